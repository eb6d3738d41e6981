//! End-to-end tests of the commands that look at results: `plot` (training curves from a JSONL
//! log) and `inspect` (what a checkpoint holds), and of the global `--threads` option.

use std::path::Path;
use std::process::Output;

mod common;

use common::cli::{last_json, metalearn_in, run_err_in, run_ok_in, text};

fn metalearn(args: &[&str], dir: &Path) -> Output {
    metalearn_in(args, Some(dir))
}

/// Runs a command that must succeed; returns stdout.
fn run_ok(args: &[&str], dir: &Path) -> String {
    run_ok_in(args, Some(dir))
}

/// Runs a command that must fail cleanly (no panic, a message); returns stderr.
fn run_err(args: &[&str], dir: &Path) -> String {
    run_err_in(args, Some(dir))
}

/// A three-class CSV whose class follows the sign pattern of two features.
fn write_classes_csv(path: &Path) {
    let mut csv = String::from("x1,x2,label\n");
    for i in 0..60 {
        let x1 = ((i * 7) % 13) as f64 / 6.5 - 1.0;
        let x2 = ((i * 5) % 11) as f64 / 5.5 - 1.0;
        let label = if x1 > 0.0 {
            "up"
        } else if x2 > 0.0 {
            "left"
        } else {
            "down"
        };
        csv.push_str(&format!("{x1},{x2},{label}\n"));
    }
    std::fs::write(path, csv).unwrap();
}

const SINE_CONFIG: &str = r#"
[task]
kind = "sinusoid"
support = 5
query = 5

[model]
arch = "mlp"
hidden = [8]

[algorithm]
name = "maml"
inner_lr = 0.01
inner_steps = 1
eval_inner_steps = 2

[training]
iterations = 12
meta_batch = 2
validate_every = 4
validation_tasks = 3
seed = 5
"#;

/// Decodes a PNG and returns its size and the number of distinct colours in it.
fn png_facts(path: &Path) -> (u32, u32, usize) {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{} is not a readable PNG: {e}", path.display()))
        .to_rgb8();
    let mut colours: Vec<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    (image.width(), image.height(), colours.len())
}

