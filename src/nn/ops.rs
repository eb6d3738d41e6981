//! Differentiable building blocks made only of candle primitives whose backward passes are
//! themselves differentiable, so that second-order meta-gradients through them are exact.
//!
//! candle's own `max_pool2d` and its fused softmax/sigmoid kernels have backward passes that are
//! not twice differentiable; the versions here are used on every path instead.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Logistic sigmoid, written as `0.5 * (tanh(x / 2) + 1)`: numerically stable for large |x|
/// and twice differentiable through `tanh`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?)
}

/// Log-softmax over the last dimension. The shift by the row maximum is detached: it does not
/// change the value, and keeps the max's mask out of the gradient graph.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    Ok(log_softmax(x)?.exp()?)
}

/// Max-pooling with a square `size` window and the same stride over the last two dimensions
/// (any leading dimensions). Trailing rows/columns that do not fill a window are dropped, as in
/// PyTorch's default (floor) mode. Built from `reshape` + `max`, whose backward is a mask product
/// and so exact to second order.
pub fn max_pool(x: &Tensor, size: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let r = dims.len();
    if r < 2 {
        return Err(Error::Shape(format!(
            "max-pool needs at least 2 dimensions, got shape {dims:?}"
        )));
    }
    let (h, w) = (dims[r - 2], dims[r - 1]);
    let (oh, ow) = (h / size, w / size);
    if oh == 0 || ow == 0 {
        return Err(Error::Shape(format!(
            "max-pool window {size} is larger than the {h}x{w} input"
        )));
    }
    let mut x = x.clone();
    if oh * size != h {
        x = x.narrow(r - 2, 0, oh * size)?;
    }
    if ow * size != w {
        x = x.narrow(r - 1, 0, ow * size)?;
    }
    let mut shape: Vec<usize> = dims[..r - 2].to_vec();
    shape.extend([oh, size, ow, size]);
    let x = x.reshape(shape)?;
    // Reduce the column window (last dim), then the row window (now at index r - 1).
    Ok(x.max(r + 1)?.max(r - 1)?)
}

/// One-hot encoding of class ids given as floats (`[n]` or `[n, 1]`), as a `[n, classes]`
/// tensor of `dtype`. Ids outside `0..classes` are an error.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let labels = labels.flatten_all()?;
    let ids = labels.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut values = vec![0f64; ids.len() * classes];
    for (row, &id) in ids.iter().enumerate() {
        if !(id >= 0.0 && id.fract() == 0.0 && (id as usize) < classes) {
            return Err(Error::Data(format!(
                "label {id} at row {row} is not a class id in 0..{classes}"
            )));
        }
        values[row * classes + id as usize] = 1.0;
    }
    Ok(Tensor::from_vec(values, (ids.len(), classes), labels.device())?.to_dtype(dtype)?)
}
