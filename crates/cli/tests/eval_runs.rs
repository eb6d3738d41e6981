//! The Omniglot one-shot benchmark: reading the "20 runs" format, scoring ProtoNet and
//! MAML-family checkpoints through `eval-runs`, and errors naming the file and line.

use std::io::Read;
use std::path::{Path, PathBuf};

mod common;

use candle_core::DType;
use common::cli::{last_json, run_err_in, run_ok_in};
use metalearn::data::omniglot::Resample;
use metalearn::eval::runs::{evaluate_runs, learner_for_ways, OneShotBenchmark, RunsOptions};
use metalearn::experiment::ExperimentConfig;
use metalearn::meta::learner::MetaLearner;
use metalearn::{Checkpoint, OptimizerConfig};

const WAYS: usize = 20;

/// `WAYS` distinct 105x105 drawings: from the shared minimal Omniglot split when present (the
/// first drawing of its first characters), else generated (a black bar per class on white).
fn drawings() -> Vec<Vec<u8>> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/omniglot/images_background_small1.zip");
    if let Ok(file) = std::fs::File::open(&shared) {
        let mut zip = zip::ZipArchive::new(file).unwrap();
        let mut names: Vec<String> = zip
            .file_names()
            .map(|n| n.unwrap().into_owned())
            .filter(|n| n.ends_with("_01.png"))
            .collect();
        names.sort();
        return names
            .iter()
            .take(WAYS)
            .map(|n| {
                let mut bytes = Vec::new();
                zip.by_name(n).unwrap().read_to_end(&mut bytes).unwrap();
                bytes
            })
            .collect();
    }
    println!(
        "shared Omniglot data not found at {}; using generated drawings",
        shared.display()
    );
    (0..WAYS)
        .map(|k| {
            let mut img = image::GrayImage::from_pixel(105, 105, image::Luma([255u8]));
            for y in 0..105 {
                for x in (5 * k as u32)..(5 * k as u32 + 4) {
                    if !(y as usize + k).is_multiple_of(3) {
                        img.put_pixel(x, y, image::Luma([0]));
                    }
                }
            }
            let mut bytes = Vec::new();
            img.write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
            bytes
        })
        .collect()
}

/// Writes `runs` runs in the official format. Test item `m` of a run is an exact copy of the
/// training image of class `(m * 7 + run) % WAYS`; with `mislabel`, every line pairs it with the
/// next class instead (so a perfect matcher is always wrong).
fn write_runs(root: &Path, runs: usize, mislabel: bool) {
    let images = drawings();
    for r in 1..=runs {
        let run = format!("run{r:02}");
        std::fs::create_dir_all(root.join(&run).join("training")).unwrap();
        std::fs::create_dir_all(root.join(&run).join("test")).unwrap();
        let mut lines = String::new();
        for (k, image) in images.iter().enumerate() {
            std::fs::write(
                root.join(format!("{run}/training/class{:02}.png", k + 1)),
                image,
            )
            .unwrap();
        }
        for m in 0..WAYS {
            let class = (m * 7 + r) % WAYS;
            std::fs::write(
                root.join(format!("{run}/test/item{:02}.png", m + 1)),
                &images[class],
            )
            .unwrap();
            let listed = if mislabel { (class + 1) % WAYS } else { class };
            lines.push_str(&format!(
                "{run}/test/item{:02}.png {run}/training/class{:02}.png\n",
                m + 1,
                listed + 1
            ));
        }
        std::fs::write(root.join(format!("{run}/class_labels.txt")), lines).unwrap();
    }
}

/// A freshly initialised meta-learner saved as a checkpoint with its experiment config.
fn checkpoint(dir: &Path, algorithm: &str, arch: &str, ways: usize) -> PathBuf {
    let toml = format!(
        r#"
[task]
kind = "classification"
data = "unused"
ways = {ways}
resample = "area"

[model]
arch = "{arch}"
width = 8
hidden = [32]

[algorithm]
name = "{algorithm}"
eval_inner_steps = 2
"#
    );
    let config = ExperimentConfig::from_toml(&toml).unwrap();
    let arch = config.architecture(&[1, 28, 28]).unwrap();
    let learner = MetaLearner::new(
        &arch,
        config.algorithm.clone(),
        config.task_kind().unwrap(),
        OptimizerConfig::adam(1e-3),
        7,
        DType::F32,
    )
    .unwrap();
    let mut ckpt = learner.to_checkpoint().unwrap();
    ckpt.sections
        .insert("experiment".into(), serde_json::to_value(&config).unwrap());
    let path = dir.join(format!("{algorithm}-{ways}.safetensors"));
    ckpt.save(&path).unwrap();
    path
}

