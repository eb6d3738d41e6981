//! Correctness of the meta-gradients, in f64, against central finite differences.
//!
//! Every reference here is computed independently of the algorithm under test: the inner loop is
//! run by hand (one `backward()` per step on fresh variables, gradients used as plain values), and
//! the meta-loss as a function of the meta-parameters is differentiated numerically by re-running
//! the whole inner loop at `θ ± eps·e_i`. Both the task-batched path (tasks of equal shape) and
//! the per-task path (tasks of different sizes) are checked.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use metalearn::meta::anil::Anil;
use metalearn::meta::inner::{run_inner_loop, InnerLoop, InnerLr};
use metalearn::meta::learner::MetaLearner;
use metalearn::meta::maml::Maml;
use metalearn::meta::metasgd::MetaSgd;
use metalearn::meta::protonet::{self, ProtoNet};
use metalearn::meta::{
    Adapted, AlgorithmConfig, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams, MetaStep,
};
use metalearn::tasks::{Task, TaskKind};
use metalearn::{
    Activation, Architecture, ForwardCtx, Layer, Loss, Network, OptimizerConfig, ParamSet,
};

/// Finite-difference step.
const EPS: f64 = 1e-5;
/// Largest accepted relative error between the analytic and the numerical gradient.
const TOL: f64 = 1e-6;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("shape matches values")
}

fn class_ids(ids: &[usize]) -> Tensor {
    let values: Vec<f64> = ids.iter().map(|&c| c as f64).collect();
    Tensor::from_vec(values, ids.len(), &Device::Cpu).expect("1-D")
}

/// Class ids with `per_class` examples of each of `ways` classes, in shuffled order.
fn shuffled_labels(rng: &mut ChaCha8Rng, ways: usize, per_class: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..ways).flat_map(|c| vec![c; per_class]).collect();
    ids.shuffle(rng);
    ids
}

fn regression_task(rng: &mut ChaCha8Rng, support: usize, query: usize) -> Task {
    Task {
        support: (
            uniform(rng, &[support, 1], -2.0, 2.0),
            uniform(rng, &[support, 1], -1.0, 1.0),
        ),
        query: (
            uniform(rng, &[query, 1], -2.0, 2.0),
            uniform(rng, &[query, 1], -1.0, 1.0),
        ),
    }
}

fn classification_task(
    rng: &mut ChaCha8Rng,
    input: &[usize],
    ways: usize,
    shots: usize,
    queries: usize,
) -> Task {
    let shape = |n: usize| {
        let mut s = vec![n];
        s.extend_from_slice(input);
        s
    };
    let s_ids = shuffled_labels(rng, ways, shots);
    let q_ids = shuffled_labels(rng, ways, queries);
    Task {
        support: (
            uniform(rng, &shape(s_ids.len()), -1.0, 1.0),
            class_ids(&s_ids),
        ),
        query: (
            uniform(rng, &shape(q_ids.len()), -1.0, 1.0),
            class_ids(&q_ids),
        ),
    }
}

/// 1-4-4-1 tanh MLP for regression.
fn tiny_mlp() -> Architecture {
    Architecture::mlp(&[1, 4, 4, 1], Activation::Tanh).expect("valid sizes")
}

/// conv 2x3x3 (padding 1) → batch-norm → ReLU → max-pool 2 → flatten → dense 3, on [1, 6, 6].
fn tiny_conv() -> Architecture {
    let mut arch = Architecture::new(&[1, 6, 6]);
    arch.push(Layer::conv2d(2, 3, 1));
    arch.push(Layer::batch_norm());
    arch.push(Layer::relu());
    arch.push(Layer::max_pool2d(2));
    arch.push(Layer::Flatten);
    arch.push_named("head", Layer::dense(3))
        .expect("unique name");
    arch
}

/// Initial parameters plus a random offset, so that no bias is exactly zero and no batch-norm
/// scale is exactly one.
fn generic_params(net: &Network, seed: u64) -> ParamSet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xabcd);
    net.init_params(seed, &Device::Cpu, DType::F64)
        .expect("init")
        .map(|_, t| {
            let noise = uniform(&mut rng, t.dims(), -0.2, 0.2);
            Ok(t.add(&noise)?)
        })
        .expect("same shapes")
}

/// A parameter set whose tensors are backed by fresh `Var`s (what `meta_train_step` needs to
/// find the gradients in the store).
fn var_backed(set: &ParamSet) -> ParamSet {
    let vars = set.to_vars().expect("vars");
    ParamSet::from_vars(set.names(), &vars).expect("unique names")
}

fn meta_params(weights: &ParamSet, lrs: Option<&ParamSet>) -> MetaParams {
    MetaParams {
        weights: var_backed(weights),
        inner_lrs: lrs.map(var_backed),
    }
}

fn flatten(set: &ParamSet) -> Vec<f64> {
    set.to_f64_vec().expect("f64 values")
}

/// Rebuilds a set shaped like `template` from the first values of `values`; returns the rest.
fn unflatten<'v>(template: &ParamSet, values: &'v [f64]) -> (ParamSet, &'v [f64]) {
    let mut offset = 0;
    let set = template
        .map(|_, t| {
            let n = t.elem_count();
            let chunk = values[offset..offset + n].to_vec();
            offset += n;
            Ok(Tensor::from_vec(chunk, t.dims(), &Device::Cpu)?)
        })
        .expect("enough values");
    (set, &values[offset..])
}

