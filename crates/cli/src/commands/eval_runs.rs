//! `metalearn eval-runs`: the official Omniglot one-shot benchmark (20 runs of 20-way 1-shot
//! classification), error rate per run and mean.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use metalearn::checkpoint::Checkpoint;
use metalearn::error::Result;
use metalearn::eval::runs::{
    evaluate_runs, evaluate_runs_with_backbone, learner_for_ways, OneShotBenchmark, RunsOptions,
};
use metalearn::experiment::{resolve_model_path, stored_config};

/// Arguments of `eval-runs`.
#[derive(Args, Debug, Clone)]
pub struct EvalRunsArgs {
    /// A meta-trained checkpoint, or a meta-train output folder (its best checkpoint is used).
    #[arg(
        long,
        required_unless_present = "backbone",
        conflicts_with = "backbone"
    )]
    pub model: Option<PathBuf>,
    /// Instead of --model: a pre-trained image backbone, frozen; each test image takes the
    /// class of the training image nearest by cosine of their pooled features.
    #[arg(long, value_name = "FILE|DIR")]
    pub backbone: Option<PathBuf>,
    /// With --backbone: its architecture (default: from the file or folder name, or its
    /// config.json).
    #[arg(long, value_name = "NAME")]
    pub architecture: Option<String>,
    /// The folder holding run01 ... run20 (unpacked all_runs.zip), or all_runs.zip itself.
    #[arg(long, value_name = "DIR")]
    pub runs: PathBuf,
    /// Adaptation steps (default: algorithm.eval_inner_steps of the checkpoint).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Test-time augmentation for ProtoNet models: embed every image as the mean embedding of
    /// the image and its eight copies shifted by one pixel (diagonals included).
    #[arg(long)]
    pub test_time_shifts: bool,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `eval-runs`.
pub fn run(args: &EvalRunsArgs) -> Result<()> {
    if let Some(backbone) = &args.backbone {
        return run_backbone(args, backbone);
    }
    let model = args
        .model
        .as_ref()
        .expect("clap requires --model without --backbone");
    let path = resolve_model_path(model)?;
    let ckpt = Checkpoint::load(&path, &candle_core::Device::Cpu)?;
    let bench = OneShotBenchmark::open(&args.runs)?;
    let mut learner = learner_for_ways(&ckpt, bench.ways())?;
    learner.set_test_time_shifts(args.test_time_shifts);
    // Preprocess as during meta-training: the filter is recorded in the experiment config.
    let resample = stored_config(&ckpt, &path)?
        .and_then(|c| c.task.resample)
        .unwrap_or_default();
    let steps = args
        .steps
        .unwrap_or(learner.algorithm_config().eval_inner_steps);
    let report = evaluate_runs(
        &learner,
        &bench,
        &RunsOptions {
            resample,
            steps: Some(steps),
        },
    )?;
    let algorithm = learner.algorithm_config().name.name();
    if args.json {
        println!(
            "{}",
            json!({
                "command": "eval-runs",
                "model": path.display().to_string(),
                "algorithm": algorithm,
                "error_percent": report.error_percent,
                "per_run": report.per_run,
                "runs": report.runs,
                "ways": report.ways,
                "test_images": report.test_images,
                "steps": steps,
                "test_time_shifts": args.test_time_shifts,
            })
        );
    } else {
        for (name, error) in report.runs.iter().zip(&report.per_run) {
            println!("{name}: {error:.1}% error");
        }
        println!(
            "{algorithm}: {:.2}% mean error over {} runs of {}-way one-shot classification \
             ({} test images, {})",
            report.error_percent,
            report.runs.len(),
            report.ways,
            report.test_images,
            learner
                .algorithm_config()
                .name
                .adaptation_summary(steps, args.test_time_shifts)
        );
    }
    Ok(())
}

/// `eval-runs --backbone`: nearest neighbour by cosine on a frozen backbone's features.
fn run_backbone(args: &EvalRunsArgs, backbone_path: &std::path::Path) -> Result<()> {
    let backbone = metalearn::vision::Backbone::load(
        backbone_path,
        args.architecture.as_deref(),
        candle_core::DType::F32,
    )?;
    let bench = OneShotBenchmark::open(&args.runs)?;
    let started = std::time::Instant::now();
    let report = evaluate_runs_with_backbone(&backbone, &bench)?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({
                "command": "eval-runs",
                "backbone": backbone_path.display().to_string(),
                "architecture": backbone.name,
                "method": "nearest neighbour, cosine of pooled features",
                "error_percent": report.error_percent,
                "per_run": report.per_run,
                "runs": report.runs,
                "ways": report.ways,
                "test_images": report.test_images,
                "seconds": seconds,
            })
        );
    } else {
        for (name, error) in report.runs.iter().zip(&report.per_run) {
            println!("{name}: {error:.1}% error");
        }
        println!(
            "{} (frozen, nearest neighbour by cosine): {:.2}% mean error over {} runs of \
             {}-way one-shot classification ({} test images, {seconds:.1} s)",
            backbone.name,
            report.error_percent,
            report.runs.len(),
            report.ways,
            report.test_images
        );
    }
    Ok(())
}
