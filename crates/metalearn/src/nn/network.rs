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
use crate::nn::architecture::{Architecture, Layer};
use crate::nn::layers::apply_layer;
pub use crate::nn::layers::{ForwardCtx, Mode};
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
    /// Normal with mean 0 and the given standard deviation (BERT initialises with 0.02).
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// Uniform in ±limit.
    Uniform {
        /// Half-width of the interval.
        limit: f64,
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
                    groups,
                    bias,
                    same_padding,
                } => {
                    if shape.len() != 3 {
                        return Err(bad(format!(
                            "conv2d needs [channels, height, width] input, got {shape:?}"
                        )));
                    }
                    if *filters == 0 || *kernel_size == 0 || *stride == 0 || *groups == 0 {
                        return Err(bad(
                            "filters, kernel_size, stride and groups must be > 0".into()
                        ));
                    }
                    if !shape[0].is_multiple_of(*groups) || !filters.is_multiple_of(*groups) {
                        return Err(bad(format!(
                            "{groups} groups must divide both the {} input channels and the {filters} filters",
                            shape[0]
                        )));
                    }
                    if *same_padding && *padding != 0 {
                        return Err(bad(
                            "same_padding computes its own padding: set padding to 0".into(),
                        ));
                    }
                    let padded = |side: usize| {
                        if *same_padding {
                            let (before, after) =
                                crate::nn::ops::same_padding(side, *kernel_size, *stride);
                            return Ok(side + before + after);
                        }
                        padding
                            .checked_mul(2)
                            .and_then(|p| p.checked_add(side))
                            .ok_or_else(|| bad(format!("padding {padding} is too large")))
                    };
                    let (c, h, w) = (shape[0], padded(shape[1])?, padded(shape[2])?);
                    if h < *kernel_size || w < *kernel_size {
                        return Err(bad(format!(
                            "kernel {kernel_size} larger than padded input {h}x{w}; the images \
                             are too small for this network: give it larger ones"
                        )));
                    }
                    let fan_in = (c / groups)
                        .checked_mul(*kernel_size)
                        .and_then(|n| n.checked_mul(*kernel_size))
                        .ok_or_else(|| bad(format!("kernel {kernel_size} is too large")))?;
                    params.push(spec(
                        "weight",
                        vec![*filters, c / groups, *kernel_size, *kernel_size],
                        Init::HeNormal { fan_in },
                    ));
                    if *bias {
                        params.push(spec("bias", vec![*filters], Init::Zeros));
                    }
                    vec![
                        *filters,
                        (h - kernel_size) / stride + 1,
                        (w - kernel_size) / stride + 1,
                    ]
                }
                Layer::GlobalAvgPool => {
                    if shape.len() != 3 {
                        return Err(bad(format!(
                            "global average pooling needs [channels, height, width] input, got {shape:?}"
                        )));
                    }
                    vec![shape[0]]
                }
                Layer::Add { from } => {
                    let source = if from == "input" {
                        Some(&arch.input_shape)
                    } else {
                        arch.layers[..i]
                            .iter()
                            .position(|l| &l.name == from)
                            .map(|j| &shapes[j])
                    };
                    let Some(source) = source else {
                        return Err(bad(format!(
                            "adds the output of `{from}`, which is no earlier layer (use the name of a layer before it, or `input`)"
                        )));
                    };
                    if *source != shape {
                        return Err(bad(format!(
                            "adds the output of `{from}`, of shape {source:?}, to an input of shape {shape:?}"
                        )));
                    }
                    shape
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
                Layer::TokenEmbedding {
                    vocab_size,
                    hidden,
                    max_positions,
                    type_vocab_size,
                    pad_id,
                    eps,
                } => {
                    if shape.len() != 1 {
                        return Err(bad(format!(
                            "token embedding needs [sequence length] token ids as input, got {shape:?}"
                        )));
                    }
                    if *vocab_size == 0 || *hidden == 0 || *type_vocab_size == 0 {
                        return Err(bad(
                            "vocab_size, hidden and type_vocab_size must be > 0".into()
                        ));
                    }
                    if shape[0] > *max_positions {
                        return Err(bad(format!(
                            "input length {} exceeds max_positions {max_positions}",
                            shape[0]
                        )));
                    }
                    if *pad_id as usize >= *vocab_size {
                        return Err(bad(format!(
                            "pad_id {pad_id} is not below vocab_size {vocab_size}"
                        )));
                    }
                    check_eps(*eps).map_err(bad)?;
                    let normal = Init::Normal { std: 0.02 };
                    params.push(spec("word", vec![*vocab_size, *hidden], normal));
                    params.push(spec("position", vec![*max_positions, *hidden], normal));
                    params.push(spec("token_type", vec![*type_vocab_size, *hidden], normal));
                    params.push(spec("norm_gamma", vec![*hidden], Init::Ones));
                    params.push(spec("norm_beta", vec![*hidden], Init::Zeros));
                    vec![shape[0], *hidden]
                }
                Layer::TransformerBlock {
                    heads,
                    intermediate,
                    eps,
                    lora_rank,
                    ..
                } => {
                    let [_, hidden] = shape[..] else {
                        return Err(bad(format!(
                            "transformer block needs [sequence, hidden] input, got {shape:?}"
                        )));
                    };
                    if *heads == 0 || hidden % heads != 0 || *intermediate == 0 {
                        return Err(bad(format!(
                            "needs heads > 0 dividing the hidden size {hidden} and intermediate > 0, got heads {heads}, intermediate {intermediate}"
                        )));
                    }
                    check_eps(*eps).map_err(bad)?;
                    let normal = Init::Normal { std: 0.02 };
                    for proj in ["q", "k", "v", "o"] {
                        params.push(spec(
                            &format!("{proj}_weight"),
                            vec![hidden, hidden],
                            normal,
                        ));
                        params.push(spec(&format!("{proj}_bias"), vec![hidden], Init::Zeros));
                    }
                    params.push(spec("attn_norm_gamma", vec![hidden], Init::Ones));
                    params.push(spec("attn_norm_beta", vec![hidden], Init::Zeros));
                    params.push(spec("ff1_weight", vec![hidden, *intermediate], normal));
                    params.push(spec("ff1_bias", vec![*intermediate], Init::Zeros));
                    params.push(spec("ff2_weight", vec![*intermediate, hidden], normal));
                    params.push(spec("ff2_bias", vec![hidden], Init::Zeros));
                    params.push(spec("ff_norm_gamma", vec![hidden], Init::Ones));
                    params.push(spec("ff_norm_beta", vec![hidden], Init::Zeros));
                    if *lora_rank > 0 {
                        for proj in ["q", "v"] {
                            params.push(spec(
                                &format!("{proj}_lora_a"),
                                vec![hidden, *lora_rank],
                                Init::GlorotUniform {
                                    fan_in: hidden,
                                    fan_out: *lora_rank,
                                },
                            ));
                            params.push(spec(
                                &format!("{proj}_lora_b"),
                                vec![*lora_rank, hidden],
                                Init::Zeros,
                            ));
                        }
                    }
                    shape
                }
                Layer::SequencePool { .. } => {
                    let [_, hidden] = shape[..] else {
                        return Err(bad(format!(
                            "sequence pooling needs [sequence, hidden] input, got {shape:?}"
                        )));
                    };
                    vec![hidden]
                }
                Layer::L2Normalize => shape,
                Layer::FeatureEmbedding { fields } => {
                    let slots = crate::nn::features::check_fields(fields).map_err(bad)?;
                    if shape != [slots] {
                        return Err(bad(format!(
                            "feature embedding reads {slots} slots per example, got input {shape:?}"
                        )));
                    }
                    for field in fields {
                        if let Some(init) = feature_table_init(field) {
                            params.push(spec(&field.name, vec![field.vocab, field.dim], init));
                        }
                    }
                    vec![fields.iter().map(|f| f.dim).sum()]
                }
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

    /// Whether the network reads token ids (its first layer is a token embedding).
    pub fn reads_tokens(&self) -> bool {
        matches!(
            self.arch.layers.first().map(|l| &l.layer),
            Some(Layer::TokenEmbedding { .. })
        )
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
        if self.reads_tokens() {
            // Token ids: a batch is padded to its longest member, which may be shorter than
            // the longest sequence the model reads.
            let length = x.dims()[lead];
            if length == 0 || length > self.arch.input_shape[0] {
                return Err(Error::Shape(format!(
                    "token batch of shape {:?}: sequences must have 1 to {} tokens",
                    x.dims(),
                    self.arch.input_shape[0]
                )));
            }
        } else if x.dims()[lead..] != self.arch.input_shape[..] {
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
        // The outputs that skip connections in this range read later.
        let sources: Vec<&str> = layers
            .iter()
            .filter_map(|l| match &l.layer {
                Layer::Add { from } => Some(from.as_str()),
                _ => None,
            })
            .collect();
        ctx.skip_sources.clear();
        if start == 0 && sources.contains(&"input") {
            ctx.skip_sources.push(("input".into(), h.clone()));
        }
        let mut h = h.clone();
        for named in layers {
            h = apply_layer(named, params, &h, ctx, batched)?;
            if sources.contains(&named.name.as_str()) {
                ctx.skip_sources.push((named.name.clone(), h.clone()));
            }
        }
        ctx.skip_sources.clear();
        Ok(h)
    }
}

/// How a feature field's table is initialised (MeLU's modules: `nn.Embedding`, N(0, 1), for
/// one value; a bias-free `nn.Linear` on a normalised multi-hot vector, U(±1/√vocab), for
/// several; zeros for id columns); `None` for numeric fields, which have no table.
fn feature_table_init(field: &crate::nn::architecture::FeatureField) -> Option<Init> {
    use crate::nn::architecture::FeatureKind;
    match field.kind {
        FeatureKind::Numeric => None,
        _ if field.zero_init => Some(Init::Zeros),
        FeatureKind::Categorical => Some(Init::Normal { std: 1.0 }),
        FeatureKind::MultiValued => Some(Init::Uniform {
            limit: 1.0 / (field.vocab as f64).sqrt(),
        }),
    }
}

fn check_eps(eps: f64) -> std::result::Result<(), String> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "layer-norm eps must be a positive number, got {eps}"
        ))
    }
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
            Init::Normal { std } => {
                let normal = Normal::new(0.0, std).expect("valid std");
                (0..n).map(|_| normal.sample(rng)).collect()
            }
            Init::Uniform { limit } => (0..n).map(|_| rng.gen_range(-limit..limit)).collect(),
        };
        let t = Tensor::from_vec(values, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
        set.insert(spec.name.clone(), t)?;
    }
    Ok(set)
}
