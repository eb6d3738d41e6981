//! Prototypical Networks (Snell, Swersky & Zemel, 2017): embed the support set, take each class's
//! mean embedding as its prototype, and classify queries by negative squared Euclidean distance.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::meta::algorithm::{
    Adapted, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams, MetaStep,
};
use crate::meta::inner::gradients_of;
use crate::nn::network::{ForwardCtx, Mode, Network};
use crate::nn::ops;
use crate::tasks::{Task, TaskKind};
use crate::train::loss::Loss;

/// Prototypical Networks; the network's output is the embedding.
#[derive(Clone, Debug)]
pub struct ProtoNet {
    /// The logits are `-distance_scale` times the squared distances (1 in the original).
    pub distance_scale: f64,
}

impl Default for ProtoNet {
    fn default() -> Self {
        Self {
            distance_scale: 1.0,
        }
    }
}

impl ProtoNet {
    fn logits(&self, queries: &Tensor, prototypes: &Tensor) -> Result<Tensor> {
        let logits = negative_squared_distances(queries, prototypes)?;
        Ok(if self.distance_scale == 1.0 {
            logits
        } else {
            logits.affine(self.distance_scale, 0.0)?
        })
    }
}

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

/// The offsets (rows down, columns right) of the copies [`shifted_copies`] makes: the image
/// itself, then its eight one-pixel shifts, diagonals included.
pub const SHIFTS: [(i32, i32); 9] = [
    (0, 0),
    (0, 1),
    (0, -1),
    (1, 0),
    (-1, 0),
    (1, 1),
    (1, -1),
    (-1, 1),
    (-1, -1),
];

/// The image batch `x` (`[n, c, h, w]`) followed by its copies shifted by each offset of
/// [`SHIFTS`] after the first (zeros fill the uncovered edge): `[9n, c, h, w]`.
pub fn shifted_copies(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    // `by` pixels along `dim` (of length `len`): +1 moves the content down or right.
    let shift = |t: &Tensor, dim: usize, by: i32, len: usize| -> Result<Tensor> {
        Ok(match by {
            1 => t.pad_with_zeros(dim, 1, 0)?.narrow(dim, 0, len)?,
            -1 => t.pad_with_zeros(dim, 0, 1)?.narrow(dim, 1, len)?,
            _ => t.clone(),
        })
    };
    let copies = SHIFTS
        .iter()
        .map(|&(down, right)| shift(&shift(x, 2, down, h)?, 3, right, w))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&copies, 0)?)
}

/// Embeddings `[n, d]` of `x` at evaluation time; with test-time shifts (image inputs only),
/// each is the mean embedding of the image and its eight one-pixel shifts.
fn eval_embedding(
    net: &Network,
    weights: &crate::nn::params::ParamSet,
    x: &Tensor,
    state: &EvalState,
) -> Result<Tensor> {
    let mut ctx = ForwardCtx::eval(state.running_stats).first_order();
    if !state.test_time_shifts || x.rank() != 4 {
        return flatten_embedding(net.forward(weights, x, &mut ctx)?);
    }
    let n = x.dim(0)?;
    let e = flatten_embedding(net.forward(weights, &shifted_copies(x)?, &mut ctx)?)?;
    let dim = e.dim(1)?;
    Ok(e.reshape((SHIFTS.len(), n, dim))?.mean(0)?)
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
                token_mask: None,
                skip_sources: Vec::new(),
                running_stats: None,
                batch_stats: Some(&mut stats),
                rng: None,
            };
            let e = flatten_embedding(net.forward(&meta.weights, &x, &mut ctx)?)?;
            batch_stats.extend(stats);
            let protos = prototypes(&e.narrow(0, 0, n_support)?, &task.support.1, ways)?;
            let q = e.narrow(0, n_support, e.dim(0)? - n_support)?;
            let logits = self.logits(&q, &protos)?;
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
        let e = eval_embedding(net, &weights, support.0, state)?;
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
        let e = eval_embedding(net, &weights, x, state)?;
        self.logits(&e, protos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shifted_copies_move_the_image_by_one_pixel() {
        // One 1x3x3 image with a single ink pixel in the centre.
        let mut values = vec![0f32; 9];
        values[4] = 1.0;
        let x = Tensor::from_vec(values, (1, 1, 3, 3), &Device::Cpu).unwrap();
        let copies = shifted_copies(&x).unwrap();
        assert_eq!(copies.dims(), &[9, 1, 3, 3]);
        for (k, &(down, right)) in SHIFTS.iter().enumerate() {
            let v = copies
                .get(k)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // The ink moves from the centre (1, 1) by the offset, row-major in the 3x3 image.
            let expected = ((1 + down) * 3 + 1 + right) as usize;
            assert_eq!(v.iter().position(|&p| p == 1.0), Some(expected), "copy {k}");
            assert_eq!(v.iter().filter(|&&p| p != 0.0).count(), 1, "copy {k}");
        }
    }
}
