//! Speed of second-order MAML on sinusoid regression, the workload of the JAX
//! reference script `maml_sine_jax.py`: MLP 1-40-40-1 ReLU, meta-batch 25, K = 10 support and 10 query points,
//! inner SGD at 0.01, Adam 1e-3. Prints milliseconds per meta-iteration (task sampling included,
//! as in the JAX script).
//!
//! `cargo run --release --example bench_maml_sine` (env: `STEPS` inner steps, default 1;
//! `ITERS`, default 500).

use std::time::Instant;

use candle_core::DType;
use metalearn::meta::learner::MetaLearner;
use metalearn::meta::{AlgorithmConfig, AlgorithmKind};
use metalearn::tasks::sinusoid::SinusoidTasks;
use metalearn::tasks::{Split, TaskSource};
use metalearn::{Activation, Architecture, OptimizerConfig};
use rand::SeedableRng;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> metalearn::Result<()> {
    let steps = env_or("STEPS", 1);
    let iters = env_or("ITERS", 500);
    let tasks = SinusoidTasks::default();
    let arch = Architecture::mlp(&[1, 40, 40, 1], Activation::Relu)?;
    let mut algorithm = AlgorithmConfig::new(AlgorithmKind::Maml);
    algorithm.inner_steps = steps;
    let mut learner = MetaLearner::new(
        &arch,
        algorithm,
        tasks.kind(),
        OptimizerConfig::adam(1e-3),
        0,
        DType::F32,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    // Warm-up: first-touch allocations and thread start-up.
    for _ in 0..20 {
        learner.meta_train_step(&tasks.sample_batch(Split::Train, 25, &mut rng)?)?;
    }
    let started = Instant::now();
    let mut loss = 0.0;
    for _ in 0..iters {
        loss = learner.meta_train_step(&tasks.sample_batch(Split::Train, 25, &mut rng)?)?;
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0 / iters as f64;
    println!("metalearn maml-sine steps={steps}: {ms:.3} ms/iter over {iters} iterations (loss {loss:.3})");
    Ok(())
}
