//! Reproducibility and resource use: the same seed and thread count give bit-identical results
//! for `fit` (library), `meta-train` and `meta-eval` (CLI), with one thread and with two; what
//! changes between one and two threads is measured and printed (run with `--nocapture`); and
//! meta-training's peak memory does not grow with the number of iterations.

mod common;

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use common::meta_runs;
use metalearn::{FitOptions, Layer, Loss, Metric, OptimizerConfig, ParamSet, Sequential};

// ---------------------------------------------------------------------------------------------
// fit (library)
// ---------------------------------------------------------------------------------------------

/// Serialises the tests of this binary that set `RAYON_NUM_THREADS` in this process (candle
/// reads it at every matrix product).
static THREAD_COUNT: Mutex<()> = Mutex::new(());

/// Runs `f` with candle using `threads` threads.
fn with_threads<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    let _guard = THREAD_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    f()
}

/// What a `fit` run produced: every per-epoch figure as a bit pattern, and the final weights and
/// batch-norm statistics.
struct FitOutcome {
    figures: Vec<Vec<(String, u64)>>,
    params: ParamSet,
    buffers: ParamSet,
}

impl FitOutcome {
    fn same_as(&self, other: &FitOutcome) -> bool {
        self.figures == other.figures
            && common::bit_identical(&self.params, &other.params)
            && common::bit_identical(&self.buffers, &other.buffers)
    }
}

fn fit(model: &mut Sequential, x: &Tensor, y: &Tensor, options: FitOptions) -> FitOutcome {
    let history = model.fit(x, y, options).expect("fit runs");
    FitOutcome {
        figures: history
            .epochs
            .iter()
            .map(|e| {
                e.flat()
                    .into_iter()
                    .map(|(k, v)| (k, v.to_bits()))
                    .collect()
            })
            .collect(),
        params: common::snapshot(&model.params()),
        buffers: common::snapshot(model.buffers()),
    }
}

/// A regression MLP with dropout (so the run also depends on the dropout RNG), wide enough that
/// its matrix products are split across threads.
fn fit_mlp() -> FitOutcome {
    let mut rng = common::rng(1);
    let x = common::normal(&mut rng, &[512, 16])
        .to_dtype(DType::F32)
        .unwrap();
    let w = common::uniform(&mut rng, &[16, 1], -0.5, 0.5)
        .to_dtype(DType::F32)
        .unwrap();
    let y = x.matmul(&w).unwrap().sin().unwrap();
    let mut model = Sequential::builder(&[16])
        .add(Layer::dense(256))
        .add(Layer::tanh())
        .add(Layer::dropout(0.1))
        .add(Layer::dense(256))
        .add(Layer::relu())
        .add(Layer::dense(1))
        .build(4)
        .unwrap();
    model
        .compile(OptimizerConfig::adam(1e-3), Loss::Mse, &[Metric::Mae])
        .unwrap();
    let options = FitOptions::new()
        .epochs(4)
        .batch_size(128)
        .validation_split(0.25)
        .seed(9);
    fit(&mut model, &x, &y, options)
}

/// A small convolutional classifier with batch normalisation (reductions over the batch).
fn fit_conv() -> FitOutcome {
    let mut rng = common::rng(2);
    let x = common::normal(&mut rng, &[96, 1, 12, 12])
        .to_dtype(DType::F32)
        .unwrap();
    let labels: Vec<f32> = (0..96).map(|_| rng.gen_range(0..3) as f32).collect();
    let y = Tensor::from_vec(labels, 96, &Device::Cpu).unwrap();
    let mut model = Sequential::builder(&[1, 12, 12])
        .add(Layer::conv2d(16, 3, 1))
        .add(Layer::batch_norm())
        .add(Layer::relu())
        .add(Layer::max_pool2d(2))
        .add(Layer::conv2d(16, 3, 1))
        .add(Layer::batch_norm())
        .add(Layer::relu())
        .add(Layer::max_pool2d(2))
        .add(Layer::Flatten)
        .add(Layer::dense(3))
        .build(6)
        .unwrap();
    model
        .compile(
            OptimizerConfig::adam(1e-2),
            Loss::CategoricalCrossEntropy,
            &[Metric::Accuracy],
        )
        .unwrap();
    fit(
        &mut model,
        &x,
        &y,
        FitOptions::new().epochs(3).batch_size(32).seed(3),
    )
}

