//! The meta-training loop: sample a meta-batch, take a meta-step, validate on held-out tasks
//! every so often, keep the best checkpoint, log to JSONL, checkpoint periodically and resume.
//!
//! Resuming is exact: `latest.safetensors` holds the weights, the optimiser's moments and step
//! count, batch-norm statistics, the task sampler's RNG position, the best validation result and
//! the window of recent meta-losses, so a run killed at any moment and resumed with the same seed
//! and thread count ends with the same parameters and the same `log.jsonl` as a run that was
//! never interrupted. Checkpoints are written to a temporary file and renamed into place; on
//! resume, log lines past the checkpoint's iteration (written before the kill, and to be written
//! again) are dropped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::eval::{scores_across_ranks, summarize, Summary};
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
    /// Further sections written into every checkpoint, by name (a text model's `tokenizer`).
    pub extra_sections: serde_json::Map<String, serde_json::Value>,
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
    /// Peak resident memory of the process in MiB, where the system reports it (Linux).
    pub peak_rss_mb: Option<f64>,
}

/// File names inside the output folder.
pub const BEST_FILE: &str = "best.safetensors";
/// The latest (resumable) checkpoint.
pub const LATEST_FILE: &str = "latest.safetensors";
/// The per-validation JSONL log.
pub const LOG_FILE: &str = "log.jsonl";

/// Progress of the loop that a resumable checkpoint records.
///
/// Floats that decide later results (the best metric, the recent losses) are also stored as
/// IEEE-754 bit patterns: JSON text does not promise to parse back to the same `f64`, and a
/// best metric one ulp off could flip a later "improved?" comparison on resume.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LoopState {
    iteration: u64,
    rng_seed: [u8; 32],
    rng_word_pos: String,
    rng_stream: u64,
    /// Iteration and mean of the best validation, for people reading the file.
    best: Option<(u64, f64)>,
    /// The best validation exactly (absent in checkpoints of older versions).
    #[serde(default)]
    best_exact: Option<ExactSummary>,
    /// Bit patterns of the last (up to) 100 meta-losses, oldest first.
    #[serde(default)]
    recent_loss_bits: Vec<u64>,
    /// Training seconds spent before this checkpoint, over all resumed runs.
    #[serde(default)]
    elapsed_seconds: f64,
}

/// A validation [`Summary`] and its iteration, with the floats as bit patterns.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ExactSummary {
    iteration: u64,
    mean_bits: u64,
    ci95_bits: u64,
    std_bits: u64,
    n: usize,
}

impl ExactSummary {
    fn new(iteration: u64, summary: &Summary) -> Self {
        Self {
            iteration,
            mean_bits: summary.mean.to_bits(),
            ci95_bits: summary.ci95.to_bits(),
            std_bits: summary.std.to_bits(),
            n: summary.n,
        }
    }

    fn summary(&self) -> (u64, Summary) {
        (
            self.iteration,
            Summary {
                mean: f64::from_bits(self.mean_bits),
                ci95: f64::from_bits(self.ci95_bits),
                std: f64::from_bits(self.std_bits),
                n: self.n,
            },
        )
    }
}

/// How many recent meta-losses the running mean (progress bar, log, report) averages.
const RECENT_WINDOW: usize = 100;

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

/// Loads the learner (onto `device`) and loop state from `<dir>/latest.safetensors` to continue
/// training.
pub fn resume(dir: &Path, device: &candle_core::Device) -> Result<(MetaLearner, Checkpoint)> {
    let path = dir.join(LATEST_FILE);
    if !path.exists() {
        return Err(Error::Config(format!(
            "cannot resume: {} does not exist (train with --out {} first, or drop --resume)",
            path.display(),
            dir.display()
        )));
    }
    let ckpt = Checkpoint::load(&path, device)?;
    let learner = MetaLearner::from_checkpoint(&ckpt)?;
    Ok((learner, ckpt))
}

/// Drops the lines of the JSONL log at `path` whose iteration is past `iteration`, and a torn
/// last line, so that a resumed run's log equals an uninterrupted run's: lines written after the
/// checkpoint being resumed are written again by the resumed run. A fresh run (`iteration` 0)
/// starts an empty log.
fn truncate_log(path: &Path, iteration: u64) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut kept = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            // The process was killed in the middle of this line.
            break;
        }
        let line_iteration = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("iteration")?.as_u64());
        if line_iteration.is_some_and(|i| i <= iteration) {
            kept.push_str(line);
        }
    }
    if kept.len() != bytes.len() {
        crate::fsutil::atomic_write(path, kept.as_bytes())?;
    }
    Ok(())
}

