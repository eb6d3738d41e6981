//! The plain transfer-learning baseline: one network trained jointly on all meta-training data
//! (for classification: over all meta-training classes at once), then fine-tuned on each test
//! task's support set with the same inner steps and learning rate as the meta-learner. It shows
//! what meta-learning buys over "pre-train, then fine-tune".

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::eval::{score_episodes, Summary};
use crate::meta::inner::{adapt_weights, InnerLoop, InnerLr};
use crate::meta::task_loss;
use crate::nn::architecture::{Architecture, Layer};
use crate::nn::network::{ForwardCtx, Network};
use crate::nn::params::ParamSet;
use crate::tasks::{Split, Task, TaskKind, TaskSource};
use crate::train::metrics::Metric;
use crate::train::optim::{Optimizer, OptimizerConfig};

/// A jointly trained network ready to be fine-tuned per task.
pub struct TransferBaseline {
    /// Network with the head sized for one task (ways outputs, or the regression output).
    task_network: Network,
    /// Pre-trained weights, head reset for a new task.
    weights: ParamSet,
    kind: TaskKind,
    inner_lr: f64,
}

/// Settings of the baseline's joint training.
#[derive(Clone, Debug)]
pub struct BaselineOptions {
    /// Gradient steps of joint training.
    pub iterations: usize,
    /// Tasks' worth of examples per step.
    pub tasks_per_batch: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Seed (weights and data).
    pub seed: u64,
    /// Learning rate of the per-task fine-tuning (use the meta-learner's inner rate).
    pub inner_lr: f64,
}

fn with_head(arch: &Architecture, units: usize) -> Result<Architecture> {
    let mut arch = arch.clone();
    // An embedding network (ProtoNet) gets a dense head; otherwise the last dense layer is it.
    match arch.layers.last() {
        Some(last) if matches!(last.layer, Layer::Dense { .. }) => {
            let i = arch.layers.len() - 1;
            arch.layers[i].layer = Layer::Dense { units };
        }
        _ => {
            if arch.layers.iter().any(|l| l.name == "head") {
                return Err(Error::Config(
                    "cannot add a baseline head: a layer is already named `head`".into(),
                ));
            }
            arch.push_named("head", Layer::Dense { units })?;
        }
    }
    Ok(arch)
}

/// Trains the baseline on joint batches from `source`'s meta-training split.
pub fn train_transfer_baseline(
    arch: &Architecture,
    source: &dyn TaskSource,
    options: &BaselineOptions,
) -> Result<TransferBaseline> {
    let kind = source.kind();
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let (_, _, joint_classes) = source.joint_batch(1, &mut rng)?;
    let (joint_arch, task_arch) = match kind {
        TaskKind::Regression => (with_head(arch, 1)?, with_head(arch, 1)?),
        TaskKind::Classification { ways } => {
            (with_head(arch, joint_classes)?, with_head(arch, ways)?)
        }
    };
    let joint_net = Network::build(&joint_arch)?;
    let init = joint_net.init_params(options.seed, &Device::Cpu, DType::F32)?;
    let vars = init.to_vars()?;
    let names = init.names().to_vec();
    let mut opt = Optimizer::new(OptimizerConfig::adam(options.lr), vars.len())?;
    let loss_fn = task_loss(kind);
    for step in 0..options.iterations {
        let (x, y, _) = source.joint_batch(options.tasks_per_batch, &mut rng)?;
        let params = ParamSet::from_vars(&names, &vars)?;
        let pred = joint_net.forward(&params, &x, &mut ForwardCtx::train())?;
        let loss = loss_fn.compute(&pred, &y)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "transfer baseline loss became {value} at step {step}; lower its learning rate"
            )));
        }
        let grads = crate::runtime::backward(&loss)?;
        let grads: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).map(|g| g.detach()))
            .collect();
        opt.step(&vars, &grads)?;
    }
    let trained = ParamSet::from_vars(&names, &vars)?.detach();
    let task_network = Network::build(&task_arch)?;
    // A fresh zero head for a new task's classes; the body keeps the joint training.
    let weights = task_network
        .init_params(options.seed, &Device::Cpu, DType::F32)?
        .map(|name, fresh| {
            let old = trained.get(name)?;
            if old.dims() == fresh.dims() {
                Ok(old.clone())
            } else {
                Ok(fresh.zeros_like()?)
            }
        })?;
    Ok(TransferBaseline {
        task_network,
        weights,
        kind,
        inner_lr: options.inner_lr,
    })
}

impl TransferBaseline {
    /// Fine-tunes on the task's support set with `steps` SGD steps and scores the query set
    /// (accuracy or MSE).
    pub fn evaluate_task(&self, task: &Task, steps: usize) -> Result<f64> {
        let pred = self.adapt_and_predict(&task.support, &task.query.0, steps)?;
        let metric = match self.kind {
            TaskKind::Regression => Metric::Mse,
            TaskKind::Classification { .. } => Metric::Accuracy,
        };
        metric.compute(&pred, &task.query.1, 0.5)
    }

    /// Fine-tunes on `support` and predicts `x`.
    pub fn adapt_and_predict(
        &self,
        support: &(Tensor, Tensor),
        x: &Tensor,
        steps: usize,
    ) -> Result<Tensor> {
        let cfg = InnerLoop {
            loss: task_loss(self.kind),
            steps,
            lr: InnerLr::Scalar(self.inner_lr),
            from_layer: 0,
            second_order: false,
        };
        let fast = adapt_weights(
            &self.task_network,
            &self.weights,
            (&support.0, &support.1),
            &cfg,
        )?;
        Ok(self
            .task_network
            .forward(&fast, x, &mut ForwardCtx::train())?
            .detach())
    }
}

/// Scores the baseline on `episodes` new tasks of `split` drawn with `seed`.
pub fn evaluate_baseline(
    baseline: &TransferBaseline,
    source: &dyn TaskSource,
    split: Split,
    episodes: usize,
    steps: usize,
    seed: u64,
) -> Result<Summary> {
    score_episodes(source, split, episodes, seed, steps, |task| {
        baseline.evaluate_task(task, steps)
    })
}
