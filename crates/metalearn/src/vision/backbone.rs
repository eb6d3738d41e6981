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
    /// How photos are resized: `bilinear` or `bicubic` (antialiased when shrinking, as PIL).
    #[serde(default = "bilinear")]
    pub interpolation: String,
}

fn bilinear() -> String {
    "bilinear".into()
}

impl Preprocess {
    /// EfficientNet-Lite's input scaling, `(v - 127) / 128` for 8-bit values, at `size`.
    pub fn efficientnet_lite(size: usize) -> Self {
        Self {
            size,
            resize: (size as f64 / 0.875).round() as usize,
            mean: [127.0 / 255.0; 3],
            std: [128.0 / 255.0; 3],
            interpolation: bilinear(),
        }
    }

    /// The preprocessing a timm `pretrained_cfg` describes (`input_size`, `crop_pct`, `mean`,
    /// `std`, `interpolation`); missing fields keep `self`'s values.
    pub fn with_timm_config(mut self, cfg: &serde_json::Value) -> Result<Self> {
        let bad = |field: &str| {
            Error::Config(format!(
                "pretrained_cfg.{field} is not what timm writes there; fix or remove it"
            ))
        };
        if let Some(size) = cfg.get("input_size") {
            let side = size
                .get(1)
                .and_then(|v| v.as_u64())
                .filter(|&s| s > 0)
                .ok_or_else(|| bad("input_size"))?;
            self.size = side as usize;
        }
        let crop = match cfg.get("crop_pct") {
            Some(v) => v
                .as_f64()
                .filter(|c| *c > 0.0 && *c <= 1.0)
                .ok_or_else(|| bad("crop_pct"))?,
            None => 0.875,
        };
        self.resize = (self.size as f64 / crop).floor() as usize;
        for (field, target) in [("mean", &mut self.mean), ("std", &mut self.std)] {
            if let Some(v) = cfg.get(field) {
                let values: Vec<f32> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_f64())
                            .map(|x| x as f32)
                            .collect()
                    })
                    .unwrap_or_default();
                if values.len() != 3 || (field == "std" && values.iter().any(|&x| x <= 0.0)) {
                    return Err(bad(field));
                }
                target.copy_from_slice(&values);
            }
        }
        if let Some(v) = cfg.get("interpolation") {
            let name = v.as_str().ok_or_else(|| bad("interpolation"))?;
            if !matches!(name, "bilinear" | "bicubic") {
                return Err(Error::Config(format!(
                    "pretrained_cfg.interpolation `{name}` is not supported: use bilinear or bicubic"
                )));
            }
            self.interpolation = name.to_string();
        }
        Ok(self)
    }

    /// The network input of one 8-bit value `v` of channel `c`.
    pub fn normalise(&self, v: f32, c: usize) -> f32 {
        (v / 255.0 - self.mean[c]) / self.std[c]
    }
}

