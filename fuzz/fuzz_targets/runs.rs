//! The reader of the one-shot benchmark's runs (`OneShotBenchmark::open`) on arbitrary input.
//!
//! An input that starts like a zip archive (`PK`) is opened as `all_runs.zip`; any other input
//! is the `class_labels.txt` of `run01` in a runs folder whose images exist (`run01/training/
//! class01.png` .. `class03.png`, `run01/test/item01.png` .. `item03.png`), beside a valid
//! `run02`. Every input must open or fail with an `Error`; runs that open must be consistent.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use metalearn::eval::runs::OneShotBenchmark;

/// Images named in the runs folder; their contents are never read by `open`.
const RUNS: [&str; 2] = ["run01", "run02"];
const IMAGES: [&str; 6] = [
    "training/class01.png",
    "training/class02.png",
    "training/class03.png",
    "test/item01.png",
    "test/item02.png",
    "test/item03.png",
];

struct Scratch {
    _dir: tempfile::TempDir,
    /// Folder holding run01 and run02.
    runs: PathBuf,
    /// Path for zip inputs.
    archive: PathBuf,
}

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let runs = dir.path().join("all_runs");
        for run in RUNS {
            for image in IMAGES {
                let path = runs.join(run).join(image);
                std::fs::create_dir_all(path.parent().expect("has a folder")).expect("mkdir");
                std::fs::write(&path, b"").expect("write an image");
            }
        }
        let labels: String = (1..=3)
            .map(|i| format!("run02/test/item0{i}.png run02/training/class0{i}.png\n"))
            .collect();
        std::fs::write(runs.join("run02/class_labels.txt"), labels).expect("write labels");
        let archive = dir.path().join("all_runs.zip");
        Scratch {
            _dir: dir,
            runs,
            archive,
        }
    })
}

fn check(bench: &OneShotBenchmark) {
    assert!(!bench.runs.is_empty());
    for run in &bench.runs {
        assert_eq!(
            run.training.len(),
            bench.ways(),
            "every run has the same ways"
        );
        assert!(run.training.len() >= 2);
        assert_eq!(run.answers.len(), run.test.len());
        assert!(run.answers.iter().all(|&a| a < run.training.len()));
    }
}

fn open(path: &Path) {
    if let Ok(bench) = OneShotBenchmark::open(path) {
        check(&bench);
    }
}

fuzz_target!(|data: &[u8]| {
    let scratch = scratch();
    if data.starts_with(b"PK") {
        std::fs::write(&scratch.archive, data).expect("write the archive");
        open(&scratch.archive);
    } else {
        std::fs::write(scratch.runs.join("run01/class_labels.txt"), data).expect("write labels");
        open(&scratch.runs);
    }
});
