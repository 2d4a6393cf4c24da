//! `cellswarm-aggregator`: merging a base model and a set of verified updates into the
//! next model. Pure computation: no I/O, no tokio, no burn, no libp2p.
//!
//! - [`Update`]: one member's verified delta with its signer, hash, base and sample count.
//! - [`Strategy`]: how updates combine — [`FedAvg`] (weighted or not), [`Median`],
//!   [`TrimmedMean`], [`Krum`] and Multi-Krum.
//! - [`ServerOptimizer`]: plain `x + g`, or FedAdam, FedYogi and FedAdagrad with moments
//!   carried between rounds.
//! - [`Merger`]: the pipeline (validate, clip, select, aggregate, central-DP noise, server
//!   step) with explicit state commits and serialisable state.
//! - [`dp`]: the reproducible Gaussian noise and the RDP accountant.
//! - [`masking`]: secure-aggregation fixed point and pairwise masks.
//!
//! Determinism: updates are sorted by signer before anything else, and the parameter
//! vector is processed in fixed chunks whose results depend only on their own inputs, so
//! the output bytes depend neither on the order updates arrive in nor on the number of
//! threads.
//!
//! ```no_run
//! use cellswarm_aggregator::{Merger, Update};
//! use cellswarm_common::config::AggregationConfig;
//! use cellswarm_common::ids::RoundId;
//! # fn run(base: cellswarm_common::weights::Weights, updates: Vec<Update>) -> Result<(), Box<dyn std::error::Error>> {
//! let mut merger = Merger::from_config(&AggregationConfig::default())?;
//! let merged = merger.merge(&base, base.hash(), &updates, RoundId(1))?;
//! println!("round 1 model {}", merged.hash);
//! merger.commit(merged.outcome.next_state);
//! # Ok(()) }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]

pub mod bench;
pub mod dp;
pub mod error;
pub mod kernels;
pub mod masking;
pub mod merger;
pub mod server;
pub mod strategy;
pub mod update;

pub use error::AggregateError;
pub use merger::{CentralDp, Merged, Merger, MergerState, Outcome};
pub use server::{Adaptive, AdaptiveParams, ServerOptimizer};
pub use strategy::{FedAvg, Krum, Median, Selection, Strategy, TrimmedMean, clipped_counts};
pub use update::{Update, View};
