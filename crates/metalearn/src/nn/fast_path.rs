//! The channels-last forward path for convolutional networks on the CPU, built on the kernels
//! of [`crate::kernels`].
//!
//! Between layers, images travel as *rows* (`[images·h·w, c]`, or `[tasks, n·h·w, c]` in
//! task-batched mode), so a convolution is one patch extraction plus one GEMM and batch-norm
//! statistics are one pass over memory. Two rewrites keep the work down, both exact:
//! a convolution's bias is folded into the following batch-norm's shift, and ReLU followed by
//! max-pooling runs as pooling then ReLU (max commutes with a monotone function), so ReLU
//! touches a quarter of the data. On the first-order path, a first block whose input needs no
//! gradient (the images) runs as one kernel that never stores its full-resolution output
//! ([`metalearn_kernels::first_block`]). On that path in inference with running statistics (as
//! ProtoNet evaluates), when no input, weight or parameter tracks a gradient and the input is
//! one task's, a block with a 3×3 stride-1 convolution of four or more channels and 2×2 pooling
//! runs as one forward-only kernel that pools each Winograd output tile as it is made
//! ([`metalearn_kernels::fused::InferenceBlock`]). Values and gradients equal the reference path in
//! [`crate::nn::network`] up to rounding; tests compare the two.

use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::error::Result;
use crate::nn::architecture::{Activation, Layer, NamedLayer};
use crate::nn::layers::{self, ForwardCtx, Mode};
use crate::nn::params::ParamSet;
use metalearn_kernels::conv::{im2col_rows, ConvGeometry, PatchOrderWeight};
use metalearn_kernels::differentiable_conv;
use metalearn_kernels::first_block::{ConvBnPoolRelu, PatchMoments, MAX_PATCH};
use metalearn_kernels::fused::{BnPoolRelu, ConvBlock, ConvRows, InferenceBlock};
use metalearn_kernels::norm::{channel_moments, moments};
use metalearn_kernels::pool::{max_pool_rows, PoolGather, PoolGeometry};
use metalearn_kernels::pooled_norm::PooledNorm;

/// Whether the fast path can run `layers` on `h`: fast kernels on, CPU, f32/f64, and at least
/// one convolution to gain from.
pub(crate) fn applies(layers: &[NamedLayer], h: &Tensor) -> bool {
    crate::kernels::enabled()
        && h.device().is_cpu()
        && matches!(h.dtype(), DType::F32 | DType::F64)
        && layers
            .iter()
            .any(|l| matches!(l.layer, Layer::Conv2d { .. }))
        // The kernels cover plain convolutions in a chain; grouped, bias-free or TF-padded
        // convolutions and skip connections take the reference path.
        && layers.iter().all(|l| match &l.layer {
            Layer::Conv2d {
                groups,
                bias,
                same_padding,
                ..
            } => *groups == 1 && *bias && !*same_padding,
            Layer::Add { .. } => false,
            _ => true,
        })
}

/// Channels-last image rows with their geometry.
struct Rows {
    /// `[images·h·w, c]`, or `[tasks, n·h·w, c]` when batched.
    t: Tensor,
    /// Leading dimensions of the plain layout: `[n]` or `[tasks, n]`.
    lead: Vec<usize>,
    h: usize,
    w: usize,
    c: usize,
}

impl Rows {
    fn images(&self) -> usize {
        self.lead.iter().product()
    }
}

/// The pooling of `rows` with `size`×`size` windows.
fn pool_geometry(rows: &Rows, size: usize) -> PoolGeometry {
    PoolGeometry {
        images: rows.images(),
        height: rows.h,
        width: rows.w,
        channels: rows.c,
        size,
    }
}

/// An activation between layers.
enum Act {
    /// The reference layout: `[lead.., c, h, w]` or `[lead.., features]`.
    Plain(Tensor),
    /// Channels-last rows.
    Rows(Rows),
}

