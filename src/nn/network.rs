//! A built network: shapes checked, parameters described, and a pure forward function.
//!
//! `forward(params, x, ctx)` reads nothing but its arguments, so the same [`Network`] runs with
//! the meta-learned weights, with per-task fast weights, or — in *task-batched* mode — with a
//! whole meta-batch of fast weights at once: every parameter then has a leading task dimension
//! `T`, and the input is `[T, batch, ...]`.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};
use crate::nn::architecture::{Activation, Architecture, Layer, NamedLayer};
use crate::nn::ops;
use crate::nn::params::ParamSet;

/// How parameters are initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Uniform in ±sqrt(6 / (fan_in + fan_out)) (Keras' default for dense kernels).
    GlorotUniform {
        /// Inputs per output.
        fan_in: usize,
        /// Outputs per input.
        fan_out: usize,
    },
    /// Normal with standard deviation sqrt(2 / fan_in) (He / Kaiming, for ReLU convolutions).
    HeNormal {
        /// Inputs per output.
        fan_in: usize,
    },
}

/// Description of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Full name, `<layer>.<param>`.
    pub name: String,
    /// Shape (without a task dimension).
    pub shape: Vec<usize>,
    /// Initialiser.
    pub init: Init,
    /// Index of the owning layer.
    pub layer: usize,
}

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
        }
    }

    /// The same context, promising that no gradient of a gradient will be taken through this
    /// forward pass (so fused kernels may be used).
    pub fn first_order(mut self) -> Self {
        self.differentiable_backward = false;
        self
    }
}

/// A built [`Architecture`]: per-layer output shapes and parameter descriptions.
#[derive(Clone, Debug)]
pub struct Network {
    arch: Architecture,
    shapes: Vec<Vec<usize>>,
    params: Vec<ParamSpec>,
    buffers: Vec<ParamSpec>,
}

impl Network {
    /// Checks the architecture's shapes and describes its parameters.
    pub fn build(arch: &Architecture) -> Result<Self> {
        crate::runtime::init();
        if arch.input_shape.is_empty() || arch.input_shape.contains(&0) {
            return Err(Error::Config(format!(
                "input shape must be non-empty with no zero dimension, got {:?}",
                arch.input_shape
            )));
        }
        let mut shape = arch.input_shape.clone();
        let mut shapes = Vec::new();
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for (i, named) in arch.layers.iter().enumerate() {
            let name = &named.name;
            let bad = |what: String| Error::Shape(format!("layer {i} `{name}`: {what}"));
            let spec = |p: &str, shape: Vec<usize>, init: Init| ParamSpec {
                name: format!("{name}.{p}"),
                shape,
                init,
                layer: i,
            };
            shape = match &named.layer {
                Layer::Dense { units } => {
                    if shape.len() != 1 {
                        return Err(bad(format!(
                            "dense needs a flat input, got {shape:?}; add a Flatten layer before it"
                        )));
                    }
                    if *units == 0 {
                        return Err(bad("units must be > 0".into()));
                    }
                    let fan_in = shape[0];
                    params.push(spec(
                        "weight",
                        vec![fan_in, *units],
                        Init::GlorotUniform {
                            fan_in,
                            fan_out: *units,
                        },
                    ));
                    params.push(spec("bias", vec![*units], Init::Zeros));
                    vec![*units]
                }
                Layer::Conv2d {
                    filters,
                    kernel_size,
                    stride,
                    padding,
                } => {
                    if shape.len() != 3 {
                        return Err(bad(format!(
                            "conv2d needs [channels, height, width] input, got {shape:?}"
                        )));
                    }
                    if *filters == 0 || *kernel_size == 0 || *stride == 0 {
                        return Err(bad("filters, kernel_size and stride must be > 0".into()));
                    }
                    let padded = |side: usize| {
                        padding
                            .checked_mul(2)
                            .and_then(|p| p.checked_add(side))
                            .ok_or_else(|| bad(format!("padding {padding} is too large")))
                    };
                    let (c, h, w) = (shape[0], padded(shape[1])?, padded(shape[2])?);
                    if h < *kernel_size || w < *kernel_size {
                        return Err(bad(format!(
                            "kernel {kernel_size} larger than padded input {h}x{w}"
                        )));
                    }
                    let fan_in = c
                        .checked_mul(*kernel_size)
                        .and_then(|n| n.checked_mul(*kernel_size))
                        .ok_or_else(|| bad(format!("kernel {kernel_size} is too large")))?;
                    params.push(spec(
                        "weight",
                        vec![*filters, c, *kernel_size, *kernel_size],
                        Init::HeNormal { fan_in },
                    ));
                    params.push(spec("bias", vec![*filters], Init::Zeros));
                    vec![
                        *filters,
                        (h - kernel_size) / stride + 1,
                        (w - kernel_size) / stride + 1,
                    ]
                }
                Layer::BatchNorm { momentum, eps } => {
                    if shape.len() != 1 && shape.len() != 3 {
                        return Err(bad(format!(
                            "batch-norm needs [features] or [channels, h, w] input, got {shape:?}"
                        )));
                    }
                    if eps.is_nan() || *eps <= 0.0 || !(0.0..=1.0).contains(momentum) {
                        return Err(bad("needs eps > 0 and momentum in [0, 1]".into()));
                    }
                    let c = shape[0];
                    params.push(spec("gamma", vec![c], Init::Ones));
                    params.push(spec("beta", vec![c], Init::Zeros));
                    buffers.push(spec("running_mean", vec![c], Init::Zeros));
                    buffers.push(spec("running_var", vec![c], Init::Ones));
                    shape
                }
                Layer::MaxPool2d { size } => {
                    if shape.len() != 3 {
                        return Err(bad(format!(
                            "max-pool needs [channels, height, width] input, got {shape:?}"
                        )));
                    }
                    if *size == 0 || shape[1] < *size || shape[2] < *size {
                        return Err(bad(format!("window {size} does not fit input {shape:?}")));
                    }
                    vec![shape[0], shape[1] / size, shape[2] / size]
                }
                Layer::Flatten => {
                    let size = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                    vec![size
                        .ok_or_else(|| bad(format!("input {shape:?} is too large to flatten")))?]
                }
                Layer::Dropout { rate } => {
                    if !(0.0..1.0).contains(rate) {
                        return Err(bad(format!("dropout rate must be in [0, 1), got {rate}")));
                    }
                    shape
                }
                Layer::Activation { .. } => shape,
            };
            shapes.push(shape.clone());
        }
        Ok(Self {
            arch: arch.clone(),
            shapes,
            params,
            buffers,
        })
    }