/// The analytic gradient of a step, flattened in meta-parameter order (missing gradients are
/// zeros).
fn flat_grads(step: &MetaStep, meta: &MetaParams) -> Vec<f64> {
    let mut out = Vec::new();
    for (g, t) in step.grads.iter().zip(meta.tensors()) {
        match g {
            Some(g) => out.extend(
                g.flatten_all()
                    .and_then(|g| g.to_vec1::<f64>())
                    .expect("f64 gradient"),
            ),
            None => out.extend(std::iter::repeat_n(0.0, t.elem_count())),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Independent references
// ---------------------------------------------------------------------------------------------

/// Learning rate of the reference inner loop.
#[derive(Clone, Copy)]
enum RefLr<'a> {
    Scalar(f64),
    PerParam(&'a ParamSet),
}

/// Settings of the reference inner loop.
#[derive(Clone, Copy)]
struct RefInner<'a> {
    loss: Loss,
    steps: usize,
    lr: RefLr<'a>,
    /// Only parameters whose name starts with this prefix are adapted (`""`: all).
    adapt_prefix: &'a str,
}

/// Plain gradient descent on `(x, y)` from `theta`: each step evaluates the mean loss with fresh
/// variables, calls `backward()` and uses the gradients as constants.
fn reference_adapt(
    net: &Network,
    theta: &ParamSet,
    x: &Tensor,
    y: &Tensor,
    cfg: RefInner,
) -> Result<ParamSet> {
    let mut fast = theta.detach();
    for _ in 0..cfg.steps {
        let vars = fast.to_vars()?;
        let params = ParamSet::from_vars(fast.names(), &vars)?;
        let pred = net.forward(&params, x, &mut ForwardCtx::train())?;
        let store = cfg.loss.compute(&pred, y)?.backward()?;
        let mut i = 0;
        fast = fast.map(|name, t| {
            let var = &vars[i];
            i += 1;
            if !name.starts_with(cfg.adapt_prefix) {
                return Ok(t.clone());
            }
            let Some(g) = store.get(var.as_tensor()) else {
                return Ok(t.clone());
            };
            let g = g.detach();
            let step = match cfg.lr {
                RefLr::Scalar(lr) => g.affine(lr, 0.0)?,
                RefLr::PerParam(lrs) => g.mul(lrs.get(name)?)?,
            };
            Ok(t.sub(&step)?)
        })?;
    }
    Ok(fast)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().expect("f64 scalar")
}

/// Mean over tasks of the query loss after the reference inner loop on the support set.
fn reference_meta_loss(net: &Network, theta: &ParamSet, tasks: &[Task], cfg: RefInner) -> f64 {
    let mut total = 0.0;
    for task in tasks {
        let fast = reference_adapt(net, theta, &task.support.0, &task.support.1, cfg)
            .expect("reference inner loop");
        let pred = net
            .forward(&fast, &task.query.0, &mut ForwardCtx::train())
            .expect("forward");
        total += scalar(&cfg.loss.compute(&pred, &task.query.1).expect("loss"));
    }
    total / tasks.len() as f64
}

/// Central differences of `f` at `at`, one per coordinate in `coords`.
fn finite_differences(at: &[f64], coords: &[usize], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    // The five-point stencil: its error is O(EPS⁴), so that strongly curved objectives (a
    // layer norm over a few units, adapted by an inner loop) are still measured to 1e-6.
    let shifted = |i: usize, by: f64| {
        let mut v = at.to_vec();
        v[i] += by;
        f(&v)
    };
    coords
        .iter()
        .map(|&i| {
            (8.0 * (shifted(i, EPS) - shifted(i, -EPS))
                - (shifted(i, 2.0 * EPS) - shifted(i, -2.0 * EPS)))
                / (12.0 * EPS)
        })
        .collect()
}

/// Largest relative error over `coords`: `|a - n| / max(|a|, |n|, 1e-3 · max|n|)` (the floor
/// keeps coordinates whose gradient is almost zero from dominating through round-off).
fn max_relative_error(analytic: &[f64], numeric: &[f64], coords: &[usize]) -> (f64, usize) {
    let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = (1e-3 * scale).max(1e-12);
    let mut worst = (0.0, 0);
    for (k, &i) in coords.iter().enumerate() {
        let (a, n) = (analytic[i], numeric[k]);
        let err = (a - n).abs() / a.abs().max(n.abs()).max(floor);
        if err > worst.0 {
            worst = (err, i);
        }
    }
    worst
}

/// Checks `alg`'s meta-step on `tasks` against the reference meta-loss `reference` (a function of
/// the flattened meta-parameters): the loss values agree and the gradient matches central finite
/// differences on every coordinate. Returns the analytic gradient.
fn check_meta_gradient(
    label: &str,
    net: &Network,
    alg: &dyn MetaAlgorithm,
    meta: &MetaParams,
    tasks: &[Task],
    kind: TaskKind,
    reference: impl Fn(&[f64]) -> f64,
) -> Result<Vec<f64>> {
    let step = alg.meta_train_step(net, meta, tasks, kind)?;
    ensure!(
        step.grads.len() == meta.tensors().len(),
        "{label}: {} gradients for {} meta-parameters",
        step.grads.len(),
        meta.tensors().len()
    );
    let mut at = flatten(&meta.weights);
    if let Some(lrs) = &meta.inner_lrs {
        at.extend(flatten(lrs));
    }
    let ref_loss = reference(&at);
    ensure!(
        (step.loss - ref_loss).abs() <= 1e-10 * ref_loss.abs().max(1.0),
        "{label}: meta-loss {} but the reference inner loop gives {ref_loss}",
        step.loss
    );
    let analytic = flat_grads(&step, meta);
    let coords: Vec<usize> = (0..at.len()).collect();
    let numeric = finite_differences(&at, &coords, &reference);
    let (err, worst) = max_relative_error(&analytic, &numeric, &coords);
    eprintln!(
        "{label}: {} coordinates, max relative error {err:.2e}",
        coords.len()
    );
    ensure!(
        err < TOL,
        "{label}: meta-gradient differs from finite differences: relative error {err:.3e} at \
         coordinate {worst} (analytic {}, numeric {})",
        analytic[worst],
        numeric[worst]
    );
    Ok(analytic)
}

/// Asserts that every weight tensor received a non-zero gradient, except those in `exempt`
/// (a bias right before batch-norm, or the last bias of a ProtoNet embedding, cannot change the
/// loss).
fn assert_weights_have_gradient(label: &str, meta: &MetaParams, grads: &[f64], exempt: &[&str]) {
    let scale = grads.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let mut offset = 0;
    for (name, t) in meta.weights.iter() {
        let n = t.elem_count();
        let largest = grads[offset..offset + n]
            .iter()
            .fold(0.0f64, |m, g| m.max(g.abs()));
        if !exempt.contains(&name.as_str()) {
            assert!(
                largest > 1e-6 * scale,
                "{label}: `{name}` got no meta-gradient (largest {largest:.3e})"
            );
        }
        offset += n;
    }
}

/// Biases whose effect a following batch-norm removes.
fn biases_before_batch_norm(arch: &Architecture) -> Vec<&str> {
    arch.layers
        .windows(2)
        .filter(|w| matches!(w[1].layer, Layer::BatchNorm { .. }) && w[0].layer.has_params())
        .map(|w| w[0].name.as_str())
        .collect()
}

/// Biases that cannot change the loss: one before a batch-norm, and an attention block's key
/// bias (it adds the same score to every key of a query, which the softmax ignores).
fn exempt_biases(arch: &Architecture) -> Vec<String> {
    let mut exempt: Vec<String> = biases_before_batch_norm(arch)
        .into_iter()
        .map(|l| format!("{l}.bias"))
        .collect();
    exempt.extend(
        arch.layers
            .iter()
            .filter(|l| matches!(l.layer, Layer::TransformerBlock { .. }))
            .map(|l| format!("{}.k_bias", l.name)),
    );
    exempt
}

fn equal_size_regression_tasks(rng: &mut ChaCha8Rng) -> Vec<Task> {
    (0..3).map(|_| regression_task(rng, 5, 4)).collect()
}

fn mixed_size_regression_tasks(rng: &mut ChaCha8Rng) -> Vec<Task> {
    vec![
        regression_task(rng, 5, 4),
        regression_task(rng, 3, 6),
        regression_task(rng, 7, 2),
    ]
}

fn equal_size_image_tasks(rng: &mut ChaCha8Rng) -> Vec<Task> {
    (0..3)
        .map(|_| classification_task(rng, &[1, 6, 6], 3, 2, 2))
        .collect()
}

fn mixed_size_image_tasks(rng: &mut ChaCha8Rng) -> Vec<Task> {
    vec![
        classification_task(rng, &[1, 6, 6], 3, 2, 2),
        classification_task(rng, &[1, 6, 6], 3, 1, 3),
    ]
}

const CONV_KIND: TaskKind = TaskKind::Classification { ways: 3 };

// ---------------------------------------------------------------------------------------------
// MAML
// ---------------------------------------------------------------------------------------------

fn check_maml(
    label: &str,
    arch: &Architecture,
    tasks: &[Task],
    kind: TaskKind,
    inner_lr: f64,
) -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(arch)?;
    let theta = generic_params(&net, 7);
    let meta = meta_params(&theta, None);
    let maml = Maml {
        adapt_from: None,
        inner_lr,
        inner_steps: 2,
        first_order: false,
    };
    let loss = metalearn::meta::task_loss(kind);
    let reference = |v: &[f64]| {
        let (w, _) = unflatten(&theta, v);
        let cfg = RefInner {
            loss,
            steps: 2,
            lr: RefLr::Scalar(inner_lr),
            adapt_prefix: "",
        };
        reference_meta_loss(&net, &w, tasks, cfg)
    };
    let grads = check_meta_gradient(label, &net, &maml, &meta, tasks, kind, reference)?;
    let exempt = exempt_biases(arch);
    let exempt: Vec<&str> = exempt.iter().map(|s| s.as_str()).collect();
    assert_weights_have_gradient(label, &meta, &grads, &exempt);
    Ok(())
}

#[test]
fn maml_second_order_mlp_task_batched_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let tasks = equal_size_regression_tasks(&mut rng);
    check_maml(
        "MAML MLP batched",
        &tiny_mlp(),
        &tasks,
        TaskKind::Regression,
        0.1,
    )
}