fn to_rows(x: &Tensor, lead_rank: usize) -> Result<Rows> {
    let dims = x.dims();
    let r = dims.len();
    let (c, h, w) = (dims[r - 3], dims[r - 2], dims[r - 1]);
    let lead = dims[..lead_rank].to_vec();
    let n = dims[lead_rank - 1];
    let t = if lead_rank == 1 {
        let t = if c == 1 {
            x.clone()
        } else {
            x.permute((0, 2, 3, 1))?
        };
        t.reshape((n * h * w, c))?
    } else {
        let t = if c == 1 {
            x.clone()
        } else {
            x.permute((0, 1, 3, 4, 2))?
        };
        t.reshape((lead[0], n * h * w, c))?
    };
    Ok(Rows { t, lead, h, w, c })
}

fn to_plain(rows: Rows) -> Result<Tensor> {
    let mut shape = rows.lead.clone();
    shape.extend([rows.h, rows.w, rows.c]);
    let t = rows.t.reshape(shape)?;
    let r = rows.lead.len();
    let t = if r == 1 {
        t.permute((0, 3, 1, 2))?
    } else {
        t.permute((0, 1, 4, 2, 3))?
    };
    Ok(t.contiguous()?)
}

impl Act {
    fn rows(self, lead_rank: usize) -> Result<Rows> {
        match self {
            Act::Rows(r) => Ok(r),
            Act::Plain(x) => to_rows(&x, lead_rank),
        }
    }
    fn plain(self) -> Result<Tensor> {
        match self {
            Act::Plain(x) => Ok(x),
            Act::Rows(r) => to_plain(r),
        }
    }
}

/// Reshapes a per-channel vector (`[c]`, or `[tasks, c]` when batched) to broadcast over rows.
fn per_channel(v: &Tensor, batched: bool) -> Result<Tensor> {
    Ok(if batched && v.rank() == 2 {
        v.unsqueeze(1)?
    } else if batched {
        v.reshape((1, 1, v.elem_count()))?
    } else {
        v.reshape((1, v.elem_count()))?
    })
}

/// The convolution weight `[filters, c, k, k]` (or `[tasks, ..]`) as a `[k·k·c, filters]` matrix
/// (or `[tasks, ..]`) in patch order (kernel row, column, channel).
fn weight_matrix(w: &Tensor) -> Result<Tensor> {
    Ok(w.contiguous()?.apply_op1(PatchOrderWeight)?)
}

fn conv_geometry(rows: &Rows, w: &Tensor, stride: usize, padding: usize) -> Result<ConvGeometry> {
    Ok(ConvGeometry {
        images: rows.images(),
        height: rows.h,
        width: rows.w,
        channels: rows.c,
        kernel: w.dim(w.rank() - 1)?,
        stride,
        padding,
    })
}

fn conv_rows(rows: Rows, w: &Tensor, stride: usize, padding: usize, fused: bool) -> Result<Rows> {
    let filters = w.dim(w.rank() - 4)?;
    let geometry = conv_geometry(&rows, w, stride, padding)?;
    let wm = weight_matrix(w)?;
    let t = if fused {
        rows.t
            .contiguous()?
            .apply_op2(&wm.contiguous()?, ConvRows(geometry))?
    } else if differentiable_conv::applies(&geometry) {
        differentiable_conv::conv(&rows.t, &wm, geometry)?
    } else {
        im2col_rows(&rows.t, geometry)?.matmul(&wm)?
    };
    Ok(Rows {
        t,
        lead: rows.lead,
        h: geometry.out_height(),
        w: geometry.out_width(),
        c: filters,
    })
}

/// Batch-norm over rows; `bias` is the preceding convolution's bias, folded in here.
#[allow(clippy::too_many_arguments)]
fn batch_norm(
    rows: Rows,
    name: &str,
    gamma: &Tensor,
    beta: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
    batched: bool,
    ctx: &mut ForwardCtx,
) -> Result<Rows> {
    let (scale, shift) = batch_norm_affine(&rows, name, gamma, beta, bias, eps, batched, ctx)?;
    Ok(Rows {
        t: rows.t.broadcast_mul(&scale)?.broadcast_add(&shift)?,
        ..rows
    })
}