/// Largest difference between two parameter sets relative to the largest magnitude.
fn relative_difference(a: &ParamSet, b: &ParamSet) -> f64 {
    let (mut diff, mut scale) = (0f64, 0f64);
    for (name, t) in a.iter() {
        let u = b.get(name).expect("same names");
        for (x, y) in common::values(t).iter().zip(common::values(u)) {
            diff = diff.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    diff / scale.max(f64::MIN_POSITIVE)
}

/// Fits twice with one thread and twice with two: each pair must agree bit for bit. One against
/// two threads is measured, and must stay close.
fn check_fit(label: &str, run: fn() -> FitOutcome) {
    for threads in [1, 2] {
        let (first, second) = with_threads(threads, || (run(), run()));
        assert!(
            first.same_as(&second),
            "{label}: two fits with {threads} thread(s) differ"
        );
    }
    let one = with_threads(1, run);
    let two = with_threads(2, run);
    let difference = relative_difference(&one.params, &two.params);
    eprintln!(
        "{label}: 1 vs 2 threads: bit-identical {}, largest relative parameter difference {difference:e}",
        one.same_as(&two)
    );
    assert!(difference < 1e-3, "{label}: 1 and 2 threads diverge");
}

#[test]
fn fit_repeats_exactly_for_a_thread_count() {
    check_fit("fit mlp", fit_mlp);
    check_fit("fit conv", fit_conv);
}

// ---------------------------------------------------------------------------------------------
// meta-train and meta-eval (CLI)
// ---------------------------------------------------------------------------------------------

const SINE_CONFIG: &str = r#"
[task]
kind = "sinusoid"
support = 10
query = 10
test_grid = 25

[model]
arch = "mlp"
hidden = [32, 32]

[algorithm]
name = "maml"
inner_lr = 0.01
inner_steps = 2
eval_inner_steps = 3

[training]
iterations = 60
meta_batch = 6
validate_every = 20
validation_tasks = 4
checkpoint_every = 20
seed = 21

[eval]
episodes = 15
baseline_iterations = 40
"#;

/// The `[training]` (and `[eval]`) tables appended to `meta_runs::SMALL_PROTONET_EXPERIMENT`.
const PROTONET_TRAINING: &str = r#"
[training]
iterations = 30
meta_batch = 2
validate_every = 10
validation_tasks = 3
checkpoint_every = 10
seed = 8

[eval]
episodes = 10
"#;

fn meta_train(dir: &Path, out: &str, threads: usize) -> serde_json::Value {
    meta_runs::run_json(meta_runs::metalearn(
        dir,
        threads,
        &[
            "meta-train",
            "--config",
            "config.toml",
            "--out",
            out,
            "--json",
        ],
    ))
}

fn meta_eval(dir: &Path, model: &str, threads: usize, baseline: bool) -> serde_json::Value {
    let mut args = vec!["meta-eval", "--model", model, "--seed", "5", "--json"];
    if baseline {
        args.push("--baseline");
    }
    meta_runs::run_json(meta_runs::metalearn(dir, threads, &args))
}

/// Meta-trains twice per thread count (1 and 2) and meta-evaluates twice per thread count: each
/// pair must agree bit for bit. Prints whether 1 and 2 threads agree.
fn check_meta_commands(dir: &Path, label: &str, baseline: bool) {
    for threads in [1, 2] {
        let a = format!("t{threads}a");
        let b = format!("t{threads}b");
        let first = meta_train(dir, &a, threads);
        let second = meta_train(dir, &b, threads);
        meta_runs::assert_same_summary(&first, &second);
        meta_runs::assert_same_meta_training(&dir.join(&a), &dir.join(&b));
        let eval = meta_eval(dir, &a, threads, baseline);
        assert!(eval["mean"].as_f64().is_some_and(f64::is_finite), "{eval}");
        assert_eq!(
            eval,
            meta_eval(dir, &a, threads, baseline),
            "{label}: meta-eval with {threads} thread(s) differs"
        );
    }
    let one = meta_runs::load_checkpoint(&dir.join("t1a/latest.safetensors"));
    let two = meta_runs::load_checkpoint(&dir.join("t2a/latest.safetensors"));
    let difference = relative_difference(&one.params, &two.params);
    eprintln!(
        "{label}: meta-train 1 vs 2 threads: bit-identical {}, largest relative parameter difference {difference:e}",
        common::bit_identical(&one.params, &two.params)
    );
    let eval_one = meta_eval(dir, "t1a", 1, baseline);
    let eval_two = meta_eval(dir, "t1a", 2, baseline);
    eprintln!(
        "{label}: meta-eval of one model with 1 vs 2 threads: identical {}, means {} and {}",
        eval_one == eval_two,
        eval_one["mean"],
        eval_two["mean"]
    );
    assert!(difference < 1e-2, "{label}: 1 and 2 threads diverge");
}

#[test]
fn sine_maml_meta_train_and_eval_repeat_exactly_for_a_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), SINE_CONFIG).unwrap();
    check_meta_commands(dir.path(), "sine maml", true);
}

#[test]
fn protonet_meta_train_and_eval_repeat_exactly_for_a_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    meta_runs::write_square_images(&dir.path().join("images"), 4, 12);
    let config = format!(
        "{}{PROTONET_TRAINING}",
        meta_runs::SMALL_PROTONET_EXPERIMENT
    );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    check_meta_commands(dir.path(), "protonet", false);
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// Peak memory after ten times the iterations stays within a generous margin of the peak after
/// a tenth of them: each meta-iteration's graph is freed. (A leak of the graph of this model,
/// tens of kilobytes per iteration, would add tens of MiB over the longer run.)
#[test]
fn meta_training_memory_does_not_grow_with_iterations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), SINE_CONFIG).unwrap();
    let peak = |iterations: &str, out: &str| -> Option<f64> {
        let summary = meta_runs::run_json(meta_runs::metalearn(
            dir.path(),
            1,
            &[
                "meta-train",
                "--config",
                "config.toml",
                "--out",
                out,
                "--iterations",
                iterations,
                "--json",
            ],
        ));
        assert_eq!(summary["iterations"].as_u64(), iterations.parse().ok());
        summary["peak_rss_mb"].as_f64()
    };
    let (Some(short), Some(long)) = (peak("60", "short"), peak("600", "long")) else {
        // No /proc/self/status on this system: nothing to measure.
        return;
    };
    eprintln!("peak RSS: {short:.1} MiB after 60 iterations, {long:.1} MiB after 600");
    assert!(short > 0.0);
    assert!(
        long < short * 1.25 + 8.0,
        "peak memory grew from {short:.1} MiB (60 iterations) to {long:.1} MiB (600)"
    );
}
