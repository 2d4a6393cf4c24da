//! The swarm: libp2p networking and the round protocol. Nothing here knows the model, the
//! movies or the daemon: the U-Net trainer lives in `crate::train::site`, the round
//! benchmark in `crate::bench_round`.
//!
//! - [`codec`]: the length-prefixed request-response codec with limits.
//! - [`network`]: the composed behaviour, the event loop that owns the swarm, and the
//!   [`network::NetClient`] handle.
//! - [`local`]: local training as the swarm sees it ([`local::LocalTrainer`]).
//! - [`engine`]: the round state machine.
//! - [`catchup`]: verified catch-up (records checked by `cellswarm-round`, merges recomputed).
//! - [`status`]: status snapshots and metrics.
//! - [`relay`]: `cellswarm relay`, a relay-only process for members behind NAT.

pub mod catchup;
pub mod codec;
pub mod engine;
pub mod local;
pub mod network;
pub mod relay;
pub mod secagg;
pub mod status;
pub mod verify;