/// The per-channel `scale` and `shift` (broadcastable over rows) with which batch-norm maps
/// `rows` (the convolution's output without its bias, which is folded in here) to
/// `rows·scale + shift`; records running statistics where `ctx` asks for them.
#[allow(clippy::too_many_arguments)]
fn batch_norm_affine(
    rows: &Rows,
    name: &str,
    gamma: &Tensor,
    beta: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
    batched: bool,
    ctx: &mut ForwardCtx,
) -> Result<(Tensor, Tensor)> {
    let bias = bias.map(|b| per_channel(b, batched)).transpose()?;
    let use_running = ctx.mode == Mode::Eval && ctx.running_stats.is_some();
    // `pre_mean` is the mean of the biased convolution output (what the reference path
    // normalises): the bias cancels, but stays in the graph so that it gets its (zero) gradient.
    let (pre_mean, var) = if use_running {
        let stats = ctx.running_stats.expect("checked");
        (
            per_channel(stats.get(&format!("{name}.running_mean"))?, batched)?,
            per_channel(stats.get(&format!("{name}.running_var"))?, batched)?,
        )
    } else {
        let (mean, var) = channel_moments(&rows.t)?;
        let pre_mean = match &bias {
            Some(b) => mean.broadcast_add(b)?,
            None => mean,
        };
        if ctx.mode == Mode::Train && !batched {
            if let Some(out) = ctx.batch_stats.as_deref_mut() {
                let count = rows.t.dim(0)?;
                let unbiased = if count > 1 {
                    count as f64 / (count - 1) as f64
                } else {
                    1.0
                };
                out.push((
                    format!("{name}.running_mean"),
                    pre_mean.flatten_all()?.detach(),
                ));
                out.push((
                    format!("{name}.running_var"),
                    var.flatten_all()?.affine(unbiased, 0.0)?.detach(),
                ));
            }
        }
        (pre_mean, var)
    };
    let scale =
        per_channel(gamma, batched)?.broadcast_mul(&var.affine(1.0, eps)?.sqrt()?.recip()?)?;
    let offset = match &bias {
        Some(b) => b.broadcast_sub(&pre_mean)?,
        None => pre_mean.neg()?,
    };
    let shift = per_channel(beta, batched)?.broadcast_add(&offset.broadcast_mul(&scale)?)?;
    Ok((scale, shift))
}

/// Convolution, batch-norm, ReLU and max-pooling on the differentiable path, with the pooling
/// moved before the batch-norm's per-channel affine map: the window winners are taken on the
/// batch-norm output (outside the graph), the convolution's output is gathered at them, and
/// the affine map and ReLU run on the pooled quarter. Given the winners, pooling is a linear
/// selection, so values and derivatives of every order are those of the layers in sequence,
/// while the graph's full-resolution tensors shrink to the convolution's output, its
/// statistics and the selection. With batch statistics (training, and adaptation without
/// running statistics) the block after the convolution runs on [`PooledNorm`]'s ops, which
/// keep second-order graphs to a few nodes per block; with running statistics it is written
/// in candle operations.
#[allow(clippy::too_many_arguments)]
fn composed_block(
    rows: Rows,
    conv_params: (&Tensor, &Tensor, usize, usize),
    bn: (&str, &Tensor, &Tensor, f64),
    size: usize,
    batched: bool,
    ctx: &mut ForwardCtx,
) -> Result<Rows> {
    let (weight, bias, stride, padding) = conv_params;
    let (name, gamma, beta, eps) = bn;
    let y = conv_rows(rows, weight, stride, padding, false)?;
    if ctx.mode == Mode::Train || ctx.running_stats.is_none() {
        return pooled_norm_block(y, (name, gamma, beta, bias, eps), size, batched, ctx);
    }
    let (scale, shift) = batch_norm_affine(&y, name, gamma, beta, Some(bias), eps, batched, ctx)?;
    let normalised =
        y.t.detach()
            .broadcast_mul(&scale.detach())?
            .broadcast_add(&shift.detach())?
            .contiguous()?;
    let geometry = pool_geometry(&y, size);
    let pooled =
        y.t.contiguous()?
            .apply_op2(&normalised, PoolGather(geometry))?;
    Ok(Rows {
        t: pooled
            .broadcast_mul(&scale)?
            .broadcast_add(&shift)?
            .relu()?,
        lead: y.lead,
        h: geometry.out_height(),
        w: geometry.out_width(),
        c: y.c,
    })
}

