//! Reading a pre-trained BERT-style sentence encoder from a folder in the Hugging Face /
//! sentence-transformers layout: `config.json`, `model.safetensors`, `tokenizer.json`, and,
//! when present, `modules.json`, the pooling module's `config.json` and
//! `sentence_bert_config.json` (which decide pooling, normalisation and the maximum length).
//!
//! The weights become a metalearn architecture (token embedding, transformer blocks, pooling,
//! optional L2 normalisation) and parameter set, so everything that works on a network works on
//! the encoder.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::nn::architecture::{Architecture, Layer, Pooling};
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::text::tokenizer::TextTokenizer;

/// Files a model folder must hold.
const REQUIRED_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// Where an encoder came from, stored with every model built on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderSource {
    /// The folder (or `hf:` name) it was read from.
    pub name: String,
    /// SHA-256 of its `model.safetensors`, in hex.
    pub sha256: String,
}

/// A pre-trained encoder read from a folder: its architecture, weights, tokenizer and origin.
#[derive(Clone, Debug)]
pub struct PretrainedEncoder {
    /// Token embedding, transformer blocks, pooling and (when the model normalises) L2.
    pub architecture: Architecture,
    /// The weights, under the architecture's parameter names.
    pub params: ParamSet,
    /// The model's tokenizer, padding to the longest member of a batch.
    pub tokenizer: TextTokenizer,
    /// Where it came from.
    pub source: EncoderSource,
}

/// The fields of `config.json` the encoder needs.
#[derive(Debug, Deserialize)]
struct BertConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: u32,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// One entry of `modules.json`.
#[derive(Debug, Deserialize)]
pub(crate) struct ModuleEntry {
    /// The module's folder, relative to the model folder.
    #[serde(default)]
    pub(crate) path: String,
    /// Its Python class, e.g. `sentence_transformers.models.Pooling`.
    #[serde(rename = "type")]
    pub(crate) kind: String,
}

/// The pooling module's `config.json`.
#[derive(Debug, Default, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

/// Checks that the folder holds the files an encoder needs, naming what is missing.
fn check_files(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Data(format!(
            "{}: no such model folder; an encoder folder holds {} (the Hugging Face / \
             sentence-transformers layout)",
            dir.display(),
            REQUIRED_FILES.join(", ")
        )));
    }
    let missing: Vec<&str> = REQUIRED_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if missing.contains(&"model.safetensors") && dir.join("pytorch_model.bin").is_file() {
        return Err(Error::Data(format!(
            "{}: has only pytorch_model.bin (a PyTorch pickle), which metalearn does not read; \
             convert it to model.safetensors once, e.g. with Python: \
             `from transformers import AutoModel; AutoModel.from_pretrained(\"{0}\")\
             .save_pretrained(\"{0}\", safe_serialization=True)`",
            dir.display()
        )));
    }
    Err(Error::Data(format!(
        "{}: missing {}; an encoder folder needs {} (plus, optionally, modules.json, \
         1_Pooling/config.json and sentence_bert_config.json)",
        dir.display(),
        missing.join(", "),
        REQUIRED_FILES.join(", ")
    )))
}

/// Pooling and normalisation from `modules.json` and the pooling config (mean pooling and no
/// normalisation for a plain transformer folder, as sentence-transformers assumes).
fn read_pooling(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((Pooling::Mean, false));
    }
    let modules: Vec<ModuleEntry> = read_json(&modules_path, "")?;
    let mut pooling = Pooling::Mean;
    let mut normalize = false;
    for module in &modules {
        let kind = module.kind.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" => {}
            "Pooling" => {
                let path = dir.join(&module.path).join("config.json");
                let cfg: PoolingConfig = read_json(&path, "")?;
                let modes = [
                    (cfg.pooling_mode_mean_tokens, Pooling::Mean),
                    (cfg.pooling_mode_cls_token, Pooling::Cls),
                    (cfg.pooling_mode_max_tokens, Pooling::Max),
                ];
                let chosen: Vec<Pooling> = modes
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, p)| *p)
                    .collect();
                if cfg.pooling_mode_mean_sqrt_len_tokens || chosen.len() != 1 {
                    return Err(Error::Data(format!(
                        "{}: metalearn reads exactly one of pooling_mode_mean_tokens, \
                         pooling_mode_cls_token and pooling_mode_max_tokens set to true",
                        path.display()
                    )));
                }
                pooling = chosen[0];
            }
            "Normalize" => normalize = true,
            other => {
                return Err(Error::Data(format!(
                    "{}: module `{}` ({other}) is not supported; metalearn reads Transformer, \
                     Pooling and Normalize modules",
                    modules_path.display(),
                    module.kind
                )))
            }
        }
    }
    Ok((pooling, normalize))
}