#[test]
fn maml_second_order_mlp_per_task_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let tasks = mixed_size_regression_tasks(&mut rng);
    check_maml(
        "MAML MLP per-task",
        &tiny_mlp(),
        &tasks,
        TaskKind::Regression,
        0.1,
    )
}

#[test]
fn maml_second_order_relu_mlp_matches_finite_differences() -> Result<()> {
    // ReLU hidden layers: the inputs are drawn so that no pre-activation sits on the kink within
    // the finite-difference step.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let arch = Architecture::mlp(&[1, 4, 4, 1], Activation::Relu)?;
    let tasks = equal_size_regression_tasks(&mut rng);
    check_maml(
        "MAML ReLU MLP batched",
        &arch,
        &tasks,
        TaskKind::Regression,
        0.1,
    )?;
    let tasks = mixed_size_regression_tasks(&mut rng);
    check_maml(
        "MAML ReLU MLP per-task",
        &arch,
        &tasks,
        TaskKind::Regression,
        0.1,
    )
}

#[test]
fn maml_second_order_conv_bn_maxpool_task_batched_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let tasks = equal_size_image_tasks(&mut rng);
    check_maml("MAML conv batched", &tiny_conv(), &tasks, CONV_KIND, 0.3)
}

#[test]
fn maml_second_order_conv_bn_maxpool_per_task_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let tasks = mixed_size_image_tasks(&mut rng);
    check_maml("MAML conv per-task", &tiny_conv(), &tasks, CONV_KIND, 0.3)
}

