//! TOML config files for `train` and `finetune`: every command-line option has a key of the same
//! name (with `_` for `-`), and flags win over the file. An unknown key, a value of the wrong type
//! or out of range, and a key that only the other command takes are errors that start with
//! `path:line:column:`, name the key and say what to change (with the nearest valid key for a
//! misspelt one).
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

use crate::config::suggest::did_you_mean;
use crate::config::{ConfigDocument, KeyProblem, TableSchema};
use crate::error::{Error, Result};
use crate::nn::architecture::Activation;
use crate::train::loss::Loss;

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
    /// The keys a `train` or `finetune` config file accepts (taken from the struct's fields).
    pub fn schema() -> TableSchema {
        TableSchema::of::<FileConfig>()
    }

    /// Reads and checks a config file (keys, types and ranges; errors start with
    /// `path:line:column:`). Relative paths inside it are resolved against the file's folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::read(path, None)
    }

    /// Reads a config file for `command` (`train` or `finetune`), which also refuses the keys
    /// that only the other command uses.
    fn read(path: &Path, command: Option<&str>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg = Self::from_document(&ConfigDocument::parse(&text, Some(path))?, command)?;
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

    /// Parses and checks config text (paths are left as written).
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::from_document(&ConfigDocument::parse(text, None)?, None)
    }

    fn from_document(doc: &ConfigDocument, command: Option<&str>) -> Result<Self> {
        let schema = Self::schema();
        doc.check_keys(&schema)?;
        let cfg: Self = doc.deserialize(&schema)?;
        if let Some(command) = command {
            if let Err(problem) = cfg.command_problem(command) {
                return Err(doc.problem_error(&problem));
            }
        }
        cfg.check().map_err(|problem| doc.problem_error(&problem))?;
        Ok(cfg)
    }

    /// Checks every value's range; messages name the key and what to change.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(KeyProblem::into_error)
    }

    /// Like [`FileConfig::validate`], keeping the offending key apart from the message.
    pub fn check(&self) -> std::result::Result<(), KeyProblem> {
        if self.data.is_some() && self.images.is_some() {
            return Err(KeyProblem::new(
                "images",
                "set either `data` (a CSV file) or `images` (an image folder), not both",
            ));
        }
        for (key, value, what) in [
            ("height", self.height, "image height in pixels"),
            ("width", self.width, "image width in pixels"),
            ("filters", self.filters, "filters per convolution"),
            ("epochs", self.epochs, "passes over the data"),
            ("batch_size", self.batch_size, "examples per step"),
            (
                "early_stopping",
                self.early_stopping,
                "epochs without improvement before stopping",
            ),
            ("new_head", self.new_head, "outputs of the new head"),
        ] {
            if value == Some(0) {
                return Err(KeyProblem::new(
                    key,
                    format!("`{key}` must be >= 1 ({what}), got 0"),
                ));
            }
        }
        if let Some(channels) = self.channels.filter(|c| !matches!(c, 1 | 3)) {
            return Err(KeyProblem::new(
                "channels",
                format!("`channels` must be 1 (grey) or 3 (RGB), got {channels}"),
            ));
        }
        if let Some(hidden) = &self.hidden {
            check_hidden(hidden)?;
        }
        if let Some(name) = &self.activation {
            if let Err(e) = name.parse::<Activation>() {
                let names = ["relu", "sigmoid", "tanh", "softmax", "linear"];
                return Err(KeyProblem::new(
                    "activation",
                    format!("`activation`: {e}{}", did_you_mean(name, &names)),
                ));
            }
        }
        if let Some(name) = &self.optimizer {
            let names = ["sgd", "adam", "adamw"];
            if !names.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(KeyProblem::new(
                    "optimizer",
                    format!(
                        "`optimizer` = \"{name}\" is unknown{}: use sgd, adam or adamw",
                        did_you_mean(name, &names)
                    ),
                ));
            }
        }
        if let Some(lr) = self.lr.filter(|lr| !(*lr > 0.0 && lr.is_finite())) {
            return Err(KeyProblem::new(
                "lr",
                format!("`lr` (the learning rate) must be a finite number > 0, got {lr}"),
            ));
        }
        if let Some(decay) = self.weight_decay.filter(|d| !(*d >= 0.0 && d.is_finite())) {
            return Err(KeyProblem::new(
                "weight_decay",
                format!("`weight_decay` must be a finite number >= 0, got {decay}"),
            ));
        }
        if let Some(momentum) = self.momentum {
            if !(0.0..1.0).contains(&momentum) {
                return Err(KeyProblem::new(
                    "momentum",
                    format!("`momentum` must be in [0, 1), got {momentum}"),
                ));
            }
            if let Some(name) = self
                .optimizer
                .as_ref()
                .filter(|name| !name.eq_ignore_ascii_case("sgd"))
            {
                return Err(KeyProblem::new(
                    "momentum",
                    format!(
                        "`momentum` applies to optimizer = \"sgd\" only, and this file sets \
                         optimizer = \"{name}\"; remove momentum or switch to sgd"
                    ),
                ));
            }
        }
        if let Some(name) = &self.loss {
            if let Err(e) = name.parse::<Loss>() {
                return Err(KeyProblem::new(
                    "loss",
                    format!("`loss`: {e}{}", did_you_mean(name, &Loss::NAMES)),
                ));
            }
        }
        if let Some(fraction) = self.validation_split {
            if !(fraction > 0.0 && fraction < 1.0) {
                return Err(KeyProblem::new(
                    "validation_split",
                    format!(
                        "`validation_split` is the fraction of examples held out and must be \
                         in (0, 1), e.g. 0.2; got {fraction}"
                    ),
                ));
            }
        }
        if let Some(ListValue::Text(text)) = &self.freeze {
            if text.split(',').any(|part| part.trim().is_empty()) {
                return Err(KeyProblem::new(
                    "freeze",
                    format!(
                        "`freeze` = \"{text}\" has an empty entry; list layer names or indices \
                         separated by commas, e.g. \"dense_1,2\""
                    ),
                ));
            }
        }
        Ok(())
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
        self.command_problem(command)
            .map_err(|problem| Error::Config(format!("{}: {}", path.display(), problem.message)))
    }

    /// The first key that only the other command uses.
    fn command_problem(&self, command: &str) -> std::result::Result<(), KeyProblem> {
        let forbidden = if command == "train" {
            FINETUNE_ONLY
        } else {
            TRAIN_ONLY
        };
        match self.keys_set().into_iter().find(|k| forbidden.contains(k)) {
            None => Ok(()),
            Some(key) => {
                let other = if command == "train" {
                    "finetune"
                } else {
                    "train (finetune keeps the architecture and input shape of --from)"
                };
                Err(KeyProblem::new(
                    key,
                    format!("key `{key}` is not used by `{command}`, only by {other}; remove it"),
                ))
            }
        }
    }
}

