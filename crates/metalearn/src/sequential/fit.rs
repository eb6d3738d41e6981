//! `fit`: mini-batch training with validation, callbacks, a NaN guard and seeded shuffling.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::nn::network::{ForwardCtx, Mode};
use crate::nn::params::ParamSet;
use crate::sequential::{not_compiled, Sequential};
use crate::train::history::{EpochLog, History};

/// Where validation data comes from.
#[derive(Clone, Debug, Default)]
pub enum Validation {
    /// No validation.
    #[default]
    None,
    /// Hold out this fraction of the training data (the last rows, before shuffling, as Keras).
    Split(f64),
    /// Separate validation inputs and targets.
    Data(Tensor, Tensor),
}

/// What a callback asks `fit` to do after an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Go on training.
    Continue,
    /// Stop after this epoch.
    Stop,
}

/// Hooks called by `fit` after every epoch.
pub trait Callback {
    /// Called with the finished epoch's record and the model as it is now.
    fn on_epoch_end(&mut self, log: &EpochLog, model: &Sequential) -> Result<Control>;
}

/// Options of [`Sequential::fit`]. Build with [`FitOptions::new`] and the setters.
pub struct FitOptions {
    /// Number of passes over the training data.
    pub epochs: usize,
    /// Examples per gradient step.
    pub batch_size: usize,
    /// Validation data or split.
    pub validation: Validation,
    /// Shuffle the training data every epoch.
    pub shuffle: bool,
    /// Seed for shuffling and dropout: the same seed gives the same result.
    pub seed: u64,
    /// Stop when the monitored validation loss has not improved for this many epochs.
    pub early_stopping_patience: Option<usize>,
    /// Minimum decrease of the monitored loss that counts as an improvement.
    pub min_delta: f64,
    /// Write the best model (lowest validation loss, or training loss without validation) here
    /// whenever it improves.
    pub best_checkpoint: Option<PathBuf>,
    /// Restore the best epoch's weights at the end.
    pub restore_best: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Extra callbacks.
    pub callbacks: Vec<Box<dyn Callback>>,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            validation: Validation::None,
            shuffle: true,
            seed: 0,
            early_stopping_patience: None,
            min_delta: 0.0,
            best_checkpoint: None,
            restore_best: false,
            progress: false,
            callbacks: Vec::new(),
        }
    }
}

impl FitOptions {
    /// Defaults: 1 epoch, batch 32, shuffled, seed 0, no validation.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the number of epochs.
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    /// Sets the batch size.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    /// Holds out a fraction of the data for validation.
    pub fn validation_split(mut self, fraction: f64) -> Self {
        self.validation = Validation::Split(fraction);
        self
    }
    /// Uses separate validation data.
    pub fn validation_data(mut self, x: Tensor, y: Tensor) -> Self {
        self.validation = Validation::Data(x, y);
        self
    }
    /// Turns shuffling on or off.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }
    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Stops early after `patience` epochs without improvement of the validation loss and
    /// restores the best weights.
    pub fn early_stopping(mut self, patience: usize) -> Self {
        self.early_stopping_patience = Some(patience);
        self.restore_best = true;
        self
    }
    /// Keeps the best model in a checkpoint file.
    pub fn best_checkpoint(mut self, path: impl Into<PathBuf>) -> Self {
        self.best_checkpoint = Some(path.into());
        self
    }
    /// Shows a progress bar.
    pub fn progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }
    /// Adds a callback.
    pub fn callback(mut self, callback: impl Callback + 'static) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }

    fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::Config("epochs must be >= 1".into()));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("batch_size must be >= 1".into()));
        }
        if let Validation::Split(f) = self.validation {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::Config(format!(
                    "validation split must be in (0, 1), got {f}"
                )));
            }
        }
        Ok(())
    }
}

