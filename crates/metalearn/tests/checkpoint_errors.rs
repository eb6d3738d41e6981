//! Checkpoint files: a save/load round trip is exact and atomic, and every malformed or
//! mismatched file is rejected by both `Checkpoint::load` and `Sequential::load` with an error
//! (never a panic) that names the file and says what is wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use metalearn::{
    Checkpoint, FitOptions, Layer, Loss, Metric, OptimizerConfig, ParamSet, Sequential,
};
use rand::{Rng, SeedableRng};

/// A small trained-looking model with batch-norm (so the file holds params and buffers).
fn model() -> Sequential {
    let mut model = Sequential::builder(&[3])
        .add(Layer::dense(5))
        .add(Layer::batch_norm())
        .add(Layer::relu())
        .add(Layer::dense(2))
        .build(7)
        .unwrap();
    model
        .compile(
            OptimizerConfig::adam(0.01),
            Loss::CategoricalCrossEntropy,
            &[Metric::Accuracy],
        )
        .unwrap();
    model
}

fn inputs() -> (Tensor, Tensor) {
    let x = Tensor::new(
        &[
            [0.1f32, -0.2, 0.3],
            [1.0, 0.5, -0.5],
            [-1.0, 2.0, 0.0],
            [0.3, 0.3, 0.3],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let y = Tensor::new(&[0f32, 1., 1., 0.], &Device::Cpu).unwrap();
    (x, y)
}

fn saved_checkpoint(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("model.safetensors");
    model().save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// Both loaders reject the file; each message names the file and contains every one of
/// `expected`. Returns the `Checkpoint::load` message.
fn rejected(path: &Path, expected: &[&str]) -> String {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let by_checkpoint = Checkpoint::load(path, &Device::Cpu);
    assert!(by_checkpoint.is_err(), "Checkpoint::load accepted {name}");
    let by_model = Sequential::load(path);
    assert!(by_model.is_err(), "Sequential::load accepted {name}");
    let first = by_checkpoint.err().unwrap().to_string();
    for message in [first.clone(), by_model.err().unwrap().to_string()] {
        assert!(message.contains(&name), "message lacks the file: {message}");
        for part in expected {
            assert!(message.contains(part), "message lacks `{part}`: {message}");
        }
    }
    first
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Splits a safetensors file into its JSON header and its data.
fn split(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Writes a safetensors file from a JSON header and data (the header padded to 8 bytes).
fn join(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_string(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// The checkpoint's bytes with one metadata entry set (`Some`) or removed (`None`).
fn with_metadata(bytes: &[u8], key: &str, value: Option<&str>) -> Vec<u8> {
    let (mut header, data) = split(bytes);
    let metadata = header
        .get_mut("__metadata__")
        .and_then(|m| m.as_object_mut())
        .unwrap();
    match value {
        Some(v) => metadata.insert(key.to_string(), v.into()),
        None => metadata.remove(key),
    };
    join(&header, &data)
}

/// A valid safetensors file holding one f32 tensor `name` of `shape`, and the given metadata.
fn safetensors_file(
    name: &str,
    shape: &[usize],
    metadata: Option<BTreeMap<&str, &str>>,
) -> Vec<u8> {
    let count: usize = shape.iter().product();
    let data: Vec<u8> = (0..count).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let mut header = serde_json::Map::new();
    header.insert(
        name.to_string(),
        serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [0, data.len()] }),
    );
    if let Some(metadata) = metadata {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap(),
        );
    }
    join(&header, &data)
}

/// Saves a checkpoint whose parameters were changed by `edit`.
fn edited_checkpoint(dir: &Path, name: &str, edit: impl FnOnce(&mut Checkpoint)) -> PathBuf {
    let mut checkpoint = model().to_checkpoint().unwrap();
    edit(&mut checkpoint);
    let path = dir.join(name);
    checkpoint.save(&path).unwrap();
    path
}

#[test]
fn save_then_load_gives_identical_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = inputs();
    let mut original = model();
    original
        .fit(
            &x,
            &y,
            FitOptions::new()
                .epochs(3)
                .batch_size(2)
                .seed(3)
                .progress(false),
        )
        .unwrap();
    let path = dir.path().join("trained.safetensors");
    original.save(&path).unwrap();
    let loaded = Sequential::load(&path).unwrap();
    let before = original.predict(&x, 4).unwrap().to_vec2::<f32>().unwrap();
    let after = loaded.predict(&x, 4).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(before, after);
    assert_eq!(loaded.architecture(), original.architecture());
    assert_eq!(loaded.epochs_trained(), original.epochs_trained());
    assert!(loaded.compile_config().is_some());
    // Running statistics travel too (batch-norm in eval mode reads them).
    let buffers = |m: &Sequential| m.buffers().to_f64_vec().unwrap();
    assert_eq!(buffers(&loaded), buffers(&original));

    let checkpoint = Checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(checkpoint.params.names(), original.params().names());
    assert_eq!(
        checkpoint.params.to_f64_vec().unwrap(),
        original.params().to_f64_vec().unwrap()
    );
}

#[test]
fn save_leaves_no_temporary_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let m = model();
    m.save(&path).unwrap();
    // Overwriting an existing checkpoint is atomic too.
    m.save(&path).unwrap();
    m.to_checkpoint().unwrap().save(&path).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["m.safetensors".to_string()]);

    // A save that cannot succeed (the parent is a file) fails and leaves nothing either.
    let blocker = write(dir.path(), "not_a_folder", b"x");
    assert!(m.save(blocker.join("m.safetensors")).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn missing_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    rejected(
        &dir.path().join("absent.safetensors"),
        &["cannot read the checkpoint", "check the path"],
    );
}

#[test]
fn empty_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "empty.safetensors", b"");
    rejected(&path, &["not a metalearn checkpoint", "truncated"]);
}