/// Checks a `hidden` list: positive sizes, or `"none"` / `""` for no hidden layer.
fn check_hidden(hidden: &ListValue<usize>) -> std::result::Result<(), KeyProblem> {
    let bad = |entry: &str| {
        KeyProblem::new(
            "hidden",
            format!(
                "`hidden` entry `{entry}` is not a layer size; give whole numbers >= 1, as \
                 \"64,32\" or [64, 32] (\"none\" for no hidden layer)"
            ),
        )
    };
    match hidden {
        ListValue::Items(sizes) => match sizes.iter().find(|&&n| n == 0) {
            Some(zero) => Err(bad(&zero.to_string())),
            None => Ok(()),
        },
        ListValue::Text(text) => {
            let text = text.trim();
            if text.is_empty() || text.eq_ignore_ascii_case("none") {
                return Ok(());
            }
            match text
                .split(',')
                .map(str::trim)
                .find(|part| !matches!(part.parse::<usize>(), Ok(n) if n > 0))
            {
                Some(part) => Err(bad(part)),
                None => Ok(()),
            }
        }
    }
}

/// Reads the config file if one is given, checked for `command` (`train` or `finetune`): keys,
/// types, ranges, and keys that only the other command takes.
pub fn load_for(path: Option<&Path>, command: &str) -> Result<FileConfig> {
    match path {
        None => Ok(FileConfig::default()),
        Some(path) => FileConfig::read(path, Some(command)),
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
