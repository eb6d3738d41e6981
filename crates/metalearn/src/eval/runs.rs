//! The official Omniglot one-shot benchmark: 20 runs of 20-way, 1-shot, within-alphabet
//! classification drawn from the evaluation alphabets (`all_runs.zip`).
//!
//! Each run folder `runNN/` holds `training/` (one image per class), `test/` (one image per test
//! item) and `class_labels.txt`, whose lines `runNN/test/itemMM.png runNN/training/classKK.png`
//! pair each test image with the training image of its class (paths relative to the folder
//! that holds the runs). The model adapts on the training images (class `i` is the `i`-th
//! training image in sorted order) and classifies every test image; a run's error is the
//! percentage of test images assigned to the wrong class, and the benchmark reports the mean
//! over the runs. Images are preprocessed exactly as [`crate::data::omniglot`] does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::data::omniglot::{preprocess_png, Resample};
use crate::error::{Error, Result};
use crate::meta::learner::MetaLearner;
use crate::meta::AlgorithmKind;
use crate::tasks::TaskKind;

/// One image of a run: its path relative to the runs folder and where it is listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunImage {
    /// Path relative to the folder holding the runs, e.g. `run01/training/class05.png`.
    pub path: String,
    /// `run01/class_labels.txt:7`: the line that names the image.
    pub listed_at: String,
}

/// One run: training images (one per class) and test images with their classes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OneShotRun {
    /// The run's folder name, e.g. `run01`.
    pub name: String,
    /// Training images, sorted by path: class `i` is `training[i]`.
    pub training: Vec<RunImage>,
    /// Test images, sorted by path.
    pub test: Vec<RunImage>,
    /// The class (index into `training`) of each test image.
    pub answers: Vec<usize>,
}

/// Where the run files are read from.
#[derive(Clone, Debug)]
enum RunFiles {
    /// An unpacked folder (the one holding `run01/`, ...).
    Folder(PathBuf),
    /// A zip archive held in memory: entry name (below the runs prefix) to bytes.
    Zip {
        archive: PathBuf,
        entries: HashMap<String, Vec<u8>>,
    },
}

impl RunFiles {
    fn read(&self, relative: &str) -> Option<Vec<u8>> {
        match self {
            RunFiles::Folder(root) => std::fs::read(root.join(relative)).ok(),
            RunFiles::Zip { entries, .. } => entries.get(relative).cloned(),
        }
    }

    fn exists(&self, relative: &str) -> bool {
        match self {
            RunFiles::Folder(root) => root.join(relative).is_file(),
            RunFiles::Zip { entries, .. } => entries.contains_key(relative),
        }
    }

    fn display(&self, relative: &str) -> String {
        match self {
            RunFiles::Folder(root) => root.join(relative).display().to_string(),
            RunFiles::Zip { archive, .. } => format!("{}: entry `{relative}`", archive.display()),
        }
    }
}

/// The benchmark's runs, read and checked (every listed image exists).
#[derive(Clone, Debug)]
pub struct OneShotBenchmark {
    files: RunFiles,
    /// The runs, sorted by name.
    pub runs: Vec<OneShotRun>,
}

impl OneShotBenchmark {
    /// Reads the runs from a folder holding `runNN/` folders (or a folder with one such folder
    /// inside, as `all_runs.zip` unpacks) or from `all_runs.zip` itself.
    pub fn open(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            RunFiles::Folder(find_runs_folder(path)?)
        } else if path.is_file() {
            read_zip(path)?
        } else {
            return Err(Error::Data(format!(
                "{}: no such runs folder or archive; get it with `metalearn data fetch omniglot`",
                path.display()
            )));
        };
        let names = run_names(&files)?;
        if names.is_empty() {
            return Err(Error::Data(format!(
                "{}: holds no runNN/class_labels.txt; give the folder that holds run01, run02, ...",
                path.display()
            )));
        }
        let runs = names
            .iter()
            .map(|name| parse_run(&files, name))
            .collect::<Result<Vec<_>>>()?;
        let ways = runs[0].training.len();
        if let Some(odd) = runs.iter().find(|r| r.training.len() != ways) {
            return Err(Error::Data(format!(
                "{}: {} has {} training classes but {} has {ways}; every run must have the same \
                 number of ways",
                files.display(&format!("{}/class_labels.txt", odd.name)),
                odd.name,
                odd.training.len(),
                runs[0].name
            )));
        }
        Ok(Self { files, runs })
    }

    /// The bytes of one listed image, with how to name it in messages.
    fn read_image(&self, image: &RunImage) -> Result<(Vec<u8>, String)> {
        let source = format!(
            "{} (listed at {})",
            self.files.display(&image.path),
            image.listed_at
        );
        let bytes = self
            .files
            .read(&image.path)
            .ok_or_else(|| Error::Data(format!("{source}: cannot be read")))?;
        Ok((bytes, source))
    }

    /// Classes per run (20 in the official benchmark).
    pub fn ways(&self) -> usize {
        self.runs.first().map_or(0, |r| r.training.len())
    }

    /// The images as a tensor `[n, 1, height, width]`, preprocessed as the Omniglot loader does.
    fn images(
        &self,
        images: &[RunImage],
        height: usize,
        width: usize,
        resample: Resample,
    ) -> Result<Tensor> {
        let mut pixels = Vec::with_capacity(images.len() * height * width);
        for image in images {
            let (bytes, source) = self.read_image(image)?;
            pixels.extend(preprocess_png(&bytes, height, width, resample, &source)?);
        }
        Ok(Tensor::from_vec(
            pixels,
            (images.len(), 1, height, width),
            &Device::Cpu,
        )?)
    }
}