/// First-order MAML: the gradient of the query loss at the fast weights, with the fast weights
/// computed by the reference inner loop (inner gradients are constants).
fn first_order_reference(
    net: &Network,
    theta: &ParamSet,
    tasks: &[Task],
    cfg: RefInner,
) -> Result<Vec<f64>> {
    let mut sum = vec![0.0; theta.num_values()];
    for task in tasks {
        let fast = reference_adapt(net, theta, &task.support.0, &task.support.1, cfg)?;
        let vars = fast.to_vars()?;
        let params = ParamSet::from_vars(fast.names(), &vars)?;
        let pred = net.forward(&params, &task.query.0, &mut ForwardCtx::train())?;
        let store = cfg.loss.compute(&pred, &task.query.1)?.backward()?;
        let mut offset = 0;
        for var in &vars {
            let n = var.elem_count();
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.flatten_all()?.to_vec1::<f64>()?;
                for (s, v) in sum[offset..offset + n].iter_mut().zip(g) {
                    *s += v;
                }
            }
            offset += n;
        }
    }
    Ok(sum.into_iter().map(|s| s / tasks.len() as f64).collect())
}

fn check_first_order(
    label: &str,
    arch: &Architecture,
    tasks: &[Task],
    kind: TaskKind,
) -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(arch)?;
    let theta = generic_params(&net, 11);
    let meta = meta_params(&theta, None);
    let inner_lr = 0.2;
    let cfg = RefInner {
        loss: metalearn::meta::task_loss(kind),
        steps: 2,
        lr: RefLr::Scalar(inner_lr),
        adapt_prefix: "",
    };
    let expected = first_order_reference(&net, &theta, tasks, cfg)?;
    let fo = Maml {
        adapt_from: None,
        inner_lr,
        inner_steps: 2,
        first_order: true,
    };
    let got = flat_grads(&fo.meta_train_step(&net, &meta, tasks, kind)?, &meta);
    let coords: Vec<usize> = (0..got.len()).collect();
    let (err, worst) = max_relative_error(&got, &expected, &coords);
    eprintln!("{label}: first-order max relative error {err:.2e}");
    ensure!(
        err < 1e-9,
        "{label}: first-order MAML gradient differs from the detached-inner-loop reference: \
         relative error {err:.3e} at coordinate {worst} ({} vs {})",
        got[worst],
        expected[worst]
    );
    let so = Maml {
        adapt_from: None,
        first_order: false,
        ..fo
    };
    let second = flat_grads(&so.meta_train_step(&net, &meta, tasks, kind)?, &meta);
    let diff: f64 = second.iter().zip(&got).map(|(a, b)| (a - b).powi(2)).sum();
    let norm: f64 = second.iter().map(|a| a * a).sum();
    ensure!(
        diff.sqrt() > 1e-3 * norm.sqrt(),
        "{label}: first- and second-order gradients coincide (relative difference {:.3e}); \
         the second-order term is missing",
        (diff / norm).sqrt()
    );
    Ok(())
}

#[test]
fn maml_first_order_equals_detached_inner_gradients_and_differs_from_second_order() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mlp = tiny_mlp();
    check_first_order(
        "FOMAML MLP batched",
        &mlp,
        &equal_size_regression_tasks(&mut rng),
        TaskKind::Regression,
    )?;
    check_first_order(
        "FOMAML MLP per-task",
        &mlp,
        &mixed_size_regression_tasks(&mut rng),
        TaskKind::Regression,
    )?;
    let conv = tiny_conv();
    check_first_order(
        "FOMAML conv batched",
        &conv,
        &equal_size_image_tasks(&mut rng),
        CONV_KIND,
    )?;
    check_first_order(
        "FOMAML conv per-task",
        &conv,
        &mixed_size_image_tasks(&mut rng),
        CONV_KIND,
    )
}

// ---------------------------------------------------------------------------------------------
// Reptile
// ---------------------------------------------------------------------------------------------

fn check_reptile(label: &str, tasks: &[Task]) -> Result<()> {
    metalearn::runtime::init();
    let arch = tiny_mlp();
    let (epsilon, inner_lr, steps) = (0.25, 0.05, 3);
    let config = AlgorithmConfig {
        name: AlgorithmKind::Reptile,
        first_order: false,
        inner_lr,
        inner_steps: steps,
        eval_inner_steps: 1,
        distance_scale: 1.0,
        adapt_from: None,
    };
    let mut learner = MetaLearner::new(
        &arch,
        config,
        TaskKind::Regression,
        OptimizerConfig::sgd(epsilon, 0.0),
        17,
        DType::F64,
    )?;
    let net = Network::build(&arch)?;
    // Copy the values out: the learner's variables are updated in place.
    let before = flatten(&learner.meta_params().weights);
    let (theta, _) = unflatten(&learner.meta_params().weights, &before);
    let cfg = RefInner {
        loss: Loss::Mse,
        steps,
        lr: RefLr::Scalar(inner_lr),
        adapt_prefix: "",
    };
    let mut mean_phi = vec![0.0; before.len()];
    for task in tasks {
        let x = Tensor::cat(&[&task.support.0, &task.query.0], 0)?;
        let y = Tensor::cat(&[&task.support.1, &task.query.1], 0)?;
        let phi = flatten(&reference_adapt(&net, &theta, &x, &y, cfg)?);
        for (m, p) in mean_phi.iter_mut().zip(phi) {
            *m += p / tasks.len() as f64;
        }
    }
    learner.meta_train_step(tasks)?;
    let after = flatten(&learner.meta_params().weights);
    let mut worst = 0.0f64;
    let mut moved = 0.0f64;
    for i in 0..before.len() {
        let expected = before[i] + epsilon * (mean_phi[i] - before[i]);
        worst = worst.max((after[i] - expected).abs());
        moved = moved.max((after[i] - before[i]).abs());
    }
    eprintln!("{label}: max |θ' - expected| = {worst:.2e}, max move {moved:.2e}");
    ensure!(moved > 1e-4, "{label}: Reptile did not move the weights");
    ensure!(
        worst < 1e-12,
        "{label}: θ after one Reptile step differs from θ + ε(mean φ − θ) by {worst:.3e}"
    );
    Ok(())
}

