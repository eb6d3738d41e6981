//! What `train`, `finetune`, `evaluate` and `predict` share: data options and loading, the
//! checkpoint's `data` section (feature and class names, what the output means), choosing the
//! output head and loss from the target, the training loop with its JSONL log and best-model
//! checkpoint, and console output.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::checkpoint::Checkpoint;
use crate::data::image_folder::{load_image_folder, ImageFolderOptions};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::nn::architecture::{Architecture, Layer};
use crate::nn::sequential::Sequential;
use crate::train::fit::{Callback, Control, FitOptions, Validation};
use crate::train::history::EpochLog;
use crate::train::loss::Loss;
use crate::train::metrics::Metric;
use crate::train::optim::OptimizerConfig;

/// Name of the checkpoint section that describes the data a model was trained on.
pub const DATA_SECTION: &str = "data";

/// Where examples come from: `--data FILE --target COLUMN` or `--images DIR`.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// CSV file with a header row and one example per row.
    #[arg(long, value_name = "FILE", conflicts_with = "images")]
    pub data: Option<PathBuf>,
    /// The CSV column to predict (every other column is a feature).
    #[arg(long, value_name = "COLUMN")]
    pub target: Option<String>,
    /// Image folder with one sub-folder per class (instead of --data).
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
}

/// Where the examples of one run come from, once flags and config are merged.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// A CSV file and its target column.
    Csv {
        /// The file.
        path: PathBuf,
        /// The target column.
        target: String,
    },
    /// An image folder.
    Images {
        /// The folder.
        dir: PathBuf,
        /// Size and channels every image is converted to.
        options: ImageFolderOptions,
    },
}

impl DataSource {
    /// The file or folder.
    pub fn path(&self) -> &Path {
        match self {
            DataSource::Csv { path, .. } => path,
            DataSource::Images { dir, .. } => dir,
        }
    }
}

/// What the target is, which fixes the output head and the default loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// More than two classes: `k` logits and cross-entropy.
    Multiclass,
    /// Two classes (0/1): one output and binary cross-entropy.
    Binary,
    /// A number: one output and mean squared error.
    Regression,
}

/// What the network's output means, so that `predict` turns it into probabilities or values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// One logit per class (softmax gives probabilities).
    ClassLogits,
    /// One probability of class 1 (after a sigmoid layer).
    Probability,
    /// One logit of class 1 (sigmoid gives the probability).
    BinaryLogit,
    /// Regression values.
    Value,
}

/// Image size and channels of an image model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// 1 (grey) or 3 (colour).
    pub channels: usize,
}

/// The checkpoint's `data` section: enough to read new data the way the training data was read
/// and to name the predictions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// What the target is.
    pub target_kind: TargetKind,
    /// What the output means.
    pub output: OutputKind,
    /// Feature columns in the order the model reads them (empty for images).
    pub feature_names: Vec<String>,
    /// The target column (or `class` for image folders).
    pub target_name: String,
    /// Class names by class id, when the target is categorical.
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// Number of classes for classification targets.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Set for image models.
    #[serde(default)]
    pub image: Option<ImageShape>,
    /// The training data's origin.
    #[serde(default)]
    pub source: String,
}

impl DataInfo {
    /// The display name of class `id`: its name when known, else the id.
    pub fn class_label(&self, id: usize) -> String {
        self.class_names
            .as_ref()
            .and_then(|names| names.get(id).cloned())
            .unwrap_or_else(|| id.to_string())
    }
}

/// Loads examples for training (class ids follow `class_names` when given).
pub fn load_dataset(source: &DataSource, class_names: Option<&[String]>) -> Result<Dataset> {
    let ds = match source {
        DataSource::Csv { path, target } => {
            crate::data::csv::load_csv_with_classes(path, target, class_names)?
        }
        DataSource::Images { dir, options } => {
            let ds = load_image_folder(dir, options)?;
            if let (Some(expected), Some(found)) = (class_names, ds.class_names.as_ref()) {
                if expected != found.as_slice() {
                    return Err(Error::Data(format!(
                        "{}: class folders {:?} differ from the model's classes {:?}; use the same \
                         folder names (or `finetune --new-head N` for new classes)",
                        dir.display(),
                        found,
                        expected
                    )));
                }
            }
            ds
        }
    };
    if ds.is_empty() {
        return Err(Error::Data(format!(
            "{}: no examples found",
            source.path().display()
        )));
    }
    Ok(ds)
}