/// Removes temporary files of checkpoint or log writes that a killed run left behind.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = [LATEST_FILE, BEST_FILE, LOG_FILE]
            .iter()
            .any(|file| name.starts_with(&format!(".{file}.")));
        if ours && name.ends_with(".tmp") {
            // Best effort: a leftover temporary file is harmless, only untidy.
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Flushes `path` to disk if it exists, so that the log lines a checkpoint follows survive a
/// power loss together with it.
fn sync_if_exists(path: &Path) -> Result<()> {
    match std::fs::File::open(path) {
        Ok(file) => file.sync_all().map_err(|e| Error::io(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
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
/// by [`resume`], sampling continues exactly where it stopped: with the same seed and thread
/// count the result is bit-identical to a run that was never interrupted.
///
/// With an output folder, the log there keeps only lines up to the learner's current iteration
/// (none for a fresh learner), and temporary files left by a killed run are removed.
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
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut best: Option<(u64, f64)> = None;
    let mut best_summary: Option<(u64, Summary)> = None;
    let mut recent: std::collections::VecDeque<f64> = Default::default();
    let mut earlier_seconds = 0.0;
    if let Some(state) = resume_from.and_then(|c| c.section("loop")) {
        let state: LoopState = serde_json::from_value(state.clone())
            .map_err(|e| Error::Checkpoint(format!("invalid loop state: {e}")))?;
        rng = restore_rng(&state)?;
        best = state.best;
        if let Some(exact) = &state.best_exact {
            let (iteration, summary) = exact.summary();
            best = Some((iteration, summary.mean));
            best_summary = Some((iteration, summary));
        }
        recent = state
            .recent_loss_bits
            .iter()
            .map(|&bits| f64::from_bits(bits))
            .collect();
        earlier_seconds = state.elapsed_seconds;
    }
    let accuracy = learner.metric() == crate::train::metrics::Metric::Accuracy;
    let start_iter = learner.iteration();
    let mut latest_path = None;
    if let Some(dir) = &options.out_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        remove_stale_temporaries(dir);
        truncate_log(&dir.join(LOG_FILE), start_iter)?;
        let latest = dir.join(LATEST_FILE);
        if resume_from.is_some() && latest.exists() {
            latest_path = Some(latest);
        }
    }
    let bar = crate::progress::bar(
        options.iterations.saturating_sub(start_iter),
        options.progress,
        "meta-training",
    );
    let metric_name = learner.metric().name();
    let write = |learner: &MetaLearner,
                 file: &str,
                 rng: &ChaCha8Rng,
                 best: Option<(u64, f64)>,
                 best_summary: &Option<(u64, Summary)>,
                 recent: &std::collections::VecDeque<f64>|
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
            best_exact: best_summary.as_ref().map(|(i, s)| ExactSummary::new(*i, s)),
            recent_loss_bits: recent.iter().map(|l| l.to_bits()).collect(),
            elapsed_seconds: earlier_seconds + started.elapsed().as_secs_f64(),
        };
        ckpt.sections.insert(
            "loop".into(),
            serde_json::to_value(state).expect("serialises"),
        );
        ckpt.sections
            .insert("experiment".into(), options.experiment.clone());
        for (name, value) in &options.extra_sections {
            ckpt.sections.insert(name.clone(), value.clone());
        }
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
        if recent.len() > RECENT_WINDOW {
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
                    write(learner, BEST_FILE, &rng, best, &best_summary, &recent)?;
                }
            }
            if let Some(dir) = &options.out_dir {
                let line = json!({
                    "iteration": done,
                    "meta_loss": running,
                    "lr": lr,
                    format!("val_{metric_name}"): summary.mean,
                    format!("val_{metric_name}_ci95"): summary.ci95,
                    "seconds": earlier_seconds + started.elapsed().as_secs_f64(),
                });
                crate::fsutil::append_line(&dir.join(LOG_FILE), &line.to_string())?;
            }
        }
        let checkpoint_now = options.out_dir.is_some()
            && ((options.checkpoint_every > 0 && done.is_multiple_of(options.checkpoint_every))
                || done == options.iterations);
        if checkpoint_now {
            let dir = options.out_dir.as_ref().expect("checked above");
            // The log lines up to this iteration must be on disk before a checkpoint that says
            // they were written.
            sync_if_exists(&dir.join(LOG_FILE))?;
            latest_path = Some(write(
                learner,
                LATEST_FILE,
                &rng,
                best,
                &best_summary,
                &recent,
            )?);
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
        peak_rss_mb: crate::runtime::peak_rss_mb(),
    })
}

/// Scores the learner on the (fixed) validation tasks.
fn validate(
    learner: &MetaLearner,
    source: &dyn TaskSource,
    options: &MetaTrainOptions,
) -> Result<Summary> {
    // A fixed seed, so every validation sees the same tasks and results are comparable.
    let scores = scores_across_ranks(
        learner.collective().as_ref(),
        source,
        Split::Validation,
        options.validation_tasks.max(1),
        options.seed ^ 0x9E37_79B9_7F4A_7C15,
        |task| learner.evaluate_task(task, None),
    )?;
    Ok(summarize(&scores))
}
