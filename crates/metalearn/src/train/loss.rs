//! Loss functions. Each returns the mean over the batch as a scalar tensor.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::ops;

/// A training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Mean squared error between prediction and target (same shape).
    Mse,
    /// Binary cross-entropy of probabilities in (0, 1) (e.g. after a sigmoid) against 0/1
    /// targets; probabilities are clipped to [1e-7, 1 - 1e-7] as in Keras.
    BinaryCrossEntropy,
    /// Binary cross-entropy of logits (no sigmoid layer), computed stably.
    BinaryCrossEntropyWithLogits,
    /// Categorical cross-entropy of logits `[batch, classes]` against class ids `[batch]`.
    CategoricalCrossEntropy,
}

impl std::str::FromStr for Loss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "mse" | "mean_squared_error" => Ok(Self::Mse),
            "bce" | "binary_cross_entropy" | "binary_crossentropy" => Ok(Self::BinaryCrossEntropy),
            "bce_logits" | "binary_cross_entropy_with_logits" => {
                Ok(Self::BinaryCrossEntropyWithLogits)
            }
            "cce" | "cross_entropy" | "categorical_cross_entropy" | "categorical_crossentropy" => {
                Ok(Self::CategoricalCrossEntropy)
            }
            other => Err(Error::Config(format!(
                "unknown loss `{other}`: use {}",
                Loss::NAMES.join(", ")
            ))),
        }
    }
}

const BCE_EPS: f64 = 1e-7;

impl Loss {
    /// Every loss by the name users write, in [`Loss::name`]'s spelling.
    pub const NAMES: [&'static str; 4] =
        ["mse", "binary_cross_entropy", "bce_logits", "cross_entropy"];

    /// The name of the loss as users write it (parsed back by `str::parse`).
    pub fn name(self) -> &'static str {
        match self {
            Loss::Mse => "mse",
            Loss::BinaryCrossEntropy => "binary_cross_entropy",
            Loss::BinaryCrossEntropyWithLogits => "bce_logits",
            Loss::CategoricalCrossEntropy => "cross_entropy",
        }
    }

    /// The mean loss of `prediction` against `target`.
    pub fn compute(&self, prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
        match self {
            Loss::Mse => {
                let target = match_shape(prediction, target)?;
                Ok(prediction.sub(&target)?.sqr()?.mean_all()?)
            }
            Loss::BinaryCrossEntropy => {
                let target = match_shape(prediction, target)?;
                let p = prediction.clamp(BCE_EPS, 1.0 - BCE_EPS)?;
                let pos = target.mul(&p.log()?)?;
                let neg = target
                    .affine(-1.0, 1.0)?
                    .mul(&p.affine(-1.0, 1.0)?.log()?)?;
                Ok(pos.add(&neg)?.neg()?.mean_all()?)
            }
            Loss::BinaryCrossEntropyWithLogits => {
                // max(z, 0) - z*y + log(1 + exp(-|z|))
                let target = match_shape(prediction, target)?;
                let z = prediction;
                let softplus = z.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
                Ok(z.relu()?
                    .sub(&z.mul(&target)?)?
                    .add(&softplus)?
                    .mean_all()?)
            }
            Loss::CategoricalCrossEntropy => {
                let one_hot = class_targets(prediction, target)?;
                let log_p = ops::log_softmax(prediction)?;
                Ok(log_p.mul(&one_hot)?.sum(D::Minus1)?.neg()?.mean_all()?)
            }
        }
    }
}

/// Brings a target to the prediction's shape, accepting `[n]` against `[n, 1]` and vice versa.
pub(crate) fn match_shape(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    let target = target.to_dtype(prediction.dtype())?;
    if target.dims() == prediction.dims() {
        return Ok(target);
    }
    if target.elem_count() == prediction.elem_count() {
        return Ok(target.reshape(prediction.shape())?);
    }
    Err(Error::Shape(format!(
        "prediction {:?} and target {:?} do not match: the model has {} output(s) per example",
        prediction.dims(),
        target.dims(),
        prediction.dims().last().copied().unwrap_or(1)
    )))
}

/// One-hot targets for class-id labels against `[..., classes]` logits.
pub(crate) fn class_targets(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    let rows = logits.elem_count() / classes;
    if target.elem_count() != rows {
        return Err(Error::Shape(format!(
            "cross-entropy needs one class id per example: logits {:?}, targets {:?}",
            logits.dims(),
            target.dims()
        )));
    }
    let one_hot = ops::one_hot(target, classes, logits.dtype())?;
    Ok(one_hot.reshape(logits.shape())?)
}

/// Supervised contrastive loss (Khosla et al. 2020, the form with the mean over positives
/// outside the log) of `embeddings` `[n, dim]` with class ids `classes`. The rows are
/// L2-normalised; for each row with at least one other row of its class, the loss is minus the
/// mean, over those positives, of the log-softmax of cosine / `temperature` over all other
/// rows; the result is the mean over such rows, and zero when no row has a positive.
pub fn supervised_contrastive(
    embeddings: &Tensor,
    classes: &[u32],
    temperature: f64,
) -> Result<Tensor> {
    let (n, _) = embeddings.dims2()?;
    if classes.len() != n {
        return Err(Error::Shape(format!(
            "{} class ids for {n} embeddings",
            classes.len()
        )));
    }
    let device = embeddings.device();
    let dtype = embeddings.dtype();
    let unit = ops::l2_normalize(embeddings)?;
    // A row is not its own candidate: exp(-1e4) is exactly zero in f32 and f64.
    let own = Tensor::eye(n, dtype, device)?.affine(1e4, 0.0)?;
    let logits = unit
        .matmul(&unit.t()?)?
        .affine(1.0 / temperature, 0.0)?
        .sub(&own)?;
    let log_p = ops::log_softmax(&logits)?;
    let mut positives = vec![0f64; n * n];
    let mut weights = vec![0f64; n];
    for i in 0..n {
        let partners: Vec<usize> = (0..n)
            .filter(|&j| j != i && classes[j] == classes[i])
            .collect();
        for &j in &partners {
            positives[i * n + j] = 1.0 / partners.len() as f64;
        }
        if !partners.is_empty() {
            weights[i] = 1.0;
        }
    }
    let anchors = weights.iter().sum::<f64>();
    if anchors == 0.0 {
        return Ok(Tensor::zeros((), dtype, device)?);
    }
    let positives = Tensor::from_vec(positives, (n, n), device)?.to_dtype(dtype)?;
    let weights = Tensor::from_vec(weights, n, device)?.to_dtype(dtype)?;
    let per_row = log_p.mul(&positives)?.sum(1)?.neg()?;
    Ok(per_row
        .mul(&weights)?
        .sum_all()?
        .affine(1.0 / anchors, 0.0)?)
}
