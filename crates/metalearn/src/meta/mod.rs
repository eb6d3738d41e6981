//! Meta-learning algorithms behind one trait.
//!
//! Every algorithm sees the same pieces: a [`Network`], the meta-parameters
//! ([`MetaParams`]: the network's weights and, for Meta-SGD, learned per-parameter inner learning
//! rates) and a batch of [`Task`]s. `meta_train_step` returns the meta-loss and the
//! meta-gradient; the [`MetaLearner`](learner::MetaLearner) applies the outer optimiser.
//!
//! | algorithm | inner loop | meta-gradient |
//! |---|---|---|
//! | MAML | SGD on all weights | through the inner loop (second order), or at the fast weights (`first_order`) |
//! | Meta-SGD | SGD with learned per-parameter rates | through the inner loop, also w.r.t. the rates |
//! | ANIL | SGD on the head only | through the inner loop |
//! | Reptile | SGD on the task's data | `θ − mean(φ_task)` (the Reptile direction) |
//! | ProtoNet | none (class means of embeddings) | of the query cross-entropy over negative squared distances |

pub mod anil;
pub mod inner;
pub mod learner;
pub mod maml;
pub mod metasgd;
pub mod mlp_maml;
pub mod protonet;
pub mod reptile;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::tasks::{Task, TaskKind};
use crate::train::loss::Loss;

/// Which meta-learning algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmKind {
    /// Model-Agnostic Meta-Learning (Finn et al., 2017).
    Maml,
    /// Reptile (Nichol et al., 2018).
    Reptile,
    /// Meta-SGD (Li et al., 2017): MAML with learned per-parameter inner learning rates.
    MetaSgd,
    /// Almost No Inner Loop (Raghu et al., 2020): MAML adapting only the head.
    Anil,
    /// Prototypical Networks (Snell et al., 2017).
    Protonet,
}

impl AlgorithmKind {
    /// The name used in configs and checkpoints.
    pub fn name(&self) -> &'static str {
        match self {
            AlgorithmKind::Maml => "maml",
            AlgorithmKind::Reptile => "reptile",
            AlgorithmKind::MetaSgd => "meta_sgd",
            AlgorithmKind::Anil => "anil",
            AlgorithmKind::Protonet => "protonet",
        }
    }

    /// How a model of this kind adapts to a new task, for reports: ProtoNet classifies by the
    /// nearest prototype and takes no gradient steps; the others take `steps` steps.
    /// `test_time_shifts` (ProtoNet's test-time augmentation) is named when on.
    pub fn adaptation_summary(&self, steps: usize, test_time_shifts: bool) -> String {
        let how = match (self, steps) {
            (AlgorithmKind::Protonet, _) => "nearest prototype".to_string(),
            (_, 1) => "1 adaptation step".to_string(),
            (_, n) => format!("{n} adaptation steps"),
        };
        if test_time_shifts {
            how + ", test-time shifts"
        } else {
            how
        }
    }
}

/// Hyper-parameters of the algorithm (inner loop).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgorithmConfig {
    /// Which algorithm.
    pub name: AlgorithmKind,
    /// MAML / ANIL: use the first-order approximation (inner gradients detached).
    #[serde(default)]
    pub first_order: bool,
    /// Inner-loop learning rate (Meta-SGD: the initial value of every learned rate).
    #[serde(default = "default_inner_lr")]
    pub inner_lr: f64,
    /// Inner steps during meta-training.
    #[serde(default = "one")]
    pub inner_steps: usize,
    /// Inner steps when adapting to a new task (evaluation, `adapt`).
    #[serde(default = "one")]
    pub eval_inner_steps: usize,
}

fn default_inner_lr() -> f64 {
    0.01
}
fn one() -> usize {
    1
}

impl AlgorithmConfig {
    /// A configuration with the given algorithm and defaults elsewhere.
    pub fn new(name: AlgorithmKind) -> Self {
        Self {
            name,
            first_order: false,
            inner_lr: default_inner_lr(),
            inner_steps: 1,
            eval_inner_steps: 1,
        }
    }

    /// A label for reports: the algorithm's name, with `fomaml` for first-order MAML.
    pub fn label(&self) -> &'static str {
        match (self.name, self.first_order) {
            (AlgorithmKind::Maml, true) => "fomaml",
            (kind, _) => kind.name(),
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.inner_lr > 0.0 && self.inner_lr.is_finite()) {
            return Err(Error::Config(format!(
                "algorithm.inner_lr must be > 0, got {}",
                self.inner_lr
            )));
        }
        if self.name != AlgorithmKind::Protonet && self.inner_steps == 0 {
            return Err(Error::Config(
                "algorithm.inner_steps must be >= 1 for gradient-based algorithms".into(),
            ));
        }
        Ok(())
    }
}

