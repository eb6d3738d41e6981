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

/// Divides every vector of the last dimension by its Euclidean norm (zero vectors stay zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    // The tiny constant plays the part of PyTorch's `max(norm, 1e-12)`: it changes no norm
    // above 1e-12 and keeps the square root differentiable at zero.
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .affine(1.0, 1e-24)?
        .sqrt()?;
    Ok(x.broadcast_div(&norm)?)
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

/// 2-D convolution (no bias) as one matrix product: every output pixel's `k x k x c` patch is
/// gathered into a row from `k * k` shifted slices of the zero-padded input, and the rows are
/// multiplied by the flattened kernels.
///
/// Shapes: `x [n, c, h, w]` with `w [o, c, k, k]` gives `[n, o, oh, ow]`; task-batched,
/// `x [t, n, c, h, w]` with `w [t, o, c, k, k]` gives `[t, n, o, oh, ow]` (task `i`'s images
/// with task `i`'s kernels).
///
/// Slicing, stacking and matrix products have backward passes made of the same operations, so
/// gradients through this are exact to any order at a bounded memory cost. candle's own
/// `conv2d` computes the kernel gradient as a convolution with the image-sized gradient as its
/// kernel; differentiated again, as second-order MAML does, that allocates patch matrices of
/// the image size squared (tens of GB for a Conv-4 meta-batch).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_grouped(x, w, stride, [padding; 4], 1)
}

/// Zero padding of a convolution's input: `[top, bottom, left, right]`.
pub type Padding2d = [usize; 4];

/// TensorFlow's "SAME" padding of a `side`-long input for a `kernel` with `stride`: output
/// `ceil(side / stride)`, the total padding `max((out - 1) · stride + kernel - side, 0)` split
/// `total / 2` before and the rest after. Returns `(before, after)`.
pub fn same_padding(side: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = side.div_ceil(stride.max(1));
    let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(side);
    (total / 2, total - total / 2)
}