/// The `eval-runs` command line for `model` on `runs`, followed by `extra`.
fn eval_runs_args<'a>(model: &'a Path, runs: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "eval-runs",
        "--model",
        model.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn runs_format_is_read_with_sorted_classes_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    write_runs(dir.path(), 2, false);
    let bench = OneShotBenchmark::open(dir.path()).unwrap();
    assert_eq!(bench.ways(), WAYS);
    assert_eq!(bench.runs.len(), 2);
    let run = &bench.runs[1];
    assert_eq!(run.name, "run02");
    assert_eq!(run.training[0].path, "run02/training/class01.png");
    assert_eq!(run.test.len(), WAYS);
    for (m, answer) in run.answers.iter().enumerate() {
        assert_eq!(*answer, (m * 7 + 2) % WAYS);
    }
    // A folder holding the runs folder (as the archive unpacks) works too.
    let outer = tempfile::tempdir().unwrap();
    write_runs(&outer.path().join("all_runs"), 1, false);
    assert_eq!(OneShotBenchmark::open(outer.path()).unwrap().runs.len(), 1);
}

#[test]
fn protonet_matches_exact_copies_and_any_ways_work() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    write_runs(&runs, 3, false);
    // Meta-trained for 5 ways: ProtoNet has no head, so 20-way runs are fine.
    let model = checkpoint(dir.path(), "protonet", "conv4", 5);
    let json = last_json(&run_ok_in(
        &eval_runs_args(&model, &runs, &["--json"]),
        None,
    ));
    // Every test image is a copy of its class's training image: nearest prototype is exact.
    assert_eq!(json["error_percent"], 0.0, "{json}");
    assert_eq!(json["per_run"].as_array().unwrap().len(), 3);
    assert_eq!(json["ways"], 20);
    assert_eq!(json["test_images"], 60);
    assert_eq!(json["test_time_shifts"], false);

    // Test-time shifts embed a copy exactly as its original, so copies still match.
    let json = last_json(&run_ok_in(
        &eval_runs_args(&model, &runs, &["--test-time-shifts", "--json"]),
        None,
    ));
    assert_eq!(json["error_percent"], 0.0, "{json}");
    assert_eq!(json["test_time_shifts"], true);

    // With every pairing shifted by one class, the same matcher is always wrong.
    let wrong = dir.path().join("wrong");
    write_runs(&wrong, 2, true);
    let json = last_json(&run_ok_in(
        &eval_runs_args(&model, &wrong, &["--json"]),
        None,
    ));
    assert_eq!(json["error_percent"], 100.0, "{json}");
    assert_eq!(json["per_run"], serde_json::json!([100.0, 100.0]));

    // The text output lists each run and the mean, and says how ProtoNet classifies (it takes
    // no adaptation steps).
    let text = run_ok_in(&eval_runs_args(&model, &runs, &[]), None);
    assert!(
        text.contains("run03: 0.0% error")
            && text.contains("mean error")
            && text.contains("nearest prototype")
            && !text.contains("adaptation step"),
        "{text}"
    );
}

