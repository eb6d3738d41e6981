//! Speed benchmarks: the workloads of the peer PyTorch and JAX scripts, with identical shapes
//! and settings, timed through the library's own code paths.
//!
//! | workload | what one iteration is |
//! | --- | --- |
//! | `protonet-conv4` | one ProtoNet episode, 60-way 5-shot 5-query (600 images 28x28), forward + backward + Adam |
//! | `maml-conv4` | second-order MAML, 5-way 1-shot 15-query, meta-batch 32, 1 inner step at lr 0.4, Adam |
//! | `fomaml-conv4` | the same, first order |
//! | `maml-sine` | second-order MAML on sinusoids, MLP 1-40-40-1, meta-batch 25, K = 10, 1 step at 0.01 |
//! | `maml-sine-5` | the same with 5 inner steps |
//! | `adapt-protonet-conv4` | prototypes of a 5-way 5-shot task and classification of its 75 queries |
//! | `melu` | MeLU's meta-step: 32 users (3–90 support and 10 query ratings each, MovieLens' feature vocabularies), 5 inner steps of second-order MAML on the decision layers, Adam |
//!
//! The conv workloads use fixed random inputs, as the peer scripts do; the sine workloads sample
//! fresh tasks every iteration (sampling included in the time), as the JAX script does.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{Error, Result};

mod text;
mod vision;
use crate::meta::learner::MetaLearner;
use crate::meta::{AlgorithmConfig, AlgorithmKind};
use crate::nn::architecture::{Activation, Architecture};
use crate::tasks::sinusoid::SinusoidTasks;
use crate::tasks::{Split, Task, TaskKind, TaskSource};
use crate::train::optim::OptimizerConfig;
pub use text::{run_text, TextInput, TEXT_WORKLOADS};
pub use vision::{run_vision, LITE0_GFLOP_PER_IMAGE, VISION_WORKLOADS};

/// The benchmark workloads, by name.
pub const WORKLOADS: [&str; 7] = [
    "protonet-conv4",
    "maml-conv4",
    "fomaml-conv4",
    "maml-sine",
    "maml-sine-5",
    "adapt-protonet-conv4",
    "melu",
];

/// Timing of one workload.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Workload name.
    pub workload: String,
    /// Timed iterations (after warm-up).
    pub iterations: usize,
    /// Mean wall-clock milliseconds per iteration.
    pub ms_per_iter: f64,
    /// Fastest single iteration, in milliseconds.
    pub min_ms: f64,
    /// Peak resident memory of the process so far, in MiB (Linux only).
    pub peak_rss_mb: Option<f64>,
    /// Threads the tensor engine used.
    pub threads: usize,
    /// Threads of the pool that runs backward passes (`None`: they run on the calling thread).
    pub backward_threads: Option<usize>,
    /// Whether the fast CPU kernels were on.
    pub fast_kernels: bool,
    /// Where the workload ran: `cpu` or `cuda`.
    pub device: String,
    /// Processes the meta-batch was split across (1 without MPI).
    pub ranks: usize,
    /// Bytes each rank sent to collectives per timed iteration (the flat meta-gradient
    /// buffer; 0 on one rank).
    pub allreduce_bytes_per_iter: f64,
    /// Milliseconds per timed iteration spent in collectives (waiting for the slowest rank
    /// included).
    pub comm_ms_per_iter: f64,
    /// Median of the iterations, in milliseconds.
    pub median_ms: f64,
    /// Text workloads: sentences encoded (or trained on) per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentences_per_sec: Option<f64>,
    /// Text workloads: sentences per iteration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentences_per_iter: Option<usize>,
    /// Vision workloads: images per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_per_sec: Option<f64>,
    /// Vision workloads: images per iteration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_per_iter: Option<usize>,
    /// Vision workloads: floating-point operations per image, in billions (forward pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflop_per_image: Option<f64>,
}

