//! A checkpoint described as JSON (what `metalearn inspect --json` prints): the file, its format
//! and provenance, the architecture with per-layer shapes and parameter counts, training
//! progress and the stored sections of a supervised model or a meta-learner.

use std::path::Path;

use candle_core::Device;
use serde_json::{json, Map, Value};

use crate::checkpoint::{Checkpoint, FORMAT};
use crate::error::{Error, Result};
use crate::nn::architecture::Layer;
use crate::nn::network::Network;

/// Reads the checkpoint at `path` and describes it as a JSON object (what `metalearn inspect
/// --json` prints): file, format, provenance, architecture with per-layer shapes and parameter
/// counts, training progress and the stored sections.
pub fn describe(path: &Path) -> Result<Map<String, Value>> {
    let ckpt = Checkpoint::load_partial(path, &Device::Cpu)?;
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let format_version = format_version(path)?;
    let network = Network::build(&ckpt.architecture)?;
    let training = ckpt.section("training");
    let meta = ckpt.section("meta");
    let frozen: Vec<String> = training
        .and_then(|t| t.get("frozen"))
        .and_then(|f| serde_json::from_value(f.clone()).ok())
        .unwrap_or_default();

    let mut layers = Vec::new();
    for (index, (named, shape)) in ckpt
        .architecture
        .layers
        .iter()
        .zip(network.layer_shapes())
        .enumerate()
    {
        let specs: Vec<_> = network
            .param_specs()
            .iter()
            .filter(|s| s.layer == index)
            .collect();
        let count = |only_frozen: bool| -> usize {
            specs
                .iter()
                .filter(|s| !only_frozen || frozen.contains(&s.name))
                .map(|s| s.shape.iter().product::<usize>())
                .sum()
        };
        layers.push(json!({
            "name": named.name,
            "type": named.layer.kind(),
            "description": layer_description(&named.layer),
            "output_shape": shape,
            "parameters": count(false),
            "frozen_parameters": count(true),
        }));
    }

    let total = ckpt.params.num_values();
    // A LoRA checkpoint's encoder weights stay in its base model.
    let in_base_model: usize = network
        .param_specs()
        .iter()
        .filter(|spec| ckpt.external_params.contains(&spec.name))
        .map(|spec| spec.shape.iter().product::<usize>())
        .sum();
    let frozen_values: usize = ckpt
        .params
        .iter()
        .filter(|(name, _)| frozen.contains(name))
        .map(|(_, t)| t.elem_count())
        .sum();
    let mut state = Map::new();
    for (name, tensor) in ckpt.state.iter() {
        let group = name.split('.').next().unwrap_or(name).to_string();
        let entry = state
            .entry(group)
            .or_insert_with(|| json!({"tensors": 0, "values": 0}));
        entry["tensors"] = json!(entry["tensors"].as_u64().unwrap_or(0) + 1);
        entry["values"] = json!(entry["values"].as_u64().unwrap_or(0) + tensor.elem_count() as u64);
    }

    let kind = if meta.is_some() {
        "meta-learning"
    } else if ckpt.section(crate::transfer::DATA_SECTION).is_some() {
        "supervised"
    } else {
        "model"
    };
    let optimizer = meta
        .and_then(|m| m.get("outer_optimizer"))
        .or_else(|| training.and_then(|t| t.get("compile")?.get("optimizer")))
        .cloned()
        .unwrap_or(Value::Null);
    let mut progress = Map::new();
    if let Some(epochs) = training.and_then(|t| t.get("epochs_trained")) {
        progress.insert("epochs".into(), epochs.clone());
    }
    if let Some(meta) = meta {
        for key in ["iteration", "optimizer_steps"] {
            if let Some(value) = meta.get(key) {
                progress.insert(key.into(), value.clone());
            }
        }
    }
    if let Some(best) = ckpt
        .section("loop")
        .and_then(|l| l.get("best"))
        .filter(|b| !b.is_null())
    {
        progress.insert("best_validation".into(), best.clone());
    }

    let mut report = Map::new();
    report.insert("command".into(), json!("inspect"));
    report.insert("path".into(), json!(path.display().to_string()));
    report.insert("file_bytes".into(), json!(file_bytes));
    report.insert("format".into(), json!(FORMAT));
    report.insert("format_version".into(), json!(format_version));
    report.insert("kind".into(), json!(kind));
    report.insert(
        "architecture".into(),
        json!({
            "input_shape": ckpt.architecture.input_shape,
            "output_shape": network.output_shape(),
            "layers": layers,
        }),
    );
    report.insert(
        "parameters".into(),
        json!({
            "total": total,
            "trainable": total - frozen_values,
            "frozen": frozen_values,
            "tensors": ckpt.params.len(),
            "frozen_names": frozen,
            "in_base_model": in_base_model,
        }),
    );
    report.insert(
        "buffers".into(),
        json!({"tensors": ckpt.buffers.len(), "values": ckpt.buffers.num_values()}),
    );
    report.insert("state".into(), Value::Object(state));
    if let Some(meta) = meta {
        let algorithm = meta.get("algorithm").cloned().unwrap_or(Value::Null);
        let label = serde_json::from_value::<crate::meta::AlgorithmConfig>(algorithm.clone())
            .map(|a| a.label().to_string())
            .ok();
        report.insert("algorithm".into(), json!(label));
        report.insert("hyper_parameters".into(), algorithm);
        report.insert(
            "task_kind".into(),
            meta.get("task_kind").cloned().unwrap_or(Value::Null),
        );
    }
    if let Some(compile) = training.and_then(|t| t.get("compile")) {
        report.insert(
            "loss".into(),
            compile.get("loss").cloned().unwrap_or(Value::Null),
        );
        report.insert(
            "metrics".into(),
            compile.get("metrics").cloned().unwrap_or(Value::Null),
        );
    }
    report.insert("progress".into(), Value::Object(progress));
    report.insert("optimizer".into(), optimizer);
    report.insert(
        "provenance".into(),
        serde_json::to_value(&ckpt.provenance).map_err(|e| Error::Checkpoint(e.to_string()))?,
    );
    if let Some(data) = ckpt.section(crate::transfer::DATA_SECTION) {
        report.insert("data".into(), data.clone());
    }
    if let Some(task) = ckpt.section("experiment").and_then(|e| e.get("task")) {
        report.insert("task".into(), task.clone());
    }
    Ok(report)
}