impl OneShotBenchmark {
    /// L2-normalised pooled features of `images` through a pre-trained `backbone`,
    /// preprocessed as its weights expect (the 105x105 images enlarged to its input size).
    fn backbone_features(
        &self,
        images: &[RunImage],
        backbone: &crate::vision::Backbone,
    ) -> Result<Tensor> {
        let size = backbone.preprocess.size;
        let mut values = Vec::with_capacity(images.len() * 3 * size * size);
        for image in images {
            let (bytes, source) = self.read_image(image)?;
            let decoded = image::load_from_memory(&bytes)
                .map_err(|e| Error::Data(format!("{source}: not a readable image ({e})")))?
                .to_rgb8();
            values.extend(crate::vision::features::input_of(
                &decoded,
                &backbone.preprocess,
            )?);
        }
        let x = Tensor::from_vec(values, (images.len(), 3, size, size), &Device::Cpu)?;
        crate::nn::ops::l2_normalize(&backbone.features(&x)?)
    }
}

/// Scores a frozen pre-trained backbone on the runs: every test image takes the class of the
/// training image whose pooled feature is nearest by cosine.
pub fn evaluate_runs_with_backbone(
    backbone: &crate::vision::Backbone,
    bench: &OneShotBenchmark,
) -> Result<RunsReport> {
    let mut per_run = Vec::with_capacity(bench.runs.len());
    let mut test_images = 0;
    for run in &bench.runs {
        let support = bench.backbone_features(&run.training, backbone)?;
        let queries = bench.backbone_features(&run.test, backbone)?;
        let similarity = queries.matmul(&support.t()?)?;
        let predicted = similarity.argmax(1)?.to_vec1::<u32>()?;
        let wrong = predicted
            .iter()
            .zip(&run.answers)
            .filter(|(p, a)| **p as usize != **a)
            .count();
        per_run.push(100.0 * wrong as f64 / run.test.len().max(1) as f64);
        test_images += run.test.len();
    }
    Ok(RunsReport {
        error_percent: per_run.iter().sum::<f64>() / per_run.len().max(1) as f64,
        per_run,
        runs: bench.runs.iter().map(|r| r.name.clone()).collect(),
        ways: bench.ways(),
        test_images,
    })
}

/// The runs folder: `path` itself, or its only sub-folder that holds runs.
fn find_runs_folder(path: &Path) -> Result<PathBuf> {
    let holds_runs = |dir: &Path| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("run") && e.path().is_dir())
        })
    };
    if holds_runs(path) {
        return Ok(path.to_path_buf());
    }
    let subfolders: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && holds_runs(p))
        .collect();
    match subfolders.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(Error::Data(format!(
            "{}: holds no run folders (run01, run02, ...); give the folder that holds them",
            path.display()
        ))),
    }
}

