//! The gradient-descent inner loop shared by MAML, Meta-SGD, ANIL and Reptile, and the
//! meta-objective built on it.
//!
//! candle's `backward` keeps gradients only for `Var`s, and fast weights are not `Var`s after
//! the first step. Each inner step therefore adds a zero-valued probe `Var` to every adapted
//! weight and reads the gradient of the probe, which equals the gradient at the fast weight.
//! With second order on, those gradients keep their graph (see [`crate::runtime::init`]), so the
//! meta-gradient flows through the whole inner loop.

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::meta::algorithm::{task_loss, MetaParams, MetaStep};
use crate::nn::network::{ForwardCtx, Network};
use crate::nn::params::ParamSet;
use crate::tasks::{Task, TaskBatch, TaskKind};
use crate::train::loss::Loss;

/// Inner-loop learning rate: one scalar, or one learned rate per weight (Meta-SGD).
#[derive(Clone, Copy, Debug)]
pub enum InnerLr<'a> {
    /// The same rate for every weight.
    Scalar(f64),
    /// A rate tensor per weight (same names and shapes as the weights).
    PerParam(&'a ParamSet),
}

/// Settings of one inner loop.
#[derive(Clone, Copy, Debug)]
pub struct InnerLoop<'a> {
    /// Loss minimised on the support set.
    pub loss: Loss,
    /// Number of gradient steps.
    pub steps: usize,
    /// Learning rate(s).
    pub lr: InnerLr<'a>,
    /// Only layers from this index on are adapted (0: all; the head index: ANIL). Features of
    /// the layers below are computed once.
    pub from_layer: usize,
    /// Keep the graph of the inner gradients (second-order meta-gradient).
    pub second_order: bool,
}

/// The index of the first layer the inner loop adapts: the layer named `adapt_from`, or 0.
pub fn first_adapted_layer(net: &Network, adapt_from: Option<&str>) -> Result<usize> {
    let Some(name) = adapt_from else {
        return Ok(0);
    };
    let layers = &net.architecture().layers;
    layers.iter().position(|l| l.name == name).ok_or_else(|| {
        let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        Error::Config(format!(
            "algorithm.adapt_from names layer `{name}`, which the network does not have; its \
             layers are {}",
            names.join(", ")
        ))
    })
}

/// Repeats every weight along a new leading task dimension (a view; gradients sum back).
pub fn broadcast_tasks(weights: &ParamSet, tasks: usize) -> Result<ParamSet> {
    weights.map(|_, t| broadcast_one(t, tasks))
}

fn broadcast_one(t: &Tensor, tasks: usize) -> Result<Tensor> {
    let mut shape = vec![tasks];
    shape.extend_from_slice(t.dims());
    Ok(t.unsqueeze(0)?.broadcast_as(shape)?)
}

/// [`broadcast_tasks`], except for the tables of feature-embedding layers below `from_layer`:
/// the inner loop does not adapt them, and the layer reads one shared table in task-batched
/// mode, so no `[T, vocab, dim]` view (and no gradient of that size) is made.
pub fn broadcast_adapted(
    net: &Network,
    weights: &ParamSet,
    tasks: usize,
    from_layer: usize,
) -> Result<ParamSet> {
    use crate::nn::architecture::Layer;
    let shared: Vec<&str> = net.architecture().layers
        [..from_layer.min(net.architecture().layers.len())]
        .iter()
        .filter(|l| matches!(l.layer, Layer::FeatureEmbedding { .. }))
        .map(|l| l.name.as_str())
        .collect();
    weights.map(|name, t| {
        let layer = name.split('.').next().unwrap_or_default();
        if shared.contains(&layer) {
            Ok(t.clone())
        } else {
            broadcast_one(t, tasks)
        }
    })
}

/// Whether parameter `name` belongs to a layer at or after `from_layer`.
fn adapted(net: &Network, name: &str, from_layer: usize) -> bool {
    net.param_specs()
        .iter()
        .find(|s| s.name == name)
        .is_some_and(|s| s.layer >= from_layer)
}

