//! Self-describing checkpoints: one safetensors file whose metadata holds the architecture, the
//! training configuration and provenance, so that a model is rebuilt from the file alone.
//!
//! Tensor names are prefixed by their role: `param.<name>` (trainable weights),
//! `buffer.<name>` (batch-norm running statistics) and `state.<name>` (anything else an algorithm
//! or optimiser needs to resume, e.g. Adam moments or Meta-SGD learning rates).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::architecture::Architecture;
use crate::nn::network::Network;
use crate::nn::params::ParamSet;

/// Value of the `format` metadata key that marks a metalearn checkpoint.
pub const FORMAT: &str = "metalearn-checkpoint";
/// Metadata key listing the parameters a partial checkpoint does not hold.
const EXTERNAL_KEY: &str = "external_params";
/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// Where a checkpoint came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// metalearn version that wrote the file.
    pub metalearn_version: String,
    /// Seconds since the Unix epoch when it was written.
    pub created_unix: u64,
    /// The data it was trained on (path, name or description).
    #[serde(default)]
    pub data: Option<String>,
    /// The checkpoint it was fine-tuned from, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// Free-form notes (e.g. the command line).
    #[serde(default)]
    pub notes: Option<String>,
}

impl Provenance {
    /// Provenance stamped with this version and the current time.
    pub fn now() -> Self {
        Self {
            metalearn_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ..Default::default()
        }
    }
}

/// Everything a checkpoint file holds.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The network's architecture.
    pub architecture: Architecture,
    /// Trainable parameters.
    pub params: ParamSet,
    /// Batch-norm running statistics.
    pub buffers: ParamSet,
    /// Extra named tensors (optimiser moments, learned learning rates, ...).
    pub state: ParamSet,
    /// JSON sections such as `training` (optimiser, loss, metrics, epochs) or `meta`
    /// (algorithm and hyper-parameters, iteration, RNG state).
    pub sections: BTreeMap<String, serde_json::Value>,
    /// Where it came from.
    pub provenance: Provenance,
    /// Parameters of the architecture that the file does not hold because they live elsewhere
    /// (a LoRA checkpoint stores its adapters and head; the base encoder's weights stay in the
    /// base model). Empty for an ordinary, self-contained checkpoint; only
    /// [`Checkpoint::load_partial`] reads a file where it is not.
    pub external_params: Vec<String>,
}

impl Checkpoint {
    /// A checkpoint of the given architecture and tensors, stamped with the current provenance.
    pub fn new(architecture: Architecture, params: ParamSet, buffers: ParamSet) -> Self {
        Self {
            architecture,
            params,
            buffers,
            state: ParamSet::new(),
            sections: BTreeMap::new(),
            provenance: Provenance::now(),
            external_params: Vec::new(),
        }
    }

