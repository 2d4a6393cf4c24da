//! The `cellswarm` binary: everything lives in the library's [`cellswarm_node::cli`].

/// Model-sized buffers are mapped directly (see [`cellswarm_node::alloc`]).
#[global_allocator]
static ALLOC: cellswarm_node::alloc::LargeMapped = cellswarm_node::alloc::LargeMapped;

fn main() -> std::process::ExitCode {
    cellswarm_node::cli::main()
}
