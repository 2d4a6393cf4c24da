//! The cellswarm round protocol's rules, as pure code: given what a node knows (its head,
//! the members, what it pooled and when), decide whether a merge record may be adopted.
//!
//! Time is an input (durations measured by the caller), never read here; nothing here
//! does I/O, and nothing here knows the model or the network. The node's driver
//! (`node/src/swarm/`) turns network and store events into calls and carries out what
//! the rules decide. One rulebook serves every path a record can take into a node: the
//! live round ([`rules::check_live`]) and catch-up ([`chain::ChainCheck`]) share
//! [`rules::check_record`]; what only a node that saw the round can check, catch-up makes
//! up for by leaving the newest record to the live round unless a commit certificate
//! ([`cert`]) vouches for it (its driver commits only records with a recomputed successor
//! or a certificate).
//!
//! [`machine`] puts the rules to work: the plain-round protocol as a deterministic state
//! machine (inputs and time in, effects out), which `tests/sim.rs` runs against liars,
//! crashes and partitions.
//!
//! See `docs/protocol.md` ("Rules every record must pass", "Outcomes, finality and fork
//! choice", "The round as a state machine") for the rules and why.

pub mod cert;
pub mod chain;
pub mod machine;
pub mod rules;
pub mod turns;

pub use cert::{Attestation, certified, threshold};
pub use chain::OwnedRules;
pub use chain::{ChainCheck, ChainError};
pub use rules::{Pooled, Position, RuleError, Rules, check_live, check_record, link, must_include};
pub use turns::{Turns, merger_order};
