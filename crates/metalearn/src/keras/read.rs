//! Reading Keras files (see the module documentation of `metalearn::keras`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::names::snake_case;
use crate::error::{Error, Result};
use crate::nn::architecture::{Activation, Architecture, Layer};
use crate::nn::params::ParamSet;
use crate::sequential::Sequential;

/// The Keras layer classes metalearn reads.
pub const SUPPORTED_LAYERS: &[&str] = &[
    "InputLayer",
    "Dense",
    "Conv2D",
    "BatchNormalization",
    "MaxPooling2D",
    "Flatten",
    "Dropout",
    "Activation",
    "ReLU",
    "Softmax",
];

/// One layer of a Keras model config.
#[derive(Clone, Debug)]
struct KerasLayer {
    class: String,
    name: String,
    config: Value,
}

/// A Keras `Sequential` config: its layers (without the InputLayer) and input shape.
#[derive(Clone, Debug)]
struct KerasModel {
    /// Keras order: `[features]` or `[height, width, channels]`.
    input_shape: Vec<usize>,
    layers: Vec<KerasLayer>,
}

/// Where the weights of each layer are: tensors in Keras layout, by layer index.
type LayerWeights = Vec<Vec<(Vec<usize>, Vec<f32>)>>;

impl Sequential {
    /// Reads a Keras model: a `.keras` file or a full-model legacy `.h5` file (architecture and
    /// weights). For weights-only files (`.weights.h5`, legacy `save_weights` `.h5`), use
    /// [`crate::keras::import`] with the architecture's file.
    pub fn from_keras(path: impl AsRef<Path>) -> Result<Sequential> {
        import(path.as_ref(), None)
    }
}

/// Reads a Keras model from `path`; `architecture` names a `.keras` file or a metalearn
/// checkpoint with the architecture, for files that hold weights only.
pub fn import(path: &Path, architecture: Option<&Path>) -> Result<Sequential> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (model, weights) = if bytes.starts_with(b"PK") {
        let (config, h5) = read_keras_zip(&bytes, &shown)?;
        let model = parse_config(&config, &shown)?;
        let file = open_h5(h5, &format!("{shown}: model.weights.h5"))?;
        let weights = keras3_weights(&file, &model, &shown)?;
        (model, weights)
    } else {
        let file = open_h5(bytes, &shown)?;
        let root = file.root();
        let attrs = root.attrs().map_err(|e| h5_error(&shown, e))?;
        if let Some(config) = attrs.get("model_config") {
            let config: Value = serde_json::from_str(&attr_string(config)).map_err(|e| {
                Error::Data(format!(
                    "{shown}: the `model_config` attribute is not JSON: {e}"
                ))
            })?;
            let model = parse_config(&config, &shown)?;
            let group = file.group("model_weights").map_err(|_| {
                Error::Data(format!(
                    "{shown}: has a model_config but no /model_weights group; was it truncated?"
                ))
            })?;
            let weights = legacy_weights(&file, &group, "model_weights/", &model, &shown)?;
            (model, weights)
        } else {
            let model = architecture_of(architecture, &shown)?;
            let weights = if file.group("layers").is_ok() {
                keras3_weights(&file, &model, &shown)?
            } else {
                legacy_weights(&file, &root, "", &model, &shown)?
            };
            (model, weights)
        }
    };
    build(&model, weights, &shown)
}

/// The architecture for a weights-only file.
fn architecture_of(architecture: Option<&Path>, shown: &str) -> Result<KerasModel> {
    let path = architecture.ok_or_else(|| {
        Error::Config(format!(
            "{shown} holds weights only: name the model's architecture with --architecture \
             (its .keras file, or a metalearn checkpoint of the same model)"
        ))
    })?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let arch_shown = path.display().to_string();
    if bytes.starts_with(b"PK") {
        let (config, _) = read_keras_zip(&bytes, &arch_shown)?;
        return parse_config(&config, &arch_shown);
    }
    // A metalearn checkpoint: the Keras config its export would write.
    let ckpt = crate::checkpoint::Checkpoint::load(path, &Device::Cpu)?;
    let model = Sequential::from_checkpoint(&ckpt)?;
    parse_config(&super::write::keras_config(&model, false)?, &arch_shown)
}