    /// Writes the checkpoint atomically (temporary file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut metadata = HashMap::new();
        metadata.insert("format".to_string(), FORMAT.to_string());
        metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        metadata.insert("architecture".to_string(), self.architecture.to_json());
        metadata.insert(
            "provenance".to_string(),
            serde_json::to_string(&self.provenance).expect("provenance serialises"),
        );
        for (key, value) in &self.sections {
            metadata.insert(format!("section.{key}"), value.to_string());
        }
        if !self.external_params.is_empty() {
            metadata.insert(
                EXTERNAL_KEY.to_string(),
                serde_json::to_string(&self.external_params).expect("names serialise"),
            );
        }
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (prefix, set) in [
            ("param", &self.params),
            ("buffer", &self.buffers),
            ("state", &self.state),
        ] {
            for (name, t) in set.iter() {
                let on_cpu = t.detach().to_device(&candle_core::Device::Cpu)?;
                tensors.push((format!("{prefix}.{name}"), on_cpu.contiguous()?));
            }
        }
        let bytes = safetensors::tensor::serialize(tensors, Some(metadata))
            .map_err(|e| Error::Checkpoint(format!("{}: cannot serialise: {e}", path.display())))?;
        crate::fsutil::atomic_write(path, &bytes)
    }

    /// Reads and validates a checkpoint: it must be a metalearn checkpoint whose tensors match its
    /// architecture exactly (names, shapes, no missing or extra parameters).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_checked(path.as_ref(), device, false)
    }

    /// Like [`Checkpoint::load`], but also reads a partial checkpoint (one whose
    /// `external_params` live in a base model, e.g. LoRA adapters and a head); the caller
    /// completes its parameters.
    pub fn load_partial(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_checked(path.as_ref(), device, true)
    }

    fn load_checked(path: &Path, device: &Device, allow_partial: bool) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Checkpoint(format!(
                "{}: cannot read the checkpoint ({e}); check the path",
                path.display()
            ))
        })?;
        Self::parse(&bytes, device, allow_partial).map_err(|e| match e {
            Error::Checkpoint(msg) => Error::Checkpoint(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses a checkpoint from its bytes (see [`Checkpoint::load`]).
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        Self::parse(bytes, device, false)
    }

    fn parse(bytes: &[u8], device: &Device, allow_partial: bool) -> Result<Self> {
        let bad = |msg: String| Error::Checkpoint(msg);
        let not_ckpt = "not a metalearn checkpoint (expected a safetensors file written by \
                        metalearn: train, finetune or meta-train one first)";
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            bad(format!(
                "{not_ckpt}; the file is not valid safetensors or is truncated ({e})"
            ))
        })?;
        let metadata = meta
            .metadata()
            .clone()
            .ok_or_else(|| bad(format!("{not_ckpt}; it has no metadata")))?;
        match metadata.get("format") {
            Some(format) if format == FORMAT => {}
            Some(format) => {
                return Err(bad(format!(
                    "{not_ckpt}; its `format` metadata is `{format}`, not `{FORMAT}`"
                )))
            }
            None => return Err(bad(format!("{not_ckpt}; its `format` metadata is missing"))),
        }
        let version: u32 = metadata
            .get("format_version")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("missing or invalid `format_version`".into()))?;
        if version > FORMAT_VERSION {
            return Err(bad(format!(
                "checkpoint format version {version} is newer than this metalearn supports \
                 ({FORMAT_VERSION}); upgrade metalearn"
            )));
        }
        let architecture = Architecture::from_json(
            metadata
                .get("architecture")
                .ok_or_else(|| bad("metadata has no `architecture`".into()))?,
        )
        .map_err(|e| bad(format!("{e}")))?;
        let provenance: Provenance = match metadata.get("provenance") {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| bad(format!("invalid `provenance` metadata: {e}")))?,
            None => Provenance::default(),
        };
        let external_params: Vec<String> = match metadata.get(EXTERNAL_KEY) {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| bad(format!("invalid `{EXTERNAL_KEY}` metadata: {e}")))?,
            None => Vec::new(),
        };
        if !external_params.is_empty() && !allow_partial {
            return Err(bad(format!(
                "it holds only part of its model's weights ({} tensors, such as `{}`, live in \
                 the base model it was trained on: a LoRA checkpoint); read it with the text \
                 commands (evaluate, predict), which load the base encoder too",
                external_params.len(),
                external_params[0]
            )));
        }
        let mut sections = BTreeMap::new();
        for (key, value) in &metadata {
            if let Some(section) = key.strip_prefix("section.") {
                let json = serde_json::from_str(value)
                    .map_err(|e| bad(format!("invalid JSON in metadata `{key}`: {e}")))?;
                sections.insert(section.to_string(), json);
            }
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
            bad(format!(
                "cannot read tensors (truncated or corrupt file?): {e}"
            ))
        })?;
        let network = Network::build(&architecture)
            .map_err(|e| bad(format!("its architecture is invalid: {e}")))?;
        let mut entries: Vec<(String, Tensor)> = tensors.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut params_map, mut buffers_map, mut state) =
            (HashMap::new(), HashMap::new(), ParamSet::new());
        for (name, t) in entries {
            if let Some(n) = name.strip_prefix("param.") {
                params_map.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix("buffer.") {
                buffers_map.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix("state.") {
                state.insert(n, t)?;
            } else {
                return Err(bad(format!(
                    "unexpected tensor `{name}` (not param./buffer./state.)"
                )));
            }
        }
        let mismatch = |e: Error| match e {
            Error::Checkpoint(msg) => bad(format!(
                "{msg}; the tensors do not match the architecture stored with them, so the file \
                 is corrupt or was edited by another tool: save the model again"
            )),
            other => other,
        };
        let stored_specs: Vec<crate::nn::network::ParamSpec> = network
            .param_specs()
            .iter()
            .filter(|spec| !external_params.contains(&spec.name))
            .cloned()
            .collect();
        if let Some(name) = external_params
            .iter()
            .find(|name| !network.param_specs().iter().any(|spec| &spec.name == *name))
        {
            return Err(bad(format!(
                "`{EXTERNAL_KEY}` names `{name}`, which is not a parameter of its architecture"
            )));
        }
        let params = collect_matching(&stored_specs, params_map, "parameter").map_err(mismatch)?;
        let buffers =
            collect_matching(network.buffer_specs(), buffers_map, "buffer").map_err(mismatch)?;
        Ok(Self {
            architecture,
            params,
            buffers,
            state,
            sections,
            provenance,
            external_params,
        })
    }

    /// A JSON section, if present.
    pub fn section(&self, key: &str) -> Option<&serde_json::Value> {
        self.sections.get(key)
    }

    /// A JSON section read as `T`, if present; a section that does not parse is an error
    /// naming it.
    pub fn parsed_section<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.section(key)
            .map(|value| {
                serde_json::from_value(value.clone()).map_err(|e| {
                    Error::Checkpoint(format!("the checkpoint's `{key}` section is invalid ({e})"))
                })
            })
            .transpose()
    }

    /// The parameters converted to `dtype`.
    pub fn params_as(&self, dtype: DType) -> Result<ParamSet> {
        self.params.to_dtype(dtype)
    }
}

fn collect_matching(
    specs: &[crate::nn::network::ParamSpec],
    mut found: HashMap<String, Tensor>,
    what: &str,
) -> Result<ParamSet> {
    let mut set = ParamSet::new();
    for spec in specs {
        let t = found.remove(&spec.name).ok_or_else(|| {
            Error::Checkpoint(format!(
                "{what} `{}` of the architecture is missing from the file",
                spec.name
            ))
        })?;
        if t.dims() != spec.shape.as_slice() {
            return Err(Error::Checkpoint(format!(
                "{what} `{}` has shape {:?} but the architecture needs {:?}",
                spec.name,
                t.dims(),
                spec.shape
            )));
        }
        if !matches!(t.dtype(), DType::F32 | DType::F64) {
            return Err(Error::Checkpoint(format!(
                "{what} `{}` has dtype {:?}; expected f32 or f64",
                spec.name,
                t.dtype()
            )));
        }
        set.insert(spec.name.clone(), t)?;
    }
    if let Some(extra) = found.keys().next() {
        return Err(Error::Checkpoint(format!(
            "{what} `{extra}` is not part of the architecture"
        )));
    }
    Ok(set)
}
