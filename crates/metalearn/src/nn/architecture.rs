//! Serialisable architecture descriptions and the built-in backbones.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An element-wise (or, for softmax, row-wise) activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x)
    Relu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// tanh(x)
    Tanh,
    /// softmax over the last dimension
    Softmax,
    /// identity
    Linear,
    /// min(max(0, x), 6) (MobileNet, EfficientNet-Lite)
    Relu6,
    /// x · sigmoid(x), also called swish (EfficientNet)
    Silu,
    /// x · min(max(x + 3, 0), 6) / 6 (MobileNetV3)
    HardSwish,
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "relu" => Ok(Self::Relu),
            "sigmoid" => Ok(Self::Sigmoid),
            "tanh" => Ok(Self::Tanh),
            "softmax" => Ok(Self::Softmax),
            "linear" | "none" | "identity" => Ok(Self::Linear),
            "relu6" => Ok(Self::Relu6),
            "silu" | "swish" => Ok(Self::Silu),
            "hard_swish" | "hardswish" | "hard-swish" => Ok(Self::HardSwish),
            other => Err(Error::Config(format!(
                "unknown activation `{other}`: use relu, relu6, sigmoid, tanh, softmax, silu, \
                 hard_swish or linear"
            ))),
        }
    }
}

/// One layer of a [`Sequential`](crate::Sequential) network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layer {
    /// Fully connected: `y = x W + b`, W of shape `[in, units]`.
    Dense {
        /// Output features.
        units: usize,
    },
    /// 2-D convolution over `[batch, channels, height, width]`, weights
    /// `[filters, in / groups, k, k]` (PyTorch's order).
    Conv2d {
        /// Output channels.
        filters: usize,
        /// Square kernel size.
        kernel_size: usize,
        /// Stride in both directions.
        #[serde(default = "one")]
        stride: usize,
        /// Zero padding on every side (0 with `same_padding`).
        #[serde(default)]
        padding: usize,
        /// Channel groups: 1 for a dense convolution, the input channel count for a
        /// depthwise one; it must divide both the input channels and `filters`.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        groups: usize,
        /// Whether a learned bias is added (convolutions followed by batch norm have none).
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        bias: bool,
        /// TensorFlow's "SAME" padding: output size `ceil(in / stride)`, with the padding
        /// `max((out - 1) · stride + k - in, 0)` split `total / 2` before (top, left) and the
        /// rest after, as the EfficientNet and MobileNet weights from TensorFlow expect.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        same_padding: bool,
    },
    /// Batch normalisation over features (`[batch, features]`) or channels
    /// (`[batch, channels, h, w]`), with learned scale (`gamma`) and shift (`beta`).
    BatchNorm {
        /// Weight of the newest batch in the running statistics (PyTorch convention).
        #[serde(default = "default_bn_momentum")]
        momentum: f64,
        /// Added to the variance before the square root.
        #[serde(default = "default_bn_eps")]
        eps: f64,
    },
    /// Max-pooling with a square window of `size` and stride `size`.
    MaxPool2d {
        /// Window size and stride.
        size: usize,
    },
    /// Flattens every dimension but the batch dimension.
    Flatten,
    /// Mean over the spatial dimensions: `[channels, h, w]` to `[channels]`.
    GlobalAvgPool,
    /// A skip connection: adds the output of the earlier layer `from` (or the network's input
    /// when `from` is `"input"`) to this layer's input, which must have the same shape. With it
    /// a layer stack expresses residual networks while parameter names, freezing and
    /// checkpoints stay per layer.
    Add {
        /// Name of the layer whose output is added.
        from: String,
    },
    /// Zeroes each value with probability `rate` while training, scaling the rest by 1/(1-rate).
    Dropout {
        /// Probability of dropping a value, in [0, 1).
        rate: f64,
    },
    /// An activation function.
    Activation {
        /// Which function.
        activation: Activation,
    },
    /// Token embeddings of a BERT-style text encoder. Input: `[seq]` token ids (stored as
    /// numbers of the network's float type), output `[seq, hidden]`: layer-norm of word +
    /// position + token-type-0 embeddings. Positions holding `pad_id` are padding: they are
    /// masked out of attention and pooling in the layers that follow.
    TokenEmbedding {
        /// Rows of the word-embedding table.
        vocab_size: usize,
        /// Width of every embedding.
        hidden: usize,
        /// Rows of the position-embedding table (the longest sequence the model reads).
        max_positions: usize,
        /// Rows of the token-type table (segment A / B); only type 0 is used.
        type_vocab_size: usize,
        /// Token id of `[PAD]`.
        pad_id: u32,
        /// Layer-norm epsilon.
        eps: f64,
    },
    /// One post-norm transformer encoder block, as in BERT: multi-head self-attention over the
    /// non-padding positions, residual, layer norm; then a GELU feed-forward layer, residual,
    /// layer norm. Input and output `[seq, hidden]`.
    TransformerBlock {
        /// Attention heads (`hidden` must be a multiple).
        heads: usize,
        /// Width of the feed-forward layer.
        intermediate: usize,
        /// Layer-norm epsilon.
        eps: f64,
        /// Rank of LoRA adapters on the query and value projections (0: none). With adapters
        /// the projection is `x (W + A B · alpha / rank)`, with `A` random and `B` zero at start.
        #[serde(default, skip_serializing_if = "is_zero")]
        lora_rank: usize,
        /// LoRA scale numerator (`alpha / rank` multiplies the adapter).
        #[serde(
            default = "default_lora_alpha",
            skip_serializing_if = "is_default_lora_alpha"
        )]
        lora_alpha: f64,
    },
    /// Pools `[seq, hidden]` to `[hidden]` over the non-padding positions.
    SequencePool {
        /// How positions are combined.
        mode: Pooling,
    },
    /// Scales every example to unit Euclidean norm over its last dimension.
    L2Normalize,
    /// Embeddings of an example's tabular features (a recommender's user and item columns),
    /// concatenated in field order. Input: `[slots]` numbers per example, each field reading
    /// its own consecutive slots: a categorical field one id, a multi-valued field up to
    /// `slots` ids (`-1` marks an empty slot; the output is the mean of the values' embeddings,
    /// zeros for an empty cell), a numeric field one value passed through. Id 0 of every table
    /// is "unknown", the row a value outside the vocabulary takes.
    FeatureEmbedding {
        /// The fields, in input and output order.
        fields: Vec<FeatureField>,
    },
}

