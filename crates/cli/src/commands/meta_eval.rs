//! `metalearn meta-eval`: mean and 95% CI of the task metric over new test tasks, optionally
//! beside the plain transfer-learning baseline.

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;
use serde_json::json;

use metalearn::checkpoint::Checkpoint;
use metalearn::error::{Error, Result};
use metalearn::eval::baseline::{train_transfer_baseline, BaselineOptions};
use metalearn::eval::score_episodes;
use metalearn::experiment::{load_meta_model, ExperimentConfig};
use metalearn::tasks::Split;

/// Arguments of `meta-eval`.
#[derive(Args, Debug, Clone)]
pub struct MetaEvalArgs {
    /// A checkpoint, or a meta-train output folder (its best checkpoint is used).
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// Evaluate the model an experiment config starts from, before any meta-training (e.g. a
    /// pre-trained text encoder's prototypes), instead of a checkpoint.
    #[arg(long, value_name = "CONFIG.toml")]
    pub config: Option<PathBuf>,
    /// Test tasks (default: eval.episodes of the config, 600).
    #[arg(long)]
    pub episodes: Option<usize>,
    /// Adaptation steps (default: algorithm.eval_inner_steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Seed of the test tasks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Which split's classes to draw tasks from: test or validation.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Data for classification tasks (overrides the path recorded in the checkpoint).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Classes per test task (default: the config's). ProtoNet models work with any number;
    /// MAML-family models only with the number they were meta-trained for.
    #[arg(long)]
    pub ways: Option<usize>,
    /// Support examples per class of the test tasks (default: the config's).
    #[arg(long)]
    pub shots: Option<usize>,
    /// Query examples per class of the test tasks (default: the config's).
    #[arg(long)]
    pub queries: Option<usize>,
    /// Draw all classes of a test task from one alphabet (group), as the official Omniglot
    /// one-shot runs do.
    #[arg(long)]
    pub same_alphabet: bool,
    /// Omniglot: comma-separated alphabets of `--data` to draw test tasks from, e.g. alphabets
    /// never seen in meta-training (replaces the config's split).
    #[arg(long, value_delimiter = ',')]
    pub test_alphabets: Option<Vec<String>>,
    /// Test-time augmentation for ProtoNet models: embed every image as the mean embedding of
    /// the image and its eight copies shifted by one pixel (diagonals included).
    #[arg(long)]
    pub test_time_shifts: bool,
    /// Run on the first CUDA GPU (needs a build with the `cuda` feature).
    #[arg(long)]
    pub cuda: bool,
    /// Also train and score the transfer baseline (joint training, then fine-tuning).
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `meta-eval`.
pub fn run(args: &MetaEvalArgs) -> Result<()> {
    let split = match args.split.as_str() {
        "test" => Split::Test,
        "validation" | "val" => Split::Validation,
        other => {
            return Err(Error::Config(format!(
                "--split `{other}` is unknown: use test or validation"
            )))
        }
    };
    let device = crate::args::compute_device(args.cuda)?;
    let (learner, mut config, path) = match (&args.model, &args.config) {
        (Some(model), _) => {
            let (learner, config, path) = load_meta_model(model, &device)?;
            (Some(learner), config, Some(path))
        }
        (None, Some(config)) => (None, ExperimentConfig::from_file(config)?, None),
        (None, None) => {
            return Err(Error::Config(
                "give --model CKPT (a meta-trained model) or --config CONFIG.toml (the model \
                 the experiment starts from)"
                    .into(),
            ))
        }
    };
    let trained_ways = config.task.ways;
    let model_label = match (&path, &args.config) {
        (Some(path), _) => path.display().to_string(),
        (None, Some(config)) => format!("{} (before meta-training)", config.display()),
        (None, None) => String::new(),
    };
    if let Some(ways) = args.ways {
        config.task.ways = Some(ways);
    }
    if let Some(shots) = args.shots {
        config.task.shots = Some(shots);
    }
    if let Some(queries) = args.queries {
        config.task.queries = Some(queries);
    }
    if args.same_alphabet {
        config.task.same_group = true;
    }
    let split = match &args.test_alphabets {
        Some(test) => {
            config.task.split = None;
            config.task.split_by_group = false;
            config.task.validation_data = None;
            config.task.split_alphabets = Some(metalearn::data::omniglot::AlphabetSplit {
                train: Vec::new(),
                validation: Vec::new(),
                test: test.iter().map(|a| a.trim().to_string()).collect(),
            });
            Split::Test
        }
        None => split,
    };
    if let Some(data) = &args.data {
        config.task.data = Some(data.clone());
    }
    config.validate()?;
    if config.task.kind == "recommendation" {
        let Some(learner) = learner else {
            return Err(Error::Config(
                "a recommendation model is scored with --model RUN (a meta-trained model)".into(),
            ));
        };
        return recommendation(args, &learner, &config, &model_label);
    }
    let source = config.task_source()?;
    let mut learner = match (learner, path) {
        (Some(_), Some(path)) if args.ways.is_some() && args.ways != trained_ways => {
            let ways = args.ways.unwrap_or_default();
            metalearn::eval::runs::learner_for_ways(&Checkpoint::load(&path, &device)?, ways)?
        }
        (Some(learner), _) => learner,
        (None, _) => config.initial_learner(&source.input_shape(), DType::F32, &device)?,
    };
    learner.set_test_time_shifts(args.test_time_shifts);
    source.check_split(split)?;
    let episodes = args.episodes.unwrap_or(config.eval.episodes);
    if episodes == 0 {
        return Err(Error::Config("--episodes must be >= 1".into()));
    }
    let steps = args.steps.unwrap_or(config.algorithm.eval_inner_steps);
    // Under MPI the episodes are split across the ranks; rank 0 alone prints.
    let root = metalearn::distributed::world().is_root();
    let show_progress = root && !args.quiet && !args.json && crate::console::stderr_is_terminal();
    let bar = metalearn::progress::bar(episodes as u64, show_progress, "meta-evaluating");
    let summary = score_episodes(source.as_ref(), split, episodes, args.seed, steps, |task| {
        let score = learner.evaluate_task(task, Some(steps));
        bar.inc(1);
        score
    })?;
    bar.finish_and_clear();
    let metric = learner.metric().name();
    let mut out = json!({
        "model": model_label,
        "algorithm": config.algorithm.label(),
        "metric": metric,
        "mean": summary.mean,
        "ci95": summary.ci95,
        "std": summary.std,
        "episodes": summary.n,
        "steps": steps,
        "split": args.split,
        "ways": config.task.ways,
        "shots": config.task.shots,
        "same_alphabet": config.task.same_group,
        "test_time_shifts": args.test_time_shifts,
    });
    if !args.json && root {
        println!(
            "{}: {metric} {:.4} ± {:.4} (95% CI) over {} new tasks, {}",
            config.algorithm.label(),
            summary.mean,
            summary.ci95,
            summary.n,
            config
                .algorithm
                .name
                .adaptation_summary(steps, args.test_time_shifts)
        );
    }
    if args.baseline {
        let arch = learner.network().architecture().clone();
        let baseline = train_transfer_baseline(
            &arch,
            source.as_ref(),
            &BaselineOptions {
                iterations: config.eval.baseline_iterations,
                tasks_per_batch: config.training.meta_batch,
                lr: config.eval.baseline_lr,
                seed: config.training.seed,
                inner_lr: config.algorithm.inner_lr,
            },
        )?;
        let bar = metalearn::progress::bar(episodes as u64, show_progress, "scoring the baseline");
        let b = score_episodes(source.as_ref(), split, episodes, args.seed, steps, |task| {
            let score = baseline.evaluate_task(task, steps);
            bar.inc(1);
            score
        })?;
        bar.finish_and_clear();
        out["baseline_mean"] = json!(b.mean);
        out["baseline_ci95"] = json!(b.ci95);
        if !args.json && root {
            println!(
                "transfer baseline: {metric} {:.4} ± {:.4} (joint training, then {steps} fine-tuning steps)",
                b.mean, b.ci95
            );
        }
    }
    if args.json && root {
        println!("{out}");
    }
    Ok(())
}

/// `meta-eval` of a recommendation model: every cold partition present, with the baselines.
fn recommendation(
    args: &MetaEvalArgs,
    learner: &metalearn::meta::learner::MetaLearner,
    config: &ExperimentConfig,
    model_label: &str,
) -> Result<()> {
    use metalearn::eval::recommendation::{evaluate_baselines, evaluate_model, WarmMeans};
    let started = std::time::Instant::now();
    let tasks = config.recommendation_tasks(args.seed)?;
    let steps = args.steps.unwrap_or(config.algorithm.eval_inner_steps);
    let means = WarmMeans::new(&tasks);
    let mut partitions = serde_json::Map::new();
    let mut baselines: std::collections::BTreeMap<
        String,
        serde_json::Map<String, serde_json::Value>,
    > = Default::default();
    let mut table = Vec::new();
    // The transfer baseline trains as long and as fast as meta-training did.
    let transfer = if args.baseline {
        let arch = learner.network().architecture().clone();
        Some(train_transfer_baseline(
            &arch,
            &tasks,
            &BaselineOptions {
                iterations: config.training.iterations as usize,
                tasks_per_batch: config.training.meta_batch,
                lr: config.training.outer_lr,
                seed: config.training.seed,
                inner_lr: config.algorithm.inner_lr,
            },
        )?)
    } else {
        None
    };
    let factorization =
        metalearn::eval::recommendation::Factorization::train(&tasks, config.training.seed);
    for name in &metalearn::data::ratings::PARTITIONS[1..] {
        let users = tasks.partition(name).unwrap_or_default();
        if users.is_empty() {
            continue;
        }
        let scores = evaluate_model(learner, &tasks, users, Some(steps))?;
        table.push((
            name.to_string(),
            config.algorithm.label().to_string(),
            scores.clone(),
        ));
        partitions.insert(name.to_string(), scores.to_json());
        let mut others = evaluate_baselines(&tasks, users, &means);
        others.insert(
            "matrix_factorization".into(),
            metalearn::eval::recommendation::evaluate_factorization(&factorization, &tasks, users),
        );
        if let Some(transfer) = &transfer {
            others.insert(
                "pretrain_finetune".into(),
                metalearn::eval::recommendation::evaluate_transfer(transfer, &tasks, users, steps)?,
            );
        }
        for (baseline, scores) in others {
            baselines
                .entry(baseline.clone())
                .or_default()
                .insert(name.to_string(), scores.to_json());
            table.push((name.to_string(), baseline, scores));
        }
    }
    if partitions.is_empty() {
        return Err(Error::Data(format!(
            "no cold partition has users with {}..={} ratings to score; the data's partitions \
             come from {}",
            config.ratings_config().min_ratings,
            config.ratings_config().max_ratings,
            tasks.data.report.partitions_from
        )));
    }
    let skipped: serde_json::Map<String, serde_json::Value> = metalearn::data::ratings::PARTITIONS
        .iter()
        .zip(&tasks.skipped)
        .map(|(p, s)| (p.to_string(), json!(s)))
        .collect();
    if !args.json {
        println!(
            "{:<16} {:<22} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "partition", "method", "users", "MAE", "RMSE", "nDCG@1", "nDCG@3", "nDCG@5"
        );
        for (partition, method, s) in &table {
            println!(
                "{:<16} {:<22} {:>7} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4}",
                partition,
                method,
                s.users,
                s.mean("mae"),
                s.mean("rmse"),
                s.mean("ndcg@1"),
                s.mean("ndcg@3"),
                s.mean("ndcg@5")
            );
        }
        println!(
            "support/query seed {}, {}; skipped users (too few / too many ratings): {}",
            args.seed,
            config.algorithm.name.adaptation_summary(steps, false),
            serde_json::Value::Object(skipped.clone())
        );
    }
    if args.json {
        println!(
            "{}",
            json!({
                "model": model_label,
                "algorithm": config.algorithm.label(),
                "seed": args.seed,
                "steps": steps,
                "partitions": partitions,
                "baselines": baselines,
                "skipped": skipped,
                "global_mean_rating": means.global,
                "eval_seconds": started.elapsed().as_secs_f64(),
            })
        );
    }
    Ok(())
}
