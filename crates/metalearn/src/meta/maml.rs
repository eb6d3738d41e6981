//! MAML (Finn, Abbeel & Levine, 2017): learn an initialisation from which a few gradient steps
//! on a task's support set give low loss on its query set. Second order by default; with
//! `first_order` the inner gradients are detached (FOMAML).

use candle_core::Tensor;

use crate::error::Result;
use crate::meta::algorithm::{
    task_loss, Adapted, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams, MetaStep,
};
use crate::meta::inner::{
    adapt_weights, first_adapted_layer, gradient_meta_step, InnerLoop, InnerLr,
};
use crate::nn::network::Network;
use crate::tasks::{Task, TaskKind};

/// MAML with a fixed inner learning rate.
#[derive(Clone, Debug)]
pub struct Maml {
    /// Inner-loop learning rate.
    pub inner_lr: f64,
    /// Inner steps during meta-training.
    pub inner_steps: usize,
    /// Detach inner gradients (first-order MAML).
    pub first_order: bool,
    /// Adapt only this layer and the ones after it (MeLU: the decision layers); `None`: all.
    pub adapt_from: Option<String>,
}

impl Maml {
    fn inner(
        &self,
        net: &Network,
        kind: TaskKind,
        steps: usize,
        second_order: bool,
    ) -> Result<InnerLoop<'static>> {
        Ok(InnerLoop {
            loss: task_loss(kind),
            steps,
            lr: InnerLr::Scalar(self.inner_lr),
            from_layer: first_adapted_layer(net, self.adapt_from.as_deref())?,
            second_order,
        })
    }
}

impl MetaAlgorithm for Maml {
    fn kind(&self) -> AlgorithmKind {
        AlgorithmKind::Maml
    }

    fn meta_train_step(
        &self,
        net: &Network,
        meta: &MetaParams,
        tasks: &[Task],
        kind: TaskKind,
    ) -> Result<MetaStep> {
        let cfg = self.inner(net, kind, self.inner_steps, !self.first_order)?;
        // Small dense networks (or their adapted top, over features candle computes) cost
        // candle more in per-op bookkeeping than in arithmetic: the plain-loop kernel.
        if let Some(step) = crate::meta::mlp_maml::meta_step_on_features(
            net,
            meta,
            tasks,
            kind,
            cfg.from_layer,
            self.inner_lr,
            self.inner_steps,
            !self.first_order,
        )? {
            return Ok(step);
        }
        gradient_meta_step(net, meta, tasks, kind, &cfg)
    }

    fn adapt(
        &self,
        net: &Network,
        meta: &MetaParams,
        support: (&Tensor, &Tensor),
        steps: usize,
        kind: TaskKind,
        _state: &EvalState,
    ) -> Result<Adapted> {
        let cfg = self.inner(net, kind, steps, false)?;
        Ok(Adapted::Weights(adapt_weights(
            net,
            &meta.weights,
            support,
            &cfg,
        )?))
    }
}