/// Loads examples for a trained model: CSV features are taken by the model's column names (so
/// extra or reordered columns are fine) and targets, when wanted, are mapped to its class ids.
pub fn load_for_model(
    info: &DataInfo,
    model: &Sequential,
    data: &DataArgs,
    with_target: bool,
) -> Result<(Tensor, Option<Tensor>, usize)> {
    let (x, y) = match (&data.data, &data.images) {
        (Some(path), _) => {
            if info.image.is_some() {
                return Err(Error::Config(
                    "this model was trained on images: give --images DIR, not --data".into(),
                ));
            }
            let x = crate::data::csv::load_csv_features(path, &info.feature_names)?;
            let y = if with_target {
                let target = data.target.as_deref().unwrap_or(&info.target_name);
                let ds = crate::data::csv::load_csv_with_classes(
                    path,
                    target,
                    info.class_names.as_deref(),
                )?;
                Some(ds.y)
            } else {
                None
            };
            (x, y)
        }
        (None, Some(dir)) => {
            let shape = info.image.ok_or_else(|| {
                Error::Config(
                    "this model was trained on CSV data: give --data FILE, not --images".into(),
                )
            })?;
            let ds = load_dataset(
                &DataSource::Images {
                    dir: dir.clone(),
                    options: ImageFolderOptions {
                        height: shape.height,
                        width: shape.width,
                        channels: shape.channels,
                    },
                },
                info.class_names.as_deref(),
            )?;
            (ds.x, with_target.then_some(ds.y))
        }
        (None, None) => {
            return Err(Error::Config(
                "no input data: give --data FILE (CSV) or --images DIR".into(),
            ))
        }
    };
    let n = x.dim(0)?;
    let expected = &model.architecture().input_shape;
    if &x.dims()[1..] != expected.as_slice() {
        return Err(Error::Shape(format!(
            "the data has examples of shape {:?} but the model expects {:?}",
            &x.dims()[1..],
            expected
        )));
    }
    Ok((x, y, n))
}

/// Reads a checkpoint into a model and its `data` section.
pub fn load_model(path: &Path) -> Result<(Sequential, DataInfo)> {
    let ckpt = Checkpoint::load(path, &candle_core::Device::Cpu)?;
    let info: DataInfo = match ckpt.section(DATA_SECTION) {
        Some(value) => serde_json::from_value(value.clone()).map_err(|e| {
            Error::Checkpoint(format!(
                "{}: invalid `{DATA_SECTION}` section: {e}",
                path.display()
            ))
        })?,
        None => {
            return Err(Error::Checkpoint(format!(
                "{}: has no `{DATA_SECTION}` section (feature and class names); it was not \
                 written by `metalearn train` or `metalearn finetune`",
                path.display()
            )))
        }
    };
    let model = Sequential::from_checkpoint(&ckpt)?;
    Ok((model, info))
}

/// Saves `model` with its `data` section, atomically.
pub fn save_model(model: &Sequential, info: &DataInfo, path: &Path) -> Result<()> {
    let mut ckpt = model.to_checkpoint()?;
    ckpt.sections.insert(
        DATA_SECTION.into(),
        serde_json::to_value(info).map_err(|e| Error::Checkpoint(e.to_string()))?,
    );
    ckpt.save(path)
}

/// The JSONL log beside a checkpoint: `<out>.log.jsonl`.
pub fn log_path(out: &Path) -> PathBuf {
    let mut name = OsString::from(out.as_os_str());
    name.push(".log.jsonl");
    PathBuf::from(name)
}