#[test]
fn reptile_step_moves_towards_mean_adapted_weights() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    check_reptile("Reptile batched", &equal_size_regression_tasks(&mut rng))?;
    check_reptile("Reptile per-task", &mixed_size_regression_tasks(&mut rng))
}

// ---------------------------------------------------------------------------------------------
// Meta-SGD
// ---------------------------------------------------------------------------------------------

fn check_meta_sgd(label: &str, arch: &Architecture, tasks: &[Task], kind: TaskKind) -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(arch)?;
    let theta = generic_params(&net, 21);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    // Distinct rates per coordinate, so that a rate applied to the wrong weight shows.
    let rates = theta.map(|_, t| Ok(uniform(&mut rng, t.dims(), 0.05, 0.3)))?;
    let meta = meta_params(&theta, Some(&rates));
    let alg = MetaSgd {
        adapt_from: None,
        inner_steps: 2,
        first_order: false,
    };
    let loss = metalearn::meta::task_loss(kind);
    let reference = |v: &[f64]| {
        let (w, rest) = unflatten(&theta, v);
        let (lrs, _) = unflatten(&rates, rest);
        let cfg = RefInner {
            loss,
            steps: 2,
            lr: RefLr::PerParam(&lrs),
            adapt_prefix: "",
        };
        reference_meta_loss(&net, &w, tasks, cfg)
    };
    let grads = check_meta_gradient(label, &net, &alg, &meta, tasks, kind, reference)?;
    let exempt = exempt_biases(arch);
    let exempt: Vec<&str> = exempt.iter().map(|s| s.as_str()).collect();
    assert_weights_have_gradient(label, &meta, &grads, &exempt);
    let rate_grads = &grads[theta.num_values()..];
    ensure!(
        rate_grads.iter().any(|g| *g != 0.0),
        "{label}: the learned rates got no gradient"
    );
    Ok(())
}

#[test]
fn meta_sgd_gradients_wrt_weights_and_rates_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mlp = tiny_mlp();
    check_meta_sgd(
        "Meta-SGD MLP batched",
        &mlp,
        &equal_size_regression_tasks(&mut rng),
        TaskKind::Regression,
    )?;
    check_meta_sgd(
        "Meta-SGD MLP per-task",
        &mlp,
        &mixed_size_regression_tasks(&mut rng),
        TaskKind::Regression,
    )?;
    check_meta_sgd(
        "Meta-SGD conv batched",
        &tiny_conv(),
        &equal_size_image_tasks(&mut rng),
        CONV_KIND,
    )
}

// ---------------------------------------------------------------------------------------------
// ANIL
// ---------------------------------------------------------------------------------------------

fn check_anil(label: &str, arch: &Architecture, tasks: &[Task], kind: TaskKind) -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(arch)?;
    let theta = generic_params(&net, 31);
    let meta = meta_params(&theta, None);
    let inner_lr = 0.3;
    let alg = Anil {
        inner_lr,
        inner_steps: 2,
        first_order: false,
    };
    let loss = metalearn::meta::task_loss(kind);
    let reference = |v: &[f64]| {
        let (w, _) = unflatten(&theta, v);
        let cfg = RefInner {
            loss,
            steps: 2,
            lr: RefLr::Scalar(inner_lr),
            adapt_prefix: "head.",
        };
        reference_meta_loss(&net, &w, tasks, cfg)
    };
    let grads = check_meta_gradient(label, &net, &alg, &meta, tasks, kind, reference)?;
    // The body is not adapted, but its meta-gradient flows through the features.
    let exempt = exempt_biases(arch);
    let exempt: Vec<&str> = exempt.iter().map(|s| s.as_str()).collect();
    assert_weights_have_gradient(label, &meta, &grads, &exempt);
    Ok(())
}

#[test]
fn anil_meta_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let mlp = tiny_mlp();
    check_anil(
        "ANIL MLP batched",
        &mlp,
        &equal_size_regression_tasks(&mut rng),
        TaskKind::Regression,
    )?;
    check_anil(
        "ANIL MLP per-task",
        &mlp,
        &mixed_size_regression_tasks(&mut rng),
        TaskKind::Regression,
    )?;
    let conv = tiny_conv();
    check_anil(
        "ANIL conv batched",
        &conv,
        &equal_size_image_tasks(&mut rng),
        CONV_KIND,
    )?;
    check_anil(
        "ANIL conv per-task",
        &conv,
        &mixed_size_image_tasks(&mut rng),
        CONV_KIND,
    )
}

