//! `cellswarm-node`: everything that runs on a site.
//!
//! - [`cli`]: the `cellswarm` command line (thin commands over the modules below).
//! - [`site`]: creating a site folder (key, config, consortium file, data folder).
//!
//! ```no_run
//! // The binary is exactly this:
//! fn main() -> std::process::ExitCode {
//!     cellswarm_node::cli::main()
//! }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]

pub mod cli;
pub mod site;
