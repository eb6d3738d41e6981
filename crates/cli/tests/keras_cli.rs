//! Keras files through the command line: `import-keras` → `predict` / `evaluate` / `finetune`
//! → `export-keras`, and the exported files read back — by metalearn always, and by Keras itself
//! when `METALEARN_KERAS_PYTHON` names a Python with Keras 3 (for example
//! `METALEARN_KERAS_PYTHON=/path/to/venv/bin/python`, with `KERAS_BACKEND=jax` if TensorFlow is
//! absent).

mod common;

use std::path::{Path, PathBuf};

use common::cli::{last_json, run_err_in, run_ok_in};
use metalearn::keras::import;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../metalearn/tests/fixtures/keras")
}

fn predictions() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("predictions.json")).unwrap())
        .unwrap()
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

/// What a metalearn model read from `file` predicts for the fixture inputs of `case`.
fn metalearn_predicts(file: &Path, architecture: Option<&Path>, case: &str) -> Vec<f64> {
    let model = import(file, architecture).unwrap();
    let x = &predictions()[case]["x"];
    let values: Vec<f32> = flat(x).iter().map(|&v| v as f32).collect();
    let rows = x.as_array().unwrap().len();
    let mut x =
        candle_core::Tensor::from_vec(values, rows * flat(&x[0]).len(), &candle_core::Device::Cpu)
            .unwrap();
    let shape = model.architecture().input_shape.clone();
    x = if let [c, h, w] = shape[..] {
        x.reshape((rows, h, w, c))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
    } else {
        x.reshape((rows, shape[0])).unwrap()
    };
    flat(
        &serde_json::to_value(
            model
                .predict(&x, 64)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap(),
        )
        .unwrap(),
    )
}

fn assert_close(found: &[f64], expected: &[f64], what: &str) {
    assert_eq!(found.len(), expected.len(), "{what}");
    let worst = found
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= 1e-5, "{what}: max difference from Keras {worst:e}");
}

#[test]
fn founding_workflow_import_finetune_export() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = fixtures();
    std::fs::write(d.join("xor.csv"), "a,b,y\n0,0,0\n0,1,1\n1,0,1\n1,1,0\n").unwrap();
    std::fs::write(d.join("new.csv"), "a,b,y\n0,0,1\n0,1,1\n1,0,0\n1,1,0\n").unwrap();
    let weights = f.join("founding_model_weights.h5");
    let arch = f.join("founding.keras");
    let out = run_ok_in(
        &[
            "import-keras",
            weights.to_str().unwrap(),
            "--architecture",
            arch.to_str().unwrap(),
            "--out",
            "imported.safetensors",
            "--json",
        ],
        Some(d),
    );
    let summary = last_json(&out);
    assert_eq!(summary["target_kind"], "binary", "{summary}");
    assert_eq!(summary["parameters"], 9, "{summary}");
    // Keras' own predictions, through predict (the label column left out with --target).
    run_ok_in(
        &[
            "predict",
            "--model",
            "imported.safetensors",
            "--data",
            "xor.csv",
            "--target",
            "y",
            "--out",
            "p.csv",
        ],
        Some(d),
    );
    let written = std::fs::read_to_string(d.join("p.csv")).unwrap();
    let expected = flat(&predictions()["founding"]["y"]);
    let probs: Vec<f64> = written
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect();
    assert_close(&probs, &expected, "predict on the imported weights");
    // Without --target the label column counts as a feature: a clear error, no output file.
    let err = run_err_in(
        &[
            "predict",
            "--model",
            "imported.safetensors",
            "--data",
            "xor.csv",
            "--out",
            "q.csv",
        ],
        Some(d),
    );
    assert!(err.contains("--target"), "{err}");
    assert!(!d.join("q.csv").exists());
    run_ok_in(
        &[
            "evaluate",
            "--model",
            "imported.safetensors",
            "--data",
            "xor.csv",
            "--target",
            "y",
        ],
        Some(d),
    );
    let tuned = last_json(&run_ok_in(
        &[
            "finetune",
            "--from",
            "imported.safetensors",
            "--data",
            "new.csv",
            "--target",
            "y",
            "--epochs",
            "300",
            "--lr",
            "0.05",
            "--out",
            "tuned.safetensors",
            "--json",
        ],
        Some(d),
    ));
    assert_eq!(
        tuned["accuracy"], 1.0,
        "fine-tuning on the new labels did not fit them: {tuned}"
    );
    for file in ["tuned.keras", "tuned.weights.h5", "tuned.h5"] {
        run_ok_in(
            &["export-keras", "tuned.safetensors", "--out", file],
            Some(d),
        );
    }
    let back = import(&d.join("tuned.h5"), None).unwrap();
    let mut tuned_arch = d.join("tuned.keras");
    let again = import(&d.join("tuned.weights.h5"), Some(&tuned_arch)).unwrap();
    assert_eq!(back.param_count(), 9);
    assert_eq!(again.param_count(), 9);
    tuned_arch.pop();
}