/// One input field of a [`Layer::FeatureEmbedding`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureField {
    /// The column it comes from; the field's table is the parameter `<layer>.<name>`.
    pub name: String,
    /// How the column's cells are read.
    pub kind: FeatureKind,
    /// Rows of the embedding table (the vocabulary with the unknown row 0); 0 for numeric.
    #[serde(default)]
    pub vocab: usize,
    /// Embedding width (1 for numeric).
    pub dim: usize,
    /// Input slots: 1, or the most values a multi-valued cell holds.
    pub slots: usize,
    /// The table starts at zero instead of at random: for id columns (a user or item id as a
    /// feature), so that ids never seen in training add nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero_init: bool,
}

/// How a [`FeatureField`]'s cells are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// One value from a vocabulary, embedded (table initialised N(0, 1), as `nn.Embedding`).
    Categorical,
    /// Several values (`a|b|c`), the mean of their embeddings (table initialised U(±1/√vocab),
    /// as a bias-free linear layer on the normalised multi-hot vector).
    MultiValued,
    /// A number, passed through.
    Numeric,
}

/// How a [`Layer::SequencePool`] combines the positions of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the non-padding positions (sentence-transformers' default).
    Mean,
    /// The first position (`[CLS]`).
    Cls,
    /// Element-wise maximum over the non-padding positions.
    Max,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn is_default_lora_alpha(a: &f64) -> bool {
    *a == default_lora_alpha()
}

fn one() -> usize {
    1
}
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn default_bn_momentum() -> f64 {
    0.1
}
fn default_bn_eps() -> f64 {
    1e-5
}

