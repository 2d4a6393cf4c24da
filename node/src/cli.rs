//! The `cellswarm` command line.
//!
//! This is the application edge: commands parse their arguments, call the library and
//! report errors with context through `anyhow`. The modules beneath return typed
//! `thiserror` errors.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::site;

/// Swarm learning for cell dynamics: train one model across institutions without
/// sharing a pixel.
#[derive(Debug, Parser)]
#[command(name = "cellswarm", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a node identity (a key file with mode 0600) and print its PeerId.
    Keygen {
        /// Where to write the key file; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a site folder: key, commented config, starter consortium file, data folder.
    Init {
        /// The site folder (created if missing).
        dir: PathBuf,
        /// The site's display name (letters, digits, '.', '_' and '-').
        #[arg(long)]
        name: String,
        /// TCP port the node will listen on.
        #[arg(long, default_value_t = 7070)]
        port: u16,
    },
}

/// Sets up tracing on stderr; `RUST_LOG` overrides the default filter.
pub fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,libp2p=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second initialisation (tests) is harmless.
    drop(result);
}

/// Parses the command line, runs the command and turns errors into exit code 1.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command.
///
/// # Errors
/// Whatever the command reports, with context.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let id = cellswarm_common::identity::Identity::create_key_file(&out)
                .with_context(|| format!("creating key file {}", out.display()))?;
            println!("{}", id.peer_id());
            Ok(())
        }
        Command::Init { dir, name, port } => {
            let created = site::init(&dir, &name, port)?;
            print!("{}", created.summary());
            Ok(())
        }
    }
}
