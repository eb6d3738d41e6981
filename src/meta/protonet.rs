//! Prototypical Networks (Snell, Swersky & Zemel, 2017): embed the support set, take each class's
//! mean embedding as its prototype, and classify queries by negative squared Euclidean distance.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::meta::inner::gradients_of;
use crate::meta::{Adapted, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams, MetaStep};
use crate::nn::network::{ForwardCtx, Mode, Network};
use crate::nn::ops;
use crate::tasks::{Task, TaskKind};
use crate::train::loss::Loss;

/// Prototypical Networks; the network's output is the embedding.
#[derive(Clone, Debug, Default)]
pub struct ProtoNet;

/// Class means of `embeddings` (`[n, d]`) for labels `0..ways` (`[n]`): `[ways, d]`.
pub fn prototypes(embeddings: &Tensor, labels: &Tensor, ways: usize) -> Result<Tensor> {
    let one_hot = ops::one_hot(labels, ways, embeddings.dtype())?; // [n, ways]
    let counts = one_hot.sum(0)?; // [ways]
    let counts_host = counts.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some(empty) = counts_host.iter().position(|&c| c == 0.0) {
        return Err(Error::Data(format!(
            "class {empty} has no support example: every class 0..{ways} needs at least one"
        )));
    }
    let sums = one_hot.t()?.matmul(embeddings)?; // [ways, d]
    Ok(sums.broadcast_div(&counts.unsqueeze(1)?)?)
}

/// Negative squared Euclidean distances between queries `[m, d]` and prototypes `[ways, d]`:
/// `[m, ways]` logits.
pub fn negative_squared_distances(queries: &Tensor, prototypes: &Tensor) -> Result<Tensor> {
    let q2 = queries.sqr()?.sum_keepdim(D::Minus1)?; // [m, 1]
    let p2 = prototypes.sqr()?.sum_keepdim(D::Minus1)?.t()?; // [1, ways]
    let cross = queries.matmul(&prototypes.t()?)?; // [m, ways]
    Ok(cross
        .affine(2.0, 0.0)?
        .broadcast_sub(&q2)?
        .broadcast_sub(&p2)?)
}

fn ways_of(kind: TaskKind) -> Result<usize> {
    match kind {
        TaskKind::Classification { ways } => Ok(ways),
        TaskKind::Regression => Err(Error::Config(
            "Prototypical Networks need classification tasks, not regression".into(),
        )),
    }
}

fn flatten_embedding(e: Tensor) -> Result<Tensor> {
    Ok(if e.rank() > 2 { e.flatten_from(1)? } else { e })
}

impl MetaAlgorithm for ProtoNet {
    fn kind(&self) -> AlgorithmKind {
        AlgorithmKind::Protonet
    }

    fn meta_train_step(
        &self,
        net: &Network,
        meta: &MetaParams,
        tasks: &[Task],
        kind: TaskKind,
    ) -> Result<MetaStep> {
        let ways = ways_of(kind)?;
        let mut total: Option<Tensor> = None;
        let mut batch_stats = Vec::new();
        for task in tasks {
            let n_support = task.support.0.dim(0)?;
            let x = Tensor::cat(&[&task.support.0, &task.query.0], 0)?;
            let mut stats = Vec::new();
            let mut ctx = ForwardCtx {
                mode: Mode::Train,
                differentiable_backward: false,
                running_stats: None,
                batch_stats: Some(&mut stats),
                rng: None,
            };
            let e = flatten_embedding(net.forward(&meta.weights, &x, &mut ctx)?)?;
            batch_stats.extend(stats);
            let protos = prototypes(&e.narrow(0, 0, n_support)?, &task.support.1, ways)?;
            let q = e.narrow(0, n_support, e.dim(0)? - n_support)?;
            let logits = negative_squared_distances(&q, &protos)?;
            let l = Loss::CategoricalCrossEntropy.compute(&logits, &task.query.1)?;
            total = Some(match total {
                Some(acc) => acc.add(&l)?,
                None => l,
            });
        }
        let loss = total
            .ok_or_else(|| Error::Data("empty meta-batch".into()))?
            .affine(1.0 / tasks.len() as f64, 0.0)?;
        let mut step = gradients_of(&loss, meta)?;
        step.batch_stats = batch_stats;
        Ok(step)
    }

    fn adapt(
        &self,
        net: &Network,
        meta: &MetaParams,
        support: (&Tensor, &Tensor),
        _steps: usize,
        kind: TaskKind,
        state: &EvalState,
    ) -> Result<Adapted> {
        let ways = ways_of(kind)?;
        let weights = meta.weights.detach();
        let e = flatten_embedding(net.forward(
            &weights,
            support.0,
            &mut ForwardCtx::eval(state.running_stats).first_order(),
        )?)?;
        Ok(Adapted::Prototypes(prototypes(&e, support.1, ways)?))
    }

    fn predict(
        &self,
        net: &Network,
        meta: &MetaParams,
        adapted: &Adapted,
        x: &Tensor,
        state: &EvalState,
    ) -> Result<Tensor> {
        let Adapted::Prototypes(protos) = adapted else {
            return Err(Error::Config(
                "ProtoNet predicts from prototypes; call adapt first".into(),
            ));
        };
        let weights = meta.weights.detach();
        let e = flatten_embedding(net.forward(
            &weights,
            x,
            &mut ForwardCtx::eval(state.running_stats).first_order(),
        )?)?;
        negative_squared_distances(&e, protos)
    }
}
