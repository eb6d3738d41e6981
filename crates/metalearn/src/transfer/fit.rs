//! Training a supervised model on a data set the way `train` and `finetune` do: a held-out
//! validation split, a JSONL log of every epoch, the best epoch kept in the checkpoint, and a
//! report of the final scores.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::sequential::fit::{Callback, Control, FitOptions, Validation};
use crate::sequential::Sequential;
use crate::train::history::EpochLog;
use crate::train::optim::OptimizerConfig;
use crate::transfer::head::target_values;
use crate::transfer::{log_path, save_model, DataInfo, HeadPlan, OutputKind};

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
pub type FitReport = serde_json::Map<String, Value>;

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
) -> Result<FitReport> {
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
    let mut summary = FitReport::new();
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
    summary.insert("loss_function".into(), json!(head.loss.name()));
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
