//! Heads fitted on fixed features, shared by the text and image classifiers: multinomial
//! logistic regression (scikit-learn's `C` convention) and nearest class prototypes.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::train::loss::Loss;
use crate::train::optim::{Optimizer, OptimizerConfig};

/// Class ids as the `[n]` target tensor of the cross-entropy, on the CPU.
pub(crate) fn class_id_targets(ids: &[u32], dtype: DType) -> Result<Tensor> {
    let values: Vec<f32> = ids.iter().map(|&c| c as f32).collect();
    Ok(Tensor::from_vec(values, ids.len(), &Device::Cpu)?.to_dtype(dtype)?)
}

/// The nearest-prototype head: column `c` is class `c`'s mean embedding, normalised and scaled
/// so that the logits are cosine similarities divided by a temperature of 0.05.
pub fn prototype_head(features: &Tensor, ids: &[u32], classes: usize) -> Result<(Tensor, Tensor)> {
    let (n, dim) = features.dims2()?;
    let rows = features.to_vec2::<f32>()?;
    let mut sums = vec![vec![0f64; dim]; classes];
    for (row, &c) in rows.iter().zip(ids) {
        for (s, v) in sums[c as usize].iter_mut().zip(row) {
            *s += *v as f64;
        }
    }
    debug_assert_eq!(rows.len(), n);
    let mut weight = vec![0f32; dim * classes];
    for (c, sum) in sums.iter().enumerate() {
        let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        for (d, v) in sum.iter().enumerate() {
            weight[d * classes + c] = (v / norm / 0.05) as f32;
        }
    }
    Ok((
        Tensor::from_vec(weight, (dim, classes), &Device::Cpu)?,
        Tensor::zeros(classes, DType::F32, &Device::Cpu)?,
    ))
}

/// Multinomial logistic regression on fixed features: mean cross-entropy plus
/// `|W|² / (2 C n)`, full-batch Adam from zero.
pub fn logistic_regression(
    features: &Tensor,
    ids: &[u32],
    classes: usize,
    c: f64,
    steps: usize,
) -> Result<(Tensor, Tensor)> {
    if !(c.is_finite() && c > 0.0) {
        return Err(Error::Config(format!(
            "C must be a positive number, got {c}"
        )));
    }
    let (n, dim) = features.dims2()?;
    let targets = class_id_targets(ids, DType::F32)?;
    let weight = Var::zeros((dim, classes), DType::F32, &Device::Cpu)?;
    let bias = Var::zeros(classes, DType::F32, &Device::Cpu)?;
    let vars = [weight.clone(), bias.clone()];
    let mut opt = Optimizer::new(OptimizerConfig::adam(0.05), 2)?;
    let penalty = 1.0 / (2.0 * c * n as f64);
    for _ in 0..steps {
        let logits = features
            .matmul(weight.as_tensor())?
            .broadcast_add(bias.as_tensor())?;
        let loss = Loss::CategoricalCrossEntropy
            .compute(&logits, &targets)?
            .add(&weight.as_tensor().sqr()?.sum_all()?.affine(penalty, 0.0)?)?;
        let grads = crate::runtime::backward(&loss)?;
        let g: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
        opt.step(&vars, &g)?;
    }
    Ok((weight.as_tensor().clone(), bias.as_tensor().clone()))
}
