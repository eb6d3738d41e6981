//! Metrics computed on predictions (no gradients).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::loss::match_shape;

/// A metric reported during training and evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of correct predictions. With one output per example, the prediction is
    /// `output > threshold` (0.5, or 0 for logits); with several, the arg-max.
    Accuracy,
    /// Mean squared error.
    Mse,
    /// Mean absolute error.
    Mae,
}

impl Metric {
    /// The metric's name in logs and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Mse => "mse",
            Metric::Mae => "mae",
        }
    }

    /// Computes the metric. `threshold` is the binary decision threshold for single-output
    /// accuracy (0.5 for probabilities, 0.0 for logits).
    pub fn compute(&self, prediction: &Tensor, target: &Tensor, threshold: f64) -> Result<f64> {
        let prediction = prediction.detach().to_dtype(DType::F64)?;
        let target = target.detach().to_dtype(DType::F64)?;
        match self {
            Metric::Mse => Ok(prediction
                .sub(&match_shape(&prediction, &target)?)?
                .sqr()?
                .mean_all()?
                .to_scalar()?),
            Metric::Mae => Ok(prediction
                .sub(&match_shape(&prediction, &target)?)?
                .abs()?
                .mean_all()?
                .to_scalar()?),
            Metric::Accuracy => accuracy(&prediction, &target, threshold),
        }
    }
}

impl std::str::FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "accuracy" | "acc" => Ok(Self::Accuracy),
            "mse" => Ok(Self::Mse),
            "mae" => Ok(Self::Mae),
            other => Err(Error::Config(format!(
                "unknown metric `{other}`: use accuracy, mse or mae"
            ))),
        }
    }
}

fn accuracy(prediction: &Tensor, target: &Tensor, threshold: f64) -> Result<f64> {
    let outputs = prediction.dims().last().copied().unwrap_or(1);
    let predicted: Vec<f64> = if prediction.rank() <= 1 || outputs == 1 {
        prediction
            .flatten_all()?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|p| if p > threshold { 1.0 } else { 0.0 })
            .collect()
    } else {
        prediction
            .argmax(D::Minus1)?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
    };
    let truth = target.flatten_all()?.to_vec1::<f64>()?;
    if truth.len() != predicted.len() {
        return Err(Error::Shape(format!(
            "accuracy needs one label per example: {} predictions, {} labels",
            predicted.len(),
            truth.len()
        )));
    }
    if truth.is_empty() {
        return Ok(0.0);
    }
    let correct = predicted
        .iter()
        .zip(&truth)
        .filter(|(p, t)| (*p - t.round()).abs() < 0.5)
        .count();
    Ok(correct as f64 / truth.len() as f64)
}
