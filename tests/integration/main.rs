//! cellswarm's integration tests: one binary, one module per topic.

/// Helpers: running the CLI, temporary sites.
mod util;

/// The command line: keygen, init, and the files they leave behind.
mod cli;

/// Learning on one site: synth, train, segment, eval; the real movies.
mod learn;

/// Swarm test harness: consortium files, in-process nodes, node processes, log events.
mod swarm_util;

/// The swarm in process: convergence, bad members, robust merging, damaged stores.
mod swarm;

/// The swarm as processes: killed members and mergers, graceful stops.
mod swarm_process;

/// Members behind NAT: relays, relayed and hole-punched connections.
mod nat;

/// Across real network boundaries: sites behind NATs in network namespaces.
mod netns;

/// `cellswarm demo` end to end.
mod demo;

/// Movies as labs have them: OME-TIFF in and out, against tifffile.
mod formats;

/// Cell dynamics: tracking, the CTC measures against py-ctcmetrics, the bacteria movie.
mod tracking;

/// Privacy: local differential privacy end to end, and the canary test (no pixel or file
/// name leaves a node).
mod privacy;

/// Hostile bytes: seeded mutations through every decode-and-verify path, with allocations
/// measured.
mod hostile;

/// Crashes: a member killed with SIGKILL at random moments, hundreds of times.
mod crash;

/// Resource exhaustion: a member flooding a node with connections, streams and bad frames.
mod exhaustion;

/// Secure aggregation: masked merges, a masked delta's secrecy, dropouts, refusals.
mod secagg;

/// The round protocol against lying members: forged catch-up chains, far-ahead claims.
mod trust;
