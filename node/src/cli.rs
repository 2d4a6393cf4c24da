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

use cellswarm_common::config::{AggregationConfig, StrategyKind};

use crate::site;

pub mod dynamics;
pub mod learn;

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
    /// Generate a synthetic movie with exact ground truth in CTC layout.
    Synth(learn::SynthArgs),
    /// Train a segmentation model on CTC movies (one site, no network).
    Train(learn::TrainArgs),
    /// Segment a movie with a trained model; writes CTC maskTTT.tif files.
    Segment(learn::SegmentArgs),
    /// Score predicted masks against ground truth (F1, AP, mean IoU, SEG; DET, TRA, LNK and
    /// divisions for a tracking result; cell-state accuracy with --states).
    Eval(learn::EvalArgs),
    /// Link instance masks into tracks with divisions; writes CTC results (maskTTT.tif,
    /// res_track.txt).
    Track(dynamics::TrackArgs),
    /// Classify each cell's state (interphase, dividing, dying); writes a CSV.
    Classify(dynamics::ClassifyArgs),
    /// Three sites training one model together on this machine, with a report: each site
    /// runs a node (libp2p over loopback) on its own synthetic movie, next to a
    /// local-only model for comparison.
    Demo(DemoArgs),
    /// Run this site's node until SIGTERM or SIGINT (the daemon).
    Run {
        /// The site file (it names the consortium file).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a relay for the consortium's members behind NAT (no model, no data, no rounds)
    /// until SIGTERM or SIGINT; only members may reserve a slot or be relayed.
    Relay {
        /// The consortium file (its members, and its other relays, may connect).
        #[arg(long)]
        consortium: PathBuf,
        /// The relay's key file (`cellswarm keygen`); list `.../p2p/<its PeerId>` in the
        /// consortium file's `relays`.
        #[arg(long)]
        key: PathBuf,
        /// Addresses to listen on.
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/7071")]
        listen: Vec<libp2p::Multiaddr>,
    },
    /// Show a running node's status (from its status endpoint).
    Status {
        /// The node's status endpoint.
        #[arg(long, default_value = "http://127.0.0.1:9460")]
        endpoint: String,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
        /// Print the Prometheus metrics instead.
        #[arg(long)]
        metrics: bool,
    },
    /// Create the consortium's starting model in this site's store and print its hash
    /// (put it in the consortium file as `genesis = "..."`).
    Genesis {
        /// The site file (it names the consortium file).
        #[arg(long)]
        config: PathBuf,
    },
    /// Measure this machine (merge throughput), to size hardware.
    Bench {
        /// What to measure.
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// Options of `cellswarm demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Real CTC sequence folders, one per site, or `synthetic:<profile>` for a synthetic
    /// site among them (default: synthetic movies).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Rounds.
    #[arg(long, default_value_t = 6)]
    pub rounds: u64,
    /// Sites.
    #[arg(long, default_value_t = 3)]
    pub sites: usize,
    /// Report folder.
    #[arg(long, default_value = "cellswarm-demo")]
    pub out: PathBuf,
    /// Seed of the synthetic movies and of training.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Optimiser steps per site per round.
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().steps)]
    pub steps: u64,
    /// Frames of each synthetic site's training movie (its held-out frames are other
    /// fields of view).
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().frames)]
    pub frames: u32,
    /// Fields of view each synthetic site is scored on (the last frame of a movie of
    /// its own each; fewer make a quicker, noisier report).
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().fields)]
    pub fields: usize,
    /// Channels of the U-Net's first level.
    #[arg(long, default_value_t = 8)]
    pub width: usize,
    /// Local differential privacy on every site: clip each round's update to this L2 norm
    /// (needs --local-dp-noise).
    #[arg(long, requires = "local_dp_noise")]
    pub local_dp_clip: Option<f64>,
    /// Local differential privacy: noise standard deviation as a multiple of the clip norm
    /// (needs --local-dp-clip).
    #[arg(long, requires = "local_dp_clip")]
    pub local_dp_noise: Option<f64>,
    /// Adam learning rate of every site (and of the local-only and pooled models).
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().learning_rate)]
    pub lr: f64,
    /// Patches per optimiser step.
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().batch)]
    pub batch: usize,
    /// Patch side in pixels (a multiple of 8).
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().patch)]
    pub patch: usize,
    /// The consortium's merge strategy, as in the consortium file (fedavg, fedadam, ...).
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().strategy)]
    pub strategy: String,
    /// Server learning rate of fedadam, fedyogi and fedadagrad.
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().server_learning_rate)]
    pub server_lr: f64,
    /// FedAvg's server step size: the model moves by this times the mean update.
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().server_step)]
    pub server_step: f64,
    /// FedProx mu of every site (0: off).
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().fedprox_mu)]
    pub fedprox_mu: f64,
    /// Train without zoom, blur and noise augmentation (for comparison).
    #[arg(long)]
    pub no_augment: bool,
    /// Keep the learning rate constant instead of decaying it over the rounds.
    #[arg(long)]
    pub constant_lr: bool,
    /// Leave site N (0-based: 0 is site-a, or the first --data movie) out of training and
    /// score every model and the classical baseline on all its annotated frames.
    #[arg(long)]
    pub unseen: Option<usize>,
    /// Cell width in pixels every model trains at; each movie is rescaled from its
    /// annotated width (0: train at the movies' own scale).
    #[arg(long, default_value_t = crate::demo::DemoOptions::default().diameter)]
    pub diameter: u32,
    /// Instance representation every model trains (`distance` or `boundary`; see
    /// `cellswarm train --help`).
    #[arg(long, default_value = "distance")]
    pub instances: cellswarm_common::config::InstanceHead,
    /// Train the swarm alone, without the local-only and pooled models it is compared
    /// with (a third of the work; for training a consortium model on this machine).
    #[arg(long)]
    pub no_baselines: bool,
    /// Privacy audit: append every message the first site's node sends (before transport
    /// encryption) to this file; see docs/security.md.
    #[arg(long)]
    pub capture_sent: Option<PathBuf>,
}

