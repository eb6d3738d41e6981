//! Meta-SGD (Li et al., 2017): MAML whose inner learning rate is a learned tensor of the same
//! shape as each weight, meta-trained together with the initialisation.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::meta::algorithm::{
    task_loss, Adapted, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams, MetaStep,
};
use crate::meta::inner::{
    adapt_weights, first_adapted_layer, gradient_meta_step, InnerLoop, InnerLr,
};
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::tasks::{Task, TaskKind};

/// Meta-SGD. The learned rates live in [`MetaParams::inner_lrs`].
#[derive(Clone, Debug)]
pub struct MetaSgd {
    /// Inner steps during meta-training.
    pub inner_steps: usize,
    /// Detach inner gradients (first-order approximation).
    pub first_order: bool,
    /// Adapt only this layer and the ones after it; `None`: all.
    pub adapt_from: Option<String>,
}

fn rates(meta: &MetaParams) -> Result<&ParamSet> {
    meta.inner_lrs.as_ref().ok_or_else(|| {
        Error::Config("Meta-SGD needs learned inner learning rates in the meta-parameters".into())
    })
}

impl MetaSgd {
    fn inner<'a>(
        &self,
        net: &Network,
        kind: TaskKind,
        steps: usize,
        rates: &'a ParamSet,
        second_order: bool,
    ) -> Result<InnerLoop<'a>> {
        Ok(InnerLoop {
            loss: task_loss(kind),
            steps,
            lr: InnerLr::PerParam(rates),
            from_layer: first_adapted_layer(net, self.adapt_from.as_deref())?,
            second_order,
        })
    }
}

impl MetaAlgorithm for MetaSgd {
    fn kind(&self) -> AlgorithmKind {
        AlgorithmKind::MetaSgd
    }

    fn meta_train_step(
        &self,
        net: &Network,
        meta: &MetaParams,
        tasks: &[Task],
        kind: TaskKind,
    ) -> Result<MetaStep> {
        let cfg = self.inner(net, kind, self.inner_steps, rates(meta)?, !self.first_order)?;
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
        let lrs = rates(meta)?.detach();
        let cfg = self.inner(net, kind, steps, &lrs, false)?;
        Ok(Adapted::Weights(adapt_weights(
            net,
            &meta.weights,
            support,
            &cfg,
        )?))
    }
}
