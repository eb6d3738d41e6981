//! End-to-end runs of the meta-learning commands: meta-train, resume, meta-eval, adapt.

use std::path::Path;
use std::process::Command;

fn metalearn(args: &[&str], dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metalearn"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_json(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().expect("some output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

const SINE_CONFIG: &str = r#"
[task]
kind = "sinusoid"
support = 10
query = 10
test_grid = 50

[model]
arch = "mlp"
hidden = [16, 16]

[algorithm]
name = "maml"
inner_lr = 0.01
inner_steps = 1
eval_inner_steps = 5

[training]
iterations = 40
meta_batch = 4
validate_every = 20
validation_tasks = 5
checkpoint_every = 20
seed = 3

[eval]
episodes = 10
"#;

#[test]
fn meta_train_resume_eval_and_adapt_on_sinusoids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("sine.toml"), SINE_CONFIG).unwrap();

    let (ok, stdout, stderr) = metalearn(
        &[
            "meta-train",
            "--config",
            "sine.toml",
            "--out",
            "run",
            "--json",
            "--iterations",
            "20",
        ],
        d,
    );
    assert!(ok, "meta-train failed: {stderr}");
    let first = last_json(&stdout);
    assert_eq!(first["iterations"], 20);
    assert!(first["train_seconds"].as_f64().unwrap() >= 0.0);
    for file in ["best.safetensors", "latest.safetensors", "log.jsonl"] {
        assert!(d.join("run").join(file).exists(), "{file} missing");
    }

    let (ok, stdout, stderr) = metalearn(
        &[
            "meta-train",
            "--config",
            "sine.toml",
            "--out",
            "run",
            "--resume",
            "--json",
        ],
        d,
    );
    assert!(ok, "resume failed: {stderr}");
    assert_eq!(last_json(&stdout)["iterations"], 40);
    let log = std::fs::read_to_string(d.join("run/log.jsonl")).unwrap();
    assert_eq!(
        log.lines().count(),
        2,
        "one validation line per 20 iterations"
    );

    let (ok, stdout, stderr) = metalearn(
        &[
            "meta-eval",
            "--model",
            "run",
            "--episodes",
            "12",
            "--steps",
            "2",
            "--json",
        ],
        d,
    );
    assert!(ok, "meta-eval failed: {stderr}");
    let eval = last_json(&stdout);
    assert_eq!(eval["metric"], "mse");
    assert_eq!(eval["episodes"], 12);
    assert!(eval["mean"].as_f64().unwrap().is_finite());
    assert!(eval["ci95"].as_f64().unwrap() >= 0.0);

    let mut support = String::from("x,y\n");
    for i in 0..10 {
        let x = -4.0 + i as f64 * 0.8;
        support.push_str(&format!("{x},{}\n", 2.0 * (x - 0.5f64).sin()));
    }
    std::fs::write(d.join("support.csv"), &support).unwrap();
    std::fs::write(d.join("query.csv"), "x\n-1.0\n0.0\n2.5\n").unwrap();
    let (ok, stdout, stderr) = metalearn(
        &[
            "adapt",
            "--model",
            "run/latest.safetensors",
            "--support",
            "support.csv",
            "--query",
            "query.csv",
            "--target",
            "y",
            "--out",
            "pred.csv",
            "--json",
        ],
        d,
    );
    assert!(ok, "adapt failed: {stderr}");
    assert_eq!(last_json(&stdout)["query_examples"], 3);
    let pred = std::fs::read_to_string(d.join("pred.csv")).unwrap();
    let rows: Vec<&str> = pred.lines().collect();
    assert_eq!(rows[0], "prediction");
    assert_eq!(rows.len(), 4);
    assert!(rows[1..]
        .iter()
        .all(|r| r.parse::<f64>().unwrap().is_finite()));
}

#[test]
fn protonet_on_a_csv_of_classes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 12 classes of 2-D blobs, 8 rows each.
    let mut csv = String::from("a,b,label\n");
    for class in 0..12 {
        let (cx, cy) = ((class % 4) as f64 * 3.0, (class / 4) as f64 * 3.0);
        for i in 0..8 {
            let jitter = (i as f64 * 0.37).sin() * 0.3;
            csv.push_str(&format!("{},{},c{class}\n", cx + jitter, cy - jitter));
        }
    }
    std::fs::write(d.join("blobs.csv"), &csv).unwrap();
    let config = r#"
[task]
kind = "classification"
data = "blobs.csv"
target = "label"
ways = 3
shots = 2
queries = 3
split = [0.5, 0.25, 0.25]

[model]
arch = "mlp"
hidden = [16]
embedding = 8