/// Records batch-norm `name`'s batch statistics where `ctx` asks for them: the mean of the
/// biased convolution output (`mean` is taken without the `bias`) and the unbiased variance
/// over `rows` rows.
fn record_batch_stats(
    ctx: &mut ForwardCtx,
    name: &str,
    (mean, var): (&[f64], &[f64]),
    bias: &Tensor,
    rows: usize,
) -> Result<()> {
    let Some(out) = ctx.batch_stats.as_deref_mut() else {
        return Ok(());
    };
    let unbiased = if rows > 1 {
        rows as f64 / (rows - 1) as f64
    } else {
        1.0
    };
    let (dtype, device, c) = (bias.dtype(), bias.device(), mean.len());
    let bias_v = bias.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let pre_mean: Vec<f64> = mean.iter().zip(&bias_v).map(|(m, b)| m + b).collect();
    let var: Vec<f64> = var.iter().map(|v| v * unbiased).collect();
    out.push((
        format!("{name}.running_mean"),
        Tensor::from_vec(pre_mean, c, device)?.to_dtype(dtype)?,
    ));
    out.push((
        format!("{name}.running_var"),
        Tensor::from_vec(var, c, device)?.to_dtype(dtype)?,
    ));
    Ok(())
}

/// Batch-norm with batch statistics, max-pooling and ReLU of the convolution output `y` on
/// the closed ops of [`PooledNorm`]: two graph nodes, and three in their gradient.
fn pooled_norm_block(
    y: Rows,
    (name, gamma, beta, bias, eps): (&str, &Tensor, &Tensor, &Tensor, f64),
    size: usize,
    batched: bool,
    ctx: &mut ForwardCtx,
) -> Result<Rows> {
    let geometry = pool_geometry(&y, size);
    let block = PooledNorm::new(
        geometry,
        &y.t.detach(),
        &gamma.detach(),
        &beta.detach(),
        eps,
    )?;
    if ctx.mode == Mode::Train && !batched {
        let (mean, var) = block.moments();
        record_batch_stats(ctx, name, (mean, var), bias, y.t.dim(0)?)?;
    }
    Ok(Rows {
        t: block.forward(&y.t, gamma, beta)?,
        lead: y.lead,
        h: geometry.out_height(),
        w: geometry.out_width(),
        c: y.c,
    })
}

/// What a fused batch-norm, max-pooling and ReLU block reads.
enum BlockInput {
    /// Rows that may get a gradient, with the convolution to run on them: `convolved` is its
    /// output, computed outside the graph for the statistics, and the whole block becomes one
    /// node ([`ConvBlock`]). `weight` is the `[k·k·c, filters]` (or `[tasks, ..]`) matrix.
    Layer {
        rows: Rows,
        weight: Tensor,
        geometry: ConvGeometry,
        convolved: Rows,
    },
    /// Images that get no gradient, with the convolution to run on them inside the kernel
    /// ([`ConvBnPoolRelu`]): `weight` is the `[k·k·c, filters]` (or `[tasks, ..]`) matrix.
    Images {
        rows: Rows,
        weight: Tensor,
        geometry: ConvGeometry,
    },
}

impl BlockInput {
    /// The rows the statistics are taken from: the convolution's output, or for
    /// [`BlockInput::Images`] the images (their patch moments give the output's).
    fn rows(&self) -> &Rows {
        match self {
            BlockInput::Layer { convolved, .. } => convolved,
            BlockInput::Images { rows, .. } => rows,
        }
    }

    /// Channels, height and width of the convolution's output.
    fn output_shape(&self) -> Result<(usize, usize, usize)> {
        Ok(match self {
            BlockInput::Layer { convolved: r, .. } => (r.c, r.h, r.w),
            BlockInput::Images {
                weight, geometry, ..
            } => (
                weight.dim(weight.rank() - 1)?,
                geometry.out_height(),
                geometry.out_width(),
            ),
        })
    }

