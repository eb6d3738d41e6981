//! Crash safety of meta-training: a run killed with SIGKILL at random moments (during a
//! meta-step, a validation, a checkpoint write, start-up) and resumed with `--resume` each time
//! ends with exactly the parameters, optimiser state, loop state, log and final metrics of a run
//! that was never interrupted.
#![cfg(unix)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::meta_runs;

/// Kills a run gets before it is allowed to finish.
const KILLS: usize = 12;
/// Fewest kills the test accepts (a fast machine may finish the run before all `KILLS`).
const MIN_KILLS: usize = 10;

/// Sinusoid MAML that takes a few seconds with one thread, checkpointing often so that kills
/// land during checkpoint writes as well as during meta-steps.
const SINE_CONFIG: &str = r#"
[task]
kind = "sinusoid"
support = 10
query = 10
test_grid = 20

[model]
arch = "mlp"
hidden = [32, 32]

[algorithm]
name = "maml"
inner_lr = 0.01
inner_steps = 2

[training]
iterations = 700
meta_batch = 5
validate_every = 40
validation_tasks = 4
checkpoint_every = 15
seed = 11
schedule = { type = "cosine", min_factor = 0.1 }
"#;

/// The `[training]` (and `[eval]`) tables appended to `meta_runs::SMALL_PROTONET_EXPERIMENT`.
const PROTONET_TRAINING: &str = r#"
[training]
iterations = 300
meta_batch = 2
validate_every = 20
validation_tasks = 3
checkpoint_every = 7
seed = 5
"#;

/// A `meta-train` command with one thread everywhere, stdout and stderr to files in `dir`.
fn meta_train(dir: &Path, out: &str, resume: bool, attempt: usize) -> Command {
    let mut args = vec![
        "meta-train",
        "--config",
        "config.toml",
        "--out",
        out,
        "--json",
        "--quiet",
    ];
    if resume {
        args.push("--resume");
    }
    let mut cmd = meta_runs::metalearn(dir, 1, &args);
    let log = |kind: &str| {
        std::fs::File::create(dir.join(format!("{out}.{attempt}.{kind}"))).expect("log file")
    };
    cmd.stdout(Stdio::from(log("stdout")))
        .stderr(Stdio::from(log("stderr")));
    cmd
}

fn output(dir: &Path, out: &str, attempt: usize, kind: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{out}.{attempt}.{kind}"))).unwrap_or_default()
}

fn check_success(status: ExitStatus, dir: &Path, out: &str, attempt: usize) {
    assert!(
        status.success(),
        "meta-train attempt {attempt} failed ({status}): {}",
        output(dir, out, attempt, "stderr")
    );
}

/// The last stdout line of an attempt, as JSON.
fn final_json(dir: &Path, out: &str, attempt: usize) -> serde_json::Value {
    meta_runs::last_json(&output(dir, out, attempt, "stdout"))
}

/// Runs to the end without interruption; returns the final JSON and the wall time.
fn uninterrupted(dir: &Path, out: &str) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let status = meta_train(dir, out, false, 0)
        .status()
        .expect("the binary runs");
    let took = started.elapsed();
    check_success(status, dir, out, 0);
    (final_json(dir, out, 0), took)
}

/// Starts the run, kills it with SIGKILL after a random delay, and restarts it with `--resume`
/// (or afresh while no checkpoint exists yet) until it finishes. Returns the final JSON and the
/// number of kills. Delays are short next to the run's length (`full_run`), so that the run
/// survives many kills, and drawn from a seeded RNG.
fn killed_and_resumed(
    dir: &Path,
    out: &str,
    full_run: Duration,
    seed: u64,
) -> (serde_json::Value, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let longest = full_run.as_secs_f64() / 25.0;
    let mut kills = 0;
    for attempt in 1..=500 {
        let resume = dir.join(out).join("latest.safetensors").exists();
        let mut child = meta_train(dir, out, resume, attempt)
            .spawn()
            .expect("the binary runs");
        let status = if kills < KILLS {
            std::thread::sleep(Duration::from_secs_f64(rng.gen_range(0.0..longest)));
            // Kills the process, or reaps it if it has just finished on its own.
            let _ = child.kill();
            child.wait().expect("wait")
        } else {
            child.wait().expect("wait")
        };
        if status.signal() == Some(9) {
            kills += 1;
            continue;
        }
        check_success(status, dir, out, attempt);
        return (final_json(dir, out, attempt), kills);
    }
    panic!("the run did not finish in 500 attempts ({kills} kills)");
}

fn kill_resume_and_compare(dir: &Path, seed: u64) {
    let (full, took) = uninterrupted(dir, "full");
    let (resumed, kills) = killed_and_resumed(dir, "resumed", took, seed);
    eprintln!("uninterrupted run: {took:?}; {kills} kills before the resumed run finished");
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the run finished"
    );
    meta_runs::assert_same_summary(&full, &resumed);
    meta_runs::assert_same_meta_training(&dir.join("full"), &dir.join("resumed"));
    let leftovers: Vec<String> = std::fs::read_dir(dir.join("resumed"))
        .expect("output folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
#[test]
fn sine_maml_killed_at_random_moments_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), SINE_CONFIG).unwrap();
    kill_resume_and_compare(dir.path(), 2024);
}

#[test]
fn protonet_on_images_killed_at_random_moments_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    meta_runs::write_square_images(&dir.path().join("images"), 5, 7);
    let config = format!(
        "{}{PROTONET_TRAINING}",
        meta_runs::SMALL_PROTONET_EXPERIMENT
    );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    kill_resume_and_compare(dir.path(), 77);
}