/// Default number of timed iterations of a workload (the peer scripts' defaults where they
/// have one).
pub fn default_iterations(workload: &str) -> usize {
    match workload {
        "maml-sine" | "maml-sine-5" => 500,
        "adapt-protonet-conv4" => 50,
        "melu" => 20,
        "encode-minilm" => 3,
        "encode-minilm-single" => 200,
        "finetune-minilm" => 10,
        "effnet-lite0-forward" => 7,
        "effnet-lite0-single" => 30,
        _ => 5,
    }
}

/// One prepared workload: `step` runs one iteration.
struct Prepared {
    step: Box<dyn FnMut() -> Result<()>>,
    warmup: usize,
    /// Sentences one iteration handles (text workloads).
    sentences: Option<usize>,
}

/// Runs `workload` for `iterations` timed iterations (after a short warm-up) on `device`.
pub fn run(workload: &str, iterations: usize, device: &Device) -> Result<BenchResult> {
    crate::runtime::init();
    if iterations == 0 {
        return Err(Error::Config("--iterations must be at least 1".into()));
    }
    let prepared = prepare(workload, device)?;
    time_prepared(workload, prepared, iterations, device)
}

/// Times a prepared workload.
fn time_prepared(
    workload: &str,
    mut prepared: Prepared,
    iterations: usize,
    device: &Device,
) -> Result<BenchResult> {
    for _ in 0..prepared.warmup {
        (prepared.step)()?;
    }
    // GPU work is queued asynchronously: each iteration waits for the device so that its time
    // covers the work it launched (a no-op on the CPU).
    device.synchronize()?;
    let world = crate::distributed::world();
    let (bytes_before, seconds_before) = world.traffic();
    let mut times = Vec::with_capacity(iterations);
    let started = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        (prepared.step)()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let total = started.elapsed().as_secs_f64() * 1000.0;
    let (bytes_after, seconds_after) = world.traffic();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let ms_per_iter = total / iterations as f64;
    Ok(BenchResult {
        median_ms: sorted[sorted.len() / 2],
        sentences_per_sec: prepared.sentences.map(|n| n as f64 * 1000.0 / ms_per_iter),
        sentences_per_iter: prepared.sentences,
        images_per_sec: None,
        images_per_iter: None,
        gflop_per_image: None,
        workload: workload.to_string(),
        iterations,
        ms_per_iter,
        min_ms: times.iter().cloned().fold(f64::INFINITY, f64::min),
        peak_rss_mb: crate::runtime::peak_rss_mb(),
        threads: candle_core::utils::get_num_threads(),
        backward_threads: crate::runtime::backward_threads(),
        fast_kernels: crate::kernels::enabled() && device.is_cpu(),
        device: if device.is_cpu() { "cpu" } else { "cuda" }.to_string(),
        ranks: world.size(),
        allreduce_bytes_per_iter: (bytes_after - bytes_before) as f64 / iterations as f64,
        comm_ms_per_iter: (seconds_after - seconds_before) * 1000.0 / iterations as f64,
    })
}

fn prepare(workload: &str, device: &Device) -> Result<Prepared> {
    match workload {
        "protonet-conv4" => protonet_episode(device),
        "maml-conv4" => maml_conv4(false, device),
        "fomaml-conv4" => maml_conv4(true, device),
        "maml-sine" => maml_sine(1, device),
        "maml-sine-5" => maml_sine(5, device),
        "adapt-protonet-conv4" => adapt_protonet(device),
        "melu" => melu(device),
        other => Err(Error::Config(format!(
            "unknown workload `{other}`; choose one of: {}",
            WORKLOADS.join(", ")
        ))),
    }
}

/// A classification task of `ways` classes with random 28x28 images, labels `0..ways` repeated
/// per class (as `repeat_interleave` in the peer scripts).
fn random_task(
    ways: usize,
    shots: usize,
    queries: usize,
    seed: u64,
    device: &Device,
) -> Result<Task> {
    let images = |n: usize, offset: u64| -> Result<Tensor> {
        // Seeded so every run times the same numbers.
        let mut rng = ChaCha8Rng::seed_from_u64(seed * 2 + offset);
        let values: Vec<f32> = (0..n * 28 * 28)
            .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
            .collect();
        Ok(Tensor::from_vec(values, (n, 1, 28, 28), device)?)
    };
    let labels = |per_class: usize| -> Result<Tensor> {
        let ids: Vec<f32> = (0..ways)
            .flat_map(|c| std::iter::repeat_n(c as f32, per_class))
            .collect();
        Ok(Tensor::from_vec(ids, ways * per_class, device)?)
    };
    Ok(Task {
        support: (images(ways * shots, 0)?, labels(shots)?),
        query: (images(ways * queries, 1)?, labels(queries)?),
    })
}

