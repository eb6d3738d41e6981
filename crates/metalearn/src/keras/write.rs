//! Writing Keras files: `.keras`, `.weights.h5` and legacy `.h5`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::names::snake_case;
use crate::error::{Error, Result};
use crate::nn::architecture::Layer;
use crate::sequential::Sequential;

/// A Keras layer to write: class, name, config and weights in Keras layout.
struct ExportLayer {
    class: &'static str,
    name: String,
    config: Value,
    weights: Vec<(Vec<usize>, Vec<f32>)>,
}

/// What `export` writes, chosen by the file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KerasFormat {
    /// `.keras`: a zip of config.json, model.weights.h5 and metadata.json.
    Keras,
    /// `.weights.h5`: Keras 3 weights only.
    Weights,
    /// Any other `.h5`: the legacy full-model HDF5 file.
    LegacyH5,
}

impl KerasFormat {
    /// The format a file name asks for.
    pub fn of(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.ends_with(".keras") {
            Ok(KerasFormat::Keras)
        } else if name.ends_with(".weights.h5") {
            Ok(KerasFormat::Weights)
        } else if name.ends_with(".h5") || name.ends_with(".hdf5") {
            Ok(KerasFormat::LegacyH5)
        } else {
            Err(Error::Config(format!(
                "{}: name the Keras file FILE.keras, FILE.weights.h5 or FILE.h5",
                path.display()
            )))
        }
    }
}

/// Writes `model` as a Keras file (format from the name, see [`KerasFormat`]), atomically. With
/// `final_softmax`, a softmax layer follows the model's output (metalearn classifiers end in
/// logits; Keras classifiers usually end in probabilities).
pub fn export(model: &Sequential, path: &Path, final_softmax: bool) -> Result<()> {
    let format = KerasFormat::of(path)?;
    let layers = keras_layers(model, final_softmax)?;
    let config = sequential_config(&keras_input(model), &layers);
    let bytes = match format {
        KerasFormat::Weights => weights_h5(&layers)?,
        KerasFormat::LegacyH5 => legacy_h5(&layers, &config)?,
        KerasFormat::Keras => {
            let mut out = std::io::Cursor::new(Vec::new());
            let mut zip = zip::ZipWriter::new(&mut out);
            let options = zip::write::SimpleFileOptions::default();
            let zip_error =
                |e: zip::result::ZipError| Error::Data(format!("cannot write the .keras zip: {e}"));
            let metadata = serde_json::json!({"keras_version": KERAS_VERSION, "date_saved": "", "exported_by": format!("metalearn {}", env!("CARGO_PKG_VERSION"))});
            for (name, data) in [
                (
                    "metadata.json",
                    serde_json::to_vec(&metadata).expect("json"),
                ),
                ("config.json", serde_json::to_vec(&config).expect("json")),
                ("model.weights.h5", weights_h5(&layers)?),
            ] {
                zip.start_file(name, options).map_err(zip_error)?;
                std::io::Write::write_all(&mut zip, &data).map_err(|e| Error::io(path, e))?;
            }
            zip.finish().map_err(zip_error)?;
            out.into_inner()
        }
    };
    crate::fsutil::atomic_write(path, &bytes)
}

/// The model's layers in Keras form, with a final softmax when asked.
fn keras_layers(model: &Sequential, final_softmax: bool) -> Result<Vec<ExportLayer>> {
    let mut layers = export_layers(model)?;
    if final_softmax {
        layers.push(ExportLayer {
            class: "Activation",
            name: unique_name(&layers, "softmax"),
            config: serde_json::json!({"activation": "softmax"}),
            weights: Vec::new(),
        });
    }
    Ok(layers)
}

/// The input shape in Keras order (images channels-last).
fn keras_input(model: &Sequential) -> Vec<usize> {
    match model.architecture().input_shape.as_slice() {
        [c, h, w] => vec![*h, *w, *c],
        other => other.to_vec(),
    }
}

/// The Keras `config.json` of `model`, as `export` writes it.
pub(super) fn keras_config(model: &Sequential, final_softmax: bool) -> Result<Value> {
    Ok(sequential_config(
        &keras_input(model),
        &keras_layers(model, final_softmax)?,
    ))
}

/// The Keras version the written files declare (the format is that of Keras 3).
const KERAS_VERSION: &str = "3.15.1";

