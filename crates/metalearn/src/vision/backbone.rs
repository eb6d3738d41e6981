//! A pre-trained image backbone: the network, its weights and running statistics, and the
//! preprocessing its weights expect. [`Backbone::load`] reads a weights file as people have it.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::folded::FoldedNetwork;
use crate::nn::network::{ForwardCtx, Network};
use crate::nn::params::ParamSet;
use crate::vision::efficientnet::{EfficientNetLite, NameMap};

/// How an image becomes the network's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square input.
    pub size: usize,
    /// A photo is first resized so that its shorter side is this long, then centre-cropped to
    /// `size` (`size / 0.875` for the ImageNet models).
    pub resize: usize,
    /// Per-channel mean subtracted from RGB values scaled to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation the centred values are divided by.
    pub std: [f32; 3],
}

impl Preprocess {
    /// EfficientNet-Lite's input scaling, `(v - 127) / 128` for 8-bit values, at `size`.
    pub fn efficientnet_lite(size: usize) -> Self {
        Self {
            size,
            resize: (size as f64 / 0.875).round() as usize,
            mean: [127.0 / 255.0; 3],
            std: [128.0 / 255.0; 3],
        }
    }

    /// The network input of one 8-bit value `v` of channel `c`.
    pub fn normalise(&self, v: f32, c: usize) -> f32 {
        (v / 255.0 - self.mean[c]) / self.std[c]
    }
}

/// The architectures [`Backbone::load`] knows, for error messages.
pub const KNOWN_ARCHITECTURES: &str =
    "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, \
efficientnet_lite3, efficientnet_lite4";

/// A pre-trained image network ready to embed or classify images.
#[derive(Clone, Debug)]
pub struct Backbone {
    /// The architecture's name, e.g. `efficientnet_lite0`.
    pub name: String,
    /// The network: up to the pooled feature (layer `pool`), then the classifier if the
    /// weights have one.
    pub network: Network,
    /// Trainable parameters.
    pub params: ParamSet,
    /// Batch-norm running statistics.
    pub stats: ParamSet,
    /// What the weights expect of an image.
    pub preprocess: Preprocess,
    /// Layers up to and including the pooling: their output is the feature.
    pub feature_layers: usize,
    /// The network compiled for CPU inference, up to the features and whole (made on first
    /// use; `None` inside when a layer has no folded form).
    folded: [OnceLock<Option<FoldedNetwork>>; 2],
}

impl Backbone {
    /// Reads a weights file (`.safetensors`, or a PyTorch `.pth` / `.pt` / `.bin`, read
    /// without running code) of the architecture `architecture` (see
    /// [`KNOWN_ARCHITECTURES`]), in the lukemelas EfficientNet-PyTorch tensor names. Tensors
    /// missing or of the wrong shape are an error naming the tensor, the expected and the
    /// found shape.
    pub fn load(path: &Path, architecture: &str, dtype: DType) -> Result<Self> {
        let spec = EfficientNetLite::named(architecture).ok_or_else(|| {
            Error::Config(format!(
                "unknown architecture `{architecture}` for {}: use one of {KNOWN_ARCHITECTURES}",
                path.display()
            ))
        })?;
        let tensors = read_weights(path)?;
        Self::from_tensors(tensors, path, architecture, &spec, dtype)
    }