/// Things `cellswarm bench` measures.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Merge throughput on random updates, next to a parallel copy of the same bytes with
    /// the same threads, measured in the same run. The last line is
    /// `merge_gbps=X copy_gbps=Y traffic_ratio=Z`.
    Merge {
        /// Number of updates K.
        #[arg(long, default_value_t = 8)]
        updates: usize,
        /// Parameters P per update; accepts suffixes K and M (binary: 8M = 8 x 2^20).
        #[arg(long, default_value = "8M", value_parser = parse_count)]
        params: usize,
        /// Merge strategy, as in the consortium file.
        #[arg(long, default_value = "fedavg")]
        strategy: StrategyKind,
        /// Byzantine members tolerated (krum, multi-krum).
        #[arg(long, default_value_t = 1)]
        byzantine: u32,
        /// Timed repetitions of each measurement (the median is reported).
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// Also time a naive FedAvg (a weighted copy per update, then a sum).
        #[arg(long)]
        naive: bool,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Round overhead without training: N nodes in this process on loopback, each with
    /// its own libp2p swarm and sled store, a model of P parameters. The last line is
    /// `round_ms_median=X bytes_per_node_per_round=Y`.
    Round {
        /// Nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Parameters P; accepts suffixes K and M (binary: 8M = 8 x 2^20).
        #[arg(long, default_value = "1M", value_parser = parse_count)]
        params: usize,
        /// Rounds timed (after a first, untimed round that sets up connections).
        #[arg(long, default_value_t = 10)]
        rounds: u64,
    },
    /// Training and inference speed of the reference U-Net (16-32-64 + 128 bottleneck,
    /// batch 8 x 1 x 128 x 128, Adam) on this machine; the threads follow
    /// RAYON_NUM_THREADS. The last line is `train_step_ms=X infer_ms=Y peak_rss_mb=Z`
    /// (medians).
    Train {
        /// Compute device: cpu, cuda[:N] or wgpu[:N] (GPU backends need the matching
        /// build feature).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Untimed training steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed training steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Timed inference batches.
        #[arg(long, default_value_t = 20)]
        infers: usize,
    },
}