/// Distinct values of the target, checked to be finite.
fn target_values(ds: &Dataset) -> Result<Vec<f64>> {
    let values = ds.y.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Data(format!(
            "{}: target `{}` of example {} is not a finite number",
            ds.source,
            ds.target_name,
            bad + 1
        )));
    }
    Ok(values)
}

/// The largest integer-coded target with this many distinct values that is still read as classes.
const MAX_INTEGER_CLASSES: usize = 100;

/// Decides what the target is, and says why.
pub fn detect_target(ds: &Dataset) -> Result<(TargetKind, usize, String)> {
    if let Some(names) = &ds.class_names {
        let k = names.len();
        return Ok(match k {
            0 | 1 => {
                return Err(Error::Data(format!(
                    "{}: target `{}` has {} class(es); classification needs at least 2",
                    ds.source, ds.target_name, k
                )))
            }
            2 => (
                TargetKind::Binary,
                2,
                format!("target `{}` has 2 classes {:?}", ds.target_name, names),
            ),
            _ => (
                TargetKind::Multiclass,
                k,
                format!("target `{}` has {k} classes", ds.target_name),
            ),
        });
    }
    let values = target_values(ds)?;
    let all_integers = values.iter().all(|v| v.fract() == 0.0 && *v >= 0.0);
    let mut distinct: Vec<i64> = values.iter().map(|v| *v as i64).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if all_integers && distinct.iter().all(|v| *v == 0 || *v == 1) {
        return Ok((
            TargetKind::Binary,
            2,
            format!("target `{}` holds only 0 and 1", ds.target_name),
        ));
    }
    let max = distinct.last().copied().unwrap_or(0) as usize;
    // Integer codes 0..k with repeats look like classes; anything else is a quantity.
    if all_integers
        && max < MAX_INTEGER_CLASSES
        && distinct.len() > 2
        && distinct.len() * 2 <= values.len()
    {
        return Ok((
            TargetKind::Multiclass,
            max + 1,
            format!(
                "target `{}` holds integer class ids 0..{max}",
                ds.target_name
            ),
        ));
    }
    Ok((
        TargetKind::Regression,
        0,
        format!("target `{}` holds numbers", ds.target_name),
    ))
}

/// The output head and training loss for a target, honouring an explicit `--loss`.
#[derive(Clone, Debug)]
pub struct HeadPlan {
    /// What the target is.
    pub target_kind: TargetKind,
    /// Output units.
    pub units: usize,
    /// Whether a sigmoid follows the head.
    pub sigmoid: bool,
    /// Loss.
    pub loss: Loss,
    /// Metrics.
    pub metrics: Vec<Metric>,
    /// What the output means.
    pub output: OutputKind,
    /// Classes, for classification.
    pub num_classes: Option<usize>,
}

/// The name of a loss as users write it.
pub fn loss_name(loss: Loss) -> &'static str {
    match loss {
        Loss::Mse => "mse",
        Loss::BinaryCrossEntropy => "binary_cross_entropy",
        Loss::BinaryCrossEntropyWithLogits => "bce_logits",
        Loss::CategoricalCrossEntropy => "cross_entropy",
    }
}

