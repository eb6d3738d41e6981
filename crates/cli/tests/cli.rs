//! End-to-end tests of the `metalearn` binary on small CSV files written to a temporary folder.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;

use common::cli::{last_json, run_err_in, run_ok_in};

/// Runs a command that must succeed; returns stdout.
fn run_ok(args: &[&str]) -> String {
    run_ok_in(args, None)
}

/// Runs a command that must fail cleanly; returns stderr.
fn run_err(args: &[&str]) -> String {
    run_err_in(args, None)
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

/// A deterministic jitter in [-0.5, 0.5).
fn jitter(i: usize, salt: usize) -> f64 {
    let h = (i * 2_654_435_761 + salt * 40_503) % 1000;
    h as f64 / 1000.0 - 0.5
}

/// Three well-separated blobs of 2-D points labelled by name.
fn blobs_csv(dir: &Path, name: &str, rows_per_class: usize) -> PathBuf {
    let centres = [
        ("setosa", 0.0, 0.0),
        ("versicolor", 4.0, 0.0),
        ("virginica", 0.0, 4.0),
    ];
    let mut csv = String::from("x1,x2,species\n");
    for i in 0..rows_per_class {
        for (c, (label, cx, cy)) in centres.iter().enumerate() {
            let k = i * 3 + c;
            csv.push_str(&format!(
                "{:.3},{:.3},{label}\n",
                cx + jitter(k, 1),
                cy + jitter(k, 2)
            ));
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, csv).unwrap();
    path
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_evaluate_predict_finetune_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = blobs_csv(dir.path(), "iris.csv", 30);
    let model = dir.path().join("model.safetensors");

    let stdout = run_ok(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "species",
        "--hidden",
        "16",
        "--epochs",
        "40",
        "--lr",
        "0.01",
        "--batch-size",
        "16",
        "--validation-split",
        "0.2",
        "--out",
        s(&model),
        "--json",
    ]);
    let summary = last_json(&stdout);
    for key in [
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "epochs",
        "train_seconds",
        "checkpoint",
    ] {
        assert!(summary.get(key).is_some(), "`{key}` missing from {summary}");
    }
    assert_eq!(summary["loss_function"], "cross_entropy");
    assert_eq!(summary["checkpoint"], s(&model));
    assert_eq!(
        num(&summary, "train_examples") + num(&summary, "val_examples"),
        90.0
    );
    assert!(num(&summary, "accuracy") >= 0.9, "{summary}");
    assert!(model.exists());

    // One JSON line per epoch beside the checkpoint.
    let log = std::fs::read_to_string(dir.path().join("model.safetensors.log.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as f64, num(&summary, "epochs"));
    assert_eq!(lines[0]["epoch"], 1);
    assert!(lines.iter().all(|l| l.get("val_loss").is_some()));

    let eval = last_json(&run_ok(&[
        "evaluate",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--json",
    ]));
    assert_eq!(num(&eval, "examples"), 90.0);
    assert!(num(&eval, "accuracy") >= 0.9, "{eval}");
    assert!(num(&eval, "loss").is_finite());

    // Features are read by name: reordered columns and an extra column are fine.
    let inputs = write(
        dir.path(),
        "new.csv",
        "extra,x2,x1\n7,0.1,0.2\n7,0.0,3.9\n7,4.1,0.1\n",
    );
    let predictions = dir.path().join("pred.csv");
    run_ok(&[
        "predict",
        "--model",
        s(&model),
        "--data",
        s(&inputs),
        "--out",
        s(&predictions),
    ]);
    let table = std::fs::read_to_string(&predictions).unwrap();
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        rows[0],
        [
            "prediction",
            "class_id",
            "prob_setosa",
            "prob_versicolor",
            "prob_virginica"
        ]
    );
    assert_eq!(rows.len(), 4);
    let predicted: Vec<&str> = rows[1..].iter().map(|r| r[0]).collect();
    assert_eq!(predicted, ["setosa", "versicolor", "virginica"]);
    for row in &rows[1..] {
        let total: f64 = row[2..].iter().map(|p| p.parse::<f64>().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{row:?}");
    }

    // Fine-tune with the first layer frozen, keeping the head.
    let tuned = dir.path().join("tuned.safetensors");
    let fine = last_json(&run_ok(&[
        "finetune",
        "--from",
        s(&model),
        "--data",
        s(&data),
        "--target",
        "species",
        "--freeze",
        "dense_1",
        "--epochs",
        "3",
        "--out",
        s(&tuned),
        "--json",
    ]));
    assert_eq!(fine["frozen_layers"], serde_json::json!(["dense_1"]));
    assert!(num(&fine, "trainable_parameters") < num(&fine, "parameters"));
    assert!(num(&fine, "accuracy") >= 0.9, "{fine}");

    // A new two-class head on a new target, training only the head.
    let relabelled: String = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if i == 0 {
                "x1,x2,side\n".to_string()
            } else {
                let x1: f64 = line.split(',').next().unwrap().parse().unwrap();
                let side = if x1 > 2.0 { "right" } else { "left" };
                let mut fields: Vec<&str> = line.split(',').take(2).collect();
                fields.push(side);
                format!("{}\n", fields.join(","))
            }
        })
        .collect();
    let sides = write(dir.path(), "sides.csv", &relabelled);
    let probe = dir.path().join("probe.safetensors");
    let probed = last_json(&run_ok(&[
        "finetune",
        "--from",
        s(&model),
        "--data",
        s(&sides),
        "--target",
        "side",
        "--new-head",
        "1",
        "--linear-probe",
        "--epochs",
        "60",
        "--lr",
        "0.05",
        "--out",
        s(&probe),
        "--json",
    ]));
    assert_eq!(probed["loss_function"], "binary_cross_entropy");
    assert!(num(&probed, "accuracy") >= 0.9, "{probed}");
    let side_predictions = dir.path().join("sides_pred.csv");
    run_ok(&[
        "predict",
        "--model",
        s(&probe),
        "--data",
        s(&sides),
        "--out",
        s(&side_predictions),
    ]);
    let header = std::fs::read_to_string(&side_predictions).unwrap();
    assert!(
        header.starts_with("prediction,class_id,prob_left,prob_right\n"),
        "{header}"
    );
}

#[test]
fn default_loss_follows_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut binary = String::from("a,b,label\n");
    let mut numeric = String::from("a,b,y\n");
    for i in 0..40 {
        let (a, b) = (jitter(i, 3) * 4.0, jitter(i, 4) * 4.0);
        binary.push_str(&format!("{a:.3},{b:.3},{}\n", u8::from(a > b)));
        numeric.push_str(&format!("{a:.3},{b:.3},{:.3}\n", 2.0 * a - b + 0.5));
    }
    let binary = write(dir.path(), "binary.csv", &binary);
    let numeric = write(dir.path(), "numeric.csv", &numeric);

    let out = dir.path().join("b.safetensors");
    let b = last_json(&run_ok(&[
        "train",
        "--data",
        s(&binary),
        "--target",
        "label",
        "--epochs",
        "2",
        "--out",
        s(&out),
        "--json",
    ]));
    assert_eq!(b["loss_function"], "binary_cross_entropy");
    assert!(b.get("accuracy").is_some());

    let out = dir.path().join("r.safetensors");
    let r = last_json(&run_ok(&[
        "train",
        "--data",
        s(&numeric),
        "--target",
        "y",
        "--epochs",
        "2",
        "--out",
        s(&out),
        "--json",
    ]));
    assert_eq!(r["loss_function"], "mse");
    assert!(r.get("mae").is_some());
    let pred = dir.path().join("r.csv");
    run_ok(&[
        "predict",
        "--model",
        s(&out),
        "--data",
        s(&numeric),
        "--out",
        s(&pred),
    ]);
    let table = std::fs::read_to_string(&pred).unwrap();
    assert!(table.starts_with("predicted_y\n"), "{table}");
    assert_eq!(table.lines().count(), 41);
}

