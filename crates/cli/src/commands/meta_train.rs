//! `metalearn meta-train`: meta-train a model from a TOML experiment config.

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;
use serde_json::json;

use metalearn::error::Result;
use metalearn::experiment::ExperimentConfig;
use metalearn::meta_training::{meta_train, resume, MetaTrainOptions};
use metalearn::text::{TokenizerRecord, TOKENIZER_SECTION};

/// Floating-point precision of a run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats (the default: fast).
    F32,
    /// 64-bit floats.
    F64,
}

/// Arguments of `meta-train`.
#[derive(Args, Debug, Clone)]
pub struct MetaTrainArgs {
    /// Experiment config (TOML) with the tables task, model, algorithm, training and eval.
    #[arg(long)]
    pub config: PathBuf,
    /// Data for classification tasks (image folder, CSV or Omniglot archive); overrides
    /// task.data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Omniglot archive of the validation alphabets; overrides task.validation_data.
    #[arg(long, value_name = "FILE")]
    pub validation_data: Option<PathBuf>,
    /// Output folder for checkpoints (best.safetensors, latest.safetensors) and log.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Meta-iterations (overrides training.iterations).
    #[arg(long)]
    pub iterations: Option<u64>,
    /// Seed (overrides training.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write latest.safetensors every N iterations (overrides training.checkpoint_every).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Continue from OUT/latest.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Floating-point precision of a new run's weights and arithmetic (a resumed run keeps its
    /// checkpoint's): f32, or f64 for exact comparisons.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Train on the first CUDA GPU (needs a build with the `cuda` feature). Checkpoints are the
    /// same as from the CPU and load on either.
    #[arg(long)]
    pub cuda: bool,
}

/// Runs `meta-train`; with the global `--threads N`, up to N tasks of a meta-batch also run in
/// parallel.
pub fn run(args: &MetaTrainArgs, threads: Option<usize>) -> Result<()> {
    let mut config = ExperimentConfig::from_file(&args.config)?;
    if let Some(n) = args.iterations {
        config.training.iterations = n;
    }
    if let Some(s) = args.seed {
        config.training.seed = s;
    }
    if let Some(n) = args.checkpoint_every {
        config.training.checkpoint_every = n;
    }
    if let Some(data) = &args.data {
        config.task.data = Some(data.clone());
    }
    if let Some(data) = &args.validation_data {
        config.task.validation_data = Some(data.clone());
    }
    config.validate()?;
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = args
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        PathBuf::from("runs").join(stem)
    });
    let device = crate::args::compute_device(args.cuda)?;
    let resumed = if args.resume {
        Some(resume(&out, &device)?)
    } else {
        None
    };
    // A text model's tokenizer, read once: the one its checkpoint stored when resuming (the
    // weights were trained with it, and no base encoder is needed), else the encoder's. It
    // tokenises the data and travels in every checkpoint, for `adapt` and `meta-eval`.
    let stored = match &resumed {
        Some((_, ckpt)) => TokenizerRecord::of(ckpt)?,
        None => None,
    };
    let tokenizer = match stored {
        Some(record) => Some(record),
        None => config.tokenizer_record()?,
    };
    config = config.with_stored_tokenizer(tokenizer.clone());
    let source = config.task_source()?;
    let (mut learner, resumed) = if let Some((learner, ckpt)) = resumed {
        (learner, Some(ckpt))
    } else {
        let dtype = match args.precision {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
        };
        let learner = config.initial_learner(&source.input_shape(), dtype, &device)?;
        (learner, None)
    };
    if let Some(t) = threads {
        learner.set_threads(t);
    }
    // Under MPI: every rank starts from rank 0's state; rank 0 alone writes files and prints.
    let world = learner.collective().clone();
    learner.broadcast_state()?;
    let root = world.is_root();
    let mut extra_sections = serde_json::Map::new();
    if let Some(record) = tokenizer {
        extra_sections.insert(
            TOKENIZER_SECTION.into(),
            serde_json::to_value(record).expect("tokenizer record serialises"),
        );
    }
    let options = MetaTrainOptions {
        iterations: config.training.iterations,
        meta_batch: config.training.meta_batch,
        validate_every: config.training.validate_every,
        validation_tasks: config.training.validation_tasks,
        checkpoint_every: config.training.checkpoint_every,
        out_dir: root.then(|| out.clone()),
        seed: config.training.seed,
        outer_lr: config.training.outer_lr,
        schedule: config.training.schedule.clone(),
        progress: root && !args.quiet && !args.json && crate::console::stderr_is_terminal(),
        experiment: serde_json::to_value(&config).expect("config serialises"),
        extra_sections,
    };
    let report = meta_train(&mut learner, source.as_ref(), &options, resumed.as_ref())?;
    let metric = learner.metric().name();
    let mut summary = json!({
        "algorithm": config.algorithm.label(),
        "iterations": report.iterations,
        "train_seconds": report.train_seconds,
        "final_meta_loss": report.final_meta_loss,
        "out_dir": out.display().to_string(),
        "latest_checkpoint": report.latest_checkpoint.as_ref().map(|p| p.display().to_string()),
        "best_checkpoint": report.best_checkpoint.as_ref().map(|p| p.display().to_string()),
        "peak_rss_mb": report.peak_rss_mb,
    });
    if let Some((iteration, best)) = &report.best_validation {
        summary["best_iteration"] = json!(iteration);
        summary[format!("best_val_{metric}")] = json!(best.mean);
        summary[format!("best_val_{metric}_ci95")] = json!(best.ci95);
    }
    if world.size() > 1 {
        summary["ranks"] = json!(world.size());
    }
    if !root {
        return Ok(());
    }
    if !args.json {
        println!(
            "meta-trained {} for {} iterations in {:.1} s (final meta-loss {:.4})",
            config.algorithm.label(),
            report.iterations,
            report.train_seconds,
            report.final_meta_loss
        );
        if let Some((iteration, best)) = &report.best_validation {
            println!(
                "best validation {metric}: {:.4} ± {:.4} at iteration {iteration}",
                best.mean, best.ci95
            );
        }
        println!("checkpoints and log in {}", out.display());
    }
    if args.json {
        println!("{summary}");
    }
    Ok(())
}