    /// Per task and channel, the mean and biased variance of the convolution's output.
    fn moments(
        &self,
        tasks: usize,
        c: usize,
    ) -> Result<(Vec<f64>, Vec<f64>, Option<PatchMoments>)> {
        let rows = self.rows();
        let data = rows.t.contiguous()?;
        let (storage, layout) = data.storage_and_layout();
        let (a, b) = layout.contiguous_offsets().expect("contiguous");
        let per_task = data.elem_count() / rows.c / tasks;
        Ok(match self {
            BlockInput::Layer { .. } => {
                let (mean, var) = match &*storage {
                    Storage::Cpu(CpuStorage::F32(v)) => moments(&v[a..b], tasks, per_task, c),
                    Storage::Cpu(CpuStorage::F64(v)) => moments(&v[a..b], tasks, per_task, c),
                    _ => unreachable!("the fast path runs on the CPU in f32 and f64 only"),
                };
                (mean, var, None)
            }
            BlockInput::Images {
                weight, geometry, ..
            } => {
                let patches = match &*storage {
                    Storage::Cpu(CpuStorage::F32(v)) => PatchMoments::of(geometry, &v[a..b], tasks),
                    Storage::Cpu(CpuStorage::F64(v)) => PatchMoments::of(geometry, &v[a..b], tasks),
                    _ => unreachable!("the fast path runs on the CPU in f32 and f64 only"),
                };
                let w = weight
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                let (mean, var) = patches.output_moments(&w, c);
                (mean, var, Some(patches))
            }
        })
    }

    /// Applies the block's kernel with batch-norm, pooling and ReLU given by `op`, parameters
    /// (or scale and shift) `a` and `b`.
    fn apply(
        self,
        op: BnPoolRelu,
        a: &Tensor,
        b: &Tensor,
        patches: Option<PatchMoments>,
    ) -> Result<Rows> {
        let (c, h, w) = (op.pool.channels, op.pool.out_height(), op.pool.out_width());
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let (t, lead) = match self {
            BlockInput::Layer {
                rows,
                weight,
                geometry,
                convolved,
            } => {
                let kernel = ConvBlock {
                    conv: ConvRows(geometry),
                    bn: op,
                    convolved: convolved.t,
                };
                let params = Tensor::stack(&[&a, &b], 0)?;
                let x = rows.t.contiguous()?;
                (
                    x.apply_op3(&weight.contiguous()?, &params, kernel)?,
                    rows.lead,
                )
            }
            BlockInput::Images {
                rows,
                weight,
                geometry,
            } => {
                let kernel = ConvBnPoolRelu {
                    conv: geometry,
                    bn: op,
                    input: rows.t.contiguous()?,
                    patches,
                };
                (weight.contiguous()?.apply_op3(&a, &b, kernel)?, rows.lead)
            }
        };
        Ok(Rows { t, lead, h, w, c })
    }
}

/// Batch-norm `(name, gamma, beta, bias, eps)` with the running statistics in `stats` as
/// `z = y·a + b`: `a = γ/σ` and `b = β + (bias − running mean)·a`, built from tensors so that
/// every parameter gets its gradient.
fn constant_affine(
    (name, gamma, beta, bias, eps): (&str, &Tensor, &Tensor, &Tensor, f64),
    stats: &ParamSet,
) -> Result<(Tensor, Tensor)> {
    let mean = stats.get(&format!("{name}.running_mean"))?;
    let var = stats.get(&format!("{name}.running_var"))?;
    let a = gamma.broadcast_mul(&var.affine(1.0, eps)?.sqrt()?.recip()?)?;
    let b = beta.broadcast_add(&bias.broadcast_sub(mean)?.broadcast_mul(&a)?)?;
    Ok((a, b))
}