/// Runs the inner loop from `weights` on `(x, y)`; returns the fast weights (the full set, with
/// non-adapted weights unchanged). With `tasks = Some(t)`, weights and data carry a leading task
/// dimension of size `t`, and each task's gradient is that of its own mean loss.
pub fn run_inner_loop(
    net: &Network,
    weights: &ParamSet,
    x: &Tensor,
    y: &Tensor,
    cfg: &InnerLoop,
    tasks: Option<usize>,
) -> Result<ParamSet> {
    run_weighted_inner_loop(net, weights, x, y, None, cfg, tasks)
}

/// [`run_inner_loop`] on a padded task batch: `weight` (`[T, k]`, see
/// [`TaskBatch::pad`]) weighs each example's squared error, so padding rows count for nothing
/// and each task's gradient is that of its own mean loss over its real examples. Mean squared
/// error only.
pub fn run_weighted_inner_loop(
    net: &Network,
    weights: &ParamSet,
    x: &Tensor,
    y: &Tensor,
    weight: Option<&Tensor>,
    cfg: &InnerLoop,
    tasks: Option<usize>,
) -> Result<ParamSet> {
    let batched = tasks.is_some();
    if weight.is_some() && (!batched || cfg.loss != Loss::Mse) {
        return Err(Error::Config(
            "per-example weights (tasks of different sizes in one batch) need task-batched \
             regression with mean squared error"
                .into(),
        ));
    }
    // The mean over all tasks' examples, times the task count, is the sum of per-task means.
    let scale = tasks.unwrap_or(1) as f64;
    let layers = net.architecture().layers.len();
    let features = if cfg.from_layer > 0 {
        net.forward_range(
            weights,
            x,
            &mut ForwardCtx::train(),
            0,
            cfg.from_layer,
            batched,
        )?
    } else {
        x.clone()
    };
    let mut fast = weights.clone();
    if explicit_gradients_supported(net, cfg) {
        for _ in 0..cfg.steps {
            let grads = explicit_gradients(net, &fast, &features, y, weight, cfg, scale, batched)?;
            fast = fast.map(|name, t| {
                let Some(g) = grads.try_get(name) else {
                    return Ok(t.clone());
                };
                let g = if cfg.second_order {
                    g.clone()
                } else {
                    g.detach()
                };
                let step = match cfg.lr {
                    InnerLr::Scalar(lr) => g.affine(lr, 0.0)?,
                    InnerLr::PerParam(lrs) => g.broadcast_mul(lrs.get(name)?)?,
                };
                Ok(t.sub(&step)?)
            })?;
        }
        return Ok(fast);
    }
    for _ in 0..cfg.steps {
        let mut probes: Vec<Option<Var>> = Vec::with_capacity(fast.len());
        let probed = fast.map(|name, t| {
            if adapted(net, name, cfg.from_layer) {
                let probe = Var::zeros(t.shape(), t.dtype(), t.device())?;
                let out = t.add(probe.as_tensor())?;
                probes.push(Some(probe));
                Ok(out)
            } else {
                probes.push(None);
                Ok(t.clone())
            }
        })?;
        let pred = net.forward_range(
            &probed,
            &features,
            &mut if cfg.second_order {
                ForwardCtx::train()
            } else {
                ForwardCtx::train().first_order()
            },
            cfg.from_layer,
            layers,
            batched,
        )?;
        let loss = match weight {
            Some(w) => weighted_squared_error(&pred, y, w)?,
            None => cfg.loss.compute(&pred, y)?.affine(scale, 0.0)?,
        };
        let grads = if cfg.second_order {
            loss.backward()?
        } else {
            crate::runtime::backward(&loss)?
        };
        let mut i = 0;
        fast = fast.map(|name, t| {
            let probe = probes[i].as_ref();
            i += 1;
            let Some(probe) = probe else {
                return Ok(t.clone());
            };
            let g = match grads.get(probe.as_tensor()) {
                Some(g) if cfg.second_order => g.clone(),
                Some(g) => g.detach(),
                // The weight does not influence the loss (e.g. a dead branch).
                None => return Ok(t.clone()),
            };
            let step = match cfg.lr {
                InnerLr::Scalar(lr) => g.affine(lr, 0.0)?,
                InnerLr::PerParam(lrs) => g.broadcast_mul(lrs.get(name)?)?,
            };
            Ok(t.sub(&step)?)
        })?;
    }
    Ok(fast)
}

