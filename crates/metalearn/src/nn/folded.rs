//! Inference of convolutional networks on the CPU with batch norm folded into the
//! convolutions: a [`FoldedNetwork`] is compiled once from a network, its parameters and its
//! running statistics, then runs channels-last through the kernels of
//! `metalearn_kernels::mobile` (a convolution, its batch norm, its activation and a skip
//! connection in one pass). No gradients flow: this serves feature extraction and prediction;
//! the reference path (`nn::layers`) stays the truth it is tested against.

use candle_core::{DType, Device, Tensor};
use metalearn_kernels::mobile::{self, Activation as Act, Nhwc};

use crate::error::{Error, Result};
use crate::nn::architecture::{Activation, Layer};
use crate::nn::network::Network;
use crate::nn::ops;
use crate::nn::params::ParamSet;

/// How a fused convolution runs.
#[derive(Clone, Debug)]
enum ConvKind {
    /// 1x1, stride 1, no padding: one matrix product.
    Pointwise,
    /// One kernel per channel.
    Depthwise,
    /// Every input channel to every output channel.
    Dense,
}

/// One step of a folded network.
#[derive(Clone, Debug)]
enum Step {
    /// A convolution with its batch norm folded in, its activation, and optionally the saved
    /// activation `residual` added before the activation.
    Conv {
        kind: ConvKind,
        /// `[c_in, c_out]` (pointwise), `[k·k, c]` (depthwise) or `[k·k·c_in, c_out]`.
        weight: Vec<f32>,
        bias: Vec<f32>,
        kernel: usize,
        stride: usize,
        same_padding: bool,
        padding: usize,
        activation: Act,
        residual: Option<usize>,
    },
    /// Global average pooling to `[n, c]`.
    Pool,
    /// A dense layer on pooled features: `weight` `[in, out]`.
    Dense {
        weight: Vec<f32>,
        bias: Vec<f32>,
        activation: Act,
    },
}

/// A network compiled for fast CPU inference; see the module documentation.
#[derive(Clone, Debug)]
pub struct FoldedNetwork {
    input: Vec<usize>,
    /// Each step, and the slot its output is kept in for a later skip connection.
    steps: Vec<(Step, Option<usize>)>,
    slots: usize,
}

