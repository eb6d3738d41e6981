//! ANIL, "Almost No Inner Loop" (Raghu et al., 2020): MAML whose inner loop adapts only the head
//! (the last layer with parameters); the body's features are computed once per task.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::meta::algorithm::{
    task_loss, Adapted, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams, MetaStep,
};
use crate::meta::inner::{adapt_weights, gradient_meta_step, InnerLoop, InnerLr};
use crate::nn::network::Network;
use crate::tasks::{Task, TaskKind};

/// ANIL with a fixed inner learning rate.
#[derive(Clone, Debug)]
pub struct Anil {
    /// Inner-loop learning rate.
    pub inner_lr: f64,
    /// Inner steps during meta-training.
    pub inner_steps: usize,
    /// Detach inner gradients.
    pub first_order: bool,
}

impl Anil {
    fn inner(
        &self,
        net: &Network,
        kind: TaskKind,
        steps: usize,
        second_order: bool,
    ) -> Result<InnerLoop<'static>> {
        let head = net.architecture().head_index().ok_or_else(|| {
            Error::Config("ANIL needs a network with a head (a last layer with parameters)".into())
        })?;
        Ok(InnerLoop {
            loss: task_loss(kind),
            steps,
            lr: InnerLr::Scalar(self.inner_lr),
            from_layer: head,
            second_order,
        })
    }
}

impl MetaAlgorithm for Anil {
    fn kind(&self) -> AlgorithmKind {
        AlgorithmKind::Anil
    }

    fn meta_train_step(
        &self,
        net: &Network,
        meta: &MetaParams,
        tasks: &[Task],
        kind: TaskKind,
    ) -> Result<MetaStep> {
        let cfg = self.inner(net, kind, self.inner_steps, !self.first_order)?;
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
