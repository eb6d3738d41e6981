//! The meta-training loop: sample a meta-batch, take a meta-step, validate on held-out tasks
//! every so often, keep the best checkpoint, log to JSONL, checkpoint periodically and resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::eval::{summarize, Summary};
use crate::meta::learner::MetaLearner;
use crate::tasks::{Split, TaskSource};

/// Outer learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum Schedule {
    /// The same rate throughout.
    #[default]
    Constant,
    /// Cosine decay from the base rate to `min_factor` times it at the last iteration.
    Cosine {
        /// Final rate as a fraction of the base rate.
        #[serde(default)]
        min_factor: f64,
    },
    /// Multiply the rate by `factor` every `every` iterations.
    Step {
        /// Iterations between decays.
        every: u64,
        /// Decay factor.
        factor: f64,
    },
}

impl Schedule {
    /// Learning rate at `iteration` (0-based) of `total`.
    pub fn lr(&self, base: f64, iteration: u64, total: u64) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Cosine { min_factor } => {
                let progress = iteration as f64 / total.max(1) as f64;
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                base * (min_factor + (1.0 - min_factor) * cos)
            }
            Schedule::Step { every, factor } => {
                base * factor.powi((iteration / (*every).max(1)) as i32)
            }
        }
    }
}

/// Options of [`meta_train`].
#[derive(Clone, Debug)]
pub struct MetaTrainOptions {
    /// Total meta-iterations (including those done before a resume).
    pub iterations: u64,
    /// Tasks per meta-iteration.
    pub meta_batch: usize,
    /// Validate every this many iterations (0: never).
    pub validate_every: u64,
    /// Validation tasks per validation (the same tasks each time).
    pub validation_tasks: usize,
    /// Write `latest.safetensors` every this many iterations (0: only at the end).
    pub checkpoint_every: u64,
    /// Folder for checkpoints and the JSONL log (`None`: keep nothing on disk).
    pub out_dir: Option<PathBuf>,
    /// Seed of task sampling.
    pub seed: u64,
    /// Base outer learning rate.
    pub outer_lr: f64,
    /// Outer learning-rate schedule.
    pub schedule: Schedule,
    /// Show a progress bar.
    pub progress: bool,
    /// JSON written into every checkpoint's `experiment` section (the full configuration), so
    /// that evaluation can rebuild the task source from the checkpoint.
    pub experiment: serde_json::Value,
}

/// What [`meta_train`] reports.
#[derive(Clone, Debug, Serialize)]
pub struct MetaTrainReport {
    /// Iterations done in total.
    pub iterations: u64,
    /// Seconds spent in this call.
    pub train_seconds: f64,
    /// Mean meta-loss over the last (up to) 100 iterations.
    pub final_meta_loss: f64,
    /// Best validation result and its iteration.
    pub best_validation: Option<(u64, Summary)>,
    /// Path of the best checkpoint, if written.
    pub best_checkpoint: Option<PathBuf>,
    /// Path of the latest checkpoint, if written.
    pub latest_checkpoint: Option<PathBuf>,
}

/// File names inside the output folder.
pub const BEST_FILE: &str = "best.safetensors";
/// The latest (resumable) checkpoint.
pub const LATEST_FILE: &str = "latest.safetensors";
/// The per-validation JSONL log.
pub const LOG_FILE: &str = "log.jsonl";

/// Progress of the loop that a resumable checkpoint records.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LoopState {
    iteration: u64,
    rng_seed: [u8; 32],
    rng_word_pos: String,
    rng_stream: u64,
    best: Option<(u64, f64)>,
}

fn rng_state(rng: &ChaCha8Rng) -> (String, [u8; 32], u64) {
    (
        rng.get_word_pos().to_string(),
        rng.get_seed(),
        rng.get_stream(),
    )
}

fn restore_rng(state: &LoopState) -> Result<ChaCha8Rng> {
    let mut rng = ChaCha8Rng::from_seed(state.rng_seed);
    rng.set_stream(state.rng_stream);
    let pos: u128 = state
        .rng_word_pos
        .parse()
        .map_err(|_| Error::Checkpoint("invalid RNG position in checkpoint".into()))?;
    rng.set_word_pos(pos);
    Ok(rng)
}

/// Loads the learner and loop state from `<dir>/latest.safetensors` to continue training.
pub fn resume(dir: &Path) -> Result<(MetaLearner, Checkpoint)> {
    let path = dir.join(LATEST_FILE);
    if !path.exists() {
        return Err(Error::Config(format!(
            "cannot resume: {} does not exist (train with --out {} first, or drop --resume)",
            path.display(),
            dir.display()
        )));
    }
    let ckpt = Checkpoint::load(&path, &candle_core::Device::Cpu)?;
    let learner = MetaLearner::from_checkpoint(&ckpt)?;
    Ok((learner, ckpt))
}

/// Higher is better for accuracy, lower for MSE.
fn better(metric_is_accuracy: bool, new: f64, old: f64) -> bool {
    if metric_is_accuracy {
        new > old
    } else {
        new < old
    }
}