/// Parses a count with an optional binary suffix: `1000`, `64K`, `8M`.
///
/// # Errors
/// A message for anything else.
pub fn parse_count(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("expected a positive count such as 1000, 64K or 8M, got {s:?}"))
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
        Command::Demo(a) => {
            anyhow::ensure!(
                (2..=26).contains(&a.sites),
                "--sites must be between 2 and 26"
            );
            anyhow::ensure!(a.rounds >= 1, "--rounds must be at least 1");
            anyhow::ensure!(a.frames >= 2, "--frames must be at least 2");
            anyhow::ensure!(
                (1..=crate::demo::MAX_FIELDS).contains(&a.fields),
                "--fields must be between 1 and {}",
                crate::demo::MAX_FIELDS
            );
            anyhow::ensure!(
                a.batch >= 1 && a.patch >= 8 && a.patch.is_multiple_of(8),
                "--batch must be at least 1 and --patch a multiple of 8"
            );
            anyhow::ensure!(
                a.lr > 0.0 && a.lr.is_finite(),
                "--lr must be a positive number"
            );
            let options = crate::demo::DemoOptions {
                sites: a.sites,
                rounds: a.rounds,
                steps: a.steps,
                data: a.data,
                frames: a.frames,
                fields: a.fields,
                out: a.out,
                seed: a.seed,
                width: a.width,
                local_dp: a.local_dp_clip.zip(a.local_dp_noise),
                capture_sent: a.capture_sent,
                learning_rate: a.lr,
                batch: a.batch,
                patch: a.patch,
                strategy: a.strategy,
                server_learning_rate: a.server_lr,
                server_step: a.server_step,
                fedprox_mu: a.fedprox_mu,
                augment: !a.no_augment,
                lr_decay: !a.constant_lr,
                unseen: a.unseen,
                diameter: a.diameter,
                instances: a.instances,
                baselines: !a.no_baselines,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(crate::demo::run(options))?;
            Ok(())
        }
        Command::Relay {
            consortium,
            key,
            listen,
        } => {
            let c = cellswarm_common::config::ConsortiumConfig::load(&consortium)?;
            let id = cellswarm_common::identity::Identity::load_key_file(&key)
                .with_context(|| format!("reading key file {}", key.display()))?;
            let me = id.peer_id();
            let allowed: Vec<libp2p::PeerId> = c
                .members
                .iter()
                .map(|m| m.peer_id)
                .chain(c.relay_peers())
                .filter(|p| *p != me)
                .collect();
            let external: Vec<libp2p::Multiaddr> = c
                .relays
                .iter()
                .filter(|a| cellswarm_common::config::relay_peer(a) == Some(me))
                .cloned()
                .collect();
            if external.is_empty() {
                tracing::warn!(
                    "{}: no entry in `relays` names this relay ({me}); reservations will name the addresses it listens on",
                    consortium.display()
                );
            }
            let settings = crate::swarm::relay::RelaySettings {
                listen,
                external,
                allowed,
                max_connections: 256,
            };
            println!("relay {me}");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(async move {
                    let cancel = tokio_util::sync::CancellationToken::new();
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .context("installing the SIGTERM handler")?;
                    let relay = crate::swarm::relay::run(
                        id.libp2p_keypair(),
                        settings,
                        cancel.clone(),
                        |a| println!("listening on {a}/p2p/{me}"),
                    );
                    tokio::pin!(relay);
                    tokio::select! {
                        r = &mut relay => return Ok(r?),
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    cancel.cancel();
                    relay.await?;
                    anyhow::Ok(())
                })?;
            Ok(())
        }
        Command::Run { config } => {
            let config = load_config(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(crate::daemon::run_until_signal(config))?;
            Ok(())
        }
        Command::Status {
            endpoint,
            json,
            metrics,
        } => {
            let path = if metrics { "/metrics" } else { "/status" };
            let body = crate::status_http::fetch(&endpoint, path)?;
            if json || metrics {
                print!("{body}");
                return Ok(());
            }
            let v: serde_json::Value =
                serde_json::from_str(&body).context("the status endpoint did not answer JSON")?;
            print!("{}", describe_status(&v));
            Ok(())
        }
        Command::Genesis { config } => {
            let config = load_config(&config)?;
            let hash = crate::daemon::create_genesis(&config)?;
            println!("{hash}");
            Ok(())
        }
        Command::Synth(a) => learn::synth(&a),
        Command::Train(a) => learn::train(&a),
        Command::Segment(a) => learn::segment_cmd(&a),
        Command::Eval(a) => learn::eval(&a),
        Command::Track(a) => dynamics::track_cmd(&a),
        Command::Classify(a) => dynamics::classify(&a),
        Command::Bench { what } => match what {
            BenchCommand::Merge {
                updates,
                params,
                strategy,
                byzantine,
                reps,
                naive,
                threads,
            } => bench_merge(updates, params, strategy, byzantine, reps, naive, threads),
            BenchCommand::Round {
                nodes,
                params,
                rounds,
            } => bench_round(nodes, params, rounds),
            BenchCommand::Train {
                device,
                warmup,
                steps,
                infers,
            } => bench_train(&device, warmup, steps, infers),
        },
    }
}

/// A person-readable summary of a `/status` document.
#[must_use]
pub fn describe_status(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".to_owned(),
        x => x.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "peer        {}", s("peer_id"));
    let _ = writeln!(
        out,
        "round       {} ({}){}",
        s("round"),
        s("phase"),
        if v["stopped"] == true {
            ", finished"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "model       {} (after round {})",
        s("model"),
        s("head_round")
    );
    let connected = v["connected"].as_array().map(Vec::len).unwrap_or(0);
    let _ = writeln!(out, "connected   {connected} member(s)");
    for p in v["connected"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "            {}", p.as_str().unwrap_or_default());
    }
    let _ = writeln!(
        out,
        "rounds      {} completed, {} deltas accepted",
        s("rounds_completed"),
        s("deltas_accepted")
    );
    if let Some(r) = v["rejected"].as_object().filter(|r| !r.is_empty()) {
        let list: Vec<String> = r.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "rejected    {}", list.join(", "));
    }
    let rec = &v["last_record"];
    if rec.is_object() {
        let _ = writeln!(
            out,
            "last merge  round {}, {} contribution(s), strategy {}, merger candidate {}",
            rec["round"],
            rec["contributions"].as_array().map(Vec::len).unwrap_or(0),
            rec["strategy"].as_str().unwrap_or("-"),
            rec["attempt"]
        );
    }
    if let Some(eps) = v["epsilon"].as_f64() {
        let _ = writeln!(
            out,
            "local DP    epsilon {eps:.4} spent (delta {})",
            s("dp_delta")
        );
    }
    let _ = writeln!(
        out,
        "traffic     {} bytes in, {} bytes out",
        s("bytes_in"),
        s("bytes_out")
    );
    out
}