/// Whether [`explicit_gradients`] handles every adapted layer and the loss: dense layers,
/// element-wise activations and flatten, under MSE or cross-entropy.
fn explicit_gradients_supported(net: &Network, cfg: &InnerLoop) -> bool {
    use crate::nn::architecture::{Activation, Layer};
    matches!(cfg.loss, Loss::Mse | Loss::CategoricalCrossEntropy)
        && net.architecture().layers[cfg.from_layer..]
            .iter()
            .all(|l| match &l.layer {
                Layer::Dense { .. } | Layer::Flatten => true,
                Layer::Activation { activation } => matches!(
                    activation,
                    Activation::Relu | Activation::Tanh | Activation::Sigmoid | Activation::Linear
                ),
                _ => false,
            })
}

/// Gradients of the (scaled) support loss with respect to the adapted weights, written out as
/// tensor operations (a hand-derived backward pass) instead of a call to `backward()`.
///
/// For the small networks of regression meta-learning, the generic backward pass (graph walk,
/// zero-filled accumulators, gradients for every variable in the graph) costs more than the
/// arithmetic. The expressions here are ordinary differentiable candle ops, so the outer
/// `backward()` differentiates through them exactly: second-order MAML stays exact, which the
/// finite-difference tests check.
#[allow(clippy::too_many_arguments)]
fn explicit_gradients(
    net: &Network,
    params: &ParamSet,
    x: &Tensor,
    y: &Tensor,
    weight: Option<&Tensor>,
    cfg: &InnerLoop,
    scale: f64,
    batched: bool,
) -> Result<ParamSet> {
    use crate::nn::architecture::{Activation, Layer};
    let layers = &net.architecture().layers[cfg.from_layer..];
    // Forward, keeping every layer's input and output.
    let mut inputs = Vec::with_capacity(layers.len());
    let mut h = x.clone();
    for (offset, _) in layers.iter().enumerate() {
        let i = cfg.from_layer + offset;
        inputs.push(h.clone());
        h = net.forward_range(params, &h, &mut ForwardCtx::train(), i, i + 1, batched)?;
    }
    let pred = h;
    // dL/dpred of the mean loss, times `scale`.
    let mut g = match (cfg.loss, weight) {
        (Loss::Mse, Some(w)) => {
            let target = crate::train::loss::match_shape(&pred, y)?;
            let outputs = pred.dim(candle_core::D::Minus1)? as f64;
            pred.sub(&target)?
                .broadcast_mul(&w.unsqueeze(candle_core::D::Minus1)?)?
                .affine(2.0 / outputs, 0.0)?
        }
        (Loss::Mse, None) => {
            let target = crate::train::loss::match_shape(&pred, y)?;
            pred.sub(&target)?
                .affine(2.0 * scale / pred.elem_count() as f64, 0.0)?
        }
        _ => {
            let one_hot = crate::train::loss::class_targets(&pred, y)?;
            let rows = pred.elem_count() / pred.dim(candle_core::D::Minus1)?;
            crate::nn::ops::softmax(&pred)?
                .sub(&one_hot)?
                .affine(scale / rows as f64, 0.0)?
        }
    };
    let mut grads = ParamSet::new();
    let batch_dim = if batched { 1 } else { 0 };
    for (offset, named) in layers.iter().enumerate().rev() {
        let input = &inputs[offset];
        let output = if offset + 1 < inputs.len() {
            &inputs[offset + 1]
        } else {
            &pred
        };
        g = match &named.layer {
            Layer::Dense { .. } => {
                let w = params.get(&format!("{}.weight", named.name))?;
                let input_t = input.transpose(batch_dim, batch_dim + 1)?;
                grads.insert(format!("{}.weight", named.name), input_t.matmul(&g)?)?;
                grads.insert(format!("{}.bias", named.name), g.sum(batch_dim)?)?;
                g.matmul(&w.transpose(batch_dim, batch_dim + 1)?)?
            }
            Layer::Flatten => g.reshape(input.shape())?,
            Layer::Activation { activation } => match activation {
                Activation::Relu => {
                    // The mask is piecewise constant: its derivative is zero almost everywhere.
                    let mask = input.gt(0.0)?.to_dtype(input.dtype())?;
                    g.mul(&mask)?
                }
                Activation::Tanh => g.mul(&output.sqr()?.affine(-1.0, 1.0)?)?,
                Activation::Sigmoid => g.mul(&output.mul(&output.affine(-1.0, 1.0)?)?)?,
                Activation::Linear => g,
                _ => unreachable!("excluded by explicit_gradients_supported"),
            },
            _ => unreachable!("excluded by explicit_gradients_supported"),
        };
    }
    Ok(grads)
}

