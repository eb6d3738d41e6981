//! Running the `metalearn` binary's meta-learning commands and comparing what two runs wrote:
//! checkpoints bit for bit, JSONL logs and final JSON summaries without their wall-clock fields.

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use metalearn::Checkpoint;

pub use super::cli::last_json;

/// A `metalearn` command in `dir` with `threads` compute threads (the global `--threads`, and
/// `RAYON_NUM_THREADS` so that nothing falls back to every core).
pub fn metalearn(dir: &Path, threads: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metalearn"));
    cmd.args(args)
        .args(["--threads", &threads.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .current_dir(dir);
    cmd
}

/// Runs a command that must succeed; returns the last line of its stdout as JSON.
pub fn run_json(mut cmd: Command) -> serde_json::Value {
    let out = cmd.output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {stderr}");
    last_json(&String::from_utf8_lossy(&out.stdout))
}

/// Loads a checkpoint or fails the test with the reason.
pub fn load_checkpoint(path: &Path) -> Checkpoint {
    Checkpoint::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()))
}

/// A checkpoint's `loop` section (RNG position, best validation, recent losses) without its
/// wall-clock field.
pub fn loop_state(ckpt: &Checkpoint) -> serde_json::Value {
    let mut state = ckpt.section("loop").expect("a loop section").clone();
    let seconds = state
        .as_object_mut()
        .expect("an object")
        .remove("elapsed_seconds");
    assert!(seconds.is_some_and(|s| s.as_f64().is_some_and(|s| s >= 0.0)));
    state
}

/// The lines of a JSONL log without their wall-clock `seconds` field.
pub fn log_without_seconds(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("the log exists");
    assert!(text.is_empty() || text.ends_with('\n'), "torn last line");
    text.lines()
        .map(|line| {
            let mut value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line ({e}): {line}"));
            value.as_object_mut().expect("an object").remove("seconds");
            value
        })
        .collect()
}

/// Fields of `meta-train --json` that depend only on the computation (not on the clock, the
/// memory or the output folder).
pub const META_TRAIN_RESULTS: [&str; 7] = [
    "iterations",
    "final_meta_loss",
    "best_iteration",
    "best_val_mse",
    "best_val_mse_ci95",
    "best_val_accuracy",
    "best_val_accuracy_ci95",
];

/// Asserts that two meta-training output folders hold the same results: the latest and best
/// checkpoints' parameters, batch-norm statistics and optimiser state bit for bit, the same
/// `meta` and loop state, and the same log lines.
pub fn assert_same_meta_training(a: &Path, b: &Path) {
    for file in ["latest.safetensors", "best.safetensors"] {
        let x = load_checkpoint(&a.join(file));
        let y = load_checkpoint(&b.join(file));
        assert!(
            super::bit_identical(&x.params, &y.params),
            "{file}: parameters differ"
        );
        assert!(
            super::bit_identical(&x.buffers, &y.buffers),
            "{file}: batch-norm statistics differ"
        );
        assert!(!x.state.is_empty(), "{file}: the optimiser state is saved");
        assert!(
            super::bit_identical(&x.state, &y.state),
            "{file}: optimiser state differs"
        );
        assert_eq!(x.section("meta"), y.section("meta"), "{file}: meta differs");
        assert_eq!(loop_state(&x), loop_state(&y), "{file}: loop state differs");
    }
    let log_a = log_without_seconds(&a.join("log.jsonl"));
    assert!(!log_a.is_empty(), "the run validated at least once");
    assert_eq!(
        log_a,
        log_without_seconds(&b.join("log.jsonl")),
        "log.jsonl differs"
    );
}

/// Asserts that two `meta-train --json` summaries report the same results.
pub fn assert_same_summary(a: &serde_json::Value, b: &serde_json::Value) {
    for key in META_TRAIN_RESULTS {
        assert_eq!(a[key], b[key], "final JSON field `{key}` differs");
    }
    assert!(a["best_iteration"].is_u64(), "the run validated: {a}");
}

/// The `[task]`, `[model]` and `[algorithm]` tables of a small ProtoNet experiment: a Conv-4 of
/// width 8 on the 16x16 grey images of [`write_square_images`] in `images/`. Append a
/// `[training]` table (and `[eval]` if wanted) to make a whole config.
pub const SMALL_PROTONET_EXPERIMENT: &str = r#"
[task]
kind = "classification"
data = "images"
image_size = [16, 16]
channels = 1
ways = 3
shots = 2
queries = 2
split = [0.5, 0.25, 0.25]

[model]
arch = "conv4"
width = 8

[algorithm]
name = "protonet"
"#;

/// Grey 16x16 images, 12 classes of `per_class`: each class a bright square at its own place,
/// with pixel noise drawn from `seed` so that images of a class differ.
pub fn write_square_images(root: &Path, per_class: usize, seed: u64) {
    use rand::Rng;
    let mut rng = super::rng(seed);
    for class in 0..12u32 {
        let folder = root.join(format!("class{class}"));
        std::fs::create_dir_all(&folder).unwrap();
        let (cx, cy) = (1 + (class % 4) * 3, 1 + (class / 4) * 5);
        for i in 0..per_class {
            let image = image::GrayImage::from_fn(16, 16, |x, y| {
                let inside = (cx..cx + 5).contains(&x) && (cy..cy + 5).contains(&y);
                let base: u8 = if inside { 200 } else { 30 };
                image::Luma([base.saturating_add(rng.gen_range(0..40))])
            });
            image.save(folder.join(format!("{i}.png"))).unwrap();
        }
    }
}