impl Layer {
    /// A dense layer with `units` outputs.
    pub fn dense(units: usize) -> Self {
        Layer::Dense { units }
    }
    /// A convolution with `filters` outputs, a `kernel_size` square kernel, stride 1 and the
    /// given zero padding.
    pub fn conv2d(filters: usize, kernel_size: usize, padding: usize) -> Self {
        Layer::Conv2d {
            filters,
            kernel_size,
            stride: 1,
            padding,
            groups: 1,
            bias: true,
            same_padding: false,
        }
    }
    /// Batch normalisation with default momentum (0.1) and epsilon (1e-5).
    pub fn batch_norm() -> Self {
        Layer::BatchNorm {
            momentum: default_bn_momentum(),
            eps: default_bn_eps(),
        }
    }
    /// Max-pooling with window and stride `size`.
    pub fn max_pool2d(size: usize) -> Self {
        Layer::MaxPool2d { size }
    }
    /// Dropout with drop probability `rate`.
    pub fn dropout(rate: f64) -> Self {
        Layer::Dropout { rate }
    }
    /// ReLU activation.
    pub fn relu() -> Self {
        Layer::Activation {
            activation: Activation::Relu,
        }
    }
    /// Sigmoid activation.
    pub fn sigmoid() -> Self {
        Layer::Activation {
            activation: Activation::Sigmoid,
        }
    }
    /// Tanh activation.
    pub fn tanh() -> Self {
        Layer::Activation {
            activation: Activation::Tanh,
        }
    }
    /// Softmax activation over the last dimension.
    pub fn softmax() -> Self {
        Layer::Activation {
            activation: Activation::Softmax,
        }
    }
    /// An activation layer.
    pub fn activation(activation: Activation) -> Self {
        Layer::Activation { activation }
    }

    /// The stem used for default layer names (`dense_1`, `conv2d_2`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Dense { .. } => "dense",
            Layer::Conv2d { .. } => "conv2d",
            Layer::BatchNorm { .. } => "batch_norm",
            Layer::MaxPool2d { .. } => "max_pool2d",
            Layer::Flatten => "flatten",
            Layer::GlobalAvgPool => "global_avg_pool",
            Layer::Add { .. } => "add",
            Layer::Dropout { .. } => "dropout",
            Layer::Activation { activation } => match activation {
                Activation::Relu => "relu",
                Activation::Sigmoid => "sigmoid",
                Activation::Tanh => "tanh",
                Activation::Softmax => "softmax",
                Activation::Linear => "linear",
                Activation::Relu6 => "relu6",
                Activation::Silu => "silu",
                Activation::HardSwish => "hard_swish",
            },
            Layer::TokenEmbedding { .. } => "token_embedding",
            Layer::TransformerBlock { .. } => "transformer_block",
            Layer::SequencePool { .. } => "sequence_pool",
            Layer::L2Normalize => "l2_normalize",
            Layer::FeatureEmbedding { .. } => "feature_embedding",
        }
    }

    /// Whether the layer owns trainable parameters.
    pub fn has_params(&self) -> bool {
        matches!(
            self,
            Layer::Dense { .. }
                | Layer::Conv2d { .. }
                | Layer::BatchNorm { .. }
                | Layer::TokenEmbedding { .. }
                | Layer::TransformerBlock { .. }
                | Layer::FeatureEmbedding { .. }
        )
    }
}

/// A layer with its name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedLayer {
    /// Unique name; parameters are called `<name>.<param>`.
    pub name: String,
    /// The layer itself.
    #[serde(flatten)]
    pub layer: Layer,
}

/// A sequential architecture: the input shape (without the batch dimension) and the layers.
/// Serialises to JSON and is stored in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// Shape of one example, e.g. `[20]` for 20 features or `[1, 28, 28]` for a grey image.
    pub input_shape: Vec<usize>,
    /// Layers in order.
    pub layers: Vec<NamedLayer>,
}