/// The block on [`InferenceBlock`], where that kernel applies: constant statistics, nothing
/// that needs a gradient, one task, and 2×2 pooling of a Winograd convolution. `None` leaves
/// the block to the other kernels.
fn inference_block(
    rows: &Rows,
    weight: &Tensor,
    geometry: ConvGeometry,
    bn: (&str, &Tensor, &Tensor, &Tensor, f64),
    (size, batched): (usize, bool),
    ctx: &ForwardCtx,
) -> Result<Option<Rows>> {
    let (Mode::Eval, Some(stats)) = (ctx.mode, ctx.running_stats) else {
        return Ok(None);
    };
    if batched || !InferenceBlock::applies(&geometry, size) {
        return Ok(None);
    }
    // Checked on the inputs of the affine map, so that a declined block (one that needs
    // gradients) does not build the map twice.
    let (name, gamma, beta, bias, _) = bn;
    let mean = stats.get(&format!("{name}.running_mean"))?;
    let var = stats.get(&format!("{name}.running_var"))?;
    if [&rows.t, weight, gamma, beta, bias, mean, var]
        .iter()
        .any(|t| t.track_op())
    {
        return Ok(None);
    }
    let (a, b) = constant_affine(bn, stats)?;
    let params = Tensor::stack(&[&a, &b], 0)?;
    let t =
        rows.t
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &params, InferenceBlock(geometry))?;
    Ok(Some(Rows {
        t,
        lead: rows.lead.clone(),
        h: geometry.out_height() / 2,
        w: geometry.out_width() / 2,
        c: weight.dim(0)?,
    }))
}

/// Batch-norm (with the convolution's bias folded in), max-pooling and ReLU as one fused kernel
/// (first-order gradients only).
#[allow(clippy::too_many_arguments)]
fn bn_pool_relu(
    input: BlockInput,
    name: &str,
    gamma: &Tensor,
    beta: &Tensor,
    bias: &Tensor,
    eps: f64,
    size: usize,
    batched: bool,
    ctx: &mut ForwardCtx,
) -> Result<Rows> {
    let (c, height, width) = input.output_shape()?;
    let lead = &input.rows().lead;
    let tasks = if batched { lead[0] } else { 1 };
    let geometry = PoolGeometry {
        images: lead.iter().product(),
        height,
        width,
        channels: c,
        size,
    };
    if let (Mode::Eval, Some(stats)) = (ctx.mode, ctx.running_stats) {
        let (a, b) = constant_affine((name, gamma, beta, bias, eps), stats)?;
        let op = BnPoolRelu {
            pool: geometry,
            mean: vec![0.0; tasks * c],
            inv_std: vec![1.0; tasks * c],
            batch_statistics: false,
        };
        return input.apply(op, &a, &b, None);
    }
    let (mean, var, patches) = input.moments(tasks, c)?;
    if ctx.mode == Mode::Train && !batched {
        let rows = geometry.images / tasks * height * width;
        record_batch_stats(ctx, name, (&mean, &var), bias, rows)?;
    }
    let op = BnPoolRelu {
        pool: geometry,
        inv_std: var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
        mean,
        batch_statistics: true,
    };
    input.apply(op, gamma, beta, patches)
}

fn max_pool(rows: Rows, size: usize) -> Result<Rows> {
    let geometry = pool_geometry(&rows, size);
    Ok(Rows {
        t: max_pool_rows(&rows.t, geometry)?,
        h: geometry.out_height(),
        w: geometry.out_width(),
        ..rows
    })
}

/// A convolution layer with its name (for its parameters), stride and padding.
#[derive(Clone, Copy)]
struct ConvLayer<'a> {
    name: &'a str,
    stride: usize,
    padding: usize,
}

/// A batch-norm layer with its name and epsilon.
#[derive(Clone, Copy)]
struct NormLayer<'a> {
    name: &'a str,
    eps: f64,
}