    /// The architecture this network was built from.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// Output shape of one example (without the batch dimension).
    pub fn output_shape(&self) -> &[usize] {
        self.shapes
            .last()
            .map(|s| s.as_slice())
            .unwrap_or(&self.arch.input_shape)
    }

    /// Output shape of each layer.
    pub fn layer_shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Trainable parameter descriptions, in order.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Non-trainable state (batch-norm running statistics) descriptions.
    pub fn buffer_specs(&self) -> &[ParamSpec] {
        &self.buffers
    }

    /// Fresh parameters drawn with `seed`.
    pub fn init_params(&self, seed: u64, device: &Device, dtype: DType) -> Result<ParamSet> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        init_set(&self.params, &mut rng, device, dtype)
    }

    /// Initial running statistics (means 0, variances 1).
    pub fn init_buffers(&self, device: &Device, dtype: DType) -> Result<ParamSet> {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        init_set(&self.buffers, &mut rng, device, dtype)
    }

    /// Folds batch statistics collected in [`ForwardCtx::batch_stats`] into running statistics:
    /// `running = (1 - momentum) · running + momentum · batch`, with each batch-norm layer's own
    /// momentum. Layers for which `skip(layer_name)` is true keep their running statistics.
    pub fn fold_batch_stats(
        &self,
        running: &mut ParamSet,
        batch_stats: Vec<(String, Tensor)>,
        skip: impl Fn(&str) -> bool,
    ) -> Result<()> {
        for (name, stat) in batch_stats {
            let layer = name.split('.').next().unwrap_or_default();
            if skip(layer) {
                continue;
            }
            let momentum = self
                .arch
                .layers
                .iter()
                .find(|l| l.name == layer)
                .and_then(|l| match l.layer {
                    Layer::BatchNorm { momentum, .. } => Some(momentum),
                    _ => None,
                })
                .ok_or_else(|| {
                    Error::Shape(format!(
                        "batch statistics for `{name}`, which is no batch-norm layer"
                    ))
                })?;
            let old = running.get(&name)?;
            let new = old
                .affine(1.0 - momentum, 0.0)?
                .add(&stat.to_dtype(old.dtype())?.affine(momentum, 0.0)?)?;
            running.replace(&name, new)?;
        }
        Ok(())
    }

    /// Forward pass. `x` is `[batch, input_shape...]`, or `[tasks, batch, input_shape...]` when
    /// every parameter carries a leading task dimension (task-batched mode).
    pub fn forward(&self, params: &ParamSet, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        self.forward_layers(params, x, ctx, self.arch.layers.len())
    }

    /// Forward pass through the first `count` layers only (for example, everything below the
    /// head to get features).
    pub fn forward_layers(
        &self,
        params: &ParamSet,
        x: &Tensor,
        ctx: &mut ForwardCtx,
        count: usize,
    ) -> Result<Tensor> {
        let example_rank = self.arch.input_shape.len();
        let lead = match x.rank().checked_sub(example_rank) {
            Some(l @ 1..=2) => l,
            _ => {
                return Err(Error::Shape(format!(
                    "input of shape {:?} does not fit examples of shape {:?}: expected [batch, {}]",
                    x.dims(),
                    self.arch.input_shape,
                    dims_text(&self.arch.input_shape)
                )))
            }
        };
        if x.dims()[lead..] != self.arch.input_shape[..] {
            return Err(Error::Shape(format!(
                "input of shape {:?} does not fit examples of shape {:?}",
                x.dims(),
                self.arch.input_shape
            )));
        }
        self.forward_range(params, x, ctx, 0, count, lead == 2)
    }

    /// Runs layers `start..end` on an intermediate activation `h` (as produced by layer
    /// `start - 1`), without checking `h` against the input shape. `batched` says whether `h`
    /// and the parameters carry a leading task dimension.
    pub fn forward_range(
        &self,
        params: &ParamSet,
        h: &Tensor,
        ctx: &mut ForwardCtx,
        start: usize,
        end: usize,
        batched: bool,
    ) -> Result<Tensor> {
        let layers = &self.arch.layers[start.min(end)..end.min(self.arch.layers.len())];
        if crate::nn::fast_path::applies(layers, h) {
            return crate::nn::fast_path::forward(layers, params, h, ctx, batched);
        }
        let mut h = h.clone();
        for named in layers {
            h = apply_layer(named, params, &h, ctx, batched)?;
        }
        Ok(h)
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
            stride, padding, ..
        } => conv2d(h, p("weight")?, p("bias")?, *stride, *padding, batched)?,
        Layer::BatchNorm { eps, .. } => {
            batch_norm(h, &named.name, p("gamma")?, p("beta")?, *eps, batched, ctx)?
        }
        Layer::MaxPool2d { size } => ops::max_pool(h, *size)?,
        Layer::Flatten => h.flatten_from(lead)?,
        Layer::Dropout { rate } => dropout(h, *rate, ctx)?,
        Layer::Activation { activation } => activate(h, *activation)?,
    })
}

fn dims_text(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn init_set(
    specs: &[ParamSpec],
    rng: &mut ChaCha8Rng,
    device: &Device,
    dtype: DType,
) -> Result<ParamSet> {
    let mut set = ParamSet::new();
    for spec in specs {
        let n: usize = spec.shape.iter().product();
        let values: Vec<f64> = match spec.init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::GlorotUniform { fan_in, fan_out } => {
                let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..n).map(|_| rng.gen_range(-limit..limit)).collect()
            }
            Init::HeNormal { fan_in } => {
                let normal = Normal::new(0.0, (2.0 / fan_in as f64).sqrt()).expect("valid std");
                (0..n).map(|_| normal.sample(rng)).collect()
            }
        };
        let t = Tensor::from_vec(values, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
        set.insert(spec.name.clone(), t)?;
    }
    Ok(set)
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
    b: &Tensor,
    stride: usize,
    padding: usize,
    batched: bool,
) -> Result<Tensor> {
    // Shifted slices and one matrix product: exact to any order on every device, where candle's
    // own conv2d runs out of memory in second-order MAML (see `ops::conv2d`).
    let y = crate::nn::ops::conv2d(x, w, stride, padding)?;
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
    }
}