/// Meta-trains `learner` on tasks from `source`. When `resume_from` is the checkpoint returned
/// by [`resume`], sampling continues exactly where it stopped.
pub fn meta_train(
    learner: &mut MetaLearner,
    source: &dyn TaskSource,
    options: &MetaTrainOptions,
    resume_from: Option<&Checkpoint>,
) -> Result<MetaTrainReport> {
    if options.meta_batch == 0 {
        return Err(Error::Config("training.meta_batch must be >= 1".into()));
    }
    if options.validate_every > 0 {
        source.check_split(Split::Validation)?;
    }
    let started = Instant::now();
    let (mut rng, mut best) = match resume_from.and_then(|c| c.section("loop")) {
        Some(state) => {
            let state: LoopState = serde_json::from_value(state.clone())
                .map_err(|e| Error::Checkpoint(format!("invalid loop state: {e}")))?;
            (restore_rng(&state)?, state.best)
        }
        None => (ChaCha8Rng::seed_from_u64(options.seed), None),
    };
    let accuracy = learner.metric() == crate::train::metrics::Metric::Accuracy;
    if let Some(dir) = &options.out_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let start_iter = learner.iteration();
    let bar = crate::progress::bar(
        options.iterations.saturating_sub(start_iter),
        options.progress,
        "meta-training",
    );
    let mut recent: std::collections::VecDeque<f64> = Default::default();
    let mut best_summary: Option<(u64, Summary)> = None;
    let mut latest_path = None;
    let metric_name = learner.metric().name();
    let write = |learner: &MetaLearner,
                 file: &str,
                 rng: &ChaCha8Rng,
                 best: Option<(u64, f64)>|
     -> Result<PathBuf> {
        let dir = options.out_dir.as_ref().expect("checked by caller");
        let mut ckpt = learner.to_checkpoint()?;
        let (pos, seed, stream) = rng_state(rng);
        let state = LoopState {
            iteration: learner.iteration(),
            rng_seed: seed,
            rng_word_pos: pos,
            rng_stream: stream,
            best,
        };
        ckpt.sections.insert(
            "loop".into(),
            serde_json::to_value(state).expect("serialises"),
        );
        ckpt.sections
            .insert("experiment".into(), options.experiment.clone());
        let path = dir.join(file);
        ckpt.save(&path)?;
        Ok(path)
    };
    while learner.iteration() < options.iterations {
        let it = learner.iteration();
        let lr = options
            .schedule
            .lr(options.outer_lr, it, options.iterations);
        learner.optimizer_mut().set_lr(lr);
        let tasks = source.sample_batch(Split::Train, options.meta_batch, &mut rng)?;
        let loss = learner
            .meta_train_step(&tasks)
            .inspect_err(|_| bar.abandon())?;
        recent.push_back(loss);
        if recent.len() > 100 {
            recent.pop_front();
        }
        let done = learner.iteration();
        let running = recent.iter().sum::<f64>() / recent.len() as f64;
        bar.inc(1);
        if done.is_multiple_of(10) || done == options.iterations {
            let val = best
                .map(|(_, v)| format!(" best val {metric_name} {v:.4}"))
                .unwrap_or_default();
            bar.set_message(format!("meta-loss {running:.4}{val}"));
        }
        let validate_now = options.validate_every > 0
            && (done.is_multiple_of(options.validate_every) || done == options.iterations);
        if validate_now {
            let summary = validate(learner, source, options)?;
            let improved = best.is_none_or(|(_, b)| better(accuracy, summary.mean, b));
            if improved {
                best = Some((done, summary.mean));
                best_summary = Some((done, summary.clone()));
                if options.out_dir.is_some() {
                    write(learner, BEST_FILE, &rng, best)?;
                }
            }
            if let Some(dir) = &options.out_dir {
                let line = json!({
                    "iteration": done,
                    "meta_loss": running,
                    "lr": lr,
                    format!("val_{metric_name}"): summary.mean,
                    format!("val_{metric_name}_ci95"): summary.ci95,
                    "seconds": started.elapsed().as_secs_f64(),
                });
                crate::fsutil::append_line(&dir.join(LOG_FILE), &line.to_string())?;
            }
        }
        let checkpoint_now = options.out_dir.is_some()
            && ((options.checkpoint_every > 0 && done.is_multiple_of(options.checkpoint_every))
                || done == options.iterations);
        if checkpoint_now {
            latest_path = Some(write(learner, LATEST_FILE, &rng, best)?);
        }
    }
    bar.finish_and_clear();
    let best_checkpoint = options
        .out_dir
        .as_ref()
        .map(|d| d.join(BEST_FILE))
        .filter(|p| p.exists());
    Ok(MetaTrainReport {
        iterations: learner.iteration(),
        train_seconds: started.elapsed().as_secs_f64(),
        final_meta_loss: if recent.is_empty() {
            f64::NAN
        } else {
            recent.iter().sum::<f64>() / recent.len() as f64
        },
        best_validation: best_summary,
        best_checkpoint,
        latest_checkpoint: latest_path,
    })
}

/// Scores the learner on the (fixed) validation tasks.
fn validate(
    learner: &MetaLearner,
    source: &dyn TaskSource,
    options: &MetaTrainOptions,
) -> Result<Summary> {
    // A fixed seed, so every validation sees the same tasks and results are comparable.
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut scores = Vec::with_capacity(options.validation_tasks);
    for _ in 0..options.validation_tasks.max(1) {
        let task = source.sample(Split::Validation, &mut rng)?;
        scores.push(learner.evaluate_task(&task, None)?);
    }
    Ok(summarize(&scores))
}