/// 2-D convolution (no bias) with asymmetric zero padding and channel groups, built like
/// [`conv2d`] from shifted slices. `w` is `[o, c / groups, k, k]` (with a leading task
/// dimension when `x` has one). A depthwise convolution (`groups == c == o`) multiplies the
/// shifted slices by each channel's kernel and sums them, without a matrix product.
pub fn conv2d_grouped(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: Padding2d,
    groups: usize,
) -> Result<Tensor> {
    let rank = x.rank();
    if !((rank == 4 || rank == 5) && w.rank() == rank) {
        return Err(Error::Shape(format!(
            "conv2d needs input [n, c, h, w] with kernels [o, c, k, k], or both with a leading \
             task dimension; got input {:?} and kernels {:?}",
            x.dims(),
            w.dims()
        )));
    }
    let (xd, wd) = (x.dims(), w.dims());
    let (c, h, width) = (xd[rank - 3], xd[rank - 2], xd[rank - 1]);
    let (o, kc, k) = (wd[rank - 4], wd[rank - 3], wd[rank - 2]);
    let leading_match = rank == 4 || xd[0] == wd[0];
    let groups_fit = groups > 0 && c % groups == 0 && o % groups == 0 && kc * groups == c;
    if !groups_fit || wd[rank - 1] != k || !leading_match || stride == 0 {
        return Err(Error::Shape(format!(
            "conv2d: kernels {wd:?} do not fit input {xd:?} (stride {stride}, {groups} groups)"
        )));
    }
    if groups > 1 && !(groups == c && o == c) {
        // Grouped but not depthwise: one dense convolution per group.
        let (cg, og) = (c / groups, o / groups);
        let mut outs = Vec::with_capacity(groups);
        for g in 0..groups {
            let xg = x.narrow(rank - 3, g * cg, cg)?;
            let wg = w.narrow(rank - 4, g * og, og)?;
            outs.push(conv2d_grouped(&xg, &wg, stride, padding, 1)?);
        }
        return Ok(Tensor::cat(&outs, rank - 3)?);
    }
    let [top, bottom, left, right] = padding;
    let (padded_h, padded_w) = (h + top + bottom, width + left + right);
    if padded_h < k || padded_w < k {
        return Err(Error::Shape(format!(
            "conv2d: the {k}x{k} kernel is larger than the {padded_h}x{padded_w} padded input"
        )));
    }
    let (oh, ow) = ((padded_h - k) / stride + 1, (padded_w - k) / stride + 1);
    // Channels last: [lead.., h, w, c], so that a patch is contiguous along the row.
    let (h_dim, w_dim) = (rank - 3, rank - 2);
    let mut xl = if rank == 4 {
        x.permute((0, 2, 3, 1))?
    } else {
        x.permute((0, 1, 3, 4, 2))?
    };
    if top + bottom > 0 {
        xl = xl.pad_with_zeros(h_dim, top, bottom)?;
    }
    if left + right > 0 {
        xl = xl.pad_with_zeros(w_dim, left, right)?;
    }
    let mut shifts = Vec::with_capacity(k * k);
    for i in 0..k {
        for j in 0..k {
            let slice = xl.narrow(h_dim, i, (oh - 1) * stride + 1)?.narrow(
                w_dim,
                j,
                (ow - 1) * stride + 1,
            )?;
            let slice = every_nth(&every_nth(&slice, h_dim, stride, oh)?, w_dim, stride, ow)?;
            shifts.push(slice.contiguous()?);
        }
    }
    // [lead.., oh, ow, c, k*k]: the column order of the kernels flattened as [o, c*k*k].
    let patches = Tensor::stack(&shifts, rank)?;
    let lead = &xd[..rank - 3];
    let mut out_shape = lead.to_vec();
    out_shape.extend([oh, ow, o]);
    let y = if groups > 1 {
        // Depthwise: [lead.., oh, ow, c, k*k] times each channel's k*k kernel, summed.
        let kernels = if rank == 4 {
            w.reshape((c, k * k))?
        } else {
            w.reshape((xd[0], 1, 1, 1, c, k * k))?
        };
        patches.broadcast_mul(&kernels)?.sum(rank)?
    } else {
        let images: usize = lead[rank - 4..].iter().product::<usize>() * oh * ow;
        let (rows, kernels) = if rank == 4 {
            (
                patches.reshape((images, c * k * k))?,
                w.reshape((o, c * k * k))?.t()?,
            )
        } else {
            (
                patches.reshape((xd[0], images, c * k * k))?,
                w.reshape((xd[0], o, c * k * k))?.transpose(1, 2)?,
            )
        };
        rows.matmul(&kernels)?.reshape(out_shape)?
    };
    Ok(if rank == 4 {
        y.permute((0, 3, 1, 2))?
    } else {
        y.permute((0, 1, 4, 2, 3))?
    })
}

/// Mean over the last two (spatial) dimensions.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let r = x.rank();
    if r < 3 {
        return Err(Error::Shape(format!(
            "global average pooling needs [.., channels, h, w], got shape {:?}",
            x.dims()
        )));
    }
    Ok(x.mean(r - 1)?.mean(r - 2)?)
}

/// min(max(x, 0), 6), from two ReLUs so that it is differentiable to any order (the kinks
/// have derivative zero almost everywhere, like ReLU's).
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    // relu(x) - relu(x - 6)
    Ok(x.relu()?.sub(&x.affine(1.0, -6.0)?.relu()?)?)
}

/// x · sigmoid(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul(&sigmoid(x)?)?)
}

/// x · relu6(x + 3) / 6.
pub fn hard_swish(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul(&relu6(&x.affine(1.0, 3.0)?)?)?
        .affine(1.0 / 6.0, 0.0)?)
}

/// Every `step`-th entry along `dim`, `count` of them, of a tensor holding `(count - 1) * step
/// + 1` entries there.
fn every_nth(x: &Tensor, dim: usize, step: usize, count: usize) -> Result<Tensor> {
    if step == 1 {
        return Ok(x.clone());
    }
    let padded = x.pad_with_zeros(dim, 0, step - 1)?;
    let mut split: Vec<usize> = padded.dims().to_vec();
    split[dim] = count;
    split.insert(dim + 1, step);
    Ok(padded
        .reshape(split)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)?)
}
