//! cellswarm's integration tests: one binary, one module per topic.

/// Helpers: running the CLI, temporary sites.
mod util;

/// The command line: keygen, init, and the files they leave behind.
mod cli;

/// Learning on one site: synth, train, segment, eval; the real movies.
mod learn;