/// The meta-parameters: network weights plus, for Meta-SGD, one learned inner learning rate per
/// weight (same names and shapes).
#[derive(Clone, Debug)]
pub struct MetaParams {
    /// Network weights θ.
    pub weights: ParamSet,
    /// Meta-SGD learning rates α, if any.
    pub inner_lrs: Option<ParamSet>,
}

impl MetaParams {
    /// Every meta-parameter tensor, weights first, then rates.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut out: Vec<&Tensor> = self.weights.tensors().iter().collect();
        if let Some(lrs) = &self.inner_lrs {
            out.extend(lrs.tensors().iter());
        }
        out
    }
}

/// What one meta-training step computed.
#[derive(Clone, Debug)]
pub struct MetaStep {
    /// Mean query loss over the batch (after adaptation).
    pub loss: f64,
    /// Gradient per meta-parameter (order of [`MetaParams::tensors`]); `None` where unused.
    pub grads: Vec<Option<Tensor>>,
    /// Batch-norm batch statistics to fold into running statistics (ProtoNet).
    pub batch_stats: Vec<(String, Tensor)>,
}

/// The result of adapting to a support set.
#[derive(Clone, Debug)]
pub enum Adapted {
    /// Fast weights (MAML family, Reptile).
    Weights(ParamSet),
    /// Class prototypes `[ways, dim]` in embedding space (ProtoNet).
    Prototypes(Tensor),
}

/// Evaluation-time context of an algorithm: BN running statistics when used.
pub struct EvalState<'a> {
    /// Batch-norm running statistics (ProtoNet uses them at test time).
    pub running_stats: Option<&'a ParamSet>,
    /// Test-time augmentation (ProtoNet): embed each image as the mean embedding of the image
    /// and its copies shifted by one pixel left, right, up and down.
    pub test_time_shifts: bool,
}

/// One meta-learning algorithm: a meta-training step on a batch of tasks, adaptation to a
/// support set, and prediction on queries.
pub trait MetaAlgorithm: Send + Sync {
    /// Which algorithm.
    fn kind(&self) -> AlgorithmKind;

    /// Meta-loss and meta-gradient on `tasks` (the outer optimiser is applied by the caller).
    fn meta_train_step(
        &self,
        net: &Network,
        meta: &MetaParams,
        tasks: &[Task],
        kind: TaskKind,
    ) -> Result<MetaStep>;

    /// Adapts to a support set `(x, y)` with `steps` inner steps (ignored by ProtoNet).
    fn adapt(
        &self,
        net: &Network,
        meta: &MetaParams,
        support: (&Tensor, &Tensor),
        steps: usize,
        kind: TaskKind,
        state: &EvalState,
    ) -> Result<Adapted>;

    /// Predictions for query inputs: regression values or class logits. The default runs the
    /// network with the adapted weights (batch-norm on the query batch's statistics, as in
    /// MAML's transductive setting).
    fn predict(
        &self,
        net: &Network,
        meta: &MetaParams,
        adapted: &Adapted,
        x: &Tensor,
        _state: &EvalState,
    ) -> Result<Tensor> {
        let weights = match adapted {
            Adapted::Weights(w) => w,
            Adapted::Prototypes(_) => &meta.weights,
        };
        Ok(net
            .forward(
                weights,
                x,
                &mut crate::nn::network::ForwardCtx::train().first_order(),
            )?
            .detach())
    }
}

/// The loss that scores a task of this kind.
pub fn task_loss(kind: TaskKind) -> Loss {
    match kind {
        TaskKind::Regression => Loss::Mse,
        TaskKind::Classification { .. } => Loss::CategoricalCrossEntropy,
    }
}

/// Builds the algorithm described by `config`.
pub fn build_algorithm(config: &AlgorithmConfig) -> Result<Box<dyn MetaAlgorithm>> {
    config.validate()?;
    Ok(match config.name {
        AlgorithmKind::Maml => Box::new(maml::Maml {
            inner_lr: config.inner_lr,
            inner_steps: config.inner_steps,
            first_order: config.first_order,
        }),
        AlgorithmKind::MetaSgd => Box::new(metasgd::MetaSgd {
            inner_steps: config.inner_steps,
            first_order: config.first_order,
        }),
        AlgorithmKind::Anil => Box::new(anil::Anil {
            inner_lr: config.inner_lr,
            inner_steps: config.inner_steps,
            first_order: config.first_order,
        }),
        AlgorithmKind::Reptile => Box::new(reptile::Reptile {
            inner_lr: config.inner_lr,
            inner_steps: config.inner_steps,
        }),
        AlgorithmKind::Protonet => Box::new(protonet::ProtoNet),
    })
}
