//! The reference forward pass of one layer in plain candle ops (`apply_layer`), and the
//! context a forward pass runs in ([`ForwardCtx`]: training or inference, batch-norm statistics,
//! dropout masks, whether the backward pass must be differentiable). The CPU fast path
//! (`fast_path.rs`) is tested against this path.

use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::nn::architecture::{Activation, Layer, NamedLayer};
use crate::nn::ops;
use crate::nn::params::ParamSet;
use crate::nn::transformer;

/// Whether the network runs in training mode (batch statistics, dropout) or inference mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch-norm normalises with the batch's statistics; dropout is active when an RNG is given.
    Train,
    /// Batch-norm uses running statistics when given (else batch statistics); no dropout.
    Eval,
}

/// Everything besides parameters and input that a forward pass may use or produce.
pub struct ForwardCtx<'a> {
    /// Training or inference.
    pub mode: Mode,
    /// Batch-norm running statistics (`<layer>.running_mean` / `.running_var`), used in
    /// [`Mode::Eval`].
    pub running_stats: Option<&'a ParamSet>,
    /// When set in [`Mode::Train`], batch-norm layers push their (detached) batch mean and
    /// unbiased variance here, so the caller can update running statistics.
    pub batch_stats: Option<&'a mut Vec<(String, Tensor)>>,
    /// Source of dropout masks; with `None`, dropout is the identity.
    pub rng: Option<&'a mut ChaCha8Rng>,
    /// Whether gradients computed from this forward pass may themselves be differentiated
    /// (second-order meta-gradients). When off, the CPU fast path may use fused kernels whose
    /// backward passes are exact but return constants. On by default: turn it off with
    /// [`ForwardCtx::first_order`] where only first-order gradients (or none) are taken.
    pub differentiable_backward: bool,
    /// The padding mask of the token batch being encoded (`[batch, seq]`, 1 for tokens and 0
    /// for padding): set by a token-embedding layer, read by transformer blocks and pooling.
    pub token_mask: Option<Tensor>,
    /// Outputs of the layers that skip connections ([`Layer::Add`]) read later in this forward
    /// pass, by layer name (`"input"` for the network's input); filled by the forward loop.
    pub skip_sources: Vec<(String, Tensor)>,
}

impl<'a> ForwardCtx<'a> {
    /// Training mode with batch statistics and no dropout RNG.
    pub fn train() -> Self {
        Self {
            mode: Mode::Train,
            running_stats: None,
            batch_stats: None,
            rng: None,
            differentiable_backward: true,
            token_mask: None,
            skip_sources: Vec::new(),
        }
    }
    /// Inference mode using the given running statistics (or batch statistics when `None`).
    pub fn eval(running_stats: Option<&'a ParamSet>) -> Self {
        Self {
            mode: Mode::Eval,
            running_stats,
            batch_stats: None,
            rng: None,
            differentiable_backward: true,
            token_mask: None,
            skip_sources: Vec::new(),
        }
    }

    /// The same context, promising that no gradient of a gradient will be taken through this
    /// forward pass (so fused kernels may be used).
    pub fn first_order(mut self) -> Self {
        self.differentiable_backward = false;
        self
    }
}