/// Mean query loss after adapting each task's copy of the meta-parameters, and its gradient
/// with respect to every meta-parameter: the MAML objective, shared by Meta-SGD and ANIL.
///
/// Tasks of equal shape run as one task-batched computation (the meta-batch is a leading
/// dimension of every tensor, as `vmap` would do); others run one by one.
pub fn gradient_meta_step(
    net: &Network,
    meta: &MetaParams,
    tasks: &[Task],
    kind: TaskKind,
    cfg: &InnerLoop,
) -> Result<MetaStep> {
    let loss_fn = task_loss(kind);
    let batch = match kind {
        // Regression tasks of different sizes (users with 3 or 90 ratings) are padded.
        TaskKind::Regression if loss_fn == Loss::Mse => TaskBatch::pad(tasks)?,
        _ => TaskBatch::stack(tasks)?,
    };
    let query_loss = match batch {
        Some(batch) => {
            let t = batch.len();
            let weights = broadcast_adapted(net, &meta.weights, t, cfg.from_layer)?;
            let fast = run_weighted_inner_loop(
                net,
                &weights,
                &batch.support_x,
                &batch.support_y,
                batch.support_weight.as_ref(),
                cfg,
                Some(t),
            )?;
            let pred = net.forward(
                &fast,
                &batch.query_x,
                &mut ForwardCtx::train().first_order(),
            )?;
            match &batch.query_weight {
                Some(w) => {
                    weighted_squared_error(&pred, &batch.query_y, w)?.affine(1.0 / t as f64, 0.0)?
                }
                None => loss_fn.compute(&pred, &batch.query_y)?,
            }
        }
        None => {
            let mut total: Option<Tensor> = None;
            for task in tasks {
                let fast = run_inner_loop(
                    net,
                    &meta.weights,
                    &task.support.0,
                    &task.support.1,
                    cfg,
                    None,
                )?;
                let pred =
                    net.forward(&fast, &task.query.0, &mut ForwardCtx::train().first_order())?;
                let l = loss_fn.compute(&pred, &task.query.1)?;
                total = Some(match total {
                    Some(acc) => acc.add(&l)?,
                    None => l,
                });
            }
            total
                .ok_or_else(|| Error::Data("empty meta-batch".into()))?
                .affine(1.0 / tasks.len() as f64, 0.0)?
        }
    };
    gradients_of(&query_loss, meta)
}

/// `Σ w · (pred − y)²` over a padded task batch, averaged over the outputs: with the weights of
/// [`TaskBatch::pad`], the sum of the tasks' mean squared errors.
pub fn weighted_squared_error(pred: &Tensor, y: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let target = crate::train::loss::match_shape(pred, y)?;
    let outputs = pred.dim(candle_core::D::Minus1)? as f64;
    let per_example = pred.sub(&target)?.sqr()?.sum(candle_core::D::Minus1)?;
    Ok(per_example
        .reshape(weight.shape())?
        .mul(weight)?
        .sum_all()?
        .affine(1.0 / outputs, 0.0)?)
}

/// Backpropagates `loss` and collects (detached) gradients for every meta-parameter.
pub fn gradients_of(loss: &Tensor, meta: &MetaParams) -> Result<MetaStep> {
    let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    if !value.is_finite() {
        return Ok(MetaStep {
            loss: value,
            grads: vec![None; meta.tensors().len()],
            batch_stats: Vec::new(),
        });
    }
    let store = crate::runtime::backward(loss)?;
    Ok(MetaStep {
        loss: value,
        grads: meta
            .tensors()
            .iter()
            .map(|t| store.get(t).map(|g| g.detach()))
            .collect(),
        batch_stats: Vec::new(),
    })
}

/// Adapts with plain (first-order) gradient descent and returns detached fast weights.
pub fn adapt_weights(
    net: &Network,
    weights: &ParamSet,
    support: (&Tensor, &Tensor),
    cfg: &InnerLoop,
) -> Result<ParamSet> {
    let cfg = InnerLoop {
        second_order: false,
        ..*cfg
    };
    Ok(run_inner_loop(net, &weights.detach(), support.0, support.1, &cfg, None)?.detach())
}
