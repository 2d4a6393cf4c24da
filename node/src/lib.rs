//! `cellswarm-node`: everything that runs on a site.
//!
//! - [`cli`]: the `cellswarm` command line (thin commands over the modules below).
//! - [`site`]: creating a site folder (key, config, consortium file, data folder).
//! - [`data`]: movies in CTC layout, TIFF files, normalisation, training patches.
//! - [`synth`]: synthetic movies with exact ground truth.
//! - [`model`]: the burn U-Net and model folders (safetensors).
//! - [`train`]: local training, [`train::params`] for the model's [`Weights`], and
//!   [`train::site`], the U-Net trainer the swarm drives.
//! - [`infer`]: tiled inference and instance extraction.
//! - [`scale`]: cell width in an image, and resampling to the model's cell width.
//! - [`metrics`]: instance matching and the CTC SEG measure.
//! - [`track`]: tracking by detection with divisions and gap closing.
//! - [`measures`]: the CTC tracking measures DET, TRA, LNK and division counts.
//! - [`store`]: durable state (sled metadata, content-addressed files).
//! - [`swarm`]: the libp2p network and the round protocol.
//! - [`daemon`]: the node as a long-running process (`cellswarm run`).
//! - [`status_http`]: the `/status` and `/metrics` endpoint, and its client.
//! - [`demo`]: `cellswarm demo`, a consortium on one machine and its report.
//! - [`bench_round`]: `cellswarm bench round`, the protocol's overhead without training.
//!
//! [`Weights`]: cellswarm_common::weights::Weights
//!
//! ```no_run
//! // The binary is exactly this:
//! fn main() -> std::process::ExitCode {
//!     cellswarm_node::cli::main()
//! }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]

pub mod alloc;
pub mod bench_round;
pub mod bench_train;
pub mod cli;
pub mod daemon;
pub mod data;
pub mod demo;
pub mod infer;
pub mod measures;
pub mod metrics;
pub mod model;
pub mod scale;
pub mod site;
pub mod status_http;
pub mod store;
pub mod swarm;
pub mod synth;
pub mod track;
pub mod train;
