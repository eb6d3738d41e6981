//! EfficientNet-Lite (Lite0 to Lite4): the architecture as a layer stack with skip connections,
//! and the tensor names of the lukemelas / EfficientNet-PyTorch layout its published weights
//! use.
//!
//! Lite is EfficientNet-B0's layout without squeeze-excitation, with ReLU6 everywhere, a fixed
//! 32-channel stem and 1280-channel head, and TensorFlow "SAME" padding; every convolution is
//! bias-free and followed by batch norm (eps 1e-3).

use crate::error::{Error, Result};
use crate::nn::architecture::{Activation, Architecture, Layer};

/// One stage of MBConv blocks: (expansion, kernel, stride of its first block, output
/// channels, blocks) at width and depth 1.
const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
];

/// The shape of an EfficientNet-Lite network.
#[derive(Clone, Debug, PartialEq)]
pub struct EfficientNetLite {
    /// Channel multiplier of the stages (rounded to multiples of 8).
    pub width: f64,
    /// Block-count multiplier of the stages (rounded up; the first and last stage keep theirs).
    pub depth: f64,
    /// Input side the weights were trained at.
    pub resolution: usize,
    /// Stem channels (32 in every published variant).
    pub stem: usize,
    /// Head channels: the pooled feature's width (1280 in every published variant).
    pub head: usize,
    /// Dropout before the classifier while training.
    pub dropout: f64,
    /// TensorFlow "SAME" padding and batch-norm eps 1e-3 (the TensorFlow originals and their
    /// ports: lukemelas, timm's `tf_` models); otherwise PyTorch's symmetric `k / 2` padding
    /// and eps 1e-5 (timm's own `efficientnet_lite*` training).
    pub tf_padding: bool,
}

impl EfficientNetLite {
    /// A published variant by name: `efficientnet_lite0` to `efficientnet_lite4` (dashes,
    /// case and a `tf_` prefix are accepted), with TensorFlow padding (the weights published
    /// under these names are ports of TensorFlow's).
    pub fn named(name: &str) -> Option<Self> {
        let key = name
            .to_ascii_lowercase()
            .replace('-', "_")
            .trim_start_matches("tf_")
            .to_string();
        let (width, depth, resolution, dropout) = match key.as_str() {
            "efficientnet_lite0" => (1.0, 1.0, 224, 0.2),
            "efficientnet_lite1" => (1.0, 1.1, 240, 0.2),
            "efficientnet_lite2" => (1.1, 1.2, 260, 0.3),
            "efficientnet_lite3" => (1.2, 1.4, 280, 0.3),
            "efficientnet_lite4" => (1.4, 1.8, 300, 0.3),
            _ => return None,
        };
        Some(Self {
            width,
            depth,
            resolution,
            stem: 32,
            head: 1280,
            dropout,
            tf_padding: true,
        })
    }

    /// A timm architecture name: `tf_efficientnet_liteN` (TensorFlow padding) or
    /// `efficientnet_liteN` (PyTorch padding, as timm trains it).
    pub fn timm(name: &str) -> Option<Self> {
        let tf = name.starts_with("tf_");
        Self::named(name).map(|spec| Self {
            tf_padding: tf,
            ..spec
        })
    }

    /// Every block's (stage, index in stage, whether it has an expansion convolution), in
    /// block order.
    pub fn block_positions(&self) -> Vec<(usize, usize, bool)> {
        STAGES
            .iter()
            .enumerate()
            .flat_map(|(stage, &(expansion, _, _, _, blocks))| {
                (0..self.blocks(stage, blocks)).map(move |i| (stage, i, expansion != 1))
            })
            .collect()
    }