    /// Builds the backbone `spec` (named `name`) from named tensors in the lukemelas layout;
    /// `source` names where they came from in error messages. A classifier follows the
    /// pooling when the tensors hold `_fc.weight`.
    pub fn from_tensors(
        tensors: Vec<(String, Tensor)>,
        source: &Path,
        name: &str,
        spec: &EfficientNetLite,
        dtype: DType,
    ) -> Result<Self> {
        let find = |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, t)| t);
        let classes = match find("_fc.weight") {
            Some(t) if t.rank() == 2 => Some(t.dim(0)?),
            Some(t) => {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor `_fc.weight` has shape {:?}; the classifier needs [classes, {}]",
                    source.display(),
                    t.dims(),
                    spec.head
                )))
            }
            None => None,
        };
        let (arch, names) = spec.build(spec.resolution, classes)?;
        let network = Network::build(&arch)?;
        let lookup = |ours: &str, theirs: &str, transposed: bool, shape: &[usize]| {
            let t = find(theirs).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: tensor `{theirs}` of shape {shape:?} is missing; is this a {name} \
                     checkpoint in the lukemelas EfficientNet-PyTorch names?",
                    source.display()
                ))
            })?;
            // Shapes in the file's layout (a transposed tensor is stored [out, in]).
            let expected: Vec<usize> = if transposed {
                shape.iter().rev().copied().collect()
            } else {
                shape.to_vec()
            };
            if t.dims() != expected.as_slice() {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor `{theirs}` has shape {:?}, {name} expects {expected:?} (for `{ours}`)",
                    source.display(),
                    t.dims()
                )));
            }
            let t = if transposed { t.t()? } else { t.clone() };
            Ok(t.to_dtype(dtype)?.contiguous()?)
        };
        let mut params = ParamSet::new();
        for spec in network.param_specs() {
            let (ours, theirs, transposed) = mapped(&names, &spec.name)?;
            params.insert(ours, lookup(ours, theirs, transposed, &spec.shape)?)?;
        }
        let mut stats = ParamSet::new();
        for spec in network.buffer_specs() {
            let (ours, theirs) = names
                .buffers
                .iter()
                .find(|(o, _)| *o == spec.name)
                .ok_or_else(|| Error::Checkpoint(format!("no source for `{}`", spec.name)))?;
            stats.insert(ours.clone(), lookup(ours, theirs, false, &spec.shape)?)?;
        }
        let known = |n: &str| {
            names.params.iter().any(|(_, t, _)| t == n)
                || names.buffers.iter().any(|(_, t)| t == n)
                || n.ends_with("num_batches_tracked")
        };
        let unused: Vec<&str> = tensors
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !known(n))
            .collect();
        if !unused.is_empty() {
            return Err(Error::Checkpoint(format!(
                "{}: {} tensors do not belong to {name} (first: `{}`); is this the right \
                 architecture?",
                source.display(),
                unused.len(),
                unused[0]
            )));
        }
        Self::new(
            name,
            network,
            params,
            stats,
            Preprocess::efficientnet_lite(spec.resolution),
        )
    }

    /// A backbone from its parts; the network must have a layer named `pool` whose output is
    /// the feature.
    pub fn new(
        name: &str,
        network: Network,
        params: ParamSet,
        stats: ParamSet,
        preprocess: Preprocess,
    ) -> Result<Self> {
        let feature_layers = network.architecture().layer_index("pool")? + 1;
        Ok(Self {
            name: name.to_string(),
            network,
            params,
            stats,
            preprocess,
            feature_layers,
            folded: Default::default(),
        })
    }

    /// Width of the pooled feature.
    pub fn feature_dim(&self) -> usize {
        self.network.layer_shapes()[self.feature_layers - 1][0]
    }

    /// Classes of the classifier the weights came with, if any.
    pub fn classes(&self) -> Option<usize> {
        (self.network.architecture().layers.len() > self.feature_layers)
            .then(|| self.network.output_shape()[0])
    }

    /// Pooled features (`[n, feature_dim]`) of preprocessed images `[n, 3, size, size]`, in
    /// inference mode.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        self.run(images, 0, self.feature_layers)
    }

    /// Class scores of preprocessed images, when the weights have a classifier.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        self.run(images, 1, self.network.architecture().layers.len())
    }

    /// The first `layers` layers in inference mode: folded on the CPU when the kernels are
    /// on, on the reference path otherwise.
    fn run(&self, images: &Tensor, which: usize, layers: usize) -> Result<Tensor> {
        if crate::kernels::enabled() && images.device().is_cpu() {
            let folded = self.folded[which].get_or_init(|| {
                FoldedNetwork::compile(&self.network, &self.params, &self.stats, layers)
                    .ok()
                    .flatten()
            });
            if let Some(folded) = folded {
                return folded
                    .run(images)?
                    .to_dtype(images.dtype())
                    .map_err(Into::into);
            }
        }
        let mut ctx = ForwardCtx::eval(Some(&self.stats)).first_order();
        self.network
            .forward_layers(&self.params, images, &mut ctx, layers)
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.params
            .tensors()
            .first()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu)
    }
}

fn mapped<'a>(names: &'a NameMap, ours: &str) -> Result<(&'a str, &'a str, bool)> {
    names
        .params
        .iter()
        .find(|(o, _, _)| o == ours)
        .map(|(o, t, tr)| (o.as_str(), t.as_str(), *tr))
        .ok_or_else(|| Error::Checkpoint(format!("no source tensor for parameter `{ours}`")))
}

/// Every tensor of a weights file: safetensors by content, else a PyTorch file.
pub fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut head = [0u8; 8];
    {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
        if n < 8 {
            return Err(Error::Checkpoint(format!(
                "{}: {n} bytes is too short to be a weights file",
                path.display()
            )));
        }
    }
    let is_zip = head.starts_with(b"PK");
    let is_pickle = head[0] == 0x80;
    if is_zip || is_pickle {
        return crate::vision::pth::read_pth(path);
    }
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::Checkpoint(format!(
            "{}: neither a safetensors file nor a PyTorch .pth ({e})",
            path.display()
        ))
    })?;
    // safetensors keeps no order; sort for determinism.
    let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}
