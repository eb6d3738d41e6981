//! The GPU path against the CPU path. Built only with the `cuda` feature, and then it needs an
//! NVIDIA GPU: run it with `cargo test --release --features cuda --test cuda`.
//!
//! On the GPU the plain candle operations run (the fast kernels are CPU-only), so these tests
//! check that every algorithm family trains the same on both devices: one meta-training step with
//! plain SGD at learning rate 1 moves each weight by minus its meta-gradient, and the loss and the
//! moves must agree, in f64 (where the two devices differ only in rounding) and in f32.
#![cfg(feature = "cuda")]

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use metalearn::meta::learner::MetaLearner;
use metalearn::meta::{AlgorithmConfig, AlgorithmKind};
use metalearn::tasks::{Task, TaskKind};
use metalearn::{Activation, Architecture, OptimizerConfig};

fn gpu() -> Result<Device> {
    Device::new_cuda(0).context("these tests need an NVIDIA GPU (built with --features cuda)")
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn labels(ways: usize, per_class: usize, dtype: DType) -> Result<Tensor> {
    let ids: Vec<f64> = (0..ways)
        .flat_map(|c| std::iter::repeat_n(c as f64, per_class))
        .collect();
    Ok(Tensor::from_vec(ids, ways * per_class, &Device::Cpu)?.to_dtype(dtype)?)
}

/// `count` classification tasks of 28x28 images.
fn image_tasks(
    count: usize,
    ways: usize,
    shots: usize,
    queries: usize,
    dtype: DType,
) -> Result<Vec<Task>> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..count)
        .map(|_| {
            Ok(Task {
                support: (
                    random(&mut rng, &[ways * shots, 1, 28, 28], dtype)?,
                    labels(ways, shots, dtype)?,
                ),
                query: (
                    random(&mut rng, &[ways * queries, 1, 28, 28], dtype)?,
                    labels(ways, queries, dtype)?,
                ),
            })
        })
        .collect()
}

/// `count` regression tasks on a 1-D input.
fn regression_tasks(count: usize, dtype: DType) -> Result<Vec<Task>> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    (0..count)
        .map(|_| {
            Ok(Task {
                support: (
                    random(&mut rng, &[10, 1], dtype)?,
                    random(&mut rng, &[10, 1], dtype)?,
                ),
                query: (
                    random(&mut rng, &[10, 1], dtype)?,
                    random(&mut rng, &[10, 1], dtype)?,
                ),
            })
        })
        .collect()
}

fn to_device(tasks: &[Task], device: &Device) -> Result<Vec<Task>> {
    Ok(tasks
        .iter()
        .map(|t| t.to_device(device))
        .collect::<metalearn::Result<_>>()?)
}