/// Plans the head for `ds`: the loss is `requested` or the default for the detected target.
/// Returns the plan and a sentence saying which loss was chosen and why.
pub fn plan_head(ds: &Dataset, requested: Option<Loss>) -> Result<(HeadPlan, String)> {
    let (kind, classes, why) = detect_target(ds)?;
    let loss = match requested {
        Some(loss) => loss,
        None => match kind {
            TargetKind::Multiclass => Loss::CategoricalCrossEntropy,
            TargetKind::Binary => Loss::BinaryCrossEntropy,
            TargetKind::Regression => Loss::Mse,
        },
    };
    let classification = [Metric::Accuracy].to_vec();
    let plan = match loss {
        Loss::CategoricalCrossEntropy => {
            if kind == TargetKind::Regression {
                return Err(Error::Config(format!(
                    "--loss cross_entropy needs class labels, but {why} (not integer class ids \
                     0..k); use --loss mse"
                )));
            }
            HeadPlan {
                target_kind: if classes > 2 {
                    TargetKind::Multiclass
                } else {
                    TargetKind::Binary
                },
                units: classes,
                sigmoid: false,
                loss,
                metrics: classification,
                output: OutputKind::ClassLogits,
                num_classes: Some(classes),
            }
        }
        Loss::BinaryCrossEntropy | Loss::BinaryCrossEntropyWithLogits => {
            if kind != TargetKind::Binary {
                return Err(Error::Config(format!(
                    "--loss {} needs a two-class (0/1) target, but {why}; use --loss {}",
                    loss_name(loss),
                    if kind == TargetKind::Multiclass {
                        "cross_entropy"
                    } else {
                        "mse"
                    }
                )));
            }
            let sigmoid = loss == Loss::BinaryCrossEntropy;
            HeadPlan {
                target_kind: TargetKind::Binary,
                units: 1,
                sigmoid,
                loss,
                metrics: classification,
                output: if sigmoid {
                    OutputKind::Probability
                } else {
                    OutputKind::BinaryLogit
                },
                num_classes: Some(2),
            }
        }
        Loss::Mse => HeadPlan {
            target_kind: TargetKind::Regression,
            units: 1,
            sigmoid: false,
            loss,
            metrics: vec![Metric::Mae],
            output: OutputKind::Value,
            num_classes: None,
        },
    };
    let how = if requested.is_some() {
        "as requested"
    } else {
        "chosen because"
    };
    let sentence = if requested.is_some() {
        format!("loss: {} ({how}; {why})", loss_name(loss))
    } else {
        format!("loss: {} ({how} {why})", loss_name(loss))
    };
    Ok((plan, sentence))
}

/// Appends the head of `plan` (dense layer named `head`, plus a sigmoid when needed).
pub fn push_head(arch: &mut Architecture, plan: &HeadPlan) -> Result<()> {
    arch.push_named("head", Layer::dense(plan.units))?;
    if plan.sigmoid {
        arch.push_named("head_sigmoid", Layer::sigmoid())?;
    }
    Ok(())
}

/// Parses a comma-separated list of hidden-layer sizes (`""` or `none` for no hidden layer).
pub fn parse_hidden(text: &str) -> Result<Vec<usize>> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            match part.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(Error::Config(format!(
                    "--hidden: `{part}` is not a layer size; give positive whole numbers separated \
                     by commas, e.g. 64,32"
                ))),
            }
        })
        .collect()
}

/// Training settings shared by `train` and `finetune` once flags and config are merged.
#[derive(Clone, Debug)]
pub struct TrainPlan {
    /// Optimiser.
    pub optimizer: OptimizerConfig,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Fraction of examples held out for validation (chosen at random with the seed).
    pub validation_split: Option<f64>,
    /// Early-stopping patience.
    pub early_stopping: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
}

/// Builds the optimiser from its name and hyper-parameters (AdamW's weight decay defaults to
/// 0.01, the others' to 0).
pub fn optimizer_from(
    name: &str,
    lr: f64,
    weight_decay: Option<f64>,
    momentum: Option<f64>,
) -> Result<OptimizerConfig> {
    let decay = weight_decay.unwrap_or(if name.eq_ignore_ascii_case("adamw") {
        0.01
    } else {
        0.0
    });
    if momentum.is_some() && !name.eq_ignore_ascii_case("sgd") {
        return Err(Error::Config(format!(
            "--momentum applies to sgd only, not `{name}`"
        )));
    }
    OptimizerConfig::from_name(name, lr, decay, momentum.unwrap_or(0.0))
}

/// Writes each epoch's figures to the JSONL log and, with validation, keeps the best model
/// (lowest validation loss) in the checkpoint file as training goes.
struct EpochRecorder {
    log: PathBuf,
    checkpoint: PathBuf,
    info: DataInfo,
    keep_best: bool,
    best_val_loss: f64,
}