/// Runs one layer on the reference path.
pub(crate) fn apply_layer(
    named: &NamedLayer,
    params: &ParamSet,
    h: &Tensor,
    ctx: &mut ForwardCtx,
    batched: bool,
) -> Result<Tensor> {
    let lead = if batched { 2 } else { 1 };
    let p = |n: &str| params.get(&format!("{}.{n}", named.name));
    Ok(match &named.layer {
        Layer::Dense { .. } => dense(h, p("weight")?, p("bias")?, batched)?,
        Layer::Conv2d {
            kernel_size,
            stride,
            padding,
            groups,
            bias,
            same_padding,
            ..
        } => {
            let pads = if *same_padding {
                let rank = h.rank();
                let (top, bottom) = ops::same_padding(h.dim(rank - 2)?, *kernel_size, *stride);
                let (left, right) = ops::same_padding(h.dim(rank - 1)?, *kernel_size, *stride);
                [top, bottom, left, right]
            } else {
                [*padding; 4]
            };
            let bias = if *bias { Some(p("bias")?) } else { None };
            let weight = p("weight")?;
            let depthwise = !batched && *groups > 1 && weight.dims()[..2] == [*groups, 1];
            if depthwise
                && !batched
                && !ctx.differentiable_backward
                && crate::kernels::enabled()
                && h.device().is_cpu()
            {
                // Direct loops, first order: the reference path's shifted copies of the input
                // do not fit in memory for a mobile network's training step at 224x224.
                let op = metalearn_kernels::depthwise::Depthwise {
                    kernel: *kernel_size,
                    stride: *stride,
                    padding: pads,
                };
                let y = op.apply(h, weight)?;
                match bias {
                    Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
                    None => y,
                }
            } else {
                conv2d(h, weight, bias, *stride, pads, *groups, batched)?
            }
        }
        Layer::BatchNorm { eps, .. } => {
            batch_norm(h, &named.name, p("gamma")?, p("beta")?, *eps, batched, ctx)?
        }
        Layer::MaxPool2d { size } => ops::max_pool(h, *size)?,
        Layer::Flatten => h.flatten_from(lead)?,
        Layer::GlobalAvgPool => ops::global_avg_pool(h)?,
        Layer::Add { from } => {
            // The network's forward loop keeps the activations skip connections read.
            let saved = ctx.skip_sources.iter().find(|(name, _)| name == from);
            let Some((_, source)) = saved else {
                return Err(crate::error::Error::Shape(format!(
                    "layer `{}` adds the output of `{from}`, which this forward pass did not \
                     compute: run the network from its first layer",
                    named.name
                )));
            };
            h.add(source)?
        }
        Layer::Dropout { rate } => dropout(h, *rate, ctx)?,
        Layer::Activation { activation } => activate(h, *activation)?,
        Layer::TokenEmbedding { pad_id, eps, .. } => {
            let (embedded, mask) = transformer::token_embedding(
                h,
                &p,
                *pad_id,
                *eps,
                batched,
                !ctx.differentiable_backward,
            )?;
            ctx.token_mask = Some(mask);
            embedded
        }
        Layer::TransformerBlock {
            heads,
            eps,
            lora_rank,
            lora_alpha,
            ..
        } => {
            let options = transformer::BlockOptions {
                heads: *heads,
                eps: *eps,
                lora_rank: *lora_rank,
                lora_alpha: *lora_alpha,
                batched,
                differentiable: ctx.differentiable_backward,
            };
            transformer::transformer_block(h, &token_mask(h, ctx)?, &p, &options)?
        }
        Layer::SequencePool { mode } => transformer::sequence_pool(h, &token_mask(h, ctx)?, *mode)?,
        Layer::L2Normalize => ops::l2_normalize(h)?,
        Layer::FeatureEmbedding { fields } => {
            crate::nn::features::embed(h, fields, &named.name, params, batched)?
        }
    })
}

/// The padding mask set by the token embedding, or all ones when the forward pass started
/// after it (for example on stored encoder activations).
fn token_mask(h: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
    let lead = &h.dims()[..h.rank() - 1];
    match &ctx.token_mask {
        Some(mask) if mask.dims() == lead => Ok(mask.clone()),
        Some(mask) => Err(crate::error::Error::Shape(format!(
            "padding mask of shape {:?} does not fit activations of shape {:?}",
            mask.dims(),
            h.dims()
        ))),
        None => Ok(Tensor::ones(lead, h.dtype(), h.device())?),
    }
}

fn dense(x: &Tensor, w: &Tensor, b: &Tensor, batched: bool) -> Result<Tensor> {
    if batched {
        // x [T, n, in] · w [T, in, out] + b [T, 1, out]
        Ok(x.matmul(w)?.broadcast_add(&b.unsqueeze(1)?)?)
    } else {
        Ok(x.matmul(w)?.broadcast_add(b)?)
    }
}

fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: ops::Padding2d,
    groups: usize,
    batched: bool,
) -> Result<Tensor> {
    // Shifted slices and one matrix product: exact to any order on every device, where candle's
    // own conv2d runs out of memory in second-order MAML (see `ops::conv2d`).
    let y = ops::conv2d_grouped(x, w, stride, padding, groups)?;
    let Some(b) = b else {
        return Ok(y);
    };
    let o = w.dim(if batched { 1 } else { 0 })?;
    let bias_shape: &[usize] = if batched {
        &[b.dim(0)?, 1, o, 1, 1]
    } else {
        &[1, o, 1, 1]
    };
    Ok(y.broadcast_add(&b.reshape(bias_shape)?)?)
}

fn batch_norm(
    x: &Tensor,
    name: &str,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    batched: bool,
    ctx: &mut ForwardCtx,
) -> Result<Tensor> {
    let lead = if batched { 1 } else { 0 };
    let rank = x.rank();
    let channel_dim = lead + 1;
    // Reduce over the batch dimension and, for images, the spatial dimensions.
    let reduce: Vec<usize> = (lead..rank).filter(|&d| d != channel_dim).collect();
    // Shape that broadcasts a per-channel vector (with the task dimension when batched).
    let mut stat_shape = vec![1usize; rank];
    stat_shape[channel_dim] = x.dim(channel_dim)?;
    if batched {
        stat_shape[0] = x.dim(0)?;
    }
    let use_running = ctx.mode == Mode::Eval && ctx.running_stats.is_some();
    let (mean, var) = if use_running {
        let stats = ctx.running_stats.expect("checked");
        let mean = stats.get(&format!("{name}.running_mean"))?;
        let var = stats.get(&format!("{name}.running_var"))?;
        let mut shape = vec![1usize; rank];
        shape[channel_dim] = x.dim(channel_dim)?;
        (
            mean.reshape(shape.as_slice())?,
            var.reshape(shape.as_slice())?,
        )
    } else {
        let mean = x.mean_keepdim(reduce.as_slice())?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(reduce.as_slice())?;
        if ctx.mode == Mode::Train && !batched {
            if let Some(out) = ctx.batch_stats.as_deref_mut() {
                let count: usize = reduce.iter().map(|&d| x.dims()[d]).product();
                let unbiased = if count > 1 {
                    count as f64 / (count - 1) as f64
                } else {
                    1.0
                };
                out.push((format!("{name}.running_mean"), mean.flatten_all()?.detach()));
                out.push((
                    format!("{name}.running_var"),
                    var.flatten_all()?.affine(unbiased, 0.0)?.detach(),
                ));
            }
        }
        (mean, var)
    };
    let normed = x
        .broadcast_sub(&mean)?
        .broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    let gamma = gamma.reshape(stat_shape.as_slice())?;
    let beta = beta.reshape(stat_shape.as_slice())?;
    Ok(normed.broadcast_mul(&gamma)?.broadcast_add(&beta)?)
}

fn dropout(x: &Tensor, rate: f64, ctx: &mut ForwardCtx) -> Result<Tensor> {
    if ctx.mode != Mode::Train || rate == 0.0 {
        return Ok(x.clone());
    }
    let Some(rng) = ctx.rng.as_deref_mut() else {
        return Ok(x.clone());
    };
    let keep = 1.0 - rate;
    let mask: Vec<f64> = (0..x.elem_count())
        .map(|_| {
            if rng.gen::<f64>() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

pub(crate) fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Relu => Ok(x.relu()?),
        Activation::Sigmoid => ops::sigmoid(x),
        Activation::Tanh => Ok(x.tanh()?),
        Activation::Softmax => ops::softmax(x),
        Activation::Linear => Ok(x.clone()),
        Activation::Relu6 => ops::relu6(x),
        Activation::Silu => ops::silu(x),
        Activation::HardSwish => ops::hard_swish(x),
    }
}