#[test]
fn random_bytes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (i, len) in [1usize, 7, 8, 9, 64, 1000, 5000].into_iter().enumerate() {
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let path = write(dir.path(), &format!("random{i}.bin"), &bytes);
        rejected(&path, &["not a metalearn checkpoint"]);
        // A plausible header length followed by garbage gets past the length check.
        if len > 16 {
            let mut framed = ((len - 8) as u64).to_le_bytes().to_vec();
            framed.extend_from_slice(&bytes[8..]);
            let path = write(dir.path(), &format!("framed{i}.bin"), &framed);
            rejected(&path, &["not a metalearn checkpoint"]);
        }
    }
    let text = write(dir.path(), "notes.txt", b"just some text, not a model\n");
    rejected(&text, &["not a metalearn checkpoint"]);
}

#[test]
fn safetensors_without_metadata_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "plain.safetensors",
        &safetensors_file("w", &[2, 2], None),
    );
    rejected(&path, &["not a metalearn checkpoint", "no metadata"]);
}

#[test]
fn wrong_or_missing_format_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = BTreeMap::from([("format", "pt")]);
    let other = safetensors_file("w", &[2], Some(metadata));
    let path = write(dir.path(), "torch.safetensors", &other);
    rejected(&path, &["not a metalearn checkpoint", "`pt`"]);

    let metadata = BTreeMap::from([("author", "someone")]);
    let unmarked = safetensors_file("w", &[2], Some(metadata));
    let path = write(dir.path(), "unmarked.safetensors", &unmarked);
    rejected(
        &path,
        &["not a metalearn checkpoint", "`format` metadata is missing"],
    );

    let (_, bytes) = saved_checkpoint(dir.path());
    let path = write(
        dir.path(),
        "reformat.safetensors",
        &with_metadata(&bytes, "format", Some("x")),
    );
    rejected(&path, &["`x`"]);
}

#[test]
fn bad_format_version_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_checkpoint(dir.path());
    let newer = write(
        dir.path(),
        "newer.safetensors",
        &with_metadata(&bytes, "format_version", Some("99")),
    );
    rejected(&newer, &["version 99", "upgrade"]);
    let junk = write(
        dir.path(),
        "junk.safetensors",
        &with_metadata(&bytes, "format_version", Some("one")),
    );
    rejected(&junk, &["format_version"]);
    let none = write(
        dir.path(),
        "none.safetensors",
        &with_metadata(&bytes, "format_version", None),
    );
    rejected(&none, &["format_version"]);
}

#[test]
fn truncated_checkpoint_is_rejected_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_checkpoint(dir.path());
    let path = dir.path().join("cut.safetensors");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let message = rejected(&path, &[]);
        assert!(
            message.contains("truncated") || message.contains("not valid safetensors"),
            "length {len}: {message}"
        );
    }
    // Trailing bytes after the data are corruption too.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"garbage");
    std::fs::write(&path, &longer).unwrap();
    rejected(&path, &[]);
}

#[test]
fn tensor_with_wrong_shape_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), "shape.safetensors", |c| {
        let wrong = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        c.params.replace("dense_1.weight", wrong).unwrap();
    });
    rejected(&path, &["`dense_1.weight`", "[3, 4]", "[3, 5]"]);

    let path = edited_checkpoint(dir.path(), "buffer_shape.safetensors", |c| {
        let name = c.buffers.names()[0].clone();
        let wrong = Tensor::zeros(9, DType::F32, &Device::Cpu).unwrap();
        c.buffers.replace(&name, wrong).unwrap();
    });
    rejected(&path, &["buffer", "[9]"]);
}

#[test]
fn missing_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), "missing.safetensors", |c| {
        c.params = c.params.filter(|name| name != "dense_2.bias");
    });
    rejected(
        &path,
        &["`dense_2.bias`", "missing", "save the model again"],
    );

    let path = edited_checkpoint(dir.path(), "no_buffers.safetensors", |c| {
        c.buffers = ParamSet::new();
    });
    rejected(&path, &["buffer", "missing"]);
}