#[test]
fn config_file_sets_options_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    blobs_csv(dir.path(), "iris.csv", 10);
    let config = write(
        dir.path(),
        "train.toml",
        "data = \"iris.csv\"\ntarget = \"species\"\nhidden = [8]\nepochs = 3\nout = \"m.safetensors\"\n",
    );
    let summary = last_json(&run_ok(&[
        "train",
        "--config",
        s(&config),
        "--epochs",
        "2",
        "--json",
    ]));
    assert_eq!(num(&summary, "epochs"), 2.0);
    assert!(dir.path().join("m.safetensors").exists());
}

#[test]
fn bad_inputs_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = blobs_csv(dir.path(), "iris.csv", 5);
    let out = dir.path().join("m.safetensors");

    let missing = dir.path().join("missing.csv");
    let stderr = run_err(&[
        "train",
        "--data",
        s(&missing),
        "--target",
        "species",
        "--out",
        s(&out),
    ]);
    assert!(stderr.contains("missing.csv"), "{stderr}");

    let stderr = run_err(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "colour",
        "--out",
        s(&out),
    ]);
    assert!(stderr.contains("colour"), "{stderr}");

    let config = write(dir.path(), "bad.toml", "epochs = 2\nlearning_rate = 0.1\n");
    let stderr = run_err(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "species",
        "--out",
        s(&out),
        "--config",
        s(&config),
    ]);
    assert!(stderr.contains("learning_rate"), "{stderr}");

    let stderr = run_err(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "species",
        "--out",
        s(&out),
        "--epochs",
        "many",
    ]);
    assert!(stderr.contains("--epochs"), "{stderr}");

    let stderr = run_err(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "species",
        "--out",
        s(&out),
        "--optimizer",
        "rmsprop",
    ]);
    assert!(stderr.contains("rmsprop"), "{stderr}");

    let stderr = run_err(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "species",
        "--out",
        s(&out),
        "--hidden",
        "8,x",
    ]);
    assert!(stderr.contains("--hidden"), "{stderr}");

    let not_a_model = write(dir.path(), "fake.safetensors", "not a checkpoint");
    let stderr = run_err(&["evaluate", "--model", s(&not_a_model), "--data", s(&data)]);
    assert!(stderr.contains("fake.safetensors"), "{stderr}");

    // None of the failures left a checkpoint behind.
    assert!(!out.exists());
}