fn unique_name(layers: &[ExportLayer], base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 1;
    while layers.iter().any(|l| l.name == name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    name
}

/// The model's layers as Keras layers with Keras-layout weights.
fn export_layers(model: &Sequential) -> Result<Vec<ExportLayer>> {
    let arch = model.architecture();
    let params = model.params();
    let buffers = model.buffers();
    let values = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let mut shape = arch.input_shape.clone();
    let shapes = model.network().layer_shapes().to_vec();
    let mut pending_flatten: Option<(usize, usize, usize)> = None;
    let mut out = Vec::new();
    for (i, named) in arch.layers.iter().enumerate() {
        let name = named.name.clone();
        let layer_name = named.name.as_str();
        let p = |n: &str| params.get(&format!("{layer_name}.{n}"));
        let layer = match &named.layer {
            Layer::TokenEmbedding { .. }
            | Layer::TransformerBlock { .. }
            | Layer::SequencePool { .. }
            | Layer::L2Normalize => {
                return Err(Error::Config(format!(
                    "layer `{name}` ({}) is part of a text encoder, which has no Keras Sequential \
                     equivalent; export text models as metalearn checkpoints",
                    named.layer.kind()
                )))
            }
            Layer::FeatureEmbedding { .. } => {
                return Err(Error::Config(format!(
                    "layer `{name}` (feature_embedding) reads tabular features, which a Keras \
                     Sequential model cannot; export recommendation models as metalearn checkpoints"
                )))
            }
            Layer::Add { .. } => {
                return Err(Error::Config(format!(
                    "layer `{name}` (add) is a skip connection, which a Keras Sequential model \
                     cannot hold; export residual networks as metalearn checkpoints"
                )))
            }
            Layer::Conv2d {
                groups,
                bias,
                same_padding,
                ..
            } if *groups != 1 || !*bias || *same_padding => {
                return Err(Error::Config(format!(
                    "layer `{name}`: grouped, bias-free or TensorFlow-padded convolutions are not \
                     exported to Keras Sequential models yet; export the model as a metalearn \
                     checkpoint"
                )))
            }
            Layer::GlobalAvgPool => ExportLayer {
                class: "GlobalAveragePooling2D",
                name,
                config: serde_json::json!({"data_format": "channels_last", "keepdims": false}),
                weights: Vec::new(),
            },
            Layer::Dense { units } => {
                let fan_in: usize = shape.iter().product();
                let mut kernel = values(p("weight")?)?;
                if let Some((c, h, w)) = pending_flatten.take() {
                    let mut rows = vec![0f32; kernel.len()];
                    for ci in 0..c {
                        for hi in 0..h {
                            for wi in 0..w {
                                let from = (ci * h + hi) * w + wi;
                                let to = (hi * w + wi) * c + ci;
                                rows[to * units..(to + 1) * units]
                                    .copy_from_slice(&kernel[from * units..(from + 1) * units]);
                            }
                        }
                    }
                    kernel = rows;
                }
                ExportLayer {
                    class: "Dense",
                    name,
                    config: serde_json::json!({"units": units, "activation": "linear", "use_bias": true}),
                    weights: vec![
                        (vec![fan_in, *units], kernel),
                        (vec![*units], values(p("bias")?)?),
                    ],
                }
            }
            Layer::Conv2d {
                filters,
                kernel_size: k,
                stride,
                padding,
                ..
            } => {
                let c = shape[0];
                let padding_name = match (*padding, *stride) {
                    (0, _) => "valid",
                    (p, 1) if 2 * p + 1 == *k => "same",
                    _ => {
                        return Err(Error::Config(format!(
                            "layer `{name}`: padding {padding} with kernel {k} and stride {stride} \
                             has no Keras equivalent (Keras pads `valid` or `same`)"
                        )))
                    }
                };
                let oihw = values(p("weight")?)?;
                let mut hwio = vec![0f32; oihw.len()];
                for f in 0..*filters {
                    for ci in 0..c {
                        for y in 0..*k {
                            for x in 0..*k {
                                hwio[((y * k + x) * c + ci) * filters + f] =
                                    oihw[((f * c + ci) * k + y) * k + x];
                            }
                        }
                    }
                }
                ExportLayer {
                    class: "Conv2D",
                    name,
                    config: serde_json::json!({"filters": filters, "kernel_size": [k, k],
                        "strides": [stride, stride], "padding": padding_name, "data_format": "channels_last",
                        "activation": "linear", "use_bias": true}),
                    weights: vec![
                        (vec![*k, *k, c, *filters], hwio),
                        (vec![*filters], values(p("bias")?)?),
                    ],
                }
            }
            Layer::BatchNorm { momentum, eps } => {
                let c = shape[0];
                let b = |n: &str| buffers.get(&format!("{layer_name}.{n}"));
                ExportLayer {
                    class: "BatchNormalization",
                    name: name.clone(),
                    config: serde_json::json!({"axis": -1, "momentum": 1.0 - momentum, "epsilon": eps}),
                    weights: vec![
                        (vec![c], values(p("gamma")?)?),
                        (vec![c], values(p("beta")?)?),
                        (vec![c], values(b("running_mean")?)?),
                        (vec![c], values(b("running_var")?)?),
                    ],
                }
            }
            Layer::MaxPool2d { size } => ExportLayer {
                class: "MaxPooling2D",
                name,
                config: serde_json::json!({"pool_size": [size, size], "strides": [size, size], "padding": "valid"}),
                weights: Vec::new(),
            },
            Layer::Flatten => {
                if let [c, h, w] = shape[..] {
                    pending_flatten = Some((c, h, w));
                }
                ExportLayer {
                    class: "Flatten",
                    name,
                    config: serde_json::json!({}),
                    weights: Vec::new(),
                }
            }
            Layer::Dropout { rate } => ExportLayer {
                class: "Dropout",
                name,
                config: serde_json::json!({"rate": rate}),
                weights: Vec::new(),
            },
            Layer::Activation { .. } => ExportLayer {
                class: "Activation",
                name,
                config: serde_json::json!({"activation": named.layer.kind()}),
                weights: Vec::new(),
            },
        };
        out.push(layer);
        shape = shapes[i].clone();
    }
    Ok(out)
}

/// The Keras 3 config of a Sequential model of `layers` on inputs of `input` (Keras order).
fn sequential_config(input: &[usize], layers: &[ExportLayer]) -> Value {
    let mut batch_shape = vec![Value::Null];
    batch_shape.extend(input.iter().map(|&d| Value::from(d)));
    let mut list = vec![
        serde_json::json!({"module": "keras.layers", "class_name": "InputLayer",
        "config": {"batch_shape": batch_shape, "dtype": "float32", "name": "input_layer"}, "registered_name": null}),
    ];
    for layer in layers {
        let mut config = layer.config.clone();
        config["name"] = Value::from(layer.name.clone());
        config["trainable"] = Value::from(true);
        config["dtype"] = Value::from("float32");
        list.push(
            serde_json::json!({"module": "keras.layers", "class_name": layer.class,
            "config": config, "registered_name": null}),
        );
    }
    serde_json::json!({"module": "keras", "class_name": "Sequential",
        "config": {"name": "sequential", "trainable": true, "dtype": "float32", "layers": list},
        "registered_name": null})
}

fn h5_write_error(e: hdf5_pure::Error) -> Error {
    Error::Data(format!("cannot build the HDF5 file: {e}"))
}

/// A Keras 3 weights file: `/layers/<snake>[_N]/vars/0..k` (every layer, weights or not).
fn weights_h5(layers: &[ExportLayer]) -> Result<Vec<u8>> {
    let mut builder = hdf5_pure::FileBuilder::new();
    let mut group = builder.create_group("layers");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for layer in layers {
        let base = snake_case(layer.class);
        let k = seen.entry(base.clone()).or_insert(0);
        let name = if *k == 0 {
            base.clone()
        } else {
            format!("{base}_{k}")
        };
        *k += 1;
        let mut layer_group = group.create_group(&name);
        let mut vars = layer_group.create_group("vars");
        vars.set_attr("name", hdf5_pure::AttrValue::String(layer.name.clone()));
        for (i, (shape, values)) in layer.weights.iter().enumerate() {
            let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            vars.create_dataset(&i.to_string())
                .with_f32_data(values)
                .with_shape(&dims);
        }
        layer_group.add_group(vars.finish());
        group.add_group(layer_group.finish());
    }
    builder.add_group(group.finish());
    let mut vars = builder.create_group("vars");
    vars.set_attr("name", hdf5_pure::AttrValue::String("sequential".into()));
    builder.add_group(vars.finish());
    builder.finish().map_err(h5_write_error)
}

/// A legacy full-model HDF5 file: `model_config`, and `/model_weights` with `layer_names` and
/// each layer's `weight_names`.
fn legacy_h5(layers: &[ExportLayer], config: &Value) -> Result<Vec<u8>> {
    use hdf5_pure::AttrValue;
    let mut builder = hdf5_pure::FileBuilder::new();
    builder.set_attr("model_config", AttrValue::String(config.to_string()));
    builder.set_attr("keras_version", AttrValue::String(KERAS_VERSION.into()));
    builder.set_attr("backend", AttrValue::String("jax".into()));
    let mut weights = builder.create_group("model_weights");
    weights.set_attr(
        "layer_names",
        AttrValue::StringArray(layers.iter().map(|l| l.name.clone()).collect()),
    );
    weights.set_attr("keras_version", AttrValue::String(KERAS_VERSION.into()));
    weights.set_attr("backend", AttrValue::String("jax".into()));
    for layer in layers {
        let mut group = weights.create_group(&layer.name);
        let names: Vec<&str> = match layer.class {
            "Dense" | "Conv2D" => vec!["kernel", "bias"],
            "BatchNormalization" => vec!["gamma", "beta", "moving_mean", "moving_variance"],
            _ => Vec::new(),
        };
        if names.is_empty() {
            group.set_attr("weight_names", AttrValue::F64Array(Vec::new()));
        } else {
            group.set_attr(
                "weight_names",
                AttrValue::StringArray(
                    names
                        .iter()
                        .map(|n| format!("{}/{n}", layer.name))
                        .collect(),
                ),
            );
            let mut inner = group.create_group(&layer.name);
            for (n, (shape, values)) in names.iter().zip(&layer.weights) {
                let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                inner
                    .create_dataset(n)
                    .with_f32_data(values)
                    .with_shape(&dims);
            }
            group.add_group(inner.finish());
        }
        weights.add_group(group.finish());
    }
    builder.add_group(weights.finish());
    builder.finish().map_err(h5_write_error)
}