#[test]
fn plot_and_inspect_a_trained_and_a_fine_tuned_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_classes_csv(&d.join("points.csv"));
    let train = last_json(&run_ok(
        &[
            "train",
            "--data",
            "points.csv",
            "--target",
            "label",
            "--hidden",
            "8",
            "--epochs",
            "4",
            "--validation-split",
            "0.25",
            "--out",
            "model.safetensors",
            "--threads",
            "1",
            "--json",
        ],
        d,
    ));
    assert_eq!(train["epochs"], 4);

    // Default output: the log's name with .png; one chart each for loss and accuracy.
    let plot = last_json(&run_ok(
        &["plot", "model.safetensors.log.jsonl", "--json"],
        d,
    ));
    assert_eq!(plot["metrics"], serde_json::json!(["loss", "accuracy"]));
    assert_eq!(plot["records"], 4);
    let png = d.join("model.safetensors.log.png");
    let (width, height, colours) = png_facts(&png);
    assert_eq!((width, height), (800, 600));
    assert_eq!(
        (plot["width"].as_u64(), plot["height"].as_u64()),
        (Some(800), Some(600))
    );
    assert!(colours > 10, "the chart looks blank ({colours} colours)");

    let only_loss = run_ok(
        &[
            "plot",
            "model.safetensors.log.jsonl",
            "--out",
            "charts/loss.png",
            "--metrics",
            "val_loss",
        ],
        d,
    );
    assert!(only_loss.contains("charts/loss.png"), "{only_loss}");
    assert_eq!(png_facts(&d.join("charts/loss.png")).1, 300);

    // 2 inputs → 8 hidden → 3 classes.
    let expected_total = 2 * 8 + 8 + 8 * 3 + 3;
    let info = last_json(&run_ok(&["inspect", "model.safetensors", "--json"], d));
    assert_eq!(info["kind"], "supervised");
    assert_eq!(info["format_version"], 1);
    assert_eq!(info["parameters"]["total"], expected_total);
    assert_eq!(info["parameters"]["trainable"], expected_total);
    assert_eq!(info["parameters"]["frozen"], 0);
    assert_eq!(info["progress"]["epochs"], 4);
    let file_bytes = std::fs::metadata(d.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(info["file_bytes"].as_u64(), Some(file_bytes));
    let layers = info["architecture"]["layers"].as_array().unwrap();
    let per_layer: u64 = layers
        .iter()
        .map(|l| l["parameters"].as_u64().unwrap())
        .sum();
    assert_eq!(per_layer, expected_total as u64);
    assert_eq!(
        layers.last().unwrap()["output_shape"],
        serde_json::json!([3])
    );
    assert_eq!(info["optimizer"]["type"], "adam");
    assert!(info["data"]["source"]
        .as_str()
        .unwrap()
        .contains("points.csv"));

    let human = run_ok(&["inspect", "model.safetensors"], d);
    for expected in [
        "dense, 8 units",
        "head",
        &format!("{expected_total} total"),
        "adam",
        "cross_entropy",
        "4 epochs",
        "points.csv",
        "version 1",
    ] {
        assert!(human.contains(expected), "`{expected}` missing:\n{human}");
    }

    // Freezing the first layer shows up as frozen parameters.
    run_ok(
        &[
            "finetune",
            "--from",
            "model.safetensors",
            "--data",
            "points.csv",
            "--target",
            "label",
            "--freeze",
            "0",
            "--epochs",
            "1",
            "--out",
            "tuned.safetensors",
            "--quiet",
        ],
        d,
    );
    let tuned = last_json(&run_ok(&["inspect", "tuned.safetensors", "--json"], d));
    let first_layer = 2 * 8 + 8;
    assert_eq!(tuned["parameters"]["frozen"], first_layer);
    assert_eq!(
        tuned["parameters"]["trainable"],
        expected_total - first_layer
    );
    let human = run_ok(&["inspect", "tuned.safetensors"], d);
    assert!(human.contains("(frozen)"), "{human}");
    assert!(d.join("tuned.safetensors.log.jsonl").exists());
    run_ok(&["plot", "tuned.safetensors.log.jsonl"], d);
    assert_eq!(
        png_facts(&d.join("tuned.safetensors.log.png")).0,
        800,
        "fine-tuning logs plot too"
    );
}