/// A run of layers the fast path executes as one unit, recognised by the kinds of its layers.
enum Block<'a> {
    /// Convolution → batch-norm → ReLU → max-pool: the Conv-4 block, fused.
    ConvNormReluPool {
        conv: ConvLayer<'a>,
        norm: NormLayer<'a>,
        pool: usize,
    },
    /// Convolution → batch-norm (the convolution's bias folded into the normalisation).
    ConvNorm {
        conv: ConvLayer<'a>,
        norm: NormLayer<'a>,
    },
    /// A convolution and its bias.
    Conv(ConvLayer<'a>),
    /// Batch-norm of image rows.
    Norm(NormLayer<'a>),
    /// ReLU → max-pool, pooled first (the two commute) so that ReLU sees a quarter of the values.
    ReluPool { pool: usize },
    /// Max-pool of image rows.
    Pool { pool: usize },
    /// An element-wise activation, in whichever layout the activations are.
    Elementwise(Activation),
    /// Any other layer, run on the reference path and layout.
    Reference(&'a NamedLayer),
}

impl<'a> Block<'a> {
    /// The block that starts `layers` (not empty), and how many layers it covers. `spatial`:
    /// whether the activations entering it are images.
    fn first(layers: &'a [NamedLayer], spatial: bool) -> (Self, usize) {
        let conv = |l: &'a NamedLayer| match l.layer {
            Layer::Conv2d {
                stride, padding, ..
            } => Some(ConvLayer {
                name: &l.name,
                stride,
                padding,
            }),
            _ => None,
        };
        let norm = |l: &'a NamedLayer| match l.layer {
            Layer::BatchNorm { eps, .. } => Some(NormLayer { name: &l.name, eps }),
            _ => None,
        };
        let pool = |l: &NamedLayer| match l.layer {
            Layer::MaxPool2d { size } => Some(size),
            _ => None,
        };
        let relu = |l: &NamedLayer| {
            matches!(
                l.layer,
                Layer::Activation {
                    activation: Activation::Relu
                }
            )
        };
        let at = |i: usize| layers.get(i);
        if spatial {
            if let Some(c) = conv(&layers[0]) {
                if let (Some(n), Some(true), Some(Some(size))) =
                    (at(1).and_then(norm), at(2).map(relu), at(3).map(pool))
                {
                    return (
                        Block::ConvNormReluPool {
                            conv: c,
                            norm: n,
                            pool: size,
                        },
                        4,
                    );
                }
                if let Some(n) = at(1).and_then(norm) {
                    return (Block::ConvNorm { conv: c, norm: n }, 2);
                }
                return (Block::Conv(c), 1);
            }
            if let Some(n) = norm(&layers[0]) {
                return (Block::Norm(n), 1);
            }
            if relu(&layers[0]) {
                if let Some(Some(size)) = at(1).map(pool) {
                    return (Block::ReluPool { pool: size }, 2);
                }
            }
            if let Some(size) = pool(&layers[0]) {
                return (Block::Pool { pool: size }, 1);
            }
        }
        match layers[0].layer {
            Layer::Activation {
                activation:
                    activation @ (Activation::Relu
                    | Activation::Sigmoid
                    | Activation::Tanh
                    | Activation::Linear),
            } => (Block::Elementwise(activation), 1),
            _ => (Block::Reference(&layers[0]), 1),
        }
    }
}

/// The parameter `name` of layer `layer`.
fn param<'p>(params: &'p ParamSet, layer: &str, name: &str) -> Result<&'p Tensor> {
    params.get(&format!("{layer}.{name}"))
}

/// Runs `layers` (the network's layers `start..end`) on `h` along the fast path, block by block.
pub(crate) fn forward(
    layers: &[NamedLayer],
    params: &ParamSet,
    h: &Tensor,
    ctx: &mut ForwardCtx,
    batched: bool,
) -> Result<Tensor> {
    let lead_rank = if batched { 2 } else { 1 };
    let mut act = Act::Plain(h.clone());
    let mut rest = layers;
    while !rest.is_empty() {
        let spatial = match &act {
            Act::Rows(_) => true,
            Act::Plain(x) => x.rank() == lead_rank + 3,
        };
        let (block, covered) = Block::first(rest, spatial);
        act = run_block(block, act, params, ctx, batched)?;
        rest = &rest[covered..];
    }
    act.plain()
}