/// `config.json` and `model.weights.h5` of a `.keras` zip.
fn read_keras_zip(bytes: &[u8], shown: &str) -> Result<(Value, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| Error::Data(format!("{shown}: not a readable .keras zip: {e}")))?;
    let mut read = |name: &str| -> Result<Vec<u8>> {
        let mut entry = zip.by_name(name).map_err(|_| {
            Error::Data(format!(
                "{shown}: the .keras zip has no `{name}`; a .keras file holds config.json, \
                 model.weights.h5 and metadata.json"
            ))
        })?;
        let mut out = Vec::new();
        entry
            .read_to_end(&mut out)
            .map_err(|e| Error::Data(format!("{shown}: cannot read `{name}`: {e}")))?;
        Ok(out)
    };
    let config = read("config.json")?;
    let weights = read("model.weights.h5")?;
    let config = serde_json::from_slice(&config)
        .map_err(|e| Error::Data(format!("{shown}: config.json is not JSON: {e}")))?;
    Ok((config, weights))
}

fn open_h5(bytes: Vec<u8>, shown: &str) -> Result<hdf5_pure::File> {
    if !hdf5_pure::is_hdf5_bytes(&bytes) {
        return Err(Error::Data(format!(
            "{shown}: not an HDF5 file (Keras .h5 / .weights.h5) nor a .keras zip"
        )));
    }
    hdf5_pure::File::from_bytes(bytes).map_err(|e| h5_error(shown, e))
}

fn h5_error(shown: &str, e: hdf5_pure::Error) -> Error {
    Error::Data(format!(
        "{shown}: cannot read the HDF5 file ({e}); is it truncated or corrupt?"
    ))
}

/// The strings of a string attribute (one or many).
fn attr_strings(value: &hdf5_pure::AttrValue) -> Vec<String> {
    use hdf5_pure::AttrValue as A;
    match value {
        A::String(s) | A::AsciiString(s) | A::VarLenString(s) | A::VarLenAsciiString(s) => {
            vec![s.clone()]
        }
        A::StringSized { value, .. } | A::AsciiStringSized { value, .. } => vec![value.clone()],
        A::StringArray(v)
        | A::AsciiStringArray(v)
        | A::VarLenStringArray(v)
        | A::VarLenAsciiStringArray(v)
        | A::VarLenAsciiCharArray(v) => v.clone(),
        A::StringArraySized { values, .. } | A::AsciiStringArraySized { values, .. } => {
            values.clone()
        }
        _ => Vec::new(),
    }
}

fn attr_string(value: &hdf5_pure::AttrValue) -> String {
    attr_strings(value).concat()
}

