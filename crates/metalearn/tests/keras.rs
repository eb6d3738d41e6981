//! Keras files made by real Keras (tests/fixtures/keras: `make_fixtures.py`, versions in
//! `VERSIONS`) read into metalearn models that predict what Keras predicted, to 1e-5; and bad
//! files refused with clear errors.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use metalearn::keras::import;
use metalearn::Sequential;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras")
}

fn predictions() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("predictions.json")).unwrap())
        .unwrap()
}

/// Keras' inputs for `model` as a metalearn tensor (images turned channels-first) and Keras'
/// outputs, flattened.
fn case(model: &str) -> (Tensor, Vec<f64>) {
    let all = predictions();
    let x = &all[model]["x"];
    let mut values = Vec::new();
    let mut dims = Vec::new();
    fn walk(v: &Value, depth: usize, dims: &mut Vec<usize>, out: &mut Vec<f32>) {
        match v {
            Value::Array(items) => {
                if dims.len() == depth {
                    dims.push(items.len());
                }
                for item in items {
                    walk(item, depth + 1, dims, out);
                }
            }
            other => out.push(other.as_f64().unwrap() as f32),
        }
    }
    walk(x, 0, &mut dims, &mut values);
    let mut t = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu).unwrap();
    if dims.len() == 4 {
        t = t.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
    }
    let y: Vec<f64> = all[model]["y"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    (t, y)
}

fn assert_predicts_like_keras(model: &Sequential, case_name: &str, file: &str) {
    let (x, expected) = case(case_name);
    let found: Vec<f64> = model
        .predict(&x, 64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(found.len(), expected.len(), "{file}");
    let worst = found
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= 1e-5, "{file}: max |metalearn - keras| = {worst:e}");
}

#[test]
fn founding_model_in_every_format_predicts_like_keras() {
    let dir = fixtures();
    let full = Sequential::from_keras(dir.join("founding.keras")).unwrap();
    assert_predicts_like_keras(&full, "founding", "founding.keras");
    let legacy = Sequential::from_keras(dir.join("founding.h5")).unwrap();
    assert_predicts_like_keras(&legacy, "founding", "founding.h5");
    // Weights only: the architecture from the .keras file, or from a metalearn checkpoint.
    let keras_arch = dir.join("founding.keras");
    for weights in ["founding.weights.h5", "founding_model_weights.h5"] {
        let model = import(&dir.join(weights), Some(&keras_arch)).unwrap();
        assert_predicts_like_keras(&model, "founding", weights);
    }
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("founding.safetensors");
    full.save(&ckpt).unwrap();
    for weights in ["founding.weights.h5", "founding_model_weights.h5"] {
        let model = import(&dir.join(weights), Some(&ckpt)).unwrap();
        assert_predicts_like_keras(&model, "founding", weights);
    }
}

#[test]
fn functional_chains_are_read_and_other_graphs_refused() {
    let dir = fixtures();
    let chain = Sequential::from_keras(dir.join("functional.keras")).unwrap();
    assert_predicts_like_keras(&chain, "functional", "functional.keras");
    let err = Sequential::from_keras(dir.join("residual.keras"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("(Add)") && err.contains("plain chain"),
        "{err}"
    );
}

#[test]
fn tf_keras_2_files_predict_like_keras() {
    let dir = fixtures();
    let full = Sequential::from_keras(dir.join("founding_tf2.h5")).unwrap();
    assert_predicts_like_keras(&full, "founding_tf2", "founding_tf2.h5");
    // Weights by order (names like `dense/kernel:0`), the architecture from a Keras 3 file.
    let weights = import(
        &dir.join("founding_tf2_model_weights.h5"),
        Some(&dir.join("founding.keras")),
    )
    .unwrap();
    assert_predicts_like_keras(&weights, "founding_tf2", "founding_tf2_model_weights.h5");
}

#[test]
fn batch_norm_dropout_and_image_models_predict_like_keras() {
    let dir = fixtures();
    let tabular = Sequential::from_keras(dir.join("tabular.keras")).unwrap();
    assert_predicts_like_keras(&tabular, "tabular", "tabular.keras");
    let image = Sequential::from_keras(dir.join("image.keras")).unwrap();
    assert_eq!(image.architecture().input_shape, vec![1, 12, 12]);
    assert_predicts_like_keras(&image, "image", "image.keras");
}

#[test]
fn bad_files_get_clear_errors() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let err = |path: &Path, arch: Option<&Path>| import(path, arch).err().unwrap().to_string();

    let text = tmp.path().join("notes.h5");
    std::fs::write(&text, "not hdf5 at all").unwrap();
    assert!(
        err(&text, None).contains("not an HDF5 file"),
        "{}",
        err(&text, None)
    );

    let bytes = std::fs::read(dir.join("founding.h5")).unwrap();
    let truncated = tmp.path().join("truncated.h5");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let message = err(&truncated, None);
    assert!(message.contains("truncated.h5"), "{message}");

    // A .keras zip without config.json.
    let zip_path = tmp.path().join("empty.keras");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    zip.start_file("metadata.json", zip::write::SimpleFileOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut zip, b"{}").unwrap();
    zip.finish().unwrap();
    assert!(
        err(&zip_path, None).contains("no `config.json`"),
        "{}",
        err(&zip_path, None)
    );

    // Weights only, without an architecture; and against another architecture.
    let weights = dir.join("founding.weights.h5");
    assert!(
        err(&weights, None).contains("--architecture"),
        "{}",
        err(&weights, None)
    );
    let message = err(&weights, Some(&dir.join("tabular.keras")));
    assert!(message.contains("another architecture"), "{message}");
    let message = err(
        &dir.join("founding_model_weights.h5"),
        Some(&dir.join("image.keras")),
    );
    assert!(message.contains("another"), "{message}");
}

/// Damaged copies of every fixture (bytes overwritten, cut short) read or fail with an error:
/// never a panic.
#[test]
fn damaged_files_fail_with_errors_not_panics() {
    use rand::{Rng, SeedableRng};
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let arch = dir.join("founding.keras");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut failures = 0;
    for name in [
        "founding.keras",
        "founding.h5",
        "founding.weights.h5",
        "founding_model_weights.h5",
        "image.keras",
    ] {
        let original = std::fs::read(dir.join(name)).unwrap();
        for round in 0..60 {
            let mut bytes = original.clone();
            if round % 3 == 0 {
                bytes.truncate(rng.gen_range(0..bytes.len()));
            } else {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] = rng.gen();
                }
            }
            let path = tmp.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            for architecture in [None, Some(arch.as_path())] {
                let outcome = std::panic::catch_unwind(|| import(&path, architecture).map(|_| ()));
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let message = e.to_string();
                        assert!(!message.is_empty());
                        failures += 1;
                    }
                    Err(_) => panic!("{name}, round {round}: the reader panicked"),
                }
            }
        }
    }
    assert!(failures > 0, "no damaged file was refused");
}