#[test]
fn maml_family_needs_a_twenty_way_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    write_runs(&runs, 2, false);
    let five = checkpoint(dir.path(), "maml", "mlp", 5);
    let err = run_err_in(&eval_runs_args(&five, &runs, &[]), None);
    assert!(err.contains("5-way") && err.contains("20"), "{err}");

    let twenty = checkpoint(dir.path(), "maml", "mlp", 20);
    let json = last_json(&run_ok_in(
        &eval_runs_args(&twenty, &runs, &["--steps", "1", "--json"]),
        None,
    ));
    let per_run: Vec<f64> = json["per_run"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(per_run.len(), 2);
    assert!(per_run.iter().all(|e| (0.0..=100.0).contains(e)));
    let mean = per_run.iter().sum::<f64>() / 2.0;
    assert!((json["error_percent"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert_eq!(json["steps"], 1);
}

#[test]
fn library_api_scores_runs_from_a_zip() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("all_runs");
    write_runs(&runs, 1, false);
    // Pack the runs below an `all_runs/` folder, as an archive might.
    let zip_path = dir.path().join("all_runs.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    let options = zip::write::SimpleFileOptions::default();
    for sub in ["training", "test", ""] {
        let folder = runs.join("run01").join(sub);
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            if entry.path().is_file() {
                let name = entry.path().strip_prefix(dir.path()).unwrap().to_owned();
                zip.start_file(name.to_string_lossy(), options).unwrap();
                std::io::Write::write_all(&mut zip, &std::fs::read(entry.path()).unwrap()).unwrap();
            }
        }
    }
    zip.finish().unwrap();
    let bench = OneShotBenchmark::open(&zip_path).unwrap();
    let model = checkpoint(dir.path(), "protonet", "conv4", 20);
    let ckpt = Checkpoint::load(&model, &candle_core::Device::Cpu).unwrap();
    let learner = learner_for_ways(&ckpt, bench.ways()).unwrap();
    let report = evaluate_runs(
        &learner,
        &bench,
        &RunsOptions {
            resample: Resample::Area,
            steps: None,
        },
    )
    .unwrap();
    assert_eq!(report.runs, vec!["run01"]);
    assert_eq!(report.error_percent, 0.0);
}

#[test]
fn malformed_runs_are_errors_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = checkpoint(dir.path(), "protonet", "conv4", 5);
    let run_eval = |runs: &Path| run_err_in(&eval_runs_args(&model, runs, &[]), None);

    // Missing class_labels.txt.
    let missing_labels = dir.path().join("missing_labels");
    write_runs(&missing_labels, 2, false);
    std::fs::remove_file(missing_labels.join("run02/class_labels.txt")).unwrap();
    let err = run_eval(&missing_labels);
    assert!(
        err.contains("run02/class_labels.txt") && err.contains("missing"),
        "{err}"
    );

    // A line with one path.
    let malformed = dir.path().join("malformed");
    write_runs(&malformed, 1, false);
    let labels = malformed.join("run01/class_labels.txt");
    let mut text = std::fs::read_to_string(&labels).unwrap();
    text = text.replacen(
        "run01/test/item03.png run01/training/",
        "run01/test/item03.png,run01/training/",
        1,
    );
    std::fs::write(&labels, text).unwrap();
    let err = run_eval(&malformed);
    assert!(err.contains("class_labels.txt:3"), "{err}");

    // A listed image that is not there.
    let missing_image = dir.path().join("missing_image");
    write_runs(&missing_image, 1, false);
    std::fs::remove_file(missing_image.join("run01/test/item05.png")).unwrap();
    let err = run_eval(&missing_image);
    assert!(
        err.contains("class_labels.txt:5") && err.contains("run01/test/item05.png"),
        "{err}"
    );

    // An image that is not a PNG: named with the line that lists it.
    let corrupt = dir.path().join("corrupt");
    write_runs(&corrupt, 1, false);
    std::fs::write(corrupt.join("run01/training/class04.png"), b"junk").unwrap();
    let err = run_eval(&corrupt);
    assert!(err.contains("class04.png") && err.contains("PNG"), "{err}");

    // No runs at all.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run_eval(&empty);
    assert!(err.contains("run01"), "{err}");
}

/// The official `all_runs.zip`: at `$OMNIGLOT_ALL_RUNS` when set, else beside the shared minimal
/// splits. It is not part of the shared data by default, so this test usually only says so.
#[test]
fn official_runs_when_present() {
    let path = std::env::var_os("OMNIGLOT_ALL_RUNS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/omniglot/all_runs.zip")
        });
    if !path.is_file() {
        println!(
            "official all_runs.zip not found at {} (set OMNIGLOT_ALL_RUNS to check it)",
            path.display()
        );
        return;
    }
    // It is the file `data fetch` verifies.
    let listed = metalearn::data::fetch::omniglot_files()
        .into_iter()
        .find(|f| f.file_name() == "all_runs.zip")
        .unwrap();
    assert_eq!(
        Some(metalearn::data::fetch::md5_file(&path).unwrap()),
        listed.md5
    );
    let bench = OneShotBenchmark::open(&path).unwrap();
    assert_eq!(bench.runs.len(), 20);
    assert_eq!(bench.ways(), 20);
    for run in &bench.runs {
        assert_eq!(run.test.len(), 20, "{}", run.name);
        // Each training image is the answer for exactly one test image.
        let mut answers = run.answers.clone();
        answers.sort_unstable();
        assert_eq!(answers, (0..20).collect::<Vec<_>>(), "{}", run.name);
    }
    // Every image decodes and is scored (an untrained model: the score itself is near chance).
    let dir = tempfile::tempdir().unwrap();
    let model = checkpoint(dir.path(), "protonet", "conv4", 20);
    let ckpt = Checkpoint::load(&model, &candle_core::Device::Cpu).unwrap();
    let learner = learner_for_ways(&ckpt, 20).unwrap();
    let options = RunsOptions {
        resample: Resample::Area,
        steps: None,
    };
    let report = evaluate_runs(&learner, &bench, &options).unwrap();
    assert_eq!(report.test_images, 400);
    assert_eq!(report.per_run.len(), 20);
    assert!((0.0..=100.0).contains(&report.error_percent));
}

/// A frozen pre-trained backbone (the tiny timm-layout fixture) scores the runs by the nearest
/// training image's pooled feature: exact copies match, shifted pairings always miss.
#[test]
fn frozen_backbone_matches_exact_copies() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    write_runs(&runs, 2, false);
    let backbone =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../metalearn/tests/fixtures/vision/tiny_timm");
    let args = |runs: &Path| {
        vec![
            "eval-runs".to_string(),
            "--backbone".into(),
            backbone.display().to_string(),
            "--runs".into(),
            runs.display().to_string(),
            "--json".into(),
        ]
    };
    let run = |runs: &Path| {
        let args = args(runs);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        last_json(&run_ok_in(&refs, None))
    };
    let json = run(&runs);
    assert_eq!(json["error_percent"], 0.0, "{json}");
    assert_eq!(json["test_images"], 40);
    let wrong = dir.path().join("wrong");
    write_runs(&wrong, 2, true);
    assert_eq!(run(&wrong)["error_percent"], 100.0);
}