impl Callback for EpochRecorder {
    fn on_epoch_end(&mut self, log: &EpochLog, model: &Sequential) -> Result<Control> {
        let mut line = serde_json::Map::new();
        line.insert("epoch".into(), json!(log.epoch));
        for (key, value) in log.flat() {
            line.insert(key, json!(value));
        }
        line.insert("seconds".into(), json!(log.seconds));
        crate::fsutil::append_line(&self.log, &Value::Object(line).to_string())?;
        if self.keep_best {
            if let Some(val_loss) = log.val_loss {
                if val_loss < self.best_val_loss {
                    self.best_val_loss = val_loss;
                    save_model(model, &self.info, &self.checkpoint)?;
                }
            }
        }
        Ok(Control::Continue)
    }
}

/// The outcome of [`fit_and_save`], as JSON fields.
pub type Summary = serde_json::Map<String, Value>;

/// Compiles `model` with the plan's head settings, trains it on `ds`, saves it to `out` with
/// `info`, and returns the summary: final loss and metrics on the training (and validation)
/// examples, epochs, best epoch, seconds, checkpoint and log paths.
pub fn fit_and_save(
    model: &mut Sequential,
    ds: &Dataset,
    head: &HeadPlan,
    plan: &TrainPlan,
    info: &DataInfo,
    out: &Path,
) -> Result<Summary> {
    if let Some(classes) = head
        .num_classes
        .filter(|_| head.output == OutputKind::ClassLogits)
    {
        check_class_ids(ds, classes)?;
    }
    let n = ds.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(plan.seed));
    let (train, val) = match plan.validation_split {
        None => (ds.subset(&(0..n).collect::<Vec<_>>())?, None),
        Some(f) => {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::Config(format!(
                    "--validation-split must be between 0 and 1 (exclusive), got {f}"
                )));
            }
            let n_val = ((n as f64) * f).round() as usize;
            if n_val == 0 || n_val >= n {
                return Err(Error::Config(format!(
                    "--validation-split {f} of {n} examples leaves an empty training or \
                     validation set; use more data or another fraction"
                )));
            }
            let (val_rows, train_rows) = order.split_at(n_val);
            let mut train_rows = train_rows.to_vec();
            let mut val_rows = val_rows.to_vec();
            train_rows.sort_unstable();
            val_rows.sort_unstable();
            (ds.subset(&train_rows)?, Some(ds.subset(&val_rows)?))
        }
    };

    model.compile(plan.optimizer.clone(), head.loss, &head.metrics)?;
    let log = log_path(out);
    if log.exists() {
        std::fs::remove_file(&log).map_err(|e| Error::io(&log, e))?;
    }
    let mut options = FitOptions::new()
        .epochs(plan.epochs)
        .batch_size(plan.batch_size)
        .seed(plan.seed)
        .progress(plan.progress)
        .callback(EpochRecorder {
            log: log.clone(),
            checkpoint: out.to_path_buf(),
            info: info.clone(),
            keep_best: val.is_some(),
            best_val_loss: f64::INFINITY,
        });
    if let Some(val) = &val {
        options.validation = Validation::Data(val.x.clone(), val.y.clone());
        // The saved model is the best validation epoch's, as in the checkpoint kept during training.
        options.restore_best = true;
    }
    if let Some(patience) = plan.early_stopping {
        options = options.early_stopping(patience);
    }
    let started = Instant::now();
    let history = model.fit(&train.x, &train.y, options)?;
    let seconds = started.elapsed().as_secs_f64();
    save_model(model, info, out)?;

    let batch = plan.batch_size.max(256);
    let mut summary = Summary::new();
    for (key, value) in model.evaluate(&train.x, &train.y, batch)? {
        summary.insert(key, json!(value));
    }
    if let Some(val) = &val {
        for (key, value) in model.evaluate(&val.x, &val.y, batch)? {
            summary.insert(format!("val_{key}"), json!(value));
        }
    }
    summary.insert("epochs".into(), json!(history.epochs.len()));
    summary.insert("best_epoch".into(), json!(history.best_epoch));
    summary.insert("stopped_early".into(), json!(history.stopped_early));
    summary.insert("train_examples".into(), json!(train.len()));
    summary.insert(
        "val_examples".into(),
        json!(val.as_ref().map_or(0, |v| v.len())),
    );
    summary.insert("train_seconds".into(), json!(seconds));
    summary.insert("checkpoint".into(), json!(out.display().to_string()));
    summary.insert("log".into(), json!(log.display().to_string()));
    summary.insert("loss_function".into(), json!(loss_name(head.loss)));
    summary.insert("target_kind".into(), json!(head.target_kind));
    Ok(summary)
}