/// One SGD(lr 1) meta-step on `device`: the loss and every weight's move, flattened, in f64.
fn step_on(
    arch: &Architecture,
    algorithm: &AlgorithmConfig,
    kind: TaskKind,
    tasks: &[Task],
    dtype: DType,
    device: &Device,
) -> Result<(f64, Vec<f64>)> {
    let mut learner = MetaLearner::new_on(
        arch,
        algorithm.clone(),
        kind,
        OptimizerConfig::sgd(1.0, 0.0),
        3,
        dtype,
        device,
    )?;
    let flat = |learner: &MetaLearner| -> Result<Vec<f64>> {
        let mut out = Vec::new();
        for t in learner.meta_params().weights.tensors() {
            out.extend(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        }
        Ok(out)
    };
    let before = flat(&learner)?;
    let loss = learner.meta_train_step(&to_device(tasks, device)?)?;
    let after = flat(&learner)?;
    let moves = before.iter().zip(&after).map(|(b, a)| a - b).collect();
    Ok((loss, moves))
}

/// Runs the step on the CPU and the GPU and compares loss and moves to `tol` (relative to the
/// largest move).
fn check(
    name: &str,
    arch: &Architecture,
    algorithm: AlgorithmConfig,
    kind: TaskKind,
    tasks: &[Task],
    dtype: DType,
    tol: f64,
) -> Result<()> {
    let (cpu_loss, cpu_moves) = step_on(arch, &algorithm, kind, tasks, dtype, &Device::Cpu)?;
    let (gpu_loss, gpu_moves) = step_on(arch, &algorithm, kind, tasks, dtype, &gpu()?)?;
    let scale = cpu_moves
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    let worst = cpu_moves
        .iter()
        .zip(&gpu_moves)
        .map(|(c, g)| (c - g).abs() / scale)
        .fold(0f64, f64::max);
    println!("{name} {dtype:?}: loss cpu {cpu_loss:.8} gpu {gpu_loss:.8}, largest move difference {worst:.2e} of the largest move");
    ensure!(
        (cpu_loss - gpu_loss).abs() <= tol * cpu_loss.abs().max(1.0),
        "{name} {dtype:?}: loss {cpu_loss} on the CPU, {gpu_loss} on the GPU"
    );
    ensure!(
        worst <= tol,
        "{name} {dtype:?}: meta-gradients differ by {worst:.2e} of the largest"
    );
    ensure!(scale > 1e-9, "{name}: the step moved no weight");
    Ok(())
}

fn each_dtype(mut run: impl FnMut(DType, f64) -> Result<()>) -> Result<()> {
    run(DType::F64, 1e-9)?;
    run(DType::F32, 2e-3)
}

#[test]
fn protonet_conv_step_matches_the_cpu() -> Result<()> {
    let arch = Architecture::conv4([1, 28, 28], 8, None)?;
    each_dtype(|dtype, tol| {
        let tasks = image_tasks(1, 4, 2, 3, dtype)?;
        let algorithm = AlgorithmConfig::new(AlgorithmKind::Protonet);
        check(
            "protonet",
            &arch,
            algorithm,
            TaskKind::Classification { ways: 4 },
            &tasks,
            dtype,
            tol,
        )
    })
}

#[test]
fn maml_conv_steps_match_the_cpu() -> Result<()> {
    let arch = Architecture::conv4([1, 28, 28], 8, Some(3))?;
    each_dtype(|dtype, tol| {
        let tasks = image_tasks(2, 3, 1, 2, dtype)?;
        for first_order in [false, true] {
            let mut algorithm = AlgorithmConfig::new(AlgorithmKind::Maml);
            algorithm.first_order = first_order;
            algorithm.inner_steps = 2;
            algorithm.inner_lr = 0.1;
            let name = if first_order { "fomaml" } else { "maml" };
            check(
                name,
                &arch,
                algorithm,
                TaskKind::Classification { ways: 3 },
                &tasks,
                dtype,
                tol,
            )?;
        }
        Ok(())
    })
}

#[test]
fn mlp_algorithms_match_the_cpu() -> Result<()> {
    let arch = Architecture::mlp(&[1, 16, 16, 1], Activation::Relu)?;
    each_dtype(|dtype, tol| {
        let tasks = regression_tasks(3, dtype)?;
        for kind in [
            AlgorithmKind::Maml,
            AlgorithmKind::MetaSgd,
            AlgorithmKind::Anil,
            AlgorithmKind::Reptile,
        ] {
            let mut algorithm = AlgorithmConfig::new(kind);
            algorithm.inner_steps = 2;
            algorithm.inner_lr = 0.05;
            check(
                &format!("{kind:?}"),
                &arch,
                algorithm,
                TaskKind::Regression,
                &tasks,
                dtype,
                tol,
            )?;
        }
        Ok(())
    })
}

#[test]
fn protonet_adaptation_classifies_the_same_on_the_gpu() -> Result<()> {
    let arch = Architecture::conv4([1, 28, 28], 8, None)?;
    let task = image_tasks(1, 5, 2, 4, DType::F32)?.remove(0);
    let mut logits = Vec::new();
    for device in [Device::Cpu, gpu()?] {
        let learner = MetaLearner::new_on(
            &arch,
            AlgorithmConfig::new(AlgorithmKind::Protonet),
            TaskKind::Classification { ways: 5 },
            OptimizerConfig::adam(1e-3),
            5,
            DType::F32,
            &device,
        )?;
        let task = to_device(std::slice::from_ref(&task), &device)?.remove(0);
        let adapted = learner.adapt((&task.support.0, &task.support.1), None)?;
        let out = learner.predict(&adapted, &task.query.0)?;
        logits.push(
            out.to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    let scale = logits[0].iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = logits[0]
        .iter()
        .zip(&logits[1])
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    ensure!(
        worst <= 2e-3 * scale.max(1.0),
        "query logits differ by {worst} (largest logit {scale})"
    );
    Ok(())
}