    /// The lukemelas name of a tensor in timm's layout (`conv_stem.weight`,
    /// `blocks.S.I.conv_pw.weight`, ...), or `None` for a name outside it.
    pub fn lukemelas_name(&self, timm: &str, positions: &[(usize, usize, bool)]) -> Option<String> {
        let (module, field) = timm.rsplit_once('.')?;
        let renamed = match module {
            "conv_stem" => "_conv_stem".to_string(),
            "bn1" => "_bn0".to_string(),
            "conv_head" => "_conv_head".to_string(),
            "bn2" => "_bn1".to_string(),
            "classifier" => "_fc".to_string(),
            _ => {
                let mut parts = module.split('.');
                let (Some("blocks"), Some(stage), Some(index), Some(part), None) = (
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                ) else {
                    return None;
                };
                let (stage, index): (usize, usize) = (stage.parse().ok()?, index.parse().ok()?);
                let block = positions
                    .iter()
                    .position(|&(s, i, _)| (s, i) == (stage, index))?;
                let expands = positions[block].2;
                let ours = match (expands, part) {
                    (true, "conv_pw") => "_expand_conv",
                    (true, "bn1") => "_bn0",
                    (true, "conv_dw") | (false, "conv_dw") => "_depthwise_conv",
                    (true, "bn2") | (false, "bn1") => "_bn1",
                    (true, "conv_pwl") | (false, "conv_pw") => "_project_conv",
                    (true, "bn3") | (false, "bn2") => "_bn2",
                    _ => return None,
                };
                format!("_blocks.{block}.{ours}")
            }
        };
        Some(format!("{renamed}.{field}"))
    }

    /// Output channels of a stage after width scaling (TensorFlow's `round_filters`).
    fn channels(&self, filters: usize) -> usize {
        let scaled = filters as f64 * self.width;
        let rounded = (((scaled + 4.0) as usize) / 8 * 8).max(8);
        if (rounded as f64) < 0.9 * scaled {
            rounded + 8
        } else {
            rounded
        }
    }

    /// Blocks of stage `index` after depth scaling.
    fn blocks(&self, index: usize, blocks: usize) -> usize {
        if index == 0 || index == STAGES.len() - 1 {
            blocks
        } else {
            (blocks as f64 * self.depth).ceil() as usize
        }
    }

