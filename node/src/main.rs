//! The `cellswarm` binary: everything lives in the library's [`cellswarm_node::cli`].

fn main() -> std::process::ExitCode {
    cellswarm_node::cli::main()
}