fn bench_round(nodes: usize, params: usize, rounds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (2..=64).contains(&nodes),
        "--nodes must be between 2 and 64"
    );
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    let r = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(crate::bench_round::round_overhead(nodes, params, rounds))?;
    println!("round overhead: {nodes} nodes, {params} parameters, {rounds} timed rounds");
    for (i, t) in r.rounds.iter().enumerate() {
        println!("  round {:>3}  {:>9.1} ms", i + 2, t.as_secs_f64() * 1e3);
    }
    if let Some(rss) = r.peak_rss {
        println!(
            "  peak memory of all {nodes} nodes together: {:.0} MiB",
            rss as f64 / f64::from(1u32 << 20)
        );
    }
    println!(
        "round_ms_median={:.1} bytes_per_node_per_round={:.0}",
        r.median().as_secs_f64() * 1e3,
        r.bytes_per_node_per_round
    );
    Ok(())
}

fn bench_train(device: &str, warmup: usize, steps: usize, infers: usize) -> anyhow::Result<()> {
    use crate::bench_round::median;
    use crate::bench_train::{BATCH, PATCH, run};
    anyhow::ensure!(
        (1..=10_000).contains(&steps) && (1..=10_000).contains(&infers) && warmup <= 1_000,
        "--steps and --infers must be between 1 and 10000, --warmup at most 1000"
    );
    let dev = crate::model::device_from_name(device)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into());
    println!(
        "reference U-Net 16-32-64 + 128, batch {BATCH} x 1 x {PATCH} x {PATCH}, Adam, on {device} ({threads} threads): {warmup} warm-up, {steps} timed steps, {infers} inference batches"
    );
    let r = run(&dev, warmup, steps, infers).context("setting up the reference trainer")?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let spread = |v: &[std::time::Duration]| {
        let lo = v.iter().copied().min().unwrap_or_default();
        let hi = v.iter().copied().max().unwrap_or_default();
        format!("{:.1}-{:.1} ms", ms(lo), ms(hi))
    };
    println!(
        "  training step  median {:.1} ms ({}), last loss {:.4}",
        ms(median(&r.steps)),
        spread(&r.steps),
        r.last_loss
    );
    println!(
        "  inference      median {:.1} ms per batch ({})",
        ms(median(&r.infers)),
        spread(&r.infers)
    );
    let rss = r
        .peak_rss
        .map_or_else(|| "unknown".into(), |b| format!("{:.0}", b as f64 / 1e6));
    println!(
        "train_step_ms={:.1} infer_ms={:.1} peak_rss_mb={rss}",
        ms(median(&r.steps)),
        ms(median(&r.infers))
    );
    Ok(())
}