#[test]
fn extra_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), "extra.safetensors", |c| {
        let extra = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        c.params.insert("dense_9.weight", extra).unwrap();
    });
    rejected(&path, &["`dense_9.weight`", "not part of the architecture"]);

    // A tensor outside the param./buffer./state. name spaces.
    let (_, bytes) = saved_checkpoint(dir.path());
    let (mut header, mut data) = split(&bytes);
    let start = data.len();
    data.extend_from_slice(&1f32.to_le_bytes());
    header.insert(
        "stray".into(),
        serde_json::json!({ "dtype": "F32", "shape": [1], "data_offsets": [start, start + 4] }),
    );
    let path = write(dir.path(), "stray.safetensors", &join(&header, &data));
    rejected(&path, &["`stray`", "unexpected tensor"]);
}

#[test]
fn parameter_with_integer_dtype_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), "dtype.safetensors", |c| {
        let t = c
            .params
            .get("dense_2.bias")
            .unwrap()
            .to_dtype(DType::U8)
            .unwrap();
        c.params.replace("dense_2.bias", t).unwrap();
    });
    rejected(&path, &["`dense_2.bias`", "dtype"]);
}

#[test]
fn bad_architecture_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_checkpoint(dir.path());
    let cases: &[(&str, Option<&str>, &[&str])] = &[
        (
            "arch_text.safetensors",
            Some("{not json"),
            &["invalid architecture JSON"],
        ),
        (
            "arch_type.safetensors",
            Some(r#"{"input_shape":"three","layers":[]}"#),
            &["invalid architecture JSON"],
        ),
        (
            "arch_layer.safetensors",
            Some(r#"{"input_shape":[3],"layers":[{"name":"x","type":"teleport"}]}"#),
            &["invalid architecture JSON"],
        ),
        ("arch_none.safetensors", None, &["architecture"]),
        // Valid JSON that does not describe a network.
        (
            "arch_empty_input.safetensors",
            Some(r#"{"input_shape":[],"layers":[]}"#),
            &["architecture is invalid", "input shape"],
        ),
        (
            "arch_conv_on_flat.safetensors",
            Some(
                r#"{"input_shape":[3],"layers":[{"name":"c","type":"conv2d","filters":2,"kernel_size":3}]}"#,
            ),
            &["architecture is invalid", "conv2d"],
        ),
        // Sizes chosen to overflow shape arithmetic.
        (
            "arch_huge_padding.safetensors",
            Some(
                r#"{"input_shape":[1,4,4],"layers":[{"name":"c","type":"conv2d","filters":2,"kernel_size":3,"padding":9223372036854775807}]}"#,
            ),
            &["architecture is invalid"],
        ),
        (
            "arch_huge_flatten.safetensors",
            Some(
                r#"{"input_shape":[4294967296,4294967296,4294967296],"layers":[{"name":"f","type":"flatten"}]}"#,
            ),
            &["architecture is invalid"],
        ),
        (
            "arch_huge_kernel.safetensors",
            Some(
                r#"{"input_shape":[4,4294967296,4294967296],"layers":[{"name":"c","type":"conv2d","filters":1,"kernel_size":4294967296}]}"#,
            ),
            &["architecture is invalid"],
        ),
        // Valid network, but not the one the tensors belong to.
        (
            "arch_other.safetensors",
            Some(r#"{"input_shape":[4],"layers":[{"name":"dense_1","type":"dense","units":5}]}"#),
            &["`dense_1.weight`", "[3, 5]", "[4, 5]"],
        ),
    ];
    for (name, architecture, expected) in cases {
        let path = write(
            dir.path(),
            name,
            &with_metadata(&bytes, "architecture", *architecture),
        );
        rejected(&path, expected);
    }
}

#[test]
fn bad_provenance_or_section_json_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_checkpoint(dir.path());
    let path = write(
        dir.path(),
        "prov.safetensors",
        &with_metadata(&bytes, "provenance", Some("[1,")),
    );
    rejected(&path, &["provenance"]);
    let path = write(
        dir.path(),
        "section.safetensors",
        &with_metadata(&bytes, "section.training", Some("{oops")),
    );
    rejected(&path, &["section.training"]);
}

#[test]
fn unreadable_training_metadata_is_reported_not_ignored() {
    use metalearn::{Checkpoint, Layer, Loss, Metric, OptimizerConfig, Sequential};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mut model = Sequential::builder(&[2])
        .add(Layer::dense(3))
        .add(Layer::dense(1))
        .build(0)
        .unwrap();
    model
        .compile(OptimizerConfig::adam(0.01), Loss::Mse, &[Metric::Mae])
        .unwrap();
    model.save(&path).unwrap();

    for (key, value) in [
        ("compile", serde_json::json!({"optimizer": "fast"})),
        ("frozen", serde_json::json!(["no_such_layer.weight"])),
    ] {
        let mut ckpt = Checkpoint::load(&path, &candle_core::Device::Cpu).unwrap();
        ckpt.sections.get_mut("training").unwrap()[key] = value;
        let edited = dir.path().join(format!("edited-{key}.safetensors"));
        ckpt.save(&edited).unwrap();
        let err = Sequential::load(&edited)
            .err()
            .unwrap_or_else(|| panic!("an invalid `{key}` entry must be an error"))
            .to_string();
        assert!(
            err.contains(key) || err.contains("no_such_layer"),
            "{key}: {err}"
        );
    }
}