fn learner(
    arch: &Architecture,
    algorithm: AlgorithmConfig,
    kind: TaskKind,
    device: &Device,
) -> Result<MetaLearner> {
    MetaLearner::new_on(
        arch,
        algorithm,
        kind,
        OptimizerConfig::adam(1e-3),
        0,
        DType::F32,
        device,
    )
}

fn protonet_episode(device: &Device) -> Result<Prepared> {
    let (ways, shots, queries) = (60, 5, 5);
    let arch = Architecture::conv4([1, 28, 28], 64, None)?;
    let mut learner = learner(
        &arch,
        AlgorithmConfig::new(AlgorithmKind::Protonet),
        TaskKind::Classification { ways },
        device,
    )?;
    let task = random_task(ways, shots, queries, 0, device)?;
    Ok(Prepared {
        step: Box::new(move || {
            learner
                .meta_train_step(std::slice::from_ref(&task))
                .map(|_| ())
        }),
        warmup: 1,
        sentences: None,
    })
}

fn maml_conv4(first_order: bool, device: &Device) -> Result<Prepared> {
    let (ways, shots, queries, meta_batch) = (5, 1, 15, 32);
    let arch = Architecture::conv4([1, 28, 28], 64, Some(ways))?;
    let mut algorithm = AlgorithmConfig::new(AlgorithmKind::Maml);
    algorithm.first_order = first_order;
    algorithm.inner_lr = 0.4;
    algorithm.inner_steps = 1;
    let mut learner = learner(&arch, algorithm, TaskKind::Classification { ways }, device)?;
    learner.set_threads(if device.is_cpu() {
        crate::meta::learner::default_task_threads()
    } else {
        // Four chunks of eight tasks, one after another: the whole meta-batch's second-order
        // graph (about 2 GB per task on the plain candle path) does not fit in 80 GB.
        4
    });
    let tasks: Vec<Task> = (0..meta_batch)
        .map(|t| random_task(ways, shots, queries, t as u64, device))
        .collect::<Result<_>>()?;
    Ok(Prepared {
        step: Box::new(move || learner.meta_train_step(&tasks).map(|_| ())),
        warmup: 1,
        sentences: None,
    })
}