fn read_zip(path: &Path) -> Result<RunFiles> {
    let handle = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(handle)).map_err(|e| {
        Error::Data(format!(
            "{}: not a readable zip archive ({e})",
            path.display()
        ))
    })?;
    let mut raw = HashMap::new();
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| {
            Error::Data(format!(
                "{}: entry #{index} cannot be read: {e}",
                path.display()
            ))
        })?;
        if entry.is_dir() {
            continue;
        }
        let name = entry
            .name()
            .map_err(|e| Error::Data(format!("{}: entry #{index}: {e}", path.display())))?
            .into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| {
            Error::Data(format!(
                "{}: entry `{name}` is corrupt ({e})",
                path.display()
            ))
        })?;
        raw.insert(name, bytes);
    }
    // Entries may sit below a folder (`all_runs/run01/...`): strip the prefix of the first
    // class_labels.txt so that names are relative to the folder holding the runs.
    let prefix = raw
        .keys()
        .filter_map(|k| k.strip_suffix("class_labels.txt"))
        .filter_map(|k| {
            let run = k.trim_end_matches('/');
            run.rfind('/').map_or(Some(""), |i| Some(&run[..=i]))
        })
        .min()
        .unwrap_or("")
        .to_string();
    let entries = raw
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v)))
        .collect();
    Ok(RunFiles::Zip {
        archive: path.to_path_buf(),
        entries,
    })
}

/// Names of the run folders (`run01`, ...), sorted; a run folder without class_labels.txt is an
/// error naming the missing file.
fn run_names(files: &RunFiles) -> Result<Vec<String>> {
    let mut names = BTreeSet::new();
    match files {
        RunFiles::Folder(root) => {
            for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
                let entry = entry.map_err(|e| Error::io(root, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("run") && entry.path().is_dir() {
                    names.insert(name);
                }
            }
        }
        RunFiles::Zip { entries, .. } => {
            for key in entries.keys() {
                if let Some((first, _)) = key.split_once('/') {
                    if first.starts_with("run") {
                        names.insert(first.to_string());
                    }
                }
            }
        }
    }
    for name in &names {
        let labels = format!("{name}/class_labels.txt");
        if !files.exists(&labels) {
            return Err(Error::Data(format!(
                "{}: missing; every run folder needs its class_labels.txt",
                files.display(&labels)
            )));
        }
    }
    Ok(names.into_iter().collect())
}

fn parse_run(files: &RunFiles, name: &str) -> Result<OneShotRun> {
    let labels_path = format!("{name}/class_labels.txt");
    let shown = files.display(&labels_path);
    let bytes = files
        .read(&labels_path)
        .ok_or_else(|| Error::Data(format!("{shown}: cannot be read")))?;
    let text =
        String::from_utf8(bytes).map_err(|_| Error::Data(format!("{shown}: not UTF-8 text")))?;
    // test path -> (training path, line)
    let mut pairs: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut training_lines: BTreeMap<String, usize> = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [test, training] = fields.as_slice() else {
            return Err(Error::Data(format!(
                "{shown}:{number}: expected two paths `{name}/test/itemMM.png \
                 {name}/training/classKK.png`, found `{line}`"
            )));
        };
        for image in [test, training] {
            if !files.exists(image) {
                return Err(Error::Data(format!(
                    "{shown}:{number}: image `{image}` not found ({})",
                    files.display(image)
                )));
            }
        }
        if pairs
            .insert(test.to_string(), (training.to_string(), number))
            .is_some()
        {
            return Err(Error::Data(format!(
                "{shown}:{number}: test image `{test}` is listed twice"
            )));
        }
        training_lines.entry(training.to_string()).or_insert(number);
    }
    if training_lines.len() < 2 {
        return Err(Error::Data(format!(
            "{shown}: lists {} training class(es); a run needs at least 2 (the official runs have 20)",
            training_lines.len()
        )));
    }
    let training: Vec<RunImage> = training_lines
        .iter()
        .map(|(path, line)| RunImage {
            path: path.clone(),
            listed_at: format!("{labels_path}:{line}"),
        })
        .collect();
    let class_of: HashMap<&str, usize> = training_lines
        .keys()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    let mut test = Vec::with_capacity(pairs.len());
    let mut answers = Vec::with_capacity(pairs.len());
    for (path, (training_path, line)) in &pairs {
        test.push(RunImage {
            path: path.clone(),
            listed_at: format!("{labels_path}:{line}"),
        });
        answers.push(class_of[training_path.as_str()]);
    }
    Ok(OneShotRun {
        name: name.to_string(),
        training,
        test,
        answers,
    })
}

/// Settings of a benchmark evaluation.
#[derive(Clone, Debug, Default)]
pub struct RunsOptions {
    /// The resizing filter the model was trained with.
    pub resample: Resample,
    /// Adaptation steps (default: the model's evaluation steps; ProtoNet takes none).
    pub steps: Option<usize>,
}