impl Sequential {
    /// Trains on `(x, y)`: `x` is `[n, input_shape...]`, `y` the targets (`[n]` class ids or
    /// 0/1 labels, or `[n, outputs]` values). Returns the per-epoch [`History`].
    ///
    /// If the loss becomes NaN or infinite, training stops with an error and the model keeps
    /// the weights of the last finished epoch.
    pub fn fit(&mut self, x: &Tensor, y: &Tensor, mut options: FitOptions) -> Result<History> {
        options.validate()?;
        let cfg = self.compiled.clone().ok_or_else(not_compiled)?;
        let n_all = x.dim(0)?;
        if y.dim(0)? != n_all {
            return Err(Error::Shape(format!(
                "x has {n_all} examples but y has {}",
                y.dim(0)?
            )));
        }
        let x = x.to_dtype(self.dtype)?.to_device(&self.device)?;
        let y = y.to_dtype(self.dtype)?.to_device(&self.device)?;
        let (x, y, val) = match std::mem::take(&mut options.validation) {
            Validation::None => (x, y, None),
            Validation::Data(vx, vy) => (x, y, Some((vx, vy))),
            Validation::Split(f) => {
                let n_val = ((n_all as f64) * f).round() as usize;
                if n_val == 0 || n_val >= n_all {
                    return Err(Error::Config(format!(
                        "validation split {f} of {n_all} examples leaves an empty set"
                    )));
                }
                let n_train = n_all - n_val;
                (
                    x.narrow(0, 0, n_train)?,
                    y.narrow(0, 0, n_train)?,
                    Some((x.narrow(0, n_train, n_val)?, y.narrow(0, n_train, n_val)?)),
                )
            }
        };
        let n = x.dim(0)?;
        if n == 0 {
            return Err(Error::Data("no training examples".into()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut history = History::default();
        let mut best: Option<(f64, usize, ParamSet, ParamSet)> = None;
        // Tracked apart from the snapshot in `best`, which is only kept when it is needed.
        let mut best_monitored: Option<f64> = None;
        let mut since_best = 0usize;
        let threshold = self.decision_threshold();
        let batches_per_epoch = n.div_ceil(options.batch_size);
        let bar = crate::progress::bar(
            (options.epochs * batches_per_epoch) as u64,
            options.progress,
            "training",
        );
        for epoch in 1..=options.epochs {
            let started = Instant::now();
            let last_good = (
                self.params().detach().map(|_, t| Ok(t.copy()?))?,
                self.buffers.clone(),
            );
            if options.shuffle {
                order.shuffle(&mut rng);
            }
            let (mut loss_sum, mut metric_sums) = (0.0, BTreeMap::<String, f64>::new());
            let mut seen = 0usize;
            for chunk in order.chunks(options.batch_size) {
                let idx = Tensor::from_slice(chunk, chunk.len(), &self.device)?;
                let xb = x.index_select(&idx, 0)?;
                let yb = y.index_select(&idx, 0)?;
                let (loss, pred) = self.train_step(&xb, &yb, &cfg.loss, &mut rng)?;
                if !loss.is_finite() {
                    self.set_params(&last_good.0)?;
                    self.buffers = last_good.1;
                    bar.abandon();
                    return Err(Error::NonFinite(format!(
                        "training loss became {loss} in epoch {epoch}; stopped and kept the weights \
                         of epoch {}. Try a lower learning rate or check the data for extreme values",
                        epoch - 1
                    )));
                }
                let w = chunk.len() as f64;
                loss_sum += loss * w;
                for m in &cfg.metrics {
                    *metric_sums.entry(m.name().to_string()).or_default() +=
                        m.compute(&pred, &yb, threshold)? * w;
                }
                seen += chunk.len();
                bar.inc(1);
            }
            // The epoch's last update is seen by no loss: it may have overflowed the weights.
            if !all_finite(&self.params())? || !all_finite(&self.buffers)? {
                self.set_params(&last_good.0)?;
                self.buffers = last_good.1;
                bar.abandon();
                return Err(Error::NonFinite(format!(
                    "the weights became NaN or infinite in epoch {epoch}; stopped and kept the \
                     weights of epoch {}. Try a lower learning rate or check the data for extreme \
                     values",
                    epoch - 1
                )));
            }
            self.epochs_trained += 1;
            let mut log = EpochLog {
                epoch,
                loss: loss_sum / seen as f64,
                metrics: metric_sums
                    .into_iter()
                    .map(|(k, v)| (k, v / seen as f64))
                    .collect(),
                val_loss: None,
                val_metrics: BTreeMap::new(),
                seconds: 0.0,
            };
            if let Some((vx, vy)) = &val {
                let mut scores = self.evaluate(vx, vy, options.batch_size.max(256))?;
                log.val_loss = scores.remove("loss");
                log.val_metrics = scores;
            }
            log.seconds = started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "epoch {epoch}/{} loss {:.4}{}",
                options.epochs,
                log.loss,
                log.val_loss
                    .map(|v| format!(" val_loss {v:.4}"))
                    .unwrap_or_default()
            ));
            let monitored = log.val_loss.unwrap_or(log.loss);
            let improved = monitored.is_finite()
                && best_monitored.is_none_or(|b| monitored < b - options.min_delta);
            if improved {
                since_best = 0;
                best_monitored = Some(monitored);
                if options.restore_best || options.best_checkpoint.is_some() {
                    best = Some((
                        monitored,
                        epoch,
                        self.params().detach().map(|_, t| Ok(t.copy()?))?,
                        self.buffers.clone(),
                    ));
                }
                if let Some(path) = &options.best_checkpoint {
                    self.save(path)?;
                }
            } else {
                since_best += 1;
            }
            let mut stop = false;
            for cb in options.callbacks.iter_mut() {
                if cb.on_epoch_end(&log, self)? == Control::Stop {
                    stop = true;
                }
            }
            history.epochs.push(log);
            if let Some(patience) = options.early_stopping_patience {
                if since_best >= patience {
                    history.stopped_early = true;
                    stop = true;
                }
            }
            if stop {
                break;
            }
        }
        bar.finish_and_clear();
        history.best_epoch = history.last().map(|l| l.epoch);
        if options.restore_best {
            if let Some((_, epoch, params, buffers)) = best {
                self.set_params(&params)?;
                self.buffers = buffers;
                history.best_epoch = Some(epoch);
            }
        }
        Ok(history)
    }

    /// One gradient step on a batch; returns the batch loss and the (detached) predictions.
    fn train_step(
        &mut self,
        xb: &Tensor,
        yb: &Tensor,
        loss_fn: &crate::train::loss::Loss,
        rng: &mut ChaCha8Rng,
    ) -> Result<(f64, Tensor)> {
        // Frozen parameters enter the graph detached, so they get no gradient.
        let params = ParamSet::from_pairs(self.names.iter().zip(&self.vars).map(|(n, v)| {
            let t = if self.frozen.contains(n) {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            };
            (n.clone(), t)
        }))?;
        let mut batch_stats = Vec::new();
        let mut ctx = ForwardCtx {
            mode: Mode::Train,
            differentiable_backward: false,
            token_mask: None,
            skip_sources: Vec::new(),
            running_stats: None,
            batch_stats: Some(&mut batch_stats),
            rng: Some(rng),
        };
        let pred = self.network.forward(&params, xb, &mut ctx)?;
        let loss = loss_fn.compute(&pred, yb)?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Ok((loss_value, pred.detach()));
        }
        let grads = crate::runtime::backward(&loss)?;
        let grads: Vec<Option<Tensor>> = self
            .names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| {
                if self.frozen.contains(n) {
                    None
                } else {
                    grads.get(v.as_tensor()).map(|g| g.detach())
                }
            })
            .collect();
        self.optimizer
            .as_mut()
            .ok_or_else(not_compiled)?
            .step(&self.vars, &grads)?;
        // Frozen batch-norm layers keep their running statistics.
        let frozen = &self.frozen;
        self.network
            .fold_batch_stats(&mut self.buffers, batch_stats, |layer| {
                frozen.contains(&format!("{layer}.gamma"))
            })?;
        Ok((loss_value, pred.detach()))
    }
}

/// Whether every value of the set is finite (summed in f64, so that large finite f32 values
/// cannot overflow the check).
fn all_finite(set: &ParamSet) -> Result<bool> {
    for t in set.tensors() {
        let sum = t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}
