//! Running the `metalearn` binary from tests: success and clean-failure checks, and the JSON
//! summary line.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs `metalearn args` (in `dir` when given) on one compute thread.
pub fn metalearn_in(args: &[&str], dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metalearn"));
    cmd.args(args).env("RAYON_NUM_THREADS", "1");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.output().expect("the metalearn binary runs")
}

/// Bytes of a process stream as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok_in(args: &[&str], dir: Option<&Path>) -> String {
    let out = metalearn_in(args, dir);
    assert!(
        out.status.success(),
        "metalearn {args:?} failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a command that must fail cleanly (no panic, an error message); returns stderr.
pub fn run_err_in(args: &[&str], dir: Option<&Path>) -> String {
    let out = metalearn_in(args, dir);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "metalearn {args:?} should fail:\n{}",
        text(&out.stdout)
    );
    // 101 is Rust's exit status after a panic.
    assert_ne!(out.status.code(), Some(101), "panic exit status:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    assert!(stderr.contains("error"), "no error message:\n{stderr}");
    stderr
}

/// The last non-blank line of stdout, parsed as one JSON object.
pub fn last_json(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .expect("stdout has a line");
    let value: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {line}"));
    assert!(value.is_object(), "not an object: {line}");
    value
}