impl FoldedNetwork {
    /// Compiles the first `layers` layers of `network` in inference mode (batch norm with
    /// the running statistics `stats`), or `None` when a layer has no folded form (then the
    /// reference path runs them).
    pub fn compile(
        network: &Network,
        params: &ParamSet,
        stats: &ParamSet,
        layers: usize,
    ) -> Result<Option<Self>> {
        let arch = network.architecture();
        let layers = &arch.layers[..layers.min(arch.layers.len())];
        if arch.input_shape.len() != 3 {
            return Ok(None);
        }
        let sources: Vec<&str> = layers
            .iter()
            .filter_map(|l| match &l.layer {
                Layer::Add { from } => Some(from.as_str()),
                _ => None,
            })
            .collect();
        if sources.contains(&"input") {
            return Ok(None);
        }
        let values = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let mut steps: Vec<(Step, Option<usize>)> = Vec::new();
        let mut slot_of: Vec<String> = Vec::new();
        let mut spatial = true;
        let mut i = 0;
        while i < layers.len() {
            let named = &layers[i];
            let p = |n: &str| params.get(&format!("{}.{n}", named.name));
            let (step, last) = match &named.layer {
                Layer::Conv2d {
                    filters,
                    kernel_size,
                    stride,
                    padding,
                    groups,
                    bias,
                    same_padding,
                } => {
                    let w = p("weight")?;
                    let (o, cg) = (w.dim(0)?, w.dim(1)?);
                    let cin = cg * groups;
                    let kind = if *groups == 1 {
                        if *kernel_size == 1 && *stride == 1 && (*padding == 0 || *same_padding) {
                            ConvKind::Pointwise
                        } else {
                            ConvKind::Dense
                        }
                    } else if *groups == cin && *filters == cin {
                        ConvKind::Depthwise
                    } else {
                        return Ok(None);
                    };
                    let mut scale = vec![1f32; o];
                    let mut shift = if *bias {
                        values(p("bias")?)?
                    } else {
                        vec![0f32; o]
                    };
                    let mut last = i;
                    // A batch norm right after the convolution is folded into it.
                    if let Some(Layer::BatchNorm { eps, .. }) = layers.get(i + 1).map(|l| &l.layer)
                    {
                        let bn = &layers[i + 1].name;
                        let get = |set: &ParamSet, n: &str| values(set.get(&format!("{bn}.{n}"))?);
                        let (gamma, beta) = (get(params, "gamma")?, get(params, "beta")?);
                        let (mean, var) = (get(stats, "running_mean")?, get(stats, "running_var")?);
                        for c in 0..o {
                            let s = gamma[c] / (var[c] + *eps as f32).sqrt();
                            shift[c] = (shift[c] - mean[c]) * s + beta[c];
                            scale[c] = s;
                        }
                        last = i + 1;
                    }
                    // A skip connection right after is added before the activation.
                    let mut residual = None;
                    if let Some(Layer::Add { from }) = layers.get(last + 1).map(|l| &l.layer) {
                        let Some(slot) = slot_of.iter().position(|s| s == from) else {
                            return Ok(None);
                        };
                        residual = Some(slot);
                        last += 1;
                    }
                    let mut activation = Act::None;
                    if let Some(act) = layers
                        .get(last + 1)
                        .and_then(|l| fused_activation(&l.layer))
                    {
                        activation = act;
                        last += 1;
                    }
                    if residual.is_some()
                        && activation != Act::None
                        && !matches!(kind, ConvKind::Pointwise)
                    {
                        // The kernels apply the activation before a late skip could be added.
                        return Ok(None);
                    }
                    let raw = values(w)?;
                    let k = *kernel_size;
                    let weight = match kind {
                        ConvKind::Pointwise => {
                            let mut t = vec![0f32; cin * o];
                            for oc in 0..o {
                                for ic in 0..cin {
                                    t[ic * o + oc] = raw[oc * cin + ic] * scale[oc];
                                }
                            }
                            t
                        }
                        ConvKind::Depthwise => {
                            let mut t = vec![0f32; k * k * o];
                            for c in 0..o {
                                for tap in 0..k * k {
                                    t[tap * o + c] = raw[c * k * k + tap] * scale[c];
                                }
                            }
                            t
                        }
                        ConvKind::Dense => {
                            let mut t = vec![0f32; k * k * cin * o];
                            for oc in 0..o {
                                for ic in 0..cin {
                                    for tap in 0..k * k {
                                        t[(tap * cin + ic) * o + oc] =
                                            raw[(oc * cin + ic) * k * k + tap] * scale[oc];
                                    }
                                }
                            }
                            t
                        }
                    };
                    let step = Step::Conv {
                        kind,
                        weight,
                        bias: shift,
                        kernel: k,
                        stride: *stride,
                        same_padding: *same_padding,
                        padding: *padding,
                        activation,
                        residual,
                    };
                    (step, last)
                }
                Layer::GlobalAvgPool if spatial => {
                    spatial = false;
                    (Step::Pool, i)
                }
                Layer::Dropout { .. } | Layer::Flatten if !spatial => {
                    i += 1;
                    continue;
                }
                Layer::Dense { .. } if !spatial => {
                    let raw = values(p("weight")?)?;
                    let mut last = i;
                    let mut activation = Act::None;
                    if let Some(act) = layers.get(i + 1).and_then(|l| fused_activation(&l.layer)) {
                        activation = act;
                        last += 1;
                    }
                    let step = Step::Dense {
                        weight: raw,
                        bias: values(p("bias")?)?,
                        activation,
                    };
                    (step, last)
                }
                _ => return Ok(None),
            };
            // The output of this step is the output of layer `last`: keep it if a skip
            // connection reads it; a source inside a fused step cannot be kept.
            let inside = layers[i..last]
                .iter()
                .any(|l| sources.contains(&l.name.as_str()));
            if inside {
                return Ok(None);
            }
            let slot = sources.contains(&layers[last].name.as_str()).then(|| {
                slot_of.push(layers[last].name.clone());
                slot_of.len() - 1
            });
            steps.push((step, slot));
            i = last + 1;
        }
        Ok(Some(Self {
            input: arch.input_shape.clone(),
            steps,
            slots: slot_of.len(),
        }))
    }