/// The Sequential config of a `.keras` config.json or a legacy `model_config`.
fn parse_config(config: &Value, shown: &str) -> Result<KerasModel> {
    let class = config["class_name"].as_str().unwrap_or("");
    let functional = matches!(class, "Functional" | "Model");
    if class != "Sequential" && !functional {
        return Err(Error::Config(format!(
            "{shown}: a `{class}` model; metalearn reads Sequential models and functional \
             models that are a plain chain of layers"
        )));
    }
    let layers = config["config"]["layers"]
        .as_array()
        .ok_or_else(|| Error::Data(format!("{shown}: the model config has no `layers` list")))?;
    if functional {
        check_chain(layers, shown)?;
    }
    let mut input_shape = None;
    let mut out = Vec::new();
    for layer in layers {
        let class = layer["class_name"].as_str().unwrap_or("?").to_string();
        let cfg = layer["config"].clone();
        let name = cfg["name"].as_str().unwrap_or("").to_string();
        if !SUPPORTED_LAYERS.contains(&class.as_str()) {
            return Err(Error::Config(format!(
                "{shown}: layer `{name}` is a {class}, which metalearn does not read; supported: {}",
                SUPPORTED_LAYERS.join(", ")
            )));
        }
        // Keras 3 writes `batch_shape`; Keras 2 `batch_input_shape`, also on the first layer.
        let declared = [&cfg["batch_shape"], &cfg["batch_input_shape"]]
            .into_iter()
            .find(|v| v.is_array());
        if class == "InputLayer" {
            let shape = declared
                .ok_or_else(|| Error::Data(format!("{shown}: the InputLayer gives no shape")))?;
            input_shape = Some(batch_shape(shape, shown)?);
            continue;
        }
        if let (None, Some(shape)) = (&input_shape, declared) {
            input_shape = Some(batch_shape(shape, shown)?);
        }
        if input_shape.is_none() {
            if let Some(shape) = layer["build_config"]["input_shape"].as_array() {
                input_shape = Some(batch_shape(&Value::Array(shape.clone()), shown)?);
            }
        }
        out.push(KerasLayer {
            class,
            name,
            config: cfg,
        });
    }
    let input_shape = input_shape.or_else(|| {
        config["config"]["build_input_shape"]
            .as_array()
            .and_then(|s| batch_shape(&Value::Array(s.clone()), shown).ok())
    });
    let input_shape = input_shape
        .ok_or_else(|| Error::Data(format!("{shown}: the model config gives no input shape")))?;
    Ok(KerasModel {
        input_shape,
        layers: out,
    })
}

