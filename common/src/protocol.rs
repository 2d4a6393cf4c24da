//! Protocol identifiers, in one place. Every id carries a namespace and a version.

/// The request-response protocol for models, deltas and merge records.
pub const SYNC_PROTOCOL: &str = "/cellswarm/sync/1";
/// The identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/cellswarm/id/1";
/// The gossipsub topic carrying signed round announcements.
pub const ROUND_TOPIC: &str = "cellswarm/round/v1";
/// The agent string sent with identify.
pub const AGENT: &str = concat!("cellswarm/", env!("CARGO_PKG_VERSION"));
