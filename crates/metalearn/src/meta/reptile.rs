//! Reptile (Nichol, Achiam & Schulman, 2018): train a copy of the weights on each task with
//! plain SGD, then move the initialisation towards the adapted weights. The step returns the
//! direction `θ − mean_task(φ_task)` as the "gradient", so an outer SGD with learning rate ε gives
//! exactly `θ ← θ + ε (mean φ − θ)`.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::meta::algorithm::{
    task_loss, Adapted, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams, MetaStep,
};
use crate::meta::inner::{
    adapt_weights, broadcast_tasks, first_adapted_layer, run_inner_loop, InnerLoop, InnerLr,
};
use crate::nn::network::{ForwardCtx, Network};
use crate::nn::params::ParamSet;
use crate::tasks::{Task, TaskBatch, TaskKind};

/// Reptile with SGD in the inner loop.
#[derive(Clone, Debug)]
pub struct Reptile {
    /// Inner SGD learning rate.
    pub inner_lr: f64,
    /// Inner SGD steps per task during meta-training.
    pub inner_steps: usize,
    /// Adapt only this layer and the ones after it (the others get no Reptile step); `None`:
    /// all.
    pub adapt_from: Option<String>,
}

impl Reptile {
    fn inner(&self, net: &Network, kind: TaskKind, steps: usize) -> Result<InnerLoop<'static>> {
        Ok(InnerLoop {
            loss: task_loss(kind),
            steps,
            lr: InnerLr::Scalar(self.inner_lr),
            from_layer: first_adapted_layer(net, self.adapt_from.as_deref())?,
            second_order: false,
        })
    }
}

impl MetaAlgorithm for Reptile {
    fn kind(&self) -> AlgorithmKind {
        AlgorithmKind::Reptile
    }

    fn meta_train_step(
        &self,
        net: &Network,
        meta: &MetaParams,
        tasks: &[Task],
        kind: TaskKind,
    ) -> Result<MetaStep> {
        let cfg = self.inner(net, kind, self.inner_steps)?;
        let theta = meta.weights.detach();
        // Reptile trains on all of a task's examples: support and query together.
        let (mean_fast, loss) = match TaskBatch::stack(tasks)? {
            Some(b) => {
                let t = b.len();
                let x = Tensor::cat(&[&b.support_x, &b.query_x], 1)?;
                let y = Tensor::cat(&[&b.support_y, &b.query_y], 1)?;
                let fast =
                    run_inner_loop(net, &broadcast_tasks(&theta, t)?, &x, &y, &cfg, Some(t))?
                        .detach();
                let pred = net.forward(&fast, &x, &mut ForwardCtx::train().first_order())?;
                let loss = cfg.loss.compute(&pred, &y)?;
                (fast.map(|_, w| Ok(w.mean(0)?))?, loss)
            }
            None => {
                let mut sum: Option<ParamSet> = None;
                let mut loss_sum: Option<Tensor> = None;
                for task in tasks {
                    let x = Tensor::cat(&[&task.support.0, &task.query.0], 0)?;
                    let y = Tensor::cat(&[&task.support.1, &task.query.1], 0)?;
                    let fast = run_inner_loop(net, &theta, &x, &y, &cfg, None)?.detach();
                    let pred = net.forward(&fast, &x, &mut ForwardCtx::train().first_order())?;
                    let l = cfg.loss.compute(&pred, &y)?;
                    loss_sum = Some(match loss_sum {
                        Some(acc) => acc.add(&l)?,
                        None => l,
                    });
                    sum = Some(match sum {
                        Some(acc) => acc.zip_map(&fast, |_, a, b| Ok(a.add(b)?))?,
                        None => fast,
                    });
                }
                let n = tasks.len() as f64;
                (
                    sum.ok_or_else(empty_batch)?
                        .map(|_, w| Ok(w.affine(1.0 / n, 0.0)?))?,
                    loss_sum.ok_or_else(empty_batch)?.affine(1.0 / n, 0.0)?,
                )
            }
        };
        let mut grads: Vec<Option<Tensor>> = theta
            .iter()
            .map(|(name, w)| Ok(Some(w.sub(mean_fast.get(name)?)?)))
            .collect::<Result<_>>()?;
        if let Some(lrs) = &meta.inner_lrs {
            grads.extend(std::iter::repeat_n(None, lrs.len()));
        }
        let loss = loss.flatten_all()?.mean(D::Minus1)?;
        Ok(MetaStep {
            loss: loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
            grads,
            batch_stats: Vec::new(),
        })
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
        let cfg = self.inner(net, kind, steps)?;
        Ok(Adapted::Weights(adapt_weights(
            net,
            &meta.weights,
            support,
            &cfg,
        )?))
    }
}

/// The error for a meta-batch with no task.
fn empty_batch() -> Error {
    Error::Data("empty meta-batch".into())
}