/// Fails unless every layer of a functional config takes its one input from the layer listed
/// before it (a plain chain, as a Sequential model is).
fn check_chain(layers: &[Value], shown: &str) -> Result<()> {
    let mut previous: Option<&str> = None;
    for layer in layers {
        let name = layer["config"]["name"].as_str().unwrap_or("?");
        let class = layer["class_name"].as_str().unwrap_or("?");
        let nodes = layer["inbound_nodes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        // Keras 3: [{"args": [tensor with keras_history [name, 0, 0]]}]; Keras 2: [[[name, 0, 0, {}]]].
        let sources: Vec<&str> = nodes
            .iter()
            .flat_map(|node| match node {
                Value::Object(_) => node["args"]
                    .as_array()
                    .map(|args| {
                        args.iter()
                            .flat_map(|a| match a {
                                Value::Array(list) => list.iter().collect::<Vec<_>>(),
                                other => vec![other],
                            })
                            .filter_map(|a| a["config"]["keras_history"][0].as_str())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default(),
                Value::Array(inputs) => inputs.iter().filter_map(|i| i[0].as_str()).collect(),
                _ => Vec::new(),
            })
            .collect();
        let chained = match previous {
            None => class == "InputLayer" && sources.is_empty(),
            Some(before) => sources == [before],
        };
        if !chained {
            return Err(Error::Config(format!(
                "{shown}: layer `{name}` ({class}) takes its input from {}, not from the layer \
                 before it{}; metalearn reads functional models that are a plain chain of layers",
                if sources.is_empty() {
                    "nothing".to_string()
                } else {
                    sources
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                },
                previous.map(|p| format!(" (`{p}`)")).unwrap_or_default()
            )));
        }
        previous = Some(name);
    }
    Ok(())
}

/// `[null, d1, d2, ...]` → `[d1, d2, ...]`.
fn batch_shape(value: &Value, shown: &str) -> Result<Vec<usize>> {
    let dims = value
        .as_array()
        .ok_or_else(|| Error::Data(format!("{shown}: an input shape is not a list")))?;
    dims.iter()
        .skip(1)
        .map(|d| {
            d.as_u64().map(|d| d as usize).ok_or_else(|| {
                Error::Data(format!(
                    "{shown}: input shape {value} has an unknown size; metalearn needs fixed sizes"
                ))
            })
        })
        .collect()
}

fn read_dataset(file: &hdf5_pure::File, path: &str, shown: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let ds = file.dataset(path).map_err(|_| {
        Error::Data(format!(
            "{shown}: no dataset `{path}`; the file is not of this model"
        ))
    })?;
    let shape = ds.shape().map_err(|e| h5_error(shown, e))?;
    let values = ds.read_f32().map_err(|e| h5_error(shown, e))?;
    Ok((shape.iter().map(|&d| d as usize).collect(), values))
}

/// Weights of a Keras 3 weights file: `/layers/<snake>[_N]/vars/0..k`.
fn keras3_weights(file: &hdf5_pure::File, model: &KerasModel, shown: &str) -> Result<LayerWeights> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for layer in &model.layers {
        let base = snake_case(&layer.class);
        let k = seen.entry(base.clone()).or_insert(0);
        let group = if *k == 0 {
            base.clone()
        } else {
            format!("{base}_{k}")
        };
        *k += 1;
        if !has_weights(&layer.class) {
            out.push(Vec::new());
            continue;
        }
        let vars = format!("layers/{group}/vars");
        let names = file
            .group(&vars)
            .map_err(|_| {
                Error::Data(format!(
                    "{shown}: no group `/{vars}` for a {} layer{}; the weights are of another \
                     architecture",
                    layer.class,
                    if layer.name.is_empty() {
                        String::new()
                    } else {
                        format!(" (`{}`)", layer.name)
                    }
                ))
            })?
            .datasets()
            .map_err(|e| h5_error(shown, e))?;
        let mut tensors = Vec::new();
        for i in 0..names.len() {
            tensors.push(read_dataset(file, &format!("{vars}/{i}"), shown)?);
        }
        out.push(tensors);
    }
    Ok(out)
}

/// Weights of a legacy HDF5 file: `layer_names`, then each group's `weight_names`, matched to
/// the model's layers that have weights, in order.
fn legacy_weights(
    file: &hdf5_pure::File,
    group: &hdf5_pure::Group,
    prefix: &str,
    model: &KerasModel,
    shown: &str,
) -> Result<LayerWeights> {
    let attrs = group.attrs().map_err(|e| h5_error(shown, e))?;
    // Attributes over 64 KB are split by Keras 2 into `layer_names0`, `layer_names1`, ...
    let layer_names = match attrs.get("layer_names") {
        Some(value) => attr_strings(value),
        None => {
            let parts: Vec<String> = (0..)
                .map_while(|i| attrs.get(&format!("layer_names{i}")).map(attr_strings))
                .flatten()
                .collect();
            if parts.is_empty() {
                return Err(Error::Data(format!(
                    "{shown}: no `layer_names` attribute; not a Keras weights file (.h5)"
                )));
            }
            parts
        }
    };
    let mut stored = Vec::new();
    for name in &layer_names {
        let layer_group = file.group(&format!("{prefix}{name}")).map_err(|_| {
            Error::Data(format!(
                "{shown}: layer group `{name}` is missing; was the file truncated?"
            ))
        })?;
        let weight_names = layer_group
            .attrs()
            .map_err(|e| h5_error(shown, e))?
            .get("weight_names")
            .map(attr_strings)
            .unwrap_or_default();
        if weight_names.is_empty() {
            continue;
        }
        let mut tensors = Vec::new();
        for w in &weight_names {
            tensors.push(read_dataset(file, &format!("{prefix}{name}/{w}"), shown)?);
        }
        stored.push((name.clone(), tensors));
    }
    let with_weights: Vec<usize> = (0..model.layers.len())
        .filter(|&i| has_weights(&model.layers[i].class))
        .collect();
    if stored.len() != with_weights.len() {
        return Err(Error::Data(format!(
            "{shown}: {} layers with weights, but the architecture has {}; the weights are of \
             another model",
            stored.len(),
            with_weights.len()
        )));
    }
    let mut out = vec![Vec::new(); model.layers.len()];
    for ((_, tensors), i) in stored.into_iter().zip(with_weights) {
        out[i] = tensors;
    }
    Ok(out)
}

fn has_weights(class: &str) -> bool {
    matches!(class, "Dense" | "Conv2D" | "BatchNormalization")
}

/// The metalearn model of a Keras config and its weights.
fn build(model: &KerasModel, weights: LayerWeights, shown: &str) -> Result<Sequential> {
    let input = match model.input_shape.as_slice() {
        [h, w, c] => vec![*c, *h, *w],
        [n] => vec![*n],
        other => {
            return Err(Error::Config(format!(
                "{shown}: input shape {other:?}; metalearn reads flat inputs or images \
                 (height, width, channels)"
            )))
        }
    };
    let mut arch = Architecture::new(&input);
    let mut params: Vec<(String, Tensor)> = Vec::new();
    let mut buffers: Vec<(String, Tensor)> = Vec::new();
    // The shape entering each layer, in Keras order, to convert what Flatten reorders.
    let mut shape = model.input_shape.clone();
    // After a Flatten of (h, w, c): the next Dense's rows are reordered from H·W·C to C·H·W.
    let mut pending_flatten: Option<(usize, usize, usize)> = None;
    let device = Device::Cpu;
    let tensor = |shape: &[usize], values: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(values, shape, &device)?)
    };
    for (i, (layer, tensors)) in model.layers.iter().zip(weights).enumerate() {
        let name = if layer.name.is_empty() {
            format!("{}_{i}", snake_case(&layer.class))
        } else {
            layer.name.clone()
        };
        let cfg = &layer.config;
        let expect = |count: usize| -> Result<()> {
            if tensors.len() != count {
                return Err(Error::Data(format!(
                    "{shown}: layer `{name}` ({}) has {} weight tensors, expected {count}",
                    layer.class,
                    tensors.len()
                )));
            }
            Ok(())
        };
        let check_shape = |found: &[usize], expected: &[usize], what: &str| -> Result<()> {
            if found != expected {
                return Err(Error::Shape(format!(
                    "{shown}: layer `{name}` ({}): {what} has shape {found:?}, expected \
                     {expected:?}; the weights are of another architecture",
                    layer.class
                )));
            }
            Ok(())
        };
        match layer.class.as_str() {
            "Dense" => {
                let units = cfg["units"].as_u64().unwrap_or(0) as usize;
                let fan_in: usize = shape.iter().product();
                if shape.len() != 1 {
                    return Err(Error::Config(format!(
                        "{shown}: layer `{name}` (Dense) gets a {shape:?} input; metalearn's Dense \
                         needs a Flatten before it"
                    )));
                }
                let use_bias = cfg["use_bias"].as_bool().unwrap_or(true);
                expect(if use_bias { 2 } else { 1 })?;
                let (kshape, mut kernel) = tensors[0].clone();
                check_shape(&kshape, &[fan_in, units], "the kernel")?;
                if let Some((h, w, c)) = pending_flatten.take() {
                    let mut rows = vec![0f32; kernel.len()];
                    for hi in 0..h {
                        for wi in 0..w {
                            for ci in 0..c {
                                let from = (hi * w + wi) * c + ci;
                                let to = (ci * h + hi) * w + wi;
                                rows[to * units..(to + 1) * units]
                                    .copy_from_slice(&kernel[from * units..(from + 1) * units]);
                            }
                        }
                    }
                    kernel = rows;
                }
                let bias = if use_bias {
                    check_shape(&tensors[1].0, &[units], "the bias")?;
                    tensors[1].1.clone()
                } else {
                    vec![0.0; units]
                };
                arch.push_named(&name, Layer::dense(units))?;
                params.push((format!("{name}.weight"), tensor(&[fan_in, units], kernel)?));
                params.push((format!("{name}.bias"), tensor(&[units], bias)?));
                push_activation(&mut arch, &name, cfg, shown)?;
                shape = vec![units];
            }
            "Conv2D" => {
                let [h, w, c] = shape[..] else {
                    return Err(Error::Config(format!(
                        "{shown}: layer `{name}` (Conv2D) gets a {shape:?} input; it needs images"
                    )));
                };
                let filters = cfg["filters"].as_u64().unwrap_or(0) as usize;
                let kernel = pair(&cfg["kernel_size"]);
                let strides = pair(&cfg["strides"]);
                let dilation = pair(&cfg["dilation_rate"]);
                let (Some((k, k2)), Some((s, s2))) = (kernel, strides) else {
                    return Err(Error::Data(format!(
                        "{shown}: layer `{name}`: no kernel size or strides"
                    )));
                };
                let padding = match cfg["padding"].as_str().unwrap_or("valid") {
                    "valid" => 0,
                    "same" if s == 1 && k % 2 == 1 => (k - 1) / 2,
                    other => {
                        return Err(Error::Config(format!(
                        "{shown}: layer `{name}` (Conv2D): padding `{other}` with kernel {k} and \
                             stride {s} pads unevenly, which metalearn's Conv2d does not; use an \
                             odd kernel with stride 1, or `valid`"
                    )))
                    }
                };
                if k != k2
                    || s != s2
                    || dilation.is_some_and(|d| d != (1, 1))
                    || cfg["groups"].as_u64().unwrap_or(1) != 1
                    || cfg["data_format"].as_str().unwrap_or("channels_last") != "channels_last"
                {
                    return Err(Error::Config(format!(
                        "{shown}: layer `{name}` (Conv2D): metalearn reads square kernels and \
                         strides, no dilation or groups, channels_last"
                    )));
                }
                let use_bias = cfg["use_bias"].as_bool().unwrap_or(true);
                expect(if use_bias { 2 } else { 1 })?;
                let (kshape, hwio) = &tensors[0];
                check_shape(kshape, &[k, k, c, filters], "the kernel")?;
                // HWIO → OIHW.
                let mut oihw = vec![0f32; hwio.len()];
                for y in 0..k {
                    for x in 0..k {
                        for ci in 0..c {
                            for f in 0..filters {
                                oihw[((f * c + ci) * k + y) * k + x] =
                                    hwio[((y * k + x) * c + ci) * filters + f];
                            }
                        }
                    }
                }
                let bias = if use_bias {
                    check_shape(&tensors[1].0, &[filters], "the bias")?;
                    tensors[1].1.clone()
                } else {
                    vec![0.0; filters]
                };
                arch.push_named(
                    &name,
                    Layer::Conv2d {
                        filters,
                        kernel_size: k,
                        stride: s,
                        padding,
                        groups: 1,
                        bias: true,
                        same_padding: false,
                    },
                )?;
                params.push((format!("{name}.weight"), tensor(&[filters, c, k, k], oihw)?));
                params.push((format!("{name}.bias"), tensor(&[filters], bias)?));
                push_activation(&mut arch, &name, cfg, shown)?;
                let out = |side: usize| (side + 2 * padding - k) / s + 1;
                shape = vec![out(h), out(w), filters];
            }
            "BatchNormalization" => {
                let channels = *shape.last().unwrap_or(&0);
                let axis = cfg["axis"]
                    .as_i64()
                    .or_else(|| cfg["axis"][0].as_i64())
                    .unwrap_or(-1);
                if axis != -1 && axis != shape.len() as i64 {
                    return Err(Error::Config(format!(
                        "{shown}: layer `{name}` (BatchNormalization) normalises axis {axis}; \
                         metalearn normalises the channels (the last axis in Keras)"
                    )));
                }
                let scale = cfg["scale"].as_bool().unwrap_or(true);
                let center = cfg["center"].as_bool().unwrap_or(true);
                expect(2 + usize::from(scale) + usize::from(center))?;
                let mut next = tensors.iter();
                let mut take = |what: &str| -> Result<Vec<f32>> {
                    let (s, v) = next.next().expect("counted above");
                    check_shape(s, &[channels], what)?;
                    Ok(v.clone())
                };
                let gamma = if scale {
                    take("gamma")?
                } else {
                    vec![1.0; channels]
                };
                let beta = if center {
                    take("beta")?
                } else {
                    vec![0.0; channels]
                };
                let mean = take("the moving mean")?;
                let var = take("the moving variance")?;
                let momentum = cfg["momentum"].as_f64().unwrap_or(0.99);
                let eps = cfg["epsilon"].as_f64().unwrap_or(1e-3);
                arch.push_named(
                    &name,
                    Layer::BatchNorm {
                        momentum: 1.0 - momentum,
                        eps,
                    },
                )?;
                params.push((format!("{name}.gamma"), tensor(&[channels], gamma)?));
                params.push((format!("{name}.beta"), tensor(&[channels], beta)?));
                buffers.push((format!("{name}.running_mean"), tensor(&[channels], mean)?));
                buffers.push((format!("{name}.running_var"), tensor(&[channels], var)?));
            }
            "MaxPooling2D" => {
                let [h, w, c] = shape[..] else {
                    return Err(Error::Config(format!(
                        "{shown}: layer `{name}` (MaxPooling2D) needs images"
                    )));
                };
                let size = pair(&cfg["pool_size"]);
                let strides = pair(&cfg["strides"]).or(size);
                match (size, strides, cfg["padding"].as_str().unwrap_or("valid")) {
                    (Some((p, p2)), Some((s, s2)), "valid") if p == p2 && s == p && s2 == p => {
                        arch.push_named(&name, Layer::max_pool2d(p))?;
                        shape = vec![h / p, w / p, c];
                    }
                    _ => {
                        return Err(Error::Config(format!(
                            "{shown}: layer `{name}` (MaxPooling2D): metalearn pools square \
                             windows with stride equal to the window and `valid` padding"
                        )))
                    }
                }
            }
            "Flatten" => {
                if let [h, w, c] = shape[..] {
                    pending_flatten = Some((h, w, c));
                }
                arch.push_named(&name, Layer::Flatten)?;
                shape = vec![shape.iter().product()];
            }
            "Dropout" => {
                let rate = cfg["rate"].as_f64().unwrap_or(0.0);
                arch.push_named(&name, Layer::dropout(rate))?;
            }
            "Activation" => {
                let activation =
                    activation_of(cfg["activation"].as_str().unwrap_or(""), &name, shown)?;
                arch.push_named(&name, Layer::activation(activation))?;
            }
            "ReLU" => {
                let plain = cfg["max_value"].is_null()
                    && cfg["negative_slope"].as_f64().unwrap_or(0.0) == 0.0
                    && cfg["threshold"].as_f64().unwrap_or(0.0) == 0.0;
                if !plain {
                    return Err(Error::Config(format!(
                        "{shown}: layer `{name}` (ReLU) has a max value, slope or threshold; \
                         metalearn's ReLU is max(0, x)"
                    )));
                }
                arch.push_named(&name, Layer::relu())?;
            }
            "Softmax" => {
                arch.push_named(&name, Layer::softmax())?;
            }
            _ => unreachable!("checked against SUPPORTED_LAYERS"),
        }
    }
    let mut model = Sequential::from_architecture(arch, 0)?;
    let mut set = ParamSet::new();
    for (n, t) in params {
        set.insert(n, t)?;
    }
    model.set_params(&set)?;
    let mut stats = model.buffers().clone();
    for (n, t) in buffers {
        stats.replace(&n, t)?;
    }
    model.set_buffers(stats);
    model.set_parent(format!("keras:{shown}"));
    Ok(model)
}