#[test]
fn finetune_rejects_unknown_layers_and_classes() {
    let dir = tempfile::tempdir().unwrap();
    let data = blobs_csv(dir.path(), "iris.csv", 5);
    let model = dir.path().join("m.safetensors");
    run_ok(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "species",
        "--epochs",
        "1",
        "--out",
        s(&model),
        "--quiet",
    ]);
    let out = dir.path().join("t.safetensors");
    let stderr = run_err(&[
        "finetune",
        "--from",
        s(&model),
        "--data",
        s(&data),
        "--target",
        "species",
        "--freeze",
        "conv9",
        "--out",
        s(&out),
    ]);
    assert!(stderr.contains("conv9"), "{stderr}");

    let other = write(
        dir.path(),
        "other.csv",
        "x1,x2,species\n0,0,rose\n1,1,tulip\n",
    );
    let stderr = run_err(&[
        "finetune",
        "--from",
        s(&model),
        "--data",
        s(&other),
        "--target",
        "species",
        "--out",
        s(&out),
    ]);
    assert!(stderr.contains("--new-head"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn demo_xor_learns_both_tasks() {
    let stdout = run_ok(&["demo", "xor", "--json", "--literal-seeds", "3"]);
    let report = last_json(&stdout);
    assert_eq!(num(&report, "pretrain_accuracy"), 1.0);
    assert_eq!(num(&report, "finetune_accuracy"), 1.0);
    assert!(num(&report, "pretrain_loss") < num(&report, "pretrain_loss_before"));
    assert!(num(&report, "finetune_loss") < num(&report, "finetune_loss_before"));
    assert_eq!(num(&report, "literal_seeds"), 3.0);
}

#[test]
fn demo_xor_prints_each_phase() {
    let stdout = run_ok(&["demo", "xor", "--literal-seeds", "2", "--seed", "1"]);
    for needle in [
        "pre-train",
        "loaded into a fresh model",
        "fine-tune",
        "literal config",
    ] {
        assert!(stdout.contains(needle), "`{needle}` missing:\n{stdout}");
    }
}

#[test]
fn image_folder_train_evaluate_predict_finetune() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for (class, base) in [("bright", 200u8), ("dark", 30u8)] {
        let folder = images.join(class);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..6 {
            let picture = image::GrayImage::from_fn(16, 16, |x, y| {
                image::Luma([base.wrapping_add(((x * 7 + y * 3 + i * 5) % 40) as u8)])
            });
            picture.save(folder.join(format!("{i}.png"))).unwrap();
        }
    }
    let model = dir.path().join("conv.safetensors");
    let summary = last_json(&run_ok(&[
        "train",
        "--images",
        s(&images),
        "--height",
        "16",
        "--width",
        "16",
        "--channels",
        "1",
        "--filters",
        "4",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--out",
        s(&model),
        "--json",
    ]));
    assert_eq!(summary["loss_function"], "binary_cross_entropy");
    assert_eq!(num(&summary, "train_examples"), 12.0);

    let eval = last_json(&run_ok(&[
        "evaluate",
        "--model",
        s(&model),
        "--images",
        s(&images),
        "--json",
    ]));
    assert_eq!(num(&eval, "examples"), 12.0);

    let predictions = dir.path().join("pred.csv");
    run_ok(&[
        "predict",
        "--model",
        s(&model),
        "--images",
        s(&images),
        "--out",
        s(&predictions),
    ]);
    let table = std::fs::read_to_string(&predictions).unwrap();
    assert!(
        table.starts_with("prediction,class_id,prob_bright,prob_dark\n"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 13);

    let tuned = dir.path().join("tuned.safetensors");
    let fine = last_json(&run_ok(&[
        "finetune",
        "--from",
        s(&model),
        "--images",
        s(&images),
        "--linear-probe",
        "--epochs",
        "1",
        "--out",
        s(&tuned),
        "--json",
    ]));
    let frozen = fine["frozen_layers"].as_array().unwrap();
    assert!(frozen.iter().any(|l| l == "conv1") && !frozen.iter().any(|l| l == "head"));

    // A CSV model cannot read images.
    let data = blobs_csv(dir.path(), "iris.csv", 3);
    let csv_model = dir.path().join("csv.safetensors");
    run_ok(&[
        "train",
        "--data",
        s(&data),
        "--target",
        "species",
        "--epochs",
        "1",
        "--out",
        s(&csv_model),
        "--quiet",
    ]);
    let stderr = run_err(&["evaluate", "--model", s(&csv_model), "--images", s(&images)]);
    assert!(stderr.contains("--data"), "{stderr}");
}
