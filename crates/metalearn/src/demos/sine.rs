//! The sinusoid demo: meta-train MAML and train the transfer baseline on sinusoid regression,
//! compare their MSE on new tasks after 0, 1 and 10 adaptation steps, and plot one new task.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::Result;
use crate::eval::baseline::{evaluate_baseline, train_transfer_baseline, BaselineOptions};
use crate::eval::{meta_evaluate, Summary};
use crate::meta::learner::MetaLearner;
use crate::meta::{AlgorithmConfig, AlgorithmKind};
use crate::meta_training::{meta_train, MetaTrainOptions, Schedule};
use crate::nn::architecture::{Activation, Architecture};
use crate::plot::{draw_chart, Series};
use crate::tasks::sinusoid::{points, SinusoidTasks};
use crate::tasks::{Split, TaskSource};
use crate::train::optim::OptimizerConfig;

/// Settings of the sinusoid demo.
#[derive(Clone, Debug)]
pub struct SineDemoOptions {
    /// MAML meta-iterations.
    pub iterations: u64,
    /// Tasks per meta-iteration.
    pub meta_batch: usize,
    /// Joint-training steps of the transfer baseline.
    pub baseline_iterations: usize,
    /// New tasks to evaluate on.
    pub eval_tasks: usize,
    /// Seed.
    pub seed: u64,
    /// Where to write the PNG (none: no plot).
    pub plot: Option<PathBuf>,
    /// Show progress bars.
    pub progress: bool,
}

impl Default for SineDemoOptions {
    fn default() -> Self {
        Self {
            iterations: 20000,
            meta_batch: 10,
            baseline_iterations: 20000,
            eval_tasks: 200,
            seed: 0,
            plot: Some(PathBuf::from("sine-demo.png")),
            progress: true,
        }
    }
}

/// MSE after 0, 1 and 10 adaptation steps.
#[derive(Clone, Debug, Serialize)]
pub struct AdaptationCurve {
    /// Before adaptation.
    pub steps_0: Summary,
    /// After one gradient step.
    pub steps_1: Summary,
    /// After ten gradient steps.
    pub steps_10: Summary,
}

/// What the demo measured.
#[derive(Clone, Debug, Serialize)]
pub struct SineDemoReport {
    /// MAML's MSE on new tasks.
    pub maml: AdaptationCurve,
    /// The transfer baseline's MSE on the same tasks.
    pub baseline: AdaptationCurve,
    /// Seconds of MAML meta-training.
    pub maml_train_seconds: f64,
    /// Seconds of baseline training.
    pub baseline_train_seconds: f64,
    /// The plot written, if any.
    pub plot: Option<PathBuf>,
}

const INNER_LR: f64 = 0.01;

/// Runs the demo.
pub fn run_sine_demo(options: &SineDemoOptions) -> Result<SineDemoReport> {
    let tasks = SinusoidTasks::default();
    let arch = Architecture::mlp(&[1, 40, 40, 1], Activation::Relu)?;
    let mut algorithm = AlgorithmConfig::new(AlgorithmKind::Maml);
    algorithm.inner_lr = INNER_LR;
    algorithm.eval_inner_steps = 10;
    let mut learner = MetaLearner::new(
        &arch,
        algorithm,
        tasks.kind(),
        OptimizerConfig::adam(1e-3),
        options.seed,
        DType::F32,
    )?;
    let train_options = MetaTrainOptions {
        iterations: options.iterations,
        meta_batch: options.meta_batch,
        validate_every: 0,
        validation_tasks: 0,
        checkpoint_every: 0,
        out_dir: None,
        seed: options.seed,
        outer_lr: 1e-3,
        schedule: Schedule::Constant,
        progress: options.progress,
        experiment: serde_json::Value::Null,
        extra_sections: Default::default(),
    };
    let started = Instant::now();
    meta_train(&mut learner, &tasks, &train_options, None)?;
    let maml_train_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let baseline = train_transfer_baseline(
        &arch,
        &tasks,
        &BaselineOptions {
            iterations: options.baseline_iterations,
            tasks_per_batch: options.meta_batch,
            lr: 1e-3,
            seed: options.seed,
            inner_lr: INNER_LR,
        },
    )?;
    let baseline_train_seconds = started.elapsed().as_secs_f64();

    let eval_seed = options.seed.wrapping_add(1_000_003);
    let n = options.eval_tasks;
    let maml_at = |steps| meta_evaluate(&learner, &tasks, Split::Test, n, Some(steps), eval_seed);
    let base_at = |steps| evaluate_baseline(&baseline, &tasks, Split::Test, n, steps, eval_seed);
    let maml = AdaptationCurve {
        steps_0: maml_at(0)?,
        steps_1: maml_at(1)?,
        steps_10: maml_at(10)?,
    };
    let baseline_curve = AdaptationCurve {
        steps_0: base_at(0)?,
        steps_1: base_at(1)?,
        steps_10: base_at(10)?,
    };

    if let Some(path) = &options.plot {
        let mut rng = ChaCha8Rng::seed_from_u64(eval_seed ^ 0xface);
        let (task, f) = tasks.sample_with_grid(200, &mut rng)?;
        let grid: Vec<f64> = task
            .query
            .0
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let curve = |pred: candle_core::Tensor| -> Result<Vec<(f64, f64)>> {
            let ys = pred.flatten_all()?.to_vec1::<f32>()?;
            Ok(grid.iter().zip(ys).map(|(&x, y)| (x, y as f64)).collect())
        };
        let (sx, sy) = (&task.support.0, &task.support.1);
        let support: Vec<(f64, f64)> = sx
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .zip(sy.flatten_all()?.to_vec1::<f32>()?)
            .map(|(x, y)| (x as f64, y as f64))
            .collect();
        let truth = points(&f, &grid.iter().map(|&x| x as f32).collect::<Vec<_>>())?;
        let maml_before = learner.predict(&learner.adapt((sx, sy), Some(0))?, &task.query.0)?;
        let maml_after = learner.predict(&learner.adapt((sx, sy), Some(10))?, &task.query.0)?;
        let series = vec![
            Series::line("ground truth", curve(truth.1)?),
            Series::points("support (K=10)", support),
            Series::dotted("MAML, 0 steps", curve(maml_before)?),
            Series::line("MAML, 10 steps", curve(maml_after)?),
            Series::dotted(
                "transfer baseline, 0 steps",
                curve(baseline.adapt_and_predict(&task.support, &task.query.0, 0)?)?,
            ),
            Series::line(
                "transfer baseline, 10 steps",
                curve(baseline.adapt_and_predict(&task.support, &task.query.0, 10)?)?,
            ),
        ];
        draw_chart(
            path,
            &format!(
                "New sinusoid task (A = {:.2}, phase = {:.2})",
                f.amplitude, f.phase
            ),
            "x",
            "y",
            &series,
            (900, 600),
        )?;
    }
    Ok(SineDemoReport {
        maml,
        baseline: baseline_curve,
        maml_train_seconds,
        baseline_train_seconds,
        plot: options.plot.clone(),
    })
}