#[test]
fn exported_files_read_back_and_predict_like_the_keras_originals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = fixtures();
    let mut requests = Vec::new();
    for case in ["founding", "tabular", "image"] {
        let source = f.join(format!("{case}.keras"));
        let ckpt = format!("{case}.safetensors");
        run_ok_in(
            &["import-keras", source.to_str().unwrap(), "--out", &ckpt],
            Some(d),
        );
        let expected = flat(&predictions()[case]["y"]);
        for format in ["keras", "h5", "weights.h5"] {
            let file = d.join(format!("{case}.{format}"));
            run_ok_in(
                &["export-keras", &ckpt, "--out", file.to_str().unwrap()],
                Some(d),
            );
            let architecture = (format == "weights.h5").then(|| d.join(format!("{case}.keras")));
            assert_close(
                &metalearn_predicts(&file, architecture.as_deref(), case),
                &expected,
                &format!("{case}.{format} read back by metalearn"),
            );
            requests.push(serde_json::json!({
                "file": file, "x": predictions()[case]["x"],
                "weights_of": architecture, "case": case,
            }));
        }
    }
    // Keras itself, when a Python with Keras is named.
    let Some(python) = std::env::var_os("METALEARN_KERAS_PYTHON") else {
        println!("METALEARN_KERAS_PYTHON is not set: the exported files were not loaded in Keras");
        return;
    };
    let request = d.join("request.json");
    std::fs::write(&request, serde_json::to_vec(&requests).unwrap()).unwrap();
    let out = std::process::Command::new(python)
        .arg(f.join("predict_with_keras.py"))
        .arg(&request)
        .env(
            "KERAS_BACKEND",
            std::env::var("KERAS_BACKEND").unwrap_or_else(|_| "jax".into()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Value> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for (request, answer) in requests.iter().zip(&answers) {
        let case = request["case"].as_str().unwrap();
        assert_close(
            &flat(answer),
            &flat(&predictions()[case]["y"]),
            &format!("{} loaded in Keras", request["file"]),
        );
    }
}

#[test]
fn compile_settings_and_named_features_come_along() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = fixtures().join("founding.keras");
    run_ok_in(
        &[
            "import-keras",
            source.to_str().unwrap(),
            "--out",
            "m.safetensors",
        ],
        Some(d),
    );
    let ckpt =
        metalearn::Checkpoint::load(d.join("m.safetensors"), &candle_core::Device::Cpu).unwrap();
    let compile = &ckpt.section("training").unwrap()["compile"];
    assert_eq!(compile["loss"], "binary_cross_entropy", "{compile}");
    let lr = compile["optimizer"]["lr"].as_f64().unwrap();
    assert!(
        (lr - 0.05).abs() < 1e-6,
        "the Keras Adam's learning rate: {compile}"
    );
    // Feature columns by name, in any order in the file.
    std::fs::write(
        d.join("shuffled.csv"),
        "b,label,a\n0,0,0\n1,1,0\n0,1,1\n1,0,1\n",
    )
    .unwrap();
    run_ok_in(
        &[
            "predict",
            "--model",
            "m.safetensors",
            "--data",
            "shuffled.csv",
            "--features",
            "a,b",
            "--out",
            "p.csv",
        ],
        Some(d),
    );
    let probs: Vec<f64> = std::fs::read_to_string(d.join("p.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect();
    assert_close(
        &probs,
        &flat(&predictions()["founding"]["y"]),
        "predict with --features",
    );
    let err = run_err_in(
        &[
            "predict",
            "--model",
            "m.safetensors",
            "--data",
            "shuffled.csv",
            "--features",
            "a",
            "--out",
            "q.csv",
        ],
        Some(d),
    );
    assert!(err.contains("--features names 1 columns"), "{err}");
}

#[test]
fn bad_keras_input_is_refused_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("bad.h5"), "not hdf5").unwrap();
    let err = run_err_in(
        &["import-keras", "bad.h5", "--out", "x.safetensors"],
        Some(d),
    );
    assert!(err.contains("not an HDF5 file"), "{err}");
    assert!(!d.join("x.safetensors").exists());
    let f = fixtures();
    let weights = f.join("founding.weights.h5");
    let err = run_err_in(
        &[
            "import-keras",
            weights.to_str().unwrap(),
            "--out",
            "x.safetensors",
        ],
        Some(d),
    );
    assert!(err.contains("--architecture"), "{err}");
    std::fs::write(d.join("m.safetensors"), b"").unwrap();
    let err = run_err_in(
        &["export-keras", "m.safetensors", "--out", "model.pt"],
        Some(d),
    );
    assert!(err.contains(".keras"), "{err}");
}