/// Fails unless every target is a class id in `0..classes`.
fn check_class_ids(ds: &Dataset, classes: usize) -> Result<()> {
    let values = target_values(ds)?;
    if let Some((row, v)) = values
        .iter()
        .enumerate()
        .find(|(_, v)| v.fract() != 0.0 || **v < 0.0 || **v >= classes as f64)
    {
        return Err(Error::Data(format!(
            "{}: target `{}` of example {} is {v}, not a class id in 0..{}",
            ds.source,
            ds.target_name,
            row + 1,
            classes - 1
        )));
    }
    Ok(())
}

/// Whether stderr is a terminal (progress bars are drawn only then).
pub fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Console output of one command: human-readable lines on stdout (unless `--json` or
/// `--quiet`), notes on stderr (unless `--quiet`), and with `--json` one JSON object as the last
/// line of stdout.
#[derive(Clone, Copy, Debug)]
pub struct Console {
    /// `--json` was given.
    pub json: bool,
    /// `--quiet` was given.
    pub quiet: bool,
}

impl Console {
    /// A console for the given flags.
    pub fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }
    /// Whether a progress bar may be drawn.
    pub fn progress(&self) -> bool {
        !self.json && !self.quiet && stderr_is_terminal()
    }
    /// A result line for people.
    pub fn line(&self, text: &str) {
        if !self.json && !self.quiet {
            println!("{text}");
        }
    }
    /// A note on stderr (which loss was chosen, warnings).
    pub fn note(&self, text: &str) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }
    /// Prints the final JSON object when `--json` is on.
    pub fn finish(&self, summary: &Summary) {
        if self.json {
            println!("{}", Value::Object(summary.clone()));
        }
    }
}

/// Formats the loss and metrics of a summary for people: `loss 0.1234  accuracy 0.9500`.
pub fn format_scores(summary: &Summary, prefix: &str) -> String {
    let mut parts = Vec::new();
    let mut keys: Vec<&String> = summary
        .keys()
        .filter(|k| match k.strip_prefix(prefix) {
            Some(rest) => !rest.starts_with("val_") && is_score(rest),
            None => false,
        })
        .collect();
    // The loss first, then the metrics alphabetically.
    keys.sort_by_key(|k| (k.as_str() != format!("{prefix}loss"), k.to_string()));
    for key in keys {
        if let Some(v) = summary[key].as_f64() {
            parts.push(format!("{} {v:.4}", &key[prefix.len()..]));
        }
    }
    parts.join("  ")
}

fn is_score(key: &str) -> bool {
    matches!(key, "loss" | "accuracy" | "mse" | "mae")
}

/// Reads loss and metric values out of an `evaluate` map.
pub fn scores_to_summary(scores: BTreeMap<String, f64>) -> Summary {
    scores.into_iter().map(|(k, v)| (k, json!(v))).collect()
}

/// The device chosen by a command's `--cuda` switch: the first CUDA GPU, or the CPU.
pub fn compute_device(cuda: bool) -> Result<candle_core::Device> {
    if !cuda {
        return Ok(candle_core::Device::Cpu);
    }
    candle_core::Device::new_cuda(0).map_err(|e| {
        Error::Config(format!(
            "--cuda: no CUDA device ({e}); build with `--features cuda` on a machine with an \
             NVIDIA GPU, or drop --cuda to run on the CPU"
        ))
    })
}