/// A `[a, b]` or `a` config value.
fn pair(value: &Value) -> Option<(usize, usize)> {
    match value {
        Value::Array(v) if v.len() == 2 => Some((v[0].as_u64()? as usize, v[1].as_u64()? as usize)),
        Value::Number(n) => n.as_u64().map(|n| (n as usize, n as usize)),
        _ => None,
    }
}

fn activation_of(name: &str, layer: &str, shown: &str) -> Result<Activation> {
    if name.is_empty() {
        return Ok(Activation::Linear);
    }
    name.parse().map_err(|_| {
        Error::Config(format!(
            "{shown}: layer `{layer}` uses the activation `{name}`; metalearn has relu, \
             sigmoid, tanh, softmax and linear"
        ))
    })
}

/// A Dense or Conv2D layer's `activation`, as a separate metalearn layer.
fn push_activation(arch: &mut Architecture, name: &str, cfg: &Value, shown: &str) -> Result<()> {
    let activation = activation_of(cfg["activation"].as_str().unwrap_or("linear"), name, shown)?;
    if activation != Activation::Linear {
        arch.push_named(
            &format!("{name}_{}", Layer::activation(activation).kind()),
            Layer::activation(activation),
        )?;
    }
    Ok(())
}

/// The compile settings a Keras file records (`compile_config` of a `.keras` file,
/// `training_config` of a legacy `.h5`), as far as metalearn has their like.
#[derive(Clone, Debug, PartialEq)]
pub struct KerasCompile {
    /// Optimiser: `sgd`, `adam` or `adamw`.
    pub optimizer: String,
    /// Its learning rate.
    pub learning_rate: f64,
    /// SGD's momentum, AdamW's weight decay (0 otherwise).
    pub momentum: f64,
    /// AdamW's weight decay.
    pub weight_decay: f64,
    /// The loss in Keras' snake-case name (`binary_crossentropy`, ...).
    pub loss: String,
    /// Whether the loss takes logits (`from_logits=True`).
    pub from_logits: bool,
}