    /// The network on `[3, side, side]` images up to the pooled feature (`pool`), followed by
    /// dropout and a dense `classifier` of `classes` outputs when given. Also returns the
    /// lukemelas tensor name of every parameter and running statistic.
    pub fn build(&self, side: usize, classes: Option<usize>) -> Result<(Architecture, NameMap)> {
        if !(self.width > 0.0 && self.depth > 0.0) || self.stem == 0 || self.head == 0 {
            return Err(Error::Config(format!(
                "EfficientNet-Lite needs positive width, depth, stem and head, got {self:?}"
            )));
        }
        let mut arch = Architecture::new(&[3, side, side]);
        let mut names = NameMap::default();
        let tf = self.tf_padding;
        let conv = |filters, kernel_size: usize, stride, groups| Layer::Conv2d {
            filters,
            kernel_size,
            stride,
            padding: if tf { 0 } else { kernel_size / 2 },
            groups,
            bias: false,
            same_padding: tf,
        };
        let norm = Layer::BatchNorm {
            momentum: 0.01,
            eps: if tf { 1e-3 } else { 1e-5 },
        };
        let relu6 = Layer::activation(Activation::Relu6);
        let mut push = |arch: &mut Architecture, ours: &str, layer: Layer, theirs: Option<&str>| {
            let is_norm = matches!(layer, Layer::BatchNorm { .. });
            let is_conv = matches!(layer, Layer::Conv2d { .. });
            arch.push_named(ours, layer)?;
            if let Some(theirs) = theirs {
                if is_conv {
                    names.push(&format!("{ours}.weight"), &format!("{theirs}.weight"));
                } else if is_norm {
                    names.push(&format!("{ours}.gamma"), &format!("{theirs}.weight"));
                    names.push(&format!("{ours}.beta"), &format!("{theirs}.bias"));
                    names.push_buffer(
                        &format!("{ours}.running_mean"),
                        &format!("{theirs}.running_mean"),
                    );
                    names.push_buffer(
                        &format!("{ours}.running_var"),
                        &format!("{theirs}.running_var"),
                    );
                }
            }
            Ok::<(), Error>(())
        };
        push(
            &mut arch,
            "stem_conv",
            conv(self.stem, 3, 2, 1),
            Some("_conv_stem"),
        )?;
        push(&mut arch, "stem_bn", norm.clone(), Some("_bn0"))?;
        push(&mut arch, "stem_act", relu6.clone(), None)?;
        let mut channels = self.stem;
        let mut block = 0;
        // The layer whose output is the next block's input (and its skip connection's source).
        let mut block_input = "stem_act".to_string();
        for (index, &(expansion, kernel, stride, filters, blocks)) in STAGES.iter().enumerate() {
            let out = self.channels(filters);
            for repeat in 0..self.blocks(index, blocks) {
                let stride = if repeat == 0 { stride } else { 1 };
                let ours = format!("block{block}");
                let theirs = format!("_blocks.{block}");
                let hidden = channels * expansion;
                if expansion != 1 {
                    let (c, n) = (format!("{ours}_expand"), format!("{ours}_expand_bn"));
                    push(
                        &mut arch,
                        &c,
                        conv(hidden, 1, 1, 1),
                        Some(&format!("{theirs}._expand_conv")),
                    )?;
                    push(&mut arch, &n, norm.clone(), Some(&format!("{theirs}._bn0")))?;
                    push(
                        &mut arch,
                        &format!("{ours}_expand_act"),
                        relu6.clone(),
                        None,
                    )?;
                }
                push(
                    &mut arch,
                    &format!("{ours}_depthwise"),
                    conv(hidden, kernel, stride, hidden),
                    Some(&format!("{theirs}._depthwise_conv")),
                )?;
                push(
                    &mut arch,
                    &format!("{ours}_depthwise_bn"),
                    norm.clone(),
                    Some(&format!("{theirs}._bn1")),
                )?;
                push(
                    &mut arch,
                    &format!("{ours}_depthwise_act"),
                    relu6.clone(),
                    None,
                )?;
                push(
                    &mut arch,
                    &format!("{ours}_project"),
                    conv(out, 1, 1, 1),
                    Some(&format!("{theirs}._project_conv")),
                )?;
                let project_bn = format!("{ours}_project_bn");
                push(
                    &mut arch,
                    &project_bn,
                    norm.clone(),
                    Some(&format!("{theirs}._bn2")),
                )?;
                block_input = if stride == 1 && channels == out {
                    let add = format!("{ours}_add");
                    let skip = Layer::Add { from: block_input };
                    push(&mut arch, &add, skip, None)?;
                    add
                } else {
                    project_bn
                };
                channels = out;
                block += 1;
            }
        }
        push(
            &mut arch,
            "head_conv",
            conv(self.head, 1, 1, 1),
            Some("_conv_head"),
        )?;
        push(&mut arch, "head_bn", norm, Some("_bn1"))?;
        push(&mut arch, "head_act", relu6, None)?;
        push(&mut arch, "pool", Layer::GlobalAvgPool, None)?;
        if let Some(classes) = classes {
            push(&mut arch, "dropout", Layer::dropout(self.dropout), None)?;
            arch.push_named("classifier", Layer::dense(classes))?;
            names.push_transposed("classifier.weight", "_fc.weight");
            names.push("classifier.bias", "_fc.bias");
        }
        Ok((arch, names))
    }
}

/// How a checkpoint's tensor names map to a network's parameters and running statistics.
#[derive(Clone, Debug, Default)]
pub struct NameMap {
    /// (our parameter, their tensor, whether the tensor is stored transposed).
    pub params: Vec<(String, String, bool)>,
    /// (our running statistic, their tensor).
    pub buffers: Vec<(String, String)>,
}

impl NameMap {
    fn push(&mut self, ours: &str, theirs: &str) {
        self.params.push((ours.into(), theirs.into(), false));
    }
    fn push_transposed(&mut self, ours: &str, theirs: &str) {
        self.params.push((ours.into(), theirs.into(), true));
    }
    fn push_buffer(&mut self, ours: &str, theirs: &str) {
        self.buffers.push((ours.into(), theirs.into()));
    }
}
