//! PyTorch `.pth` files read without Python: both of torch's layouts give the values torch saved,
//! in the file's order, and every damaged, foreign or code-carrying file is refused with an error
//! (never a panic) that names the file.
//!
//! The fixtures in `tests/fixtures/pth/` come from `make_fixtures.py` (torch 2.x); the expected
//! values are in `expected.safetensors` and the expected order in `expected_order.txt`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use metalearn::vision::pth::read_pth;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

/// Asserts that `tensors` are the fixture state dict: names in order, dtypes, shapes and values.
fn assert_expected(tensors: &[(String, Tensor)]) {
    let expected =
        candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    let order = std::fs::read_to_string(fixture("expected_order.txt")).unwrap();
    let order: Vec<&str> = order.lines().collect();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, order);
    for (name, got) in tensors {
        let want = &expected[name];
        assert_eq!(got.dtype(), want.dtype(), "{name}");
        assert_eq!(got.dims(), want.dims(), "{name}");
        let got_values = got
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let want_values = want
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(got_values, want_values, "{name}");
    }
}

fn err_of(path: &Path) -> String {
    match read_pth(path) {
        Ok(t) => panic!("{} read as {} tensors", path.display(), t.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "`{w}` missing from: {msg}");
    }
}

#[test]
fn zip_state_dict_reads_exactly() {
    let tensors = read_pth(&fixture("state_dict_zip.pth")).unwrap();
    assert_expected(&tensors);
    let dtypes: Vec<DType> = tensors.iter().map(|(_, t)| t.dtype()).collect();
    assert!(dtypes.contains(&DType::I64) && dtypes.contains(&DType::F16));
    assert!(tensors.iter().all(|(_, t)| t.device().is_cpu()));
}

#[test]
fn legacy_state_dict_reads_exactly() {
    assert_expected(&read_pth(&fixture("state_dict_legacy.pth")).unwrap());
}

#[test]
fn non_contiguous_view_keeps_its_values() {
    // `torch.arange(24).reshape(4, 6)[1:, 1:5].t()`: storage offset 7, strides (1, 6).
    let tensors = read_pth(&fixture("state_dict_legacy.pth")).unwrap();
    let (_, t) = tensors.iter().find(|(n, _)| n == "head.weight_t").unwrap();
    let rows = t.to_vec2::<f32>().unwrap();
    assert_eq!(rows[0], vec![7.0, 13.0, 19.0]);
    assert_eq!(rows[3], vec![10.0, 16.0, 22.0]);
}

#[test]
fn training_checkpoints_yield_their_state_dict() {
    // zip, under `state_dict`; legacy, under `model`.
    assert_expected(&read_pth(&fixture("checkpoint.pth")).unwrap());
    assert_expected(&read_pth(&fixture("checkpoint_legacy.pth")).unwrap());
}

#[test]
fn parameters_read_as_their_data() {
    // `state_dict(keep_vars=True)`: each tensor pickled through `_rebuild_parameter`.
    let tensors = read_pth(&fixture("parameters.pth")).unwrap();
    let expected =
        candle_core::safetensors::load(fixture("expected_parameters.safetensors"), &Device::Cpu)
            .unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["weight", "bias"]);
    for (name, got) in &tensors {
        let want = &expected[name];
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}

#[test]
fn pickled_module_is_refused_naming_its_class() {
    let path = fixture("whole_module.pth");
    let msg = err_of(&path);
    assert_mentions(
        &msg,
        &[
            "whole_module.pth",
            "`__main__.TinyNet`",
            "without executing code",
            "state_dict()",
        ],
    );
}

#[test]
fn truncated_files_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = std::fs::read(fixture("state_dict_legacy.pth")).unwrap();

    // Storage data missing: the message says how many bytes were expected.
    let path = dir.path().join("cut_storages.pth");
    std::fs::write(&path, &legacy[..legacy.len() - 100]).unwrap();
    let msg = err_of(&path);
    let expected = format!("need {} bytes", legacy.len());
    assert_mentions(
        &msg,
        &[
            "cut_storages.pth",
            "truncated",
            &expected,
            "100 bytes missing",
        ],
    );

    // Cut inside the pickles.
    let path = dir.path().join("cut_pickle.pth");
    std::fs::write(&path, &legacy[..400]).unwrap();
    assert_mentions(&err_of(&path), &["cut_pickle.pth", "truncated"]);

    // A zip file cut short loses its directory.
    let zip = std::fs::read(fixture("state_dict_zip.pth")).unwrap();
    let path = dir.path().join("cut.pth");
    std::fs::write(&path, &zip[..zip.len() / 2]).unwrap();
    assert_mentions(&err_of(&path), &["cut.pth", "truncated"]);
}

#[test]
fn short_storage_in_a_zip_says_what_was_expected() {
    use std::io::{Read, Write};
    let bytes = std::fs::read(fixture("state_dict_zip.pth")).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if name.ends_with("/data/0") {
            data.truncate(100); // conv.weight: 108 f32 = 432 bytes
        }
        writer.start_file(name, stored).unwrap();
        writer.write_all(&data).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.pth");
    std::fs::write(&path, writer.finish().unwrap().into_inner()).unwrap();
    assert_mentions(
        &err_of(&path),
        &[
            "short.pth",
            "truncated",
            "conv.weight",
            "holds 100 bytes",
            "432 bytes were expected",
        ],
    );
}