/// Longest sequence the model reads: `sentence_bert_config.json`'s `max_seq_length` when
/// present, else the number of position embeddings.
fn read_max_length(dir: &Path, positions: usize) -> Result<usize> {
    let path = dir.join("sentence_bert_config.json");
    if !path.is_file() {
        return Ok(positions);
    }
    let value: serde_json::Value = read_json(&path, "")?;
    match value.get("max_seq_length").and_then(|v| v.as_u64()) {
        Some(n) if n > 0 => Ok((n as usize).min(positions)),
        _ => Ok(positions),
    }
}

/// Hex SHA-256 of a file, read in chunks.
pub fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Reads the encoder in `dir`, with weights in `dtype`.
pub fn load_pretrained(dir: &Path, dtype: DType) -> Result<PretrainedEncoder> {
    check_files(dir)?;
    let config_path = dir.join("config.json");
    let cfg: BertConfig = read_json(&config_path, "")?;
    let bad_config = |what: String| Error::Data(format!("{}: {what}", config_path.display()));
    if let Some(kind) = cfg.model_type.as_deref() {
        if kind != "bert" {
            return Err(bad_config(format!(
                "model_type `{kind}` is not supported; metalearn reads BERT encoders (model_type \
                 `bert`, e.g. all-MiniLM-L6-v2)"
            )));
        }
    }
    if cfg.hidden_act != "gelu" {
        return Err(bad_config(format!(
            "hidden_act `{}` is not supported; metalearn's transformer block uses `gelu`",
            cfg.hidden_act
        )));
    }
    if let Some(kind) = cfg.position_embedding_type.as_deref() {
        if kind != "absolute" {
            return Err(bad_config(format!(
                "position_embedding_type `{kind}` is not supported (only `absolute`)"
            )));
        }
    }
    let (pooling, normalize) = read_pooling(dir)?;
    let max_length = read_max_length(dir, cfg.max_position_embeddings)?;
    let tokenizer =
        TextTokenizer::from_file(&dir.join("tokenizer.json"), max_length, cfg.pad_token_id)?;
    if let Some(max_id) = tokenizer.max_token_id() {
        if max_id as usize >= cfg.vocab_size {
            return Err(Error::Data(format!(
                "{}: the tokenizer's vocabulary ({} tokens, ids up to {max_id}) does not match \
                 the embedding matrix of {} rows in config.json; use the tokenizer.json that \
                 was published with these weights",
                dir.join("tokenizer.json").display(),
                tokenizer.vocab_size(),
                cfg.vocab_size
            )));
        }
    }

    let mut arch = Architecture::new(&[max_length]);
    arch.push_named(
        "embeddings",
        Layer::TokenEmbedding {
            vocab_size: cfg.vocab_size,
            hidden: cfg.hidden_size,
            max_positions: cfg.max_position_embeddings,
            type_vocab_size: cfg.type_vocab_size,
            pad_id: cfg.pad_token_id,
            eps: cfg.layer_norm_eps,
        },
    )?;
    for i in 1..=cfg.num_hidden_layers {
        arch.push_named(
            &format!("block{i}"),
            Layer::TransformerBlock {
                heads: cfg.num_attention_heads,
                intermediate: cfg.intermediate_size,
                eps: cfg.layer_norm_eps,
                lora_rank: 0,
                lora_alpha: 16.0,
            },
        )?;
    }
    arch.push_named("pool", Layer::SequencePool { mode: pooling })?;
    if normalize {
        arch.push_named("normalize", Layer::L2Normalize)?;
    }
    let network = Network::build(&arch).map_err(|e| bad_config(e.to_string()))?;

    let weights_path = dir.join("model.safetensors");
    let params = read_weights(&weights_path, &network, cfg.num_hidden_layers, dtype)?;
    Ok(PretrainedEncoder {
        architecture: arch,
        params,
        tokenizer,
        source: EncoderSource {
            name: dir.display().to_string(),
            sha256: file_sha256(&weights_path)?,
        },
    })
}

