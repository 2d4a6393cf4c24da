//! Helpers shared by the integration test modules.

use std::path::Path;
use std::process::{Command, Output};

/// Path of the `cellswarm` binary built for these tests.
pub(crate) const CELLSWARM: &str = env!("CARGO_BIN_EXE_cellswarm-under-test");

/// Runs `cellswarm` with `args` in `cwd` and returns its output.
///
/// # Panics
/// If the binary cannot be started (a broken build, not a test outcome).
#[must_use]
pub(crate) fn cellswarm(cwd: &Path, args: &[&str]) -> Output {
    Command::new(CELLSWARM)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the cellswarm test binary starts")
}

/// Stdout of a command that must have succeeded.
///
/// # Panics
/// If the command failed; the panic shows its stderr.
#[must_use]
pub(crate) fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether python3 can import `modules` (e.g. `"tifffile, numpy"`), the oracles of a
/// test; `package` is what to install. With `CELLSWARM_REQUIRE_ORACLES=1` (CI) a missing
/// oracle fails the test instead of skipping it.
///
/// # Panics
/// If the oracle is missing and required.
#[must_use]
pub(crate) fn have_python_modules(modules: &str, package: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CELLSWARM_REQUIRE_ORACLES").is_none_or(|v| v != "1"),
            "CELLSWARM_REQUIRE_ORACLES=1 but python3 cannot import {modules} ({package})"
        );
        eprintln!("skipping: {package} not installed (pip install -r .ci/requirements.txt)");
    }
    ok
}