[algorithm]
name = "protonet"

[training]
iterations = 30
meta_batch = 2
validate_every = 15
validation_tasks = 5
"#;
    std::fs::write(d.join("proto.toml"), config).unwrap();
    let (ok, stdout, stderr) = metalearn(
        &[
            "meta-train",
            "--config",
            "proto.toml",
            "--data",
            "blobs.csv",
            "--out",
            "p",
            "--json",
        ],
        d,
    );
    assert!(ok, "meta-train failed: {stderr}");
    assert_eq!(last_json(&stdout)["iterations"], 30);
    let (ok, stdout, stderr) = metalearn(
        &["meta-eval", "--model", "p", "--episodes", "20", "--json"],
        d,
    );
    assert!(ok, "meta-eval failed: {stderr}");
    let eval = last_json(&stdout);
    assert_eq!(eval["metric"], "accuracy");
    let acc = eval["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));

    // A user's own 3-way task: two examples per class in the support set.
    std::fs::write(
        d.join("support.csv"),
        "a,b,label\n0,0,x\n0.2,0.1,x\n9,0,y\n9.1,0.2,y\n0,6,z\n0.1,6.2,z\n",
    )
    .unwrap();
    std::fs::write(
        d.join("query.csv"),
        "a,b,label\n0.1,0.05,x\n8.9,0.1,y\n0.05,6.1,z\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = metalearn(
        &[
            "adapt",
            "--model",
            "p",
            "--support",
            "support.csv",
            "--query",
            "query.csv",
            "--target",
            "label",
            "--out",
            "pred.csv",
            "--json",
        ],
        d,
    );
    assert!(ok, "adapt failed: {stderr}");
    let result = last_json(&stdout);
    assert!(result["accuracy"].as_f64().is_some());
    let pred = std::fs::read_to_string(d.join("pred.csv")).unwrap();
    assert!(pred.starts_with("predicted,p_x,p_y,p_z"), "header: {pred}");
    assert_eq!(pred.lines().count(), 4);

    // A labelled query with a class the support set does not have is an error, not a silent
    // fallback to unlabelled predictions.
    std::fs::write(d.join("bad-query.csv"), "a,b,label\n0.1,0.05,w\n").unwrap();
    let (ok, _, stderr) = metalearn(
        &[
            "adapt",
            "--model",
            "p",
            "--support",
            "support.csv",
            "--query",
            "bad-query.csv",
            "--target",
            "label",
            "--out",
            "pred2.csv",
        ],
        d,
    );
    assert!(!ok, "an unknown query class must fail");
    assert!(stderr.contains("`w`"), "{stderr}");
    assert!(!d.join("pred2.csv").exists());
}

#[test]
fn meta_commands_reject_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("bad.toml"),
        SINE_CONFIG.replace("meta_batch = 4", "meta_bach = 4"),
    )
    .unwrap();
    let (ok, _, stderr) = metalearn(&["meta-train", "--config", "bad.toml", "--out", "r"], d);
    assert!(!ok);
    assert!(stderr.contains("meta_bach"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    std::fs::write(
        d.join("zero.toml"),
        SINE_CONFIG.replace("inner_lr = 0.01", "inner_lr = 0.0"),
    )
    .unwrap();
    let (ok, _, stderr) = metalearn(&["meta-train", "--config", "zero.toml", "--out", "r"], d);
    assert!(!ok);
    assert!(stderr.contains("inner_lr"), "{stderr}");

    let (ok, _, stderr) = metalearn(&["meta-eval", "--model", "missing-dir"], d);
    assert!(!ok);
    assert!(stderr.contains("missing-dir"), "{stderr}");

    std::fs::write(d.join("s.toml"), SINE_CONFIG).unwrap();
    let (ok, _, stderr) = metalearn(
        &[
            "meta-train",
            "--config",
            "s.toml",
            "--out",
            "fresh",
            "--resume",
        ],
        d,
    );
    assert!(!ok);
    assert!(stderr.contains("cannot resume"), "{stderr}");

    // --cuda without a GPU build (the tests' build) names the feature and the way out.
    if !cfg!(feature = "cuda") {
        for args in [
            &["meta-train", "--config", "s.toml", "--out", "g", "--cuda"][..],
            &["bench", "--workload", "maml-sine", "--cuda"][..],
        ] {
            let (ok, _, stderr) = metalearn(args, d);
            assert!(!ok, "{args:?} succeeded without a GPU build");
            assert!(stderr.contains("--features cuda"), "{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
        assert!(
            !d.join("g").exists(),
            "a failed --cuda run left an output folder"
        );
    }
}