/// The benchmark's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunsReport {
    /// Mean error over the runs, in percent.
    pub error_percent: f64,
    /// Error of each run, in percent, in the order of `runs`.
    pub per_run: Vec<f64>,
    /// Run names.
    pub runs: Vec<String>,
    /// Classes per run.
    pub ways: usize,
    /// Test images over all runs.
    pub test_images: usize,
}

/// Adapts `learner` on each run's training images and scores its test images. The learner must
/// be set up for the benchmark's number of ways (see [`learner_for_ways`]) and take grey images
/// `[1, height, width]`.
pub fn evaluate_runs(
    learner: &MetaLearner,
    bench: &OneShotBenchmark,
    options: &RunsOptions,
) -> Result<RunsReport> {
    let ways = bench.ways();
    match learner.task_kind() {
        TaskKind::Classification { ways: w } if w == ways => {}
        other => {
            return Err(Error::Config(format!(
                "the model is set up for {other:?} but the runs are {ways}-way classification; \
                 load it with learner_for_ways"
            )))
        }
    }
    let shape = learner.network().architecture().input_shape.clone();
    let [1, height, width] = shape.as_slice() else {
        return Err(Error::Config(format!(
            "the model takes inputs of shape {shape:?}; the benchmark's images are grey, \
             [1, height, width]: use a model meta-trained on Omniglot"
        )));
    };
    let (height, width) = (*height, *width);
    let mut per_run = Vec::with_capacity(bench.runs.len());
    let mut test_images = 0;
    for run in &bench.runs {
        let support_x = bench.images(&run.training, height, width, options.resample)?;
        let support_y = Tensor::from_vec(
            (0..run.training.len())
                .map(|i| i as f32)
                .collect::<Vec<_>>(),
            run.training.len(),
            &Device::Cpu,
        )?;
        let adapted = learner.adapt((&support_x, &support_y), options.steps)?;
        let query_x = bench.images(&run.test, height, width, options.resample)?;
        let logits = learner.predict(&adapted, &query_x)?;
        let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
        let wrong = predicted
            .iter()
            .zip(&run.answers)
            .filter(|(p, a)| **p as usize != **a)
            .count();
        per_run.push(100.0 * wrong as f64 / run.test.len().max(1) as f64);
        test_images += run.test.len();
    }
    let error_percent = per_run.iter().sum::<f64>() / per_run.len().max(1) as f64;
    Ok(RunsReport {
        error_percent,
        per_run,
        runs: bench.runs.iter().map(|r| r.name.clone()).collect(),
        ways,
        test_images,
    })
}

/// Rebuilds a meta-learner from `ckpt` for `ways`-way classification. ProtoNet needs no head,
/// so any checkpoint works; the MAML family's output layer has one unit per class, so its
/// checkpoint must have been meta-trained for exactly `ways` ways.
pub fn learner_for_ways(ckpt: &Checkpoint, ways: usize) -> Result<MetaLearner> {
    let learner = MetaLearner::from_checkpoint(ckpt)?;
    let trained = match learner.task_kind() {
        TaskKind::Classification { ways } => ways,
        TaskKind::Regression => {
            return Err(Error::Config(
                "this checkpoint was meta-trained on regression tasks; the one-shot benchmark \
                 needs a classification model"
                    .into(),
            ))
        }
    };
    if trained == ways {
        return Ok(learner);
    }
    let algorithm = learner.algorithm_config().name;
    if algorithm != AlgorithmKind::Protonet {
        return Err(Error::Config(format!(
            "this {} checkpoint was meta-trained for {trained}-way tasks, so its output layer \
             has {trained} classes and cannot classify the benchmark's {ways}-way runs; \
             meta-train with task.ways = {ways} (ProtoNet checkpoints work with any number of ways)",
            algorithm.name()
        )));
    }
    let mut ckpt = ckpt.clone();
    let meta = ckpt
        .sections
        .get_mut("meta")
        .and_then(|m| m.as_object_mut())
        .ok_or_else(|| Error::Checkpoint("checkpoint `meta` section is not an object".into()))?;
    meta.insert(
        "task_kind".into(),
        serde_json::to_value(TaskKind::Classification { ways })
            .map_err(|e| Error::Checkpoint(format!("cannot set the task kind: {e}")))?,
    );
    MetaLearner::from_checkpoint(&ckpt)
}