/// Runs one block on the activations `act`.
fn run_block(
    block: Block,
    act: Act,
    params: &ParamSet,
    ctx: &mut ForwardCtx,
    batched: bool,
) -> Result<Act> {
    let lead_rank = if batched { 2 } else { 1 };
    // Fused kernels' backward passes are exact but not themselves differentiable.
    let fused = !ctx.differentiable_backward;
    Ok(match block {
        Block::ConvNormReluPool { conv, norm, pool } if fused => {
            let rows = act.rows(lead_rank)?;
            let weight = param(params, conv.name, "weight")?;
            let bias = param(params, conv.name, "bias")?;
            let (gamma, beta) = (
                param(params, norm.name, "gamma")?,
                param(params, norm.name, "beta")?,
            );
            let geometry = conv_geometry(&rows, weight, conv.stride, conv.padding)?;
            let bn_params = (norm.name, gamma, beta, bias, norm.eps);
            if let Some(out) =
                inference_block(&rows, weight, geometry, bn_params, (pool, batched), ctx)?
            {
                return Ok(Act::Rows(out));
            }
            let matrix = weight_matrix(weight)?;
            let input = if !rows.t.track_op() && geometry.patch_len() <= MAX_PATCH {
                BlockInput::Images {
                    weight: matrix,
                    rows,
                    geometry,
                }
            } else {
                let y = rows
                    .t
                    .detach()
                    .contiguous()?
                    .apply_op2(&matrix.detach().contiguous()?, ConvRows(geometry))?;
                let convolved = Rows {
                    t: y,
                    lead: rows.lead.clone(),
                    h: geometry.out_height(),
                    w: geometry.out_width(),
                    c: matrix.dim(matrix.rank() - 1)?,
                };
                BlockInput::Layer {
                    rows,
                    weight: matrix,
                    geometry,
                    convolved,
                }
            };
            Act::Rows(bn_pool_relu(
                input, norm.name, gamma, beta, bias, norm.eps, pool, batched, ctx,
            )?)
        }
        Block::ConvNormReluPool { conv, norm, pool } => Act::Rows(composed_block(
            act.rows(lead_rank)?,
            (
                param(params, conv.name, "weight")?,
                param(params, conv.name, "bias")?,
                conv.stride,
                conv.padding,
            ),
            (
                norm.name,
                param(params, norm.name, "gamma")?,
                param(params, norm.name, "beta")?,
                norm.eps,
            ),
            pool,
            batched,
            ctx,
        )?),
        Block::ConvNorm { conv, norm } => {
            let weight = param(params, conv.name, "weight")?;
            let y = conv_rows(
                act.rows(lead_rank)?,
                weight,
                conv.stride,
                conv.padding,
                fused,
            )?;
            Act::Rows(batch_norm(
                y,
                norm.name,
                param(params, norm.name, "gamma")?,
                param(params, norm.name, "beta")?,
                Some(param(params, conv.name, "bias")?),
                norm.eps,
                batched,
                ctx,
            )?)
        }
        Block::Conv(conv) => {
            let weight = param(params, conv.name, "weight")?;
            let y = conv_rows(
                act.rows(lead_rank)?,
                weight,
                conv.stride,
                conv.padding,
                fused,
            )?;
            let bias = per_channel(param(params, conv.name, "bias")?, batched)?;
            let t = y.t.broadcast_add(&bias)?;
            Act::Rows(Rows { t, ..y })
        }
        Block::Norm(norm) => Act::Rows(batch_norm(
            act.rows(lead_rank)?,
            norm.name,
            param(params, norm.name, "gamma")?,
            param(params, norm.name, "beta")?,
            None,
            norm.eps,
            batched,
            ctx,
        )?),
        Block::ReluPool { pool } => {
            let pooled = max_pool(act.rows(lead_rank)?, pool)?;
            Act::Rows(Rows {
                t: pooled.t.relu()?,
                ..pooled
            })
        }
        Block::Pool { pool } => Act::Rows(max_pool(act.rows(lead_rank)?, pool)?),
        Block::Elementwise(activation) => match act {
            Act::Rows(rows) => Act::Rows(Rows {
                t: layers::activate(&rows.t, activation)?,
                ..rows
            }),
            Act::Plain(x) => Act::Plain(layers::activate(&x, activation)?),
        },
        Block::Reference(named) => Act::Plain(layers::apply_layer(
            named,
            params,
            &act.plain()?,
            ctx,
            batched,
        )?),
    })
}