#[test]
fn plot_and_inspect_a_meta_trained_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("sine.toml"), SINE_CONFIG).unwrap();
    run_ok(
        &[
            "--threads",
            "1",
            "meta-train",
            "--config",
            "sine.toml",
            "--out",
            "run",
            "--quiet",
        ],
        d,
    );
    let log = std::fs::read_to_string(d.join("run/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "one line per validation");

    // The folder stands for its log; meta-loss and validation MSE get one chart each.
    let plot = last_json(&run_ok(&["plot", "run", "--out", "meta.png", "--json"], d));
    assert_eq!(plot["metrics"], serde_json::json!(["meta_loss", "mse"]));
    assert_eq!(plot["x"], "iteration");
    let (width, height, colours) = png_facts(&d.join("meta.png"));
    assert_eq!((width, height), (800, 600));
    assert!(colours > 10, "the chart looks blank ({colours} colours)");
    run_ok(
        &[
            "plot",
            "run/log.jsonl",
            "--metrics",
            "mse,lr",
            "--out",
            "m.png",
        ],
        d,
    );
    assert_eq!(png_facts(&d.join("m.png")).1, 600);

    let info = last_json(&run_ok(&["inspect", "run/best.safetensors", "--json"], d));
    assert_eq!(info["kind"], "meta-learning");
    assert_eq!(info["algorithm"], "maml");
    assert_eq!(info["hyper_parameters"]["inner_lr"], 0.01);
    assert_eq!(info["hyper_parameters"]["eval_inner_steps"], 2);
    // 1 input → 8 hidden → 1 output.
    assert_eq!(info["parameters"]["total"], 8 + 8 + 8 + 1);
    assert_eq!(info["task"]["kind"], "sinusoid");
    assert!(info["state"]["optim"]["values"].as_u64().unwrap() > 0);

    let latest = run_ok(&["inspect", "run/latest.safetensors"], d);
    for expected in [
        "maml",
        "inner_lr=0.01",
        "meta-iteration 12",
        "25 total",
        "optimiser moments",
        "sinusoid",
    ] {
        assert!(latest.contains(expected), "`{expected}` missing:\n{latest}");
    }
    // A meta-train folder stands for its best checkpoint.
    let folder = last_json(&run_ok(&["inspect", "run", "--json"], d));
    assert!(folder["path"]
        .as_str()
        .unwrap()
        .ends_with("best.safetensors"));
}

#[test]
fn plot_and_inspect_reject_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let err = run_err(&["plot", "missing.jsonl"], d);
    assert!(err.contains("missing.jsonl"), "{err}");

    std::fs::write(d.join("empty.jsonl"), "\n").unwrap();
    let err = run_err(&["plot", "empty.jsonl"], d);
    assert!(err.contains("empty"), "{err}");

    std::fs::write(
        d.join("broken.jsonl"),
        "{\"epoch\": 1, \"loss\": 0.5}\n{\"epoch\": 2, \"loss\": 0.4\n",
    )
    .unwrap();
    let err = run_err(&["plot", "broken.jsonl"], d);
    assert!(err.contains("broken.jsonl:2"), "{err}");
    assert!(!d.join("broken.png").exists(), "no image from a bad log");

    std::fs::write(d.join("words.jsonl"), "{\"epoch\": 1, \"note\": \"hi\"}\n").unwrap();
    let err = run_err(&["plot", "words.jsonl"], d);
    assert!(err.contains("no numeric series"), "{err}");

    std::fs::write(d.join("ok.jsonl"), "{\"epoch\": 1, \"loss\": 0.5}\n").unwrap();
    let err = run_err(&["plot", "ok.jsonl", "--metrics", "accuracy"], d);
    assert!(
        err.contains("accuracy") && err.contains("loss"),
        "names the unknown metric and the known ones: {err}"
    );
    let err = run_err(&["plot", "ok.jsonl", "--out", "ok.jpg"], d);
    assert!(err.contains(".png"), "{err}");

    let err = run_err(&["inspect", "nothing.safetensors"], d);
    assert!(err.contains("nothing.safetensors"), "{err}");
    std::fs::write(d.join("fake.safetensors"), b"not a checkpoint").unwrap();
    let err = run_err(&["inspect", "fake.safetensors"], d);
    assert!(err.contains("not a metalearn checkpoint"), "{err}");
}

#[test]
fn threads_must_be_a_positive_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("ok.jsonl"), "{\"epoch\": 1, \"loss\": 0.5}\n").unwrap();
    run_ok(&["plot", "ok.jsonl", "--threads", "1"], d);
    run_ok(&["--threads", "2", "plot", "ok.jsonl"], d);

    for bad in ["0", "two"] {
        let out = metalearn(&["plot", "ok.jsonl", "--threads", bad], d);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
        assert!(stderr.contains("--threads"), "{stderr}");
    }
    let stderr = text(&metalearn(&["--threads", "0", "meta-eval", "--model", "x"], d).stderr);
    assert!(stderr.contains("at least 1"), "{stderr}");
    let stderr = text(&metalearn(&["train", "--threads", "two"], d).stderr);
    assert!(stderr.contains("not a whole number"), "{stderr}");

    // Every computing command accepts it.
    for command in [
        "train",
        "finetune",
        "evaluate",
        "predict",
        "meta-train",
        "meta-eval",
        "adapt",
        "eval-runs",
        "demo",
    ] {
        let help = run_ok(&[command, "--help"], d);
        assert!(help.contains("--threads"), "{command} --help:\n{help}");
    }
}

/// `--threads N` sizes every pool, the one that runs backward passes included (it was once
/// built with one thread per core before the option was read, so `--threads 1` used two cores).
#[test]
fn threads_size_every_pool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in [1usize, 3] {
        let n_text = n.to_string();
        let report = last_json(&run_ok(
            &[
                "--threads",
                &n_text,
                "bench",
                "--workload",
                "maml-sine",
                "--iterations",
                "1",
                "--json",
            ],
            d,
        ));
        assert_eq!(report["threads"], n, "{report}");
        assert_eq!(report["backward_threads"], n, "{report}");
    }
}