#[test]
fn anil_inner_loop_changes_only_the_head() -> Result<()> {
    metalearn::runtime::init();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (arch, task, kind) in [
        (
            tiny_mlp(),
            regression_task(&mut rng, 6, 3),
            TaskKind::Regression,
        ),
        (
            tiny_conv(),
            classification_task(&mut rng, &[1, 6, 6], 3, 2, 2),
            CONV_KIND,
        ),
    ] {
        let net = Network::build(&arch)?;
        let theta = generic_params(&net, 41);
        let head = arch.head_index().expect("a head");
        let alg = Anil {
            inner_lr: 0.3,
            inner_steps: 3,
            first_order: false,
        };
        let meta = meta_params(&theta, None);
        let state = EvalState {
            running_stats: None,
            test_time_shifts: false,
        };
        let Adapted::Weights(adapted) = alg.adapt(
            &net,
            &meta,
            (&task.support.0, &task.support.1),
            3,
            kind,
            &state,
        )?
        else {
            panic!("ANIL adapts weights");
        };
        // The inner loop as meta-training runs it (second order, graph kept).
        let cfg = InnerLoop {
            loss: metalearn::meta::task_loss(kind),
            steps: 3,
            lr: InnerLr::Scalar(0.3),
            from_layer: head,
            second_order: true,
        };
        let fast = run_inner_loop(
            &net,
            &meta.weights,
            &task.support.0,
            &task.support.1,
            &cfg,
            None,
        )?;
        for spec in net.param_specs() {
            let before = theta.get(&spec.name)?.flatten_all()?.to_vec1::<f64>()?;
            for (what, set) in [("adapt", &adapted), ("inner loop", &fast)] {
                let after = set.get(&spec.name)?.flatten_all()?.to_vec1::<f64>()?;
                if spec.layer < head {
                    assert_eq!(
                        before, after,
                        "ANIL {what} changed body parameter `{}`",
                        spec.name
                    );
                } else {
                    assert_ne!(
                        before, after,
                        "ANIL {what} left head parameter `{}` unchanged",
                        spec.name
                    );
                }
            }
        }
        // The adapted head equals the reference's (head-only gradient descent).
        let reference = reference_adapt(
            &net,
            &theta,
            &task.support.0,
            &task.support.1,
            RefInner {
                loss: metalearn::meta::task_loss(kind),
                steps: 3,
                lr: RefLr::Scalar(0.3),
                adapt_prefix: "head.",
            },
        )?;
        let (a, r) = (flatten(&adapted), flatten(&reference));
        let worst = a
            .iter()
            .zip(&r)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst < 1e-12,
            "ANIL adapted weights differ from the reference by {worst:.3e}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ProtoNet
// ---------------------------------------------------------------------------------------------

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_vec2::<f64>().expect("2-D f64")
}

fn ids_of(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<f64>()
        .expect("1-D f64")
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

/// Class means of support embeddings and negative squared distances of queries to them, in
/// plain f64 arithmetic.
fn hand_logits(
    support: &[Vec<f64>],
    labels: &[usize],
    queries: &[Vec<f64>],
    ways: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let dim = support[0].len();
    let mut means = vec![vec![0.0; dim]; ways];
    let mut counts = vec![0usize; ways];
    for (e, &c) in support.iter().zip(labels) {
        for d in 0..dim {
            means[c][d] += e[d];
        }
        counts[c] += 1;
    }
    for (m, &n) in means.iter_mut().zip(&counts) {
        for v in m.iter_mut() {
            *v /= n as f64;
        }
    }
    let logits = queries
        .iter()
        .map(|q| {
            means
                .iter()
                .map(|m| -q.iter().zip(m).map(|(a, b)| (a - b).powi(2)).sum::<f64>())
                .collect()
        })
        .collect();
    (means, logits)
}

#[test]
fn protonet_logits_are_negative_squared_distances_to_class_means() -> Result<()> {
    metalearn::runtime::init();
    let mut arch = Architecture::new(&[2]);
    arch.push(Layer::dense(5));
    arch.push(Layer::relu());
    arch.push(Layer::dense(3));
    let net = Network::build(&arch)?;
    let theta = generic_params(&net, 51);
    let meta = meta_params(&theta, None);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let ways = 4;
    // Unequal shots and labels in arbitrary order.
    let s_ids = vec![2, 0, 3, 1, 1, 2, 0, 2, 3];
    let sx = uniform(&mut rng, &[s_ids.len(), 2], -2.0, 2.0);
    let qx = uniform(&mut rng, &[7, 2], -2.0, 2.0);
    let kind = TaskKind::Classification { ways };
    let state = EvalState {
        running_stats: None,
        test_time_shifts: false,
    };
    let adapted =
        ProtoNet::default().adapt(&net, &meta, (&sx, &class_ids(&s_ids)), 0, kind, &state)?;
    let logits = ProtoNet::default().predict(&net, &meta, &adapted, &qx, &state)?;
    let embed = |x: &Tensor| {
        rows(
            &net.forward(&theta, x, &mut ForwardCtx::eval(None))
                .expect("forward"),
        )
    };
    let (means, expected) = hand_logits(&embed(&sx), &s_ids, &embed(&qx), ways);
    let Adapted::Prototypes(protos) = &adapted else {
        panic!("ProtoNet adapts to prototypes");
    };
    let close = |a: &[Vec<f64>], b: &[Vec<f64>], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}: row count");
        for (ra, rb) in a.iter().zip(b) {
            assert_eq!(ra.len(), rb.len(), "{what}: column count");
            for (x, y) in ra.iter().zip(rb) {
                assert!(
                    (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                    "{what}: {x} vs {y}"
                );
            }
        }
    };
    close(&rows(protos), &means, "prototypes");
    close(&rows(&logits), &expected, "logits");
    // The free functions agree too.
    let e_s = net.forward(&theta, &sx, &mut ForwardCtx::eval(None))?;
    let p = protonet::prototypes(&e_s, &class_ids(&s_ids), ways)?;
    close(&rows(&p), &means, "prototypes()");
    // A class without a support example is an error that names it.
    let err = protonet::prototypes(&e_s, &class_ids(&[0, 1, 3, 0, 1, 3, 0, 1, 3]), ways)
        .expect_err("class 2 has no support example");
    assert!(
        err.to_string().contains("class 2"),
        "unexpected message: {err}"
    );
    Ok(())
}

/// The ProtoNet query loss in plain f64, from the network's (train-mode) embeddings of support
/// and query together.
fn protonet_reference_loss(
    net: &Network,
    theta: &ParamSet,
    tasks: &[Task],
    ways: usize,
    scale: f64,
) -> f64 {
    let mut total = 0.0;
    for task in tasks {
        let x = Tensor::cat(&[&task.support.0, &task.query.0], 0).expect("same example shape");
        let e = rows(
            &net.forward(theta, &x, &mut ForwardCtx::train())
                .expect("forward"),
        );
        let n_support = task.support.0.dim(0).expect("batch");
        let (_, logits) = hand_logits(
            &e[..n_support],
            &ids_of(&task.support.1),
            &e[n_support..],
            ways,
        );
        let q_ids = ids_of(&task.query.1);
        let mut loss = 0.0;
        for (row, &c) in logits.iter().zip(&q_ids) {
            let row: Vec<f64> = row.iter().map(|l| scale * l).collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = row.iter().map(|l| (l - max).exp()).sum::<f64>().ln() + max;
            loss += log_sum - row[c];
        }
        total += loss / q_ids.len() as f64;
    }
    total / tasks.len() as f64
}

#[test]
fn protonet_meta_gradient_matches_finite_differences() -> Result<()> {
    metalearn::runtime::init();
    let ways = 3;
    let kind = TaskKind::Classification { ways };
    let mut plain = Architecture::new(&[2]);
    plain.push(Layer::dense(5));
    plain.push(Layer::tanh());
    plain.push(Layer::dense(3));
    let mut with_bn = Architecture::new(&[2]);
    with_bn.push(Layer::dense(5));
    with_bn.push(Layer::batch_norm());
    with_bn.push(Layer::tanh());
    with_bn.push(Layer::dense(3));
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for (label, arch, scale) in [
        ("ProtoNet MLP", plain.clone(), 1.0),
        ("ProtoNet MLP+BN", with_bn, 1.0),
        ("ProtoNet MLP, distance scale 2.5", plain, 2.5),
    ] {
        let net = Network::build(&arch)?;
        let theta = generic_params(&net, 61);
        let meta = meta_params(&theta, None);
        let tasks: Vec<Task> = vec![
            classification_task(&mut rng, &[2], ways, 2, 2),
            classification_task(&mut rng, &[2], ways, 3, 1),
        ];
        let reference = |v: &[f64]| {
            let (w, _) = unflatten(&theta, v);
            protonet_reference_loss(&net, &w, &tasks, ways, scale)
        };
        let protonet = ProtoNet {
            distance_scale: scale,
        };
        let grads = check_meta_gradient(label, &net, &protonet, &meta, &tasks, kind, reference)?;
        // A shift of every embedding (the last bias) leaves all distances unchanged.
        let mut exempt = exempt_biases(&arch);
        exempt.push("dense_2.bias".into());
        let exempt: Vec<&str> = exempt.iter().map(|s| s.as_str()).collect();
        assert_weights_have_gradient(label, &meta, &grads, &exempt);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Max-pooling (on the second-order path of every conv backbone)
// ---------------------------------------------------------------------------------------------

#[test]
fn max_pool_takes_window_maxima() -> Result<()> {
    metalearn::runtime::init();
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    // Non-square input with a trailing row and column that do not fill a window.
    let (n, c, h, w, size) = (2, 3, 7, 5, 2);
    let x = uniform(&mut rng, &[n, c, h, w], -1.0, 1.0);
    let pooled = metalearn::nn::ops::max_pool(&x, size)?;
    let (oh, ow) = (h / size, w / size);
    assert_eq!(pooled.dims(), &[n, c, oh, ow]);
    let values = x.flatten_all()?.to_vec1::<f64>()?;
    let got = pooled.flatten_all()?.to_vec1::<f64>()?;
    let at = |b: usize, ch: usize, i: usize, j: usize| values[((b * c + ch) * h + i) * w + j];
    let mut k = 0;
    for b in 0..n {
        for ch in 0..c {
            for i in 0..oh {
                for j in 0..ow {
                    let mut m = f64::NEG_INFINITY;
                    for di in 0..size {
                        for dj in 0..size {
                            m = m.max(at(b, ch, i * size + di, j * size + dj));
                        }
                    }
                    assert_eq!(got[k], m, "window ({b}, {ch}, {i}, {j})");
                    k += 1;
                }
            }
        }
    }
    Ok(())
}

/// A regression task with `inputs` features and `outputs` targets per example.
fn wide_regression_task(
    rng: &mut ChaCha8Rng,
    support: usize,
    query: usize,
    io: [usize; 2],
) -> Task {
    let [inputs, outputs] = io;
    Task {
        support: (
            uniform(rng, &[support, inputs], -2.0, 2.0),
            uniform(rng, &[support, outputs], -1.0, 1.0),
        ),
        query: (
            uniform(rng, &[query, inputs], -2.0, 2.0),
            uniform(rng, &[query, outputs], -1.0, 1.0),
        ),
    }
}

#[test]
fn mlp_maml_kernel_matches_the_reference_path() -> Result<()> {
    use metalearn::kernels::with_kernels;
    metalearn::runtime::init();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut deep = Architecture::mlp(&[3, 6, 5, 2], Activation::Relu)?;
    deep.push(Layer::Activation {
        activation: Activation::Linear,
    });
    let cases: Vec<(&str, Architecture, Vec<Task>)> = vec![
        (
            "1-4-4-1 ReLU, equal sizes",
            Architecture::mlp(&[1, 4, 4, 1], Activation::Relu)?,
            equal_size_regression_tasks(&mut rng),
        ),
        (
            "1-4-4-1 ReLU, mixed sizes",
            Architecture::mlp(&[1, 4, 4, 1], Activation::Relu)?,
            mixed_size_regression_tasks(&mut rng),
        ),
        (
            "3-6-5-2 ReLU then linear",
            deep,
            (0..4)
                .map(|i| wide_regression_task(&mut rng, 4 + i, 3, [3, 2]))
                .collect(),
        ),
    ];
    for (label, arch, tasks) in &cases {
        let net = Network::build(arch)?;
        let meta = meta_params(&generic_params(&net, 5), None);
        for (steps, first_order) in [(1, false), (3, false), (2, true)] {
            let maml = Maml {
                adapt_from: None,
                inner_lr: 0.05,
                inner_steps: steps,
                first_order,
            };
            let kind = TaskKind::Regression;
            let fast = with_kernels(true, || maml.meta_train_step(&net, &meta, tasks, kind))?;
            let reference = with_kernels(false, || maml.meta_train_step(&net, &meta, tasks, kind))?;
            let case = format!("{label}, {steps} steps, first order {first_order}");
            let direct = with_kernels(true, || {
                metalearn::meta::mlp_maml::meta_step(
                    &net,
                    &meta,
                    tasks,
                    kind,
                    0.05,
                    steps,
                    !first_order,
                )
            })?;
            ensure!(direct.is_some(), "{case}: the kernel declined the network");
            ensure!(
                (fast.loss - reference.loss).abs() <= 1e-12 * reference.loss.abs().max(1.0),
                "{case}: loss {} vs reference {}",
                fast.loss,
                reference.loss
            );
            let (a, b) = (flat_grads(&fast, &meta), flat_grads(&reference, &meta));
            let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            ensure!(
                worst <= 1e-10 * scale,
                "{case}: gradients differ by {worst:e} (largest {scale:e})"
            );
            ensure!(
                b.iter().filter(|v| **v != 0.0).count() > b.len() / 2,
                "{case}: most gradients are zero, the comparison would prove little"
            );
        }
    }
    Ok(())
}

#[test]
fn mlp_maml_kernel_in_f32_matches_the_reference_path() -> Result<()> {
    // f32 runs the vectorised product (AVX2 and FMA where the CPU has them); sizes are chosen
    // so that blocks of 8 columns and 4 rows are both full and partial.
    use metalearn::kernels::with_kernels;
    metalearn::runtime::init();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let arch = Architecture::mlp(&[3, 40, 13, 1], Activation::Relu)?;
    let net = Network::build(&arch)?;
    let to_f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("cast");
    let weights = generic_params(&net, 9).map(|_, t| Ok(to_f32(t)))?;
    let meta = meta_params(&weights, None);
    let tasks: Vec<Task> = (0..5)
        .map(|i| {
            let t = wide_regression_task(&mut rng, 10 + i, 7, [3, 1]);
            Task {
                support: (to_f32(&t.support.0), to_f32(&t.support.1)),
                query: (to_f32(&t.query.0), to_f32(&t.query.1)),
            }
        })
        .collect();
    for (steps, first_order) in [(1, false), (3, false), (2, true)] {
        let maml = Maml {
            adapt_from: None,
            inner_lr: 0.01,
            inner_steps: steps,
            first_order,
        };
        let kind = TaskKind::Regression;
        let fast = with_kernels(true, || maml.meta_train_step(&net, &meta, &tasks, kind))?;
        let reference = with_kernels(false, || maml.meta_train_step(&net, &meta, &tasks, kind))?;
        let flat = |step: &MetaStep| -> Vec<f32> {
            step.grads
                .iter()
                .flat_map(|g| {
                    g.as_ref()
                        .expect("every weight has a gradient")
                        .flatten_all()
                        .and_then(|g| g.to_vec1::<f32>())
                        .expect("f32 gradient")
                })
                .collect()
        };
        let (a, b) = (flat(&fast), flat(&reference));
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        ensure!(
            worst <= 1e-4 * scale && (fast.loss - reference.loss).abs() <= 1e-5 * reference.loss,
            "{steps} steps, first order {first_order}: gradients differ by {worst:e} (largest \
             {scale:e}), losses {} vs {}",
            fast.loss,
            reference.loss
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Text encoders
// ---------------------------------------------------------------------------------------------

/// A tiny BERT-style classifier: token embedding → transformer block → mean pooling → dense 2.
fn tiny_text_encoder() -> Architecture {
    let mut arch = Architecture::new(&[5]);
    arch.push(Layer::TokenEmbedding {
        vocab_size: 11,
        hidden: 4,
        max_positions: 5,
        type_vocab_size: 1,
        pad_id: 0,
        eps: 1e-5,
    });
    arch.push(Layer::TransformerBlock {
        heads: 2,
        intermediate: 6,
        eps: 1e-5,
        lora_rank: 0,
        lora_alpha: 16.0,
    });
    arch.push(Layer::SequencePool {
        mode: metalearn::nn::architecture::Pooling::Mean,
    });
    arch.push_named("head", Layer::dense(2))
        .expect("unique name");
    arch
}

/// A 2-way task of `per_class` token sequences per class, padded with id 0 after a random
/// length of 2 to 5 tokens (ids 1..11).
fn token_task(rng: &mut ChaCha8Rng, per_class: usize, queries: usize) -> Task {
    let mut sequences = |n: usize| {
        let values: Vec<f64> = (0..n)
            .flat_map(|_| {
                let length = rng.gen_range(2..=5);
                let ids: Vec<f64> = (0..5)
                    .map(|i| {
                        if i < length {
                            rng.gen_range(1..11) as f64
                        } else {
                            0.0
                        }
                    })
                    .collect();
                ids
            })
            .collect();
        Tensor::from_vec(values, (n, 5), &Device::Cpu).expect("shape")
    };
    let support = sequences(2 * per_class);
    let query = sequences(2 * queries);
    let s_ids = shuffled_labels(rng, 2, per_class);
    let q_ids = shuffled_labels(rng, 2, queries);
    Task {
        support: (support, class_ids(&s_ids)),
        query: (query, class_ids(&q_ids)),
    }
}

#[test]
fn maml_second_order_text_encoder_matches_finite_differences() -> Result<()> {
    // Equal-size tasks run task-batched (every parameter, the word table included, gets a
    // task dimension); tasks of different sizes run one by one.
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let kind = TaskKind::Classification { ways: 2 };
    let batched = vec![token_task(&mut rng, 2, 2), token_task(&mut rng, 2, 2)];
    check_maml(
        "MAML encoder batched",
        &tiny_text_encoder(),
        &batched,
        kind,
        0.1,
    )?;
    let mixed = vec![token_task(&mut rng, 1, 2), token_task(&mut rng, 2, 1)];
    check_maml(
        "MAML encoder per-task",
        &tiny_text_encoder(),
        &mixed,
        kind,
        0.1,
    )
}