#[test]
fn every_prefix_of_a_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefix.pth");
    for name in ["state_dict_legacy.pth", "state_dict_zip.pth"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for len in 0..bytes.len() {
            std::fs::write(&path, &bytes[..len]).unwrap();
            let msg = err_of(&path);
            assert!(msg.contains("prefix.pth"), "{name}[..{len}]: {msg}");
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flipped.pth");
    let bytes = std::fs::read(fixture("state_dict_legacy.pth")).unwrap();
    // Every byte of the pickles (the first ~1.3 KB) and a sample of the data, each set to a few
    // values; the result may read (a changed value) or fail, but must not panic.
    for at in (0..bytes.len()).filter(|&i| i < 1400 || i % 37 == 0) {
        for value in [0x00, 0x01, 0x7f, 0x80, 0xff, bytes[at] ^ 0x20] {
            let mut damaged = bytes.clone();
            damaged[at] = value;
            std::fs::write(&path, &damaged).unwrap();
            if let Err(e) = read_pth(&path) {
                assert!(e.to_string().contains("flipped.pth"), "{e}");
            }
        }
    }
}

#[test]
fn foreign_and_empty_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.pth");
    let noise: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &noise).unwrap();
    let msg = err_of(&path);
    let first = format!("{:02x} {:02x}", noise[0], noise[1]);
    assert_mentions(
        &msg,
        &["noise.pth", "neither a zip archive", "legacy", &first],
    );

    let path = dir.path().join("empty.pth");
    std::fs::write(&path, b"").unwrap();
    assert_mentions(&err_of(&path), &["empty.pth", "is empty"]);

    let path = dir.path().join("missing.pth");
    assert_mentions(&err_of(&path), &["missing.pth"]);
}

/// A legacy-format file whose main pickle is `main` (protocol 2) and which has no storages.
fn legacy_file(dir: &Path, name: &str, main: &[u8]) -> PathBuf {
    let mut bytes = vec![0x80, 0x02, 0x8a, 0x0a];
    bytes.extend_from_slice(&[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
    bytes.push(b'.');
    bytes.extend_from_slice(&[0x80, 0x02, b'M', 0xe9, 0x03, b'.']); // 1001
    bytes.extend_from_slice(&[0x80, 0x02, b'}', b'.']); // sys_info: {}
    bytes.extend_from_slice(&[0x80, 0x02]);
    bytes.extend_from_slice(main);
    bytes.extend_from_slice(&[0x80, 0x02, b']', b'.']); // storage keys: []
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn hostile_pickles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    // A call of `os.system`, the classic pickle exploit.
    let path = legacy_file(
        dir,
        "exploit.pth",
        b"cos\nsystem\nX\x04\x00\x00\x00echo\x85R.",
    );
    assert_mentions(
        &err_of(&path),
        &["exploit.pth", "`os.system`", "without executing code"],
    );

    // An opcode torch never writes, and a byte that is no opcode at all.
    let path = legacy_file(dir, "inst.pth", b"(ios\nsystem\n.");
    assert_mentions(&err_of(&path), &["inst.pth", "opcode 0x69 (INST)"]);
    let path = legacy_file(dir, "junk.pth", b"\xfe.");
    assert_mentions(&err_of(&path), &["junk.pth", "opcode 0xfe"]);

    // A 10-byte integer (like the magic number) inside the state dict.
    let path = legacy_file(dir, "long.pth", b"\x8a\x0a0123456789.");
    assert_mentions(&err_of(&path), &["long.pth", "LONG1"]);

    // Nesting a million tuples deep.
    let mut deep = vec![b')'];
    deep.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    deep.push(b'.');
    let path = legacy_file(dir, "deep.pth", &deep);
    assert_mentions(&err_of(&path), &["deep.pth", "nest deeper"]);

    // Doubling an object through the memo 64 times (2^64 objects from a few hundred bytes).
    let mut bomb = b"]q\x00".to_vec();
    for _ in 0..64 {
        bomb.extend_from_slice(b"h\x00h\x00\x86q\x00");
    }
    bomb.push(b'.');
    let path = legacy_file(dir, "bomb.pth", &bomb);
    assert_mentions(&err_of(&path), &["bomb.pth", "out of proportion"]);

    // A string that claims 4 GB.
    let path = legacy_file(dir, "long_string.pth", b"X\xff\xff\xff\xff.");
    assert_mentions(&err_of(&path), &["long_string.pth", "truncated"]);

    // Stack underflows and stray marks.
    for (i, main) in [&b"R."[..], b"(t(u.", b"}(K\x01u.", b"s.", b"."]
        .iter()
        .enumerate()
    {
        let path = legacy_file(dir, &format!("stack{i}.pth"), main);
        assert_mentions(&err_of(&path), &[&format!("stack{i}.pth"), "malformed"]);
    }

    // A plain dict without tensors.
    let path = legacy_file(dir, "no_tensors.pth", b"}X\x05\x00\x00\x00epochK\x03s.");
    assert_mentions(&err_of(&path), &["no_tensors.pth", "no tensors", "`epoch`"]);
}