fn maml_sine(steps: usize, device: &Device) -> Result<Prepared> {
    let tasks = SinusoidTasks::default();
    let arch = Architecture::mlp(&[1, 40, 40, 1], Activation::Relu)?;
    let mut algorithm = AlgorithmConfig::new(AlgorithmKind::Maml);
    algorithm.inner_steps = steps;
    algorithm.inner_lr = 0.01;
    let mut learner = learner(&arch, algorithm, tasks.kind(), device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let device = device.clone();
    Ok(Prepared {
        step: Box::new(move || {
            let batch = tasks.sample_batch(Split::Train, 25, &mut rng)?;
            let batch = move_tasks(batch, &device)?;
            learner.meta_train_step(&batch).map(|_| ())
        }),
        warmup: 20,
        sentences: None,
    })
}

/// MeLU's network and meta-step on random users with MovieLens-1M's feature vocabularies
/// (MeLU's split: rate 6, genres 25 (up to 7 a film), directors 2,186 (12), actors 7,978 (4);
/// gender 2, age 7, occupation 21, zip 3,402) and support sizes spread over 3–90.
fn melu(device: &Device) -> Result<Prepared> {
    use crate::nn::architecture::{FeatureField, FeatureKind, Layer};
    let field = |name: &str, kind, vocab: usize, slots| FeatureField {
        name: name.into(),
        kind,
        vocab: vocab + 1,
        dim: 32,
        slots,
        zero_init: false,
    };
    let fields = vec![
        field("rate", FeatureKind::Categorical, 6, 1),
        field("genres", FeatureKind::MultiValued, 25, 7),
        field("directors", FeatureKind::MultiValued, 2186, 12),
        field("actors", FeatureKind::MultiValued, 7978, 4),
        field("gender", FeatureKind::Categorical, 2, 1),
        field("age", FeatureKind::Categorical, 7, 1),
        field("occupation", FeatureKind::Categorical, 21, 1),
        field("zip", FeatureKind::Categorical, 3402, 1),
    ];
    let slots: usize = fields.iter().map(|f| f.slots).sum();
    let mut arch = Architecture::new(&[slots]);
    arch.push_named(
        "embeddings",
        Layer::FeatureEmbedding {
            fields: fields.clone(),
        },
    )?;
    arch.push_named("fc1", Layer::dense(64))?;
    arch.push_named("act1", Layer::relu())?;
    arch.push_named("fc2", Layer::dense(64))?;
    arch.push_named("act2", Layer::relu())?;
    arch.push_named("head", Layer::dense(1))?;
    let mut algorithm = AlgorithmConfig::new(AlgorithmKind::Maml);
    algorithm.inner_steps = 5;
    algorithm.inner_lr = 5e-6;
    algorithm.adapt_from = Some("fc1".into());
    let mut learner = learner(&arch, algorithm, TaskKind::Regression, device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let row = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        use rand::Rng;
        let mut v = Vec::with_capacity(slots);
        for f in &fields {
            let present = match f.kind {
                FeatureKind::MultiValued => rng.gen_range(1..=f.slots),
                _ => 1,
            };
            for s in 0..f.slots {
                v.push(if s < present {
                    rng.gen_range(1..f.vocab) as f32
                } else {
                    -1.0
                });
            }
        }
        v
    };
    let set = |rng: &mut ChaCha8Rng, n: usize| -> Result<(Tensor, Tensor)> {
        use rand::Rng;
        let x: Vec<f32> = (0..n).flat_map(|_| row(rng)).collect();
        let y: Vec<f32> = (0..n).map(|_| rng.gen_range(1..=5) as f32).collect();
        Ok((
            Tensor::from_vec(x, (n, slots), device)?,
            Tensor::from_vec(y, (n, 1), device)?,
        ))
    };
    // Eight meta-batches of fixed users, cycled.
    let mut batches = Vec::new();
    for _ in 0..8 {
        let mut users = Vec::with_capacity(32);
        for _ in 0..32 {
            use rand::Rng;
            let support = rng.gen_range(3..=90);
            users.push(Task {
                support: set(&mut rng, support)?,
                query: set(&mut rng, 10)?,
            });
        }
        batches.push(users);
    }
    let mut next = 0;
    Ok(Prepared {
        step: Box::new(move || {
            next = (next + 1) % batches.len();
            learner.meta_train_step(&batches[next]).map(|_| ())
        }),
        warmup: 5,
        sentences: None,
    })
}

fn adapt_protonet(device: &Device) -> Result<Prepared> {
    let (ways, shots, queries) = (5, 5, 15);
    let arch = Architecture::conv4([1, 28, 28], 64, None)?;
    let learner = learner(
        &arch,
        AlgorithmConfig::new(AlgorithmKind::Protonet),
        TaskKind::Classification { ways },
        device,
    )?;
    let task = random_task(ways, shots, queries, 0, device)?;
    Ok(Prepared {
        step: Box::new(move || {
            let adapted = learner.adapt((&task.support.0, &task.support.1), None)?;
            let logits = learner.predict(&adapted, &task.query.0)?;
            // Reading the predicted classes back is part of the deploy-time path.
            logits.argmax(1)?.to_vec1::<u32>()?;
            Ok(())
        }),
        warmup: 3,
        sentences: None,
    })
}

fn move_tasks(tasks: Vec<Task>, device: &Device) -> Result<Vec<Task>> {
    if device.is_cpu() {
        return Ok(tasks);
    }
    tasks.iter().map(|t| t.to_device(device)).collect()
}