/// The `format_version` metadata entry, read from the safetensors header.
fn format_version(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Checkpoint(format!("{}: unreadable header: {e}", path.display())))?;
    header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format_version"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: missing or invalid `format_version` metadata",
                path.display()
            ))
        })
}

/// One layer in words: `dense, 64 units`, `conv2d, 64 filters 3x3, stride 1, padding 1`.
fn layer_description(layer: &Layer) -> String {
    match layer {
        Layer::Dense { units: 1 } => "dense, 1 unit".into(),
        Layer::Dense { units } => format!("dense, {units} units"),
        Layer::Conv2d {
            filters,
            kernel_size,
            stride,
            padding,
            groups,
            bias,
            same_padding,
        } => {
            let padding = if *same_padding {
                "same (TensorFlow)".to_string()
            } else {
                padding.to_string()
            };
            let groups = match groups {
                1 => String::new(),
                g => format!(", {g} groups"),
            };
            let bias = if *bias { "" } else { ", no bias" };
            format!(
                "conv2d, {filters} filters {kernel_size}x{kernel_size}, stride {stride}, padding {padding}{groups}{bias}"
            )
        }
        Layer::BatchNorm { momentum, eps } => {
            format!("batch_norm, momentum {momentum}, eps {eps:e}")
        }
        Layer::MaxPool2d { size } => format!("max_pool2d, {size}x{size}"),
        Layer::Flatten => "flatten".into(),
        Layer::GlobalAvgPool => "global_avg_pool".into(),
        Layer::Add { from } => format!("add, skip connection from `{from}`"),
        Layer::Dropout { rate } => format!("dropout, rate {rate}"),
        Layer::Activation { .. } => layer.kind().into(),
        Layer::TokenEmbedding {
            vocab_size,
            hidden,
            max_positions,
            ..
        } => format!(
            "token_embedding, vocabulary {vocab_size}, width {hidden}, {max_positions} positions"
        ),
        Layer::TransformerBlock {
            heads,
            intermediate,
            lora_rank,
            ..
        } => {
            let lora = if *lora_rank > 0 {
                format!(", LoRA rank {lora_rank}")
            } else {
                String::new()
            };
            format!("transformer_block, {heads} heads, feed-forward {intermediate}{lora}")
        }
        Layer::SequencePool { mode } => format!("sequence_pool, {mode:?}").to_lowercase(),
        Layer::L2Normalize => "l2_normalize".into(),
        Layer::FeatureEmbedding { fields } => {
            use crate::nn::architecture::FeatureKind;
            let count = |k: FeatureKind| fields.iter().filter(|f| f.kind == k).count();
            format!(
                "feature_embedding, {} fields ({} categorical, {} multi-valued, {} numeric)",
                fields.len(),
                count(FeatureKind::Categorical),
                count(FeatureKind::MultiValued),
                count(FeatureKind::Numeric)
            )
        }
    }
}
