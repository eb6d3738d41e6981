//! What every meta-learning algorithm shares: which algorithm and its settings
//! ([`AlgorithmConfig`]), the meta-parameters ([`MetaParams`]), one meta-training step's result
//! ([`MetaStep`]), and the [`MetaAlgorithm`] trait each algorithm's file implements.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::{at_least, positive_finite, KeyProblem};
use crate::error::Result;
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
    /// ProtoNet: the logits are `-distance_scale` times the squared distances (an inverse
    /// temperature). 1 is the original method; L2-normalised embeddings, whose squared
    /// distances are at most 4, need more (e.g. 10) to make confident predictions.
    #[serde(default = "one_f64", skip_serializing_if = "is_one")]
    pub distance_scale: f64,
    /// MAML, Meta-SGD, Reptile: adapt only this layer (by name) and the layers after it in
    /// the inner loop; the layers before it (a recommender's embeddings, MeLU) are learned in
    /// the outer loop only. `None`: every layer adapts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt_from: Option<String>,
}

fn one_f64() -> f64 {
    1.0
}
fn is_one(x: &f64) -> bool {
    *x == 1.0
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
            distance_scale: 1.0,
            adapt_from: None,
        }
    }

    /// A label for reports: the algorithm's name, with `fomaml` for first-order MAML.
    pub fn label(&self) -> &'static str {
        match (self.name, self.first_order) {
            (AlgorithmKind::Maml, true) => "fomaml",
            (kind, _) => kind.name(),
        }
    }

    /// Checks every value (the one place the rules of `[algorithm]` are written): the inner
    /// learning rate, the inner steps, and which algorithms have a first-order variant. The
    /// problem names its key, `algorithm.inner_lr` and so on.
    pub fn check(&self) -> std::result::Result<(), KeyProblem> {
        positive_finite("algorithm.inner_lr", self.inner_lr)?;
        positive_finite("algorithm.distance_scale", self.distance_scale)?;
        if self.distance_scale != 1.0 && self.name != AlgorithmKind::Protonet {
            return Err(KeyProblem::new(
                "algorithm.distance_scale",
                format!(
                    "`algorithm.distance_scale` applies to protonet only; {} has no distances, \
                     so remove it",
                    self.name.name()
                ),
            ));
        }
        if self.name != AlgorithmKind::Protonet && self.inner_steps == 0 {
            return Err(at_least(
                "algorithm.inner_steps",
                0,
                1,
                "inner steps per task in meta-training; eval_inner_steps = 0 scores without adapting",
            ));
        }
        if self.adapt_from.is_some()
            && matches!(self.name, AlgorithmKind::Anil | AlgorithmKind::Protonet)
        {
            return Err(KeyProblem::new(
                "algorithm.adapt_from",
                format!(
                    "`algorithm.adapt_from` applies to maml, meta_sgd and reptile; {} {}, so \
                     remove it",
                    self.name.name(),
                    if self.name == AlgorithmKind::Anil {
                        "always adapts the head alone"
                    } else {
                        "takes no gradient steps"
                    }
                ),
            ));
        }
        if self.first_order && matches!(self.name, AlgorithmKind::Reptile | AlgorithmKind::Protonet)
        {
            return Err(KeyProblem::new(
                "algorithm.first_order",
                format!(
                    "`algorithm.first_order` applies to maml, meta_sgd and anil; {} has no \
                     second-order variant, so remove it",
                    self.name.name()
                ),
            ));
        }
        Ok(())
    }

    /// [`AlgorithmConfig::check`] as a configuration error.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(KeyProblem::into_error)
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
