//! The `cellswarm` CLI, built in the test package for its integration tests.

fn main() -> std::process::ExitCode {
    cellswarm_node::cli::main()
}