/// The compile settings of a full-model Keras file (`None` for weights-only files, models saved
/// without compiling, and optimisers or losses metalearn lacks).
pub fn compile_settings(path: &Path) -> Result<Option<KerasCompile>> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (optimizer, loss) = if bytes.starts_with(b"PK") {
        let (config, _) = read_keras_zip(&bytes, &shown)?;
        let compile = &config["compile_config"];
        (compile["optimizer"].clone(), compile["loss"].clone())
    } else {
        let file = open_h5(bytes, &shown)?;
        let attrs = file.root().attrs().map_err(|e| h5_error(&shown, e))?;
        let Some(training) = attrs.get("training_config") else {
            return Ok(None);
        };
        let training: Value = serde_json::from_str(&attr_string(training)).map_err(|e| {
            Error::Data(format!(
                "{shown}: the `training_config` attribute is not JSON: {e}"
            ))
        })?;
        (
            training["optimizer_config"].clone(),
            training["loss"].clone(),
        )
    };
    let class = optimizer["class_name"]
        .as_str()
        .or_else(|| optimizer.as_str())
        .unwrap_or("")
        .rsplit('>')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if !matches!(class.as_str(), "sgd" | "adam" | "adamw") {
        return Ok(None);
    }
    let cfg = &optimizer["config"];
    let (loss_name, from_logits) = match &loss {
        Value::String(name) => (name.clone(), false),
        Value::Object(_) => (
            snake_case(loss["class_name"].as_str().unwrap_or("")),
            loss["config"]["from_logits"].as_bool().unwrap_or(false),
        ),
        _ => return Ok(None),
    };
    Ok(Some(KerasCompile {
        learning_rate: cfg["learning_rate"].as_f64().unwrap_or(0.001),
        momentum: cfg["momentum"].as_f64().unwrap_or(0.0),
        weight_decay: cfg["weight_decay"].as_f64().unwrap_or(0.0),
        optimizer: class,
        loss: loss_name,
        from_logits,
    }))
}
