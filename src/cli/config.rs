//! TOML config files for `train` and `finetune`: every command-line option has a key of the same
//! name (with `_` for `-`), flags win over the file, and an unknown key is an error naming it.
//!
//! ```toml
//! data = "iris.csv"        # relative paths are relative to the config file
//! target = "species"
//! hidden = "64,32"         # or [64, 32]
//! optimizer = "adam"
//! lr = 0.001
//! epochs = 50
//! validation_split = 0.2
//! early_stopping = 5
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// A list given either as a comma-separated string (`"64,32"`) or as a TOML array.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ListValue<T> {
    /// `"a,b,c"`
    Text(String),
    /// `[a, b, c]`
    Items(Vec<T>),
}

impl ListValue<usize> {
    /// The comma-separated form, as the command line would give it.
    pub fn to_text(&self) -> String {
        match self {
            ListValue::Text(s) => s.clone(),
            ListValue::Items(items) => items
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// A layer given by index or name in a TOML `freeze` array.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LayerItem {
    /// 0-based position.
    Index(usize),
    /// Layer name.
    Name(String),
}

impl ListValue<LayerItem> {
    /// The comma-separated form, as the command line would give it.
    pub fn to_text(&self) -> String {
        match self {
            ListValue::Text(s) => s.clone(),
            ListValue::Items(items) => items
                .iter()
                .map(|item| match item {
                    LayerItem::Index(i) => i.to_string(),
                    LayerItem::Name(n) => n.clone(),
                })
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// The keys a config file may set. All are optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// CSV file with the training data.
    pub data: Option<PathBuf>,
    /// Target column of the CSV file.
    pub target: Option<String>,
    /// Image folder (one sub-folder per class).
    pub images: Option<PathBuf>,
    /// Image height after resizing.
    pub height: Option<usize>,
    /// Image width after resizing.
    pub width: Option<usize>,
    /// Image channels (1 grey, 3 colour).
    pub channels: Option<usize>,
    /// Hidden layer sizes of the MLP.
    pub hidden: Option<ListValue<usize>>,
    /// Hidden-layer activation.
    pub activation: Option<String>,
    /// Filters per convolution of the image backbone.
    pub filters: Option<usize>,
    /// sgd, adam or adamw.
    pub optimizer: Option<String>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Weight decay.
    pub weight_decay: Option<f64>,
    /// SGD momentum.
    pub momentum: Option<f64>,
    /// Training loss.
    pub loss: Option<String>,
    /// Epochs.
    pub epochs: Option<usize>,
    /// Batch size.
    pub batch_size: Option<usize>,
    /// Fraction of rows held out for validation.
    pub validation_split: Option<f64>,
    /// Early-stopping patience in epochs.
    pub early_stopping: Option<usize>,
    /// Seed.
    pub seed: Option<u64>,
    /// Output checkpoint.
    pub out: Option<PathBuf>,
    /// Checkpoint to fine-tune (finetune only).
    pub from: Option<PathBuf>,
    /// Layers to freeze (finetune only).
    pub freeze: Option<ListValue<LayerItem>>,
    /// Replace the head by one with this many outputs (finetune only).
    pub new_head: Option<usize>,
    /// Train only the head (finetune only).
    pub linear_probe: Option<bool>,
}

/// Keys that only `train` accepts.
const TRAIN_ONLY: &[&str] = &[
    "hidden",
    "activation",
    "filters",
    "height",
    "width",
    "channels",
];
/// Keys that only `finetune` accepts.
const FINETUNE_ONLY: &[&str] = &["from", "freeze", "new_head", "linear_probe"];

impl FileConfig {
    /// Reads a config file. Relative paths inside it are resolved against the file's folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg = Self::from_toml(&text)
            .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or_else(|| Path::new(""));
        for p in [&mut cfg.data, &mut cfg.images, &mut cfg.out, &mut cfg.from]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parses config text (paths are left as written).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string().trim().to_string()))
    }

    /// The names of the keys that are set.
    pub fn keys_set(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut note = |set: bool, key: &'static str| {
            if set {
                keys.push(key);
            }
        };
        note(self.data.is_some(), "data");
        note(self.target.is_some(), "target");
        note(self.images.is_some(), "images");
        note(self.height.is_some(), "height");
        note(self.width.is_some(), "width");
        note(self.channels.is_some(), "channels");
        note(self.hidden.is_some(), "hidden");
        note(self.activation.is_some(), "activation");
        note(self.filters.is_some(), "filters");
        note(self.optimizer.is_some(), "optimizer");
        note(self.lr.is_some(), "lr");
        note(self.weight_decay.is_some(), "weight_decay");
        note(self.momentum.is_some(), "momentum");
        note(self.loss.is_some(), "loss");
        note(self.epochs.is_some(), "epochs");
        note(self.batch_size.is_some(), "batch_size");
        note(self.validation_split.is_some(), "validation_split");
        note(self.early_stopping.is_some(), "early_stopping");
        note(self.seed.is_some(), "seed");
        note(self.out.is_some(), "out");
        note(self.from.is_some(), "from");
        note(self.freeze.is_some(), "freeze");
        note(self.new_head.is_some(), "new_head");
        note(self.linear_probe.is_some(), "linear_probe");
        keys
    }

    /// Fails if the file sets a key that `command` (`train` or `finetune`) does not take.
    pub fn check_for(&self, command: &str, path: &Path) -> Result<()> {
        let forbidden = if command == "train" {
            FINETUNE_ONLY
        } else {
            TRAIN_ONLY
        };
        if let Some(key) = self.keys_set().into_iter().find(|k| forbidden.contains(k)) {
            let other = if command == "train" {
                "finetune"
            } else {
                "train (finetune keeps the architecture and input shape of --from)"
            };
            return Err(Error::Config(format!(
                "config file {}: key `{key}` is not used by `{command}`, only by {other}; remove it",
                path.display()
            )));
        }
        Ok(())
    }
}

/// Reads the config file if one is given, checked for `command`.
pub fn load_for(path: Option<&Path>, command: &str) -> Result<FileConfig> {
    match path {
        None => Ok(FileConfig::default()),
        Some(path) => {
            let cfg = FileConfig::from_file(path)?;
            cfg.check_for(command, path)?;
            Ok(cfg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = FileConfig::from_toml("epochs = 3\nlearning_rate = 0.1\n").unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
    }

    #[test]
    fn lists_parse_as_text_or_arrays() -> Result<()> {
        let a = FileConfig::from_toml("hidden = \"64,32\"\nfreeze = [0, \"dense_2\"]")?;
        assert_eq!(a.hidden.unwrap().to_text(), "64,32");
        assert_eq!(a.freeze.unwrap().to_text(), "0,dense_2");
        let b = FileConfig::from_toml("hidden = [16, 8]")?;
        assert_eq!(b.hidden.unwrap().to_text(), "16,8");
        Ok(())
    }

    #[test]
    fn wrong_type_is_an_error() {
        assert!(FileConfig::from_toml("epochs = \"many\"").is_err());
    }

    #[test]
    fn command_specific_keys_are_checked() -> Result<()> {
        let cfg = FileConfig::from_toml("freeze = \"0\"")?;
        let err = cfg.check_for("train", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("`freeze`"), "{err}");
        cfg.check_for("finetune", Path::new("c.toml"))?;
        let cfg = FileConfig::from_toml("hidden = \"4\"")?;
        assert!(cfg.check_for("finetune", Path::new("c.toml")).is_err());
        Ok(())
    }
}