    /// Runs the compiled layers on `x` (`[n, c, h, w]`); returns `[n, features]` after
    /// pooling, or the `[n, c, h, w]` map when the compiled layers end before it.
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if [c, h, w] != self.input[..] {
            return Err(Error::Shape(format!(
                "input of shape {:?} does not fit images of shape {:?}",
                x.dims(),
                self.input
            )));
        }
        let device = x.device().clone();
        let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut map = Some(Nhwc::from_nchw(&values, n, c, h, w));
        let mut flat: Option<(Vec<f32>, usize)> = None;
        let mut saved: Vec<Option<Nhwc>> = vec![None; self.slots];
        for (step, slot) in &self.steps {
            match step {
                Step::Conv {
                    kind,
                    weight,
                    bias,
                    kernel,
                    stride,
                    same_padding,
                    padding,
                    activation,
                    residual,
                } => {
                    let x = map.as_ref().expect("convolutions run on maps");
                    let pads = if *same_padding {
                        let (t, b) = ops::same_padding(x.h, *kernel, *stride);
                        let (l, r) = ops::same_padding(x.w, *kernel, *stride);
                        [t, b, l, r]
                    } else {
                        [*padding; 4]
                    };
                    let residual = residual.and_then(|s| saved[s].as_ref());
                    let out = match kind {
                        ConvKind::Pointwise => {
                            mobile::pointwise(x, weight, bias, *activation, residual)
                        }
                        ConvKind::Depthwise => {
                            mobile::depthwise(x, weight, bias, *kernel, *stride, pads, *activation)
                        }
                        ConvKind::Dense => {
                            mobile::dense(x, weight, bias, *kernel, *stride, pads, *activation)
                        }
                    };
                    let out = match (kind, residual) {
                        // Depthwise and dense convolutions take their skip after the fact.
                        (ConvKind::Pointwise, _) | (_, None) => out,
                        (_, Some(r)) => add_then(out, r, *activation),
                    };
                    if let Some(s) = slot {
                        saved[*s] = Some(out.clone());
                    }
                    map = Some(out);
                }
                Step::Pool => {
                    let x = map.take().expect("pooling runs on maps");
                    flat = Some((mobile::global_avg_pool(&x), x.c));
                }
                Step::Dense {
                    weight,
                    bias,
                    activation,
                } => {
                    let (x, width) = flat.take().expect("dense layers run on features");
                    let units = bias.len();
                    let mut out = vec![0f32; n * units];
                    for (row, o) in x.chunks(width).zip(out.chunks_mut(units)) {
                        o.copy_from_slice(bias);
                        for (i, &v) in row.iter().enumerate() {
                            let wrow = &weight[i * units..(i + 1) * units];
                            for (acc, &wv) in o.iter_mut().zip(wrow) {
                                *acc += v * wv;
                            }
                        }
                        let act = *activation;
                        o.iter_mut().for_each(|v| *v = apply(act, *v));
                    }
                    flat = Some((out, units));
                }
            }
        }
        to_tensor(map, flat, n, &device)
    }
}

fn to_tensor(
    map: Option<Nhwc>,
    flat: Option<(Vec<f32>, usize)>,
    n: usize,
    device: &Device,
) -> Result<Tensor> {
    if let Some((values, width)) = flat {
        return Ok(Tensor::from_vec(values, (n, width), device)?);
    }
    let m = map.expect("a map or features");
    let t = Tensor::from_vec(m.data, (m.n, m.h, m.w, m.c), device)?;
    Ok(t.permute((0, 3, 1, 2))?.contiguous()?)
}

/// The residual added to a convolution's output whose activation already ran: only valid
/// without activation, which `compile` guarantees by fusing the add before it.
fn add_then(mut out: Nhwc, residual: &Nhwc, activation: Act) -> Nhwc {
    debug_assert_eq!(activation, Act::None);
    for (o, r) in out.data.iter_mut().zip(&residual.data) {
        *o += r;
    }
    out
}

fn apply(act: Act, v: f32) -> f32 {
    match act {
        Act::None => v,
        Act::Relu => v.max(0.0),
        Act::Relu6 => v.clamp(0.0, 6.0),
    }
}

fn fused_activation(layer: &Layer) -> Option<Act> {
    match layer {
        Layer::Activation {
            activation: Activation::Relu,
        } => Some(Act::Relu),
        Layer::Activation {
            activation: Activation::Relu6,
        } => Some(Act::Relu6),
        Layer::Activation {
            activation: Activation::Linear,
        } => Some(Act::None),
        _ => None,
    }
}