fn load_config(path: &std::path::Path) -> anyhow::Result<cellswarm_common::config::Config> {
    Ok(cellswarm_common::config::Config::load(path)?)
}

fn bench_merge(
    k: usize,
    p: usize,
    strategy: StrategyKind,
    byzantine: u32,
    reps: usize,
    naive: bool,
    threads: Option<usize>,
) -> anyhow::Result<()> {
    use cellswarm_aggregator::{Merger, bench};
    let cfg = AggregationConfig {
        strategy,
        byzantine,
        ..AggregationConfig::default()
    };
    let mut merger = Merger::from_config(&cfg).context("configuring the merge")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .context("starting worker threads")?;
    let gib = |b: f64, t: std::time::Duration| b / t.as_secs_f64() / f64::from(1u32 << 30);
    pool.install(|| {
        eprintln!(
            "generating {k} random updates of {p} parameters ({:.2} GiB)...",
            (k * p * 4) as f64 / f64::from(1u32 << 30)
        );
        let inputs = bench::random_inputs(k, p, 1);
        println!(
            "merge {k} updates x {p} parameters, strategy {}, {} threads, median of {reps}",
            merger.name(),
            rayon::current_num_threads()
        );
        let r =
            bench::measure(&mut merger, &inputs, reps, naive).context("merging random updates")?;
        let bytes = r.input_bytes();
        println!(
            "  merge {:>10.2} ms  {:>6.2} GiB/s input read",
            r.merge.as_secs_f64() * 1e3,
            gib(bytes, r.merge)
        );
        println!(
            "  copy  {:>10.2} ms  {:>6.2} GiB/s read (and as many written)",
            r.copy.as_secs_f64() * 1e3,
            gib(bytes, r.copy)
        );
        if let (Some(t), Some(x)) = (r.naive, r.speedup_over_naive()) {
            println!(
                "  naive {:>10.2} ms  {:>6.2} GiB/s input read ({x:.1}x slower than the merge)",
                t.as_secs_f64() * 1e3,
                gib(bytes, t)
            );
        }
        println!(
            "merge_gbps={:.2} copy_gbps={:.2} traffic_ratio={:.3}",
            r.merge_gbps(),
            r.copy_gbps(),
            r.traffic_ratio()
        );
        Ok(())
    })
}