impl Architecture {
    /// An empty architecture for inputs of the given shape.
    pub fn new(input_shape: &[usize]) -> Self {
        Self {
            input_shape: input_shape.to_vec(),
            layers: Vec::new(),
        }
    }

    /// Appends a layer with a default name (`<kind>_<n>`).
    pub fn push(&mut self, layer: Layer) {
        let kind = layer.kind();
        let mut n = 1 + self
            .layers
            .iter()
            .filter(|l| l.layer.kind() == kind)
            .count();
        let mut name = format!("{kind}_{n}");
        while self.layers.iter().any(|l| l.name == name) {
            n += 1;
            name = format!("{kind}_{n}");
        }
        self.layers.push(NamedLayer { name, layer });
    }

    /// Appends a layer with an explicit name (must be unique).
    pub fn push_named(&mut self, name: &str, layer: Layer) -> Result<()> {
        if self.layers.iter().any(|l| l.name == name) {
            return Err(Error::Config(format!("duplicate layer name `{name}`")));
        }
        if name.is_empty() || name.contains('.') {
            return Err(Error::Config(format!(
                "layer name `{name}` must be non-empty and contain no `.`"
            )));
        }
        self.layers.push(NamedLayer {
            name: name.to_string(),
            layer,
        });
        Ok(())
    }

    /// Index of the layer named `name`.
    pub fn layer_index(&self, name: &str) -> Result<usize> {
        self.layers
            .iter()
            .position(|l| l.name == name)
            .ok_or_else(|| {
                let known: Vec<_> = self.layers.iter().map(|l| l.name.as_str()).collect();
                Error::Config(format!(
                    "no layer named `{name}` (layers: {})",
                    known.join(", ")
                ))
            })
    }

    /// Index of the last layer that has parameters (the "head").
    pub fn head_index(&self) -> Option<usize> {
        self.layers.iter().rposition(|l| l.layer.has_params())
    }

    /// A multi-layer perceptron: `sizes[0]` inputs, hidden layers `sizes[1..n-1]` each followed
    /// by `activation`, and a linear output layer of `sizes[n-1]` units named `head`.
    pub fn mlp(sizes: &[usize], activation: Activation) -> Result<Self> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::Config(format!(
                "mlp sizes must list at least an input and an output size, all > 0; got {sizes:?}"
            )));
        }
        let mut arch = Self::new(&[sizes[0]]);
        for (i, &units) in sizes[1..].iter().enumerate() {
            if i + 2 == sizes.len() {
                arch.push_named("head", Layer::dense(units))?;
            } else {
                arch.push(Layer::dense(units));
                arch.push(Layer::activation(activation));
            }
        }
        Ok(arch)
    }

    /// The standard few-shot backbone: 4 blocks of [conv 3x3 (`width` filters, padding 1) →
    /// batch-norm → ReLU → max-pool 2], then flatten. With `classes = Some(n)`, a dense head
    /// named `head` with `n` outputs follows (MAML-style); with `None` the network outputs the
    /// embedding (ProtoNet-style).
    pub fn conv4(input_shape: [usize; 3], width: usize, classes: Option<usize>) -> Result<Self> {
        if width == 0 || input_shape.contains(&0) {
            return Err(Error::Config(format!(
                "conv4 needs width > 0 and a non-empty input shape, got width {width}, input {input_shape:?}"
            )));
        }
        let mut arch = Self::new(&input_shape);
        for block in 1..=4 {
            arch.push_named(&format!("conv{block}"), Layer::conv2d(width, 3, 1))?;
            arch.push_named(&format!("bn{block}"), Layer::batch_norm())?;
            arch.push_named(&format!("relu{block}"), Layer::relu())?;
            arch.push_named(&format!("pool{block}"), Layer::max_pool2d(2))?;
        }
        arch.push_named("flatten", Layer::Flatten)?;
        if let Some(n) = classes {
            arch.push_named("head", Layer::dense(n))?;
        }
        Ok(arch)
    }

    /// JSON text of this architecture.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("architecture serialises")
    }

    /// Parses an architecture from JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("invalid architecture JSON: {e}")))
    }
}