/// Where each metalearn parameter comes from in the Hugging Face file, and whether the stored
/// matrix is `[out, in]` (PyTorch's `Linear`) and must be transposed to metalearn's `[in, out]`.
fn hf_names(layers: usize) -> Vec<(String, String, bool)> {
    let mut names = vec![
        (
            "embeddings.word",
            "embeddings.word_embeddings.weight",
            false,
        ),
        (
            "embeddings.position",
            "embeddings.position_embeddings.weight",
            false,
        ),
        (
            "embeddings.token_type",
            "embeddings.token_type_embeddings.weight",
            false,
        ),
        (
            "embeddings.norm_gamma",
            "embeddings.LayerNorm.weight",
            false,
        ),
        ("embeddings.norm_beta", "embeddings.LayerNorm.bias", false),
    ]
    .into_iter()
    .map(|(a, b, t)| (a.to_string(), b.to_string(), t))
    .collect::<Vec<_>>();
    for i in 0..layers {
        let ours = format!("block{}", i + 1);
        let theirs = format!("encoder.layer.{i}");
        let pairs = [
            ("q", "attention.self.query"),
            ("k", "attention.self.key"),
            ("v", "attention.self.value"),
            ("o", "attention.output.dense"),
            ("ff1", "intermediate.dense"),
            ("ff2", "output.dense"),
        ];
        for (short, long) in pairs {
            names.push((
                format!("{ours}.{short}_weight"),
                format!("{theirs}.{long}.weight"),
                true,
            ));
            names.push((
                format!("{ours}.{short}_bias"),
                format!("{theirs}.{long}.bias"),
                false,
            ));
        }
        for (short, long) in [
            ("attn_norm", "attention.output.LayerNorm"),
            ("ff_norm", "output.LayerNorm"),
        ] {
            names.push((
                format!("{ours}.{short}_gamma"),
                format!("{theirs}.{long}.weight"),
                false,
            ));
            names.push((
                format!("{ours}.{short}_beta"),
                format!("{theirs}.{long}.bias"),
                false,
            ));
        }
    }
    names
}

/// Reads the weights from `model.safetensors`, checking every tensor's presence and shape.
fn read_weights(path: &Path, network: &Network, layers: usize, dtype: DType) -> Result<ParamSet> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::Data(format!(
            "{}: not a readable safetensors file ({e})",
            path.display()
        ))
    })?;
    // Weights saved from a task model (BertForSequenceClassification, ...) carry a `bert.`
    // prefix.
    let prefix = ["", "bert.", "model."]
        .into_iter()
        .find(|p| tensors.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
        .ok_or_else(|| {
            Error::Data(format!(
                "{}: has no tensor `embeddings.word_embeddings.weight`; this is not a BERT \
                 encoder's weight file",
                path.display()
            ))
        })?;
    let mut params = ParamSet::new();
    let sources: std::collections::HashMap<String, (String, bool)> = hf_names(layers)
        .into_iter()
        .map(|(ours, theirs, transpose)| (ours, (theirs, transpose)))
        .collect();
    for spec in network.param_specs() {
        let (theirs, transpose) = &sources[&spec.name];
        let transpose = *transpose;
        let key = format!("{prefix}{theirs}");
        let tensor = tensors.get(&key).ok_or_else(|| {
            Error::Data(format!(
                "{}: tensor `{key}` is missing (config.json describes {layers} layers)",
                path.display()
            ))
        })?;
        let expected: Vec<usize> = if transpose {
            spec.shape.iter().rev().copied().collect()
        } else {
            spec.shape.clone()
        };
        if tensor.dims() != expected.as_slice() {
            return Err(Error::Data(format!(
                "{}: tensor `{key}` has shape {:?}, config.json implies {expected:?}",
                path.display(),
                tensor.dims()
            )));
        }
        let tensor: Tensor = if transpose {
            tensor.t()?.contiguous()?
        } else {
            tensor.clone()
        };
        params.insert(spec.name.clone(), tensor.to_dtype(dtype)?)?;
    }
    Ok(params)
}