/// The weights file of a model folder, in order of preference.
const WEIGHT_FILES: [&str; 3] = ["model.safetensors", "pytorch_model.bin", "model.pth"];

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
    /// Reads a backbone: a weights file (`.safetensors`, or a PyTorch `.pth` / `.pt` /
    /// `.bin`, read without running code) of the architecture `architecture` (see
    /// [`KNOWN_ARCHITECTURES`]; by default the one the file's or its folder's name holds), a timm folder (`config.json` with `architecture`,
    /// `pretrained_cfg` and optionally `model_args`, beside `model.safetensors` or
    /// `pytorch_model.bin`), or `hf:OWNER/MODEL[@REVISION]`: such a folder from the Hugging
    /// Face Hub, through its standard cache (see [`crate::hub`]). Tensors may be in the lukemelas EfficientNet-PyTorch names or in
    /// timm's; missing or misshapen tensors are an error naming the tensor, the expected and
    /// the found shape.
    pub fn load(path: &Path, architecture: Option<&str>, dtype: DType) -> Result<Self> {
        if let Some(name) = path.to_str().and_then(crate::hub::HubName::parse) {
            let name = name?;
            let options = crate::hub::HubOptions::from_env();
            let missing = |file: &str| {
                let why = crate::hub::offline_reason(&options).unwrap_or_else(|| {
                    "a timm model on the Hub has config.json and model.safetensors; this \
                     repository (or revision) lacks it"
                        .to_string()
                });
                Error::Data(format!("{name}: {file} not found: {why}"))
            };
            let dir = crate::hub::download_files(
                &name,
                &["config.json", "model.safetensors"],
                &[],
                &options,
                &missing,
            )?;
            return Self::load_timm_folder(&dir, architecture, dtype);
        }
        if path.is_dir() {
            return Self::load_timm_folder(path, architecture, dtype);
        }
        // A bare file: the architecture given, or the one its name (or its folder's) holds.
        let inferred = architecture
            .is_none()
            .then(|| named_in_path(path))
            .flatten();
        let architecture = architecture.or(inferred.as_deref()).ok_or_else(|| {
            Error::Config(format!(
                "{}: a weights file without config.json needs its architecture (--architecture \
                 NAME): one of {KNOWN_ARCHITECTURES}",
                path.display()
            ))
        })?;
        let spec =
            EfficientNetLite::named(architecture).ok_or_else(|| unknown(architecture, path))?;
        let tensors = read_weights(path)?;
        Self::from_tensors(tensors, path, architecture, &spec, dtype)
    }

    /// A timm model folder; see [`Backbone::load`].
    fn load_timm_folder(dir: &Path, architecture: Option<&str>, dtype: DType) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            // A folder holding only the weights: as the bare file, with its architecture.
            let weights = WEIGHT_FILES
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.exists());
            if let Some(weights) = &weights {
                return Self::load(weights, architecture, dtype);
            }
            return Err(Error::Config(format!(
                "{}: no config.json; give the weights file itself with --architecture NAME, or a \
                 timm folder (config.json beside model.safetensors)",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::Config(format!("{}: line {}: {e}", config_path.display(), e.line()))
        })?;
        let named = config.get("architecture").and_then(|v| v.as_str());
        let name = architecture.or(named).ok_or_else(|| {
            Error::Config(format!(
                "{}: no `architecture`; give --architecture NAME",
                config_path.display()
            ))
        })?;
        let mut spec = EfficientNetLite::timm(name).ok_or_else(|| unknown(name, &config_path))?;
        let args = config.get("model_args");
        let number = |key: &str| args.and_then(|a| a.get(key)).and_then(|v| v.as_f64());
        if let Some(width) = number("channel_multiplier") {
            spec.width = width;
        }
        if let Some(depth) = number("depth_multiplier") {
            spec.depth = depth;
        }
        if let Some(stem) = number("stem_size") {
            spec.stem = stem as usize;
        }
        if let Some(head) = config.get("num_features").and_then(|v| v.as_u64()) {
            spec.head = head as usize;
        }
        let base = if spec.tf_padding {
            Preprocess::efficientnet_lite(spec.resolution)
        } else {
            // timm's own EfficientNet-Lite training normalises with ImageNet's statistics.
            Preprocess {
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
                ..Preprocess::efficientnet_lite(spec.resolution)
            }
        };
        let preprocess = match config.get("pretrained_cfg") {
            Some(cfg) => base
                .with_timm_config(cfg)
                .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?,
            None => base,
        };
        spec.resolution = preprocess.size;
        let weights = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: no model.safetensors or pytorch_model.bin beside config.json",
                    dir.display()
                ))
            })?;
        let tensors = read_weights(&weights)?;
        let mut backbone = Self::from_tensors(tensors, &weights, name, &spec, dtype)?;
        backbone.preprocess = preprocess;
        Ok(backbone)
    }

    /// Builds the backbone `spec` (named `name`) from named tensors in the lukemelas or the
    /// timm layout; `source` names where they came from in error messages. A classifier
    /// follows the pooling when the tensors hold one.
    pub fn from_tensors(
        tensors: Vec<(String, Tensor)>,
        source: &Path,
        name: &str,
        spec: &EfficientNetLite,
        dtype: DType,
    ) -> Result<Self> {
        let tensors = to_lukemelas_names(tensors, spec, source)?;
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

/// The published architecture a weights file's name (or else its folder's) names, e.g.
/// `efficientnet-lite0-57934424.pth` or `efficientnet-lite0/model.safetensors`.
fn named_in_path(path: &Path) -> Option<String> {
    let named = |p: Option<&Path>| {
        let name = p
            .and_then(|p| p.file_name())
            .map(|f| f.to_string_lossy().to_ascii_lowercase().replace('-', "_"))
            .unwrap_or_default();
        (0..=4)
            .map(|i| format!("efficientnet_lite{i}"))
            .find(|arch| name.contains(arch.as_str()))
    };
    named(Some(path)).or_else(|| named(path.parent()))
}

fn unknown(architecture: &str, source: &Path) -> Error {
    Error::Config(format!(
        "unknown architecture `{architecture}` for {}: use one of {KNOWN_ARCHITECTURES}",
        source.display()
    ))
}

/// Tensors in timm's EfficientNet layout renamed to lukemelas' (others are returned as they
/// are).
fn to_lukemelas_names(
    tensors: Vec<(String, Tensor)>,
    spec: &EfficientNetLite,
    source: &Path,
) -> Result<Vec<(String, Tensor)>> {
    if !tensors.iter().any(|(n, _)| n == "conv_stem.weight") {
        return Ok(tensors);
    }
    let positions = spec.block_positions();
    tensors
        .into_iter()
        .map(|(n, t)| match spec.lukemelas_name(&n, &positions) {
            Some(renamed) => Ok((renamed, t)),
            None => Err(Error::Checkpoint(format!(
                "{}: tensor `{n}` has no place in {} blocks of timm's EfficientNet-Lite layout; \
                 is this the right architecture?",
                source.display(),
                positions.len()
            ))),
        })
        .collect()
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
