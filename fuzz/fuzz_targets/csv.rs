//! The CSV loader on arbitrary file contents: every input must load or fail with an `Error`.
//!
//! The target column is taken from the input's first header cell, so that inputs reach the
//! row parsing as well as the header checks.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use metalearn::{load_csv, load_csv_features, load_csv_with_classes};

/// One file, rewritten for each input (the loaders take paths).
fn scratch() -> &'static (tempfile::TempDir, PathBuf) {
    static SCRATCH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("input.csv");
        (dir, path)
    })
}

/// The first cell of the first line, as a column name to ask for.
fn first_column(data: &[u8]) -> String {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let cell = line.split(|&b| b == b',').next().unwrap_or_default();
    String::from_utf8_lossy(cell).trim().to_string()
}

fuzz_target!(|data: &[u8]| {
    let (_, path) = scratch();
    std::fs::write(path, data).expect("write the input");
    let first = first_column(data);
    for target in [first.as_str(), "y"] {
        if let Ok(set) = load_csv(path, target) {
            let rows = set.x.dims()[0];
            assert_eq!(set.y.dims(), [rows], "one label per row");
            assert_eq!(set.x.dims()[1], set.feature_names.len());
            if let Some(classes) = &set.class_names {
                let ids = set.y.to_vec1::<f32>().expect("labels are f32");
                assert!(ids.iter().all(|&id| (id as usize) < classes.len()));
            }
        }
        let classes = ["a".to_string(), "b".to_string()];
        let _ = load_csv_with_classes(path, target, Some(&classes));
    }
    if let Ok(x) = load_csv_features(path, &[first.clone(), "y".to_string()]) {
        assert_eq!(x.dims()[1], 2);
    }
});
