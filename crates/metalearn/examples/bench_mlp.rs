//! Throughput of `fit` on a tabular MLP: 10,000 rows x 20 features, hidden layers 64 and 32
//! (ReLU), binary target, Adam, batch 64. Prints the seconds per epoch (median of the timed
//! epochs, after one warm-up epoch).
//!
//! Run with `cargo run --release --example bench_mlp [EPOCHS]`. Set `RAYON_NUM_THREADS` to pin the
//! number of threads candle uses.

use candle_core::{Device, Tensor};
use metalearn::{
    Activation, Architecture, FitOptions, Layer, Loss, Metric, OptimizerConfig, Sequential,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 10_000;
const FEATURES: usize = 20;
const BATCH: usize = 64;

fn main() -> metalearn::Result<()> {
    let timed_epochs: usize = match std::env::args().nth(1) {
        Some(text) => text.parse().map_err(|_| {
            metalearn::Error::Config(format!("EPOCHS must be a whole number, got `{text}`"))
        })?,
        None => 5,
    };
    // Synthetic data: the label is whether a fixed random projection of the features is positive.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let weights: Vec<f32> = (0..FEATURES).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut xs = Vec::with_capacity(ROWS * FEATURES);
    let mut ys = Vec::with_capacity(ROWS);
    for _ in 0..ROWS {
        let row: Vec<f32> = (0..FEATURES).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let score: f32 = row.iter().zip(&weights).map(|(a, b)| a * b).sum();
        ys.push(if score > 0.0 { 1f32 } else { 0. });
        xs.extend(row);
    }
    let x = Tensor::from_vec(xs, (ROWS, FEATURES), &Device::Cpu)?;
    let y = Tensor::from_vec(ys, ROWS, &Device::Cpu)?;

    let mut arch = Architecture::mlp(&[FEATURES, 64, 32, 1], Activation::Relu)?;
    arch.push(Layer::sigmoid());
    let mut model = Sequential::from_architecture(arch, 0)?;
    model.compile(
        OptimizerConfig::adam(1e-3),
        Loss::BinaryCrossEntropy,
        &[Metric::Accuracy],
    )?;
    let options = || FitOptions::new().epochs(1).batch_size(BATCH).seed(0);
    model.fit(&x, &y, options())?;
    let mut seconds = Vec::with_capacity(timed_epochs);
    let mut accuracy = 0.0;
    for _ in 0..timed_epochs.max(1) {
        let started = std::time::Instant::now();
        let history = model.fit(&x, &y, options())?;
        seconds.push(started.elapsed().as_secs_f64());
        accuracy = history
            .last()
            .and_then(|log| log.metrics.get("accuracy").copied())
            .unwrap_or(0.0);
    }
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    println!(
        "bench_mlp: {ROWS} rows x {FEATURES} features, MLP {FEATURES}-64-32-1, batch {BATCH} \
         ({} steps/epoch), candle threads {}, rayon threads {}",
        ROWS.div_ceil(BATCH),
        candle_core::utils::get_num_threads(),
        rayon::current_num_threads()
    );
    println!(
        "seconds per epoch: {median:.3} (median of {}; min {:.3}, max {:.3}); train accuracy {:.3}",
        seconds.len(),
        seconds[0],
        seconds[seconds.len() - 1],
        accuracy
    );
    Ok(())
}
