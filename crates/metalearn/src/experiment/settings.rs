//! The experiment configuration of `metalearn meta-train`: a TOML file with the sections
//! `[task]`, `[model]`, `[algorithm]`, `[training]` and `[eval]`.
//!
//! Reading a file checks, in order: TOML syntax; that every key exists (an unknown key is named
//! with its section, the nearest valid key — "did you mean `ways`?" — or the section it belongs
//! in, and the list of valid keys); the type of every value; and the range of every number and
//! the combinations the code relies on. Each error starts with `path:line:column:` of the key it
//! concerns and says what to change. [`ConfigDocument`] and [`TableSchema`] do the same for the
//! `train` / `finetune` config files.
//!
//! ```toml
//! [task]
//! kind = "sinusoid"        # or "classification" (with data = "folder or file.csv")
//! support = 10
//! query = 10
//!
//! [model]
//! arch = "mlp"             # or "conv4"
//! hidden = [40, 40]
//!
//! [algorithm]
//! name = "maml"            # maml, reptile, meta_sgd, anil, protonet
//! inner_lr = 0.01
//! inner_steps = 1
//! eval_inner_steps = 10
//!
//! [training]
//! iterations = 70000
//! meta_batch = 25
//! outer_lr = 0.001
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::suggest::did_you_mean;
use crate::config::{at_least, positive_finite, ConfigDocument, KeyProblem, TableSchema};
use crate::error::{Error, Result};
use crate::meta::{AlgorithmConfig, AlgorithmKind};
use crate::meta_training::Schedule;
use crate::nn::architecture::Activation;
use crate::tasks::episodic::EpisodeSpec;
use crate::text::TokenizerRecord;

/// The whole experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Where tasks come from.
    pub task: TaskConfig,
    /// The network.
    #[serde(default)]
    pub model: ModelConfig,
    /// The meta-learning algorithm.
    pub algorithm: AlgorithmConfig,
    /// The meta-training loop.
    #[serde(default)]
    pub training: TrainingConfig,
    /// Evaluation defaults.
    #[serde(default)]
    pub eval: EvalConfig,
    /// The text model's tokenizer, once read: from the checkpoint this config came from, or
    /// from `model.encoder` (see [`ExperimentConfig::with_stored_tokenizer`]). When set, texts
    /// are tokenised with it and `model.encoder` is not read for them.
    #[serde(skip)]
    pub(crate) stored_tokenizer: Option<TokenizerRecord>,
}

/// `[task]`: a sinusoid distribution or episodes over a labelled data set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// `sinusoid` or `classification`.
    pub kind: String,
    /// Sinusoid: amplitude range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amplitude: Option<[f64; 2]>,
    /// Sinusoid: phase range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<[f64; 2]>,
    /// Sinusoid: input range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_range: Option<[f64; 2]>,
    /// Sinusoid: support points per task (K).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support: Option<usize>,
    /// Sinusoid: query points per task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<usize>,
    /// Sinusoid: evenly spaced query points of test tasks (default 100; 0 is invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_grid: Option<usize>,
    /// Classification: an image folder (one sub-folder per class) or a CSV file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Classification from CSV: the label column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Classification from a CSV of texts: the column holding the text (the model is then a
    /// text encoder, `model.arch = "encoder"`, whose tokenizer reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_column: Option<String>,
    /// Classification from CSV: a column naming each class's group (e.g. CLINC150's `domain`),
    /// for `same_group` tasks and `split_groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_column: Option<String>,
    /// Classification from CSV: the groups (values of `group_column`) of each split by name,
    /// `{ train = [...], validation = [...], test = [...] }`, instead of `split` fractions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_groups: Option<crate::data::omniglot::AlphabetSplit>,
    /// Classification from images: `[height, width]` to resize to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[usize; 2]>,
    /// Classification from images: 1 (grey) or 3 (RGB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Classes per task (N).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ways: Option<usize>,
    /// Support examples per class (K).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shots: Option<usize>,
    /// Query examples per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queries: Option<usize>,
    /// Draw all classes of a task from one group.
    #[serde(default)]
    pub same_group: bool,
    /// Fractions of classes for meta-train / validation / test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<[f64; 3]>,
    /// Split by whole groups instead of classes.
    #[serde(default)]
    pub split_by_group: bool,
    /// Seed of the class split.
    #[serde(default)]
    pub split_seed: u64,
    /// Read `data` as Omniglot (`<root>/<Alphabet>/<characterNN>/<image>.png`, a zip archive or
    /// unpacked); when absent, a `.zip` file or a folder of alphabet folders is taken as Omniglot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omniglot: Option<bool>,
    /// Omniglot: add every character rotated by 90, 180 and 270 degrees as three more classes.
    #[serde(default)]
    pub rotations: bool,
    /// Omniglot: add every character's left-right mirror image as one more class (with
    /// `rotations`, the mirror image's rotations too). Meta-training classes only.
    #[serde(default)]
    pub reflections: bool,
    /// Omniglot: the resizing filter, "area" (default) or "lanczos3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resample: Option<crate::data::omniglot::Resample>,
    /// Omniglot: alphabets of each split by name, `{ train = [...], validation = [...],
    /// test = [...] }` (instead of `split` fractions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_alphabets: Option<crate::data::omniglot::AlphabetSplit>,
    /// Omniglot: folder of the decoded-image cache (default: `.metalearn-cache` beside the data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Omniglot: a second archive or folder whose `split_alphabets.validation` alphabets give the
    /// validation tasks, so that every alphabet of `data` can be meta-trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_data: Option<PathBuf>,
    /// Recommendation (`kind = "recommendation"`, `data` a folder): the files, columns,
    /// features and cold-start protocol, `[task.ratings]` (see
    /// [`crate::data::ratings::RatingsConfig`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratings: Option<crate::data::ratings::RatingsConfig>,
    /// Image data: random perturbation of meta-training images, `{ shift = 1.5, rotation = 10,
    /// scale = 0.1, shear = 0.1, stroke = 0.5 }` (see [`crate::data::augment::Augment`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<crate::data::augment::Augment>,
}

/// `[model]`: the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `mlp`, `conv4`, or `encoder` (a pre-trained text encoder, see `encoder`).
    #[serde(default = "default_arch")]
    pub arch: String,
    /// With `arch = "encoder"`: the encoder to start from, a Hugging Face /
    /// sentence-transformers folder, `hf:OWNER/MODEL`, or a text model trained by metalearn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<PathBuf>,
    /// MLP hidden sizes.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// MLP activation.
    #[serde(default = "default_activation")]
    pub activation: String,
    /// Conv-4 filters per layer.
    #[serde(default = "default_width")]
    pub width: usize,
    /// Embedding size of an MLP used by ProtoNet.
    #[serde(default = "default_width")]
    pub embedding: usize,
}

fn default_arch() -> String {
    "mlp".into()
}
fn default_hidden() -> Vec<usize> {
    vec![40, 40]
}
fn default_activation() -> String {
    "relu".into()
}
fn default_width() -> usize {
    64
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: default_arch(),
            encoder: None,
            hidden: default_hidden(),
            activation: default_activation(),
            width: default_width(),
            embedding: default_width(),
        }
    }
}

/// `[training]`: the meta-training loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Meta-iterations.
    #[serde(default = "default_iterations")]
    pub iterations: u64,
    /// Tasks per meta-iteration.
    #[serde(default = "default_meta_batch")]
    pub meta_batch: usize,
    /// Outer (Adam) learning rate.
    #[serde(default = "default_outer_lr")]
    pub outer_lr: f64,
    /// Outer learning-rate schedule.
    #[serde(default)]
    pub schedule: Schedule,
    /// Validate every this many iterations (0: never).
    #[serde(default = "default_validate_every")]
    pub validate_every: u64,
    /// Validation tasks per validation.
    #[serde(default = "default_validation_tasks")]
    pub validation_tasks: usize,
    /// Write a resumable checkpoint every this many iterations (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Seed of initialisation and task sampling.
    #[serde(default)]
    pub seed: u64,
}

fn default_iterations() -> u64 {
    1000
}
fn default_meta_batch() -> usize {
    4
}
fn default_outer_lr() -> f64 {
    1e-3
}
fn default_validate_every() -> u64 {
    500
}
fn default_validation_tasks() -> usize {
    100
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            iterations: default_iterations(),
            meta_batch: default_meta_batch(),
            outer_lr: default_outer_lr(),
            schedule: Schedule::default(),
            validate_every: default_validate_every(),
            validation_tasks: default_validation_tasks(),
            checkpoint_every: 0,
            seed: 0,
        }
    }
}

/// `[eval]`: defaults of `meta-eval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Test tasks.
    #[serde(default = "default_episodes")]
    pub episodes: usize,
    /// Joint-training steps of the transfer baseline.
    #[serde(default = "default_baseline_iterations")]
    pub baseline_iterations: usize,
    /// Adam learning rate of the transfer baseline's joint training.
    #[serde(default = "default_outer_lr")]
    pub baseline_lr: f64,
}

fn default_episodes() -> usize {
    600
}
fn default_baseline_iterations() -> usize {
    5000
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            episodes: default_episodes(),
            baseline_iterations: default_baseline_iterations(),
            baseline_lr: default_outer_lr(),
        }
    }
}

impl ExperimentConfig {
    /// The sections of an experiment config and the keys each accepts (taken from the structs,
    /// so the list cannot drift from what the parser accepts).
    pub fn schema() -> TableSchema {
        let schedule = TableSchema::flat(&["type", "min_factor", "every", "factor"]);
        TableSchema::of::<ExperimentConfig>()
            .with_table(
                "task",
                TableSchema::of::<TaskConfig>()
                    .with_table(
                        "split_alphabets",
                        TableSchema::of::<crate::data::omniglot::AlphabetSplit>(),
                    )
                    .with_table(
                        "split_groups",
                        TableSchema::of::<crate::data::omniglot::AlphabetSplit>(),
                    )
                    .with_table(
                        "augment",
                        TableSchema::of::<crate::data::augment::Augment>(),
                    )
                    .with_table(
                        "ratings",
                        TableSchema::of::<crate::data::ratings::RatingsConfig>(),
                    ),
            )
            .with_table("model", TableSchema::of::<ModelConfig>())
            .with_table("algorithm", TableSchema::of::<AlgorithmConfig>())
            .with_table(
                "training",
                TableSchema::of::<TrainingConfig>().with_table("schedule", schedule),
            )
            .with_table("eval", TableSchema::of::<EvalConfig>())
    }

    /// Reads and validates a TOML config file. Errors start with `path:line:column:` where the
    /// offending key is in the file, name the key, and say what to change.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_document(&ConfigDocument::parse(&text, Some(path))?)
    }

    /// Parses and validates TOML text (errors carry `line N, column M:` instead of a path).
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::from_document(&ConfigDocument::parse(text, None)?)
    }

    fn from_document(doc: &ConfigDocument) -> Result<Self> {
        if doc.is_empty() {
            return Err(doc.error(
                "the config is empty: an experiment needs at least a [task] and an [algorithm] \
                 section (see configs/*.toml for complete examples)",
            ));
        }
        let schema = Self::schema();
        doc.check_keys(&schema)?;
        let config: Self = doc.deserialize(&schema)?;
        config
            .check()
            .map_err(|problem| doc.problem_error(&problem))?;
        Ok(config)
    }

    /// Checks every range and the combinations the code relies on; messages name the field and
    /// what to change. Run again after command-line overrides.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(KeyProblem::into_error)
    }

    /// Like [`ExperimentConfig::validate`], keeping the dotted key of the offending field apart
    /// from the message (so that a file's line can be added to it).
    pub fn check(&self) -> std::result::Result<(), KeyProblem> {
        self.check_task()?;
        self.check_model()?;
        self.check_algorithm()?;
        self.check_training()?;
        self.check_eval()
    }

    fn check_task(&self) -> std::result::Result<(), KeyProblem> {
        let t = &self.task;
        if t.ratings.is_some() && t.kind != "recommendation" {
            return Err(KeyProblem::new(
                "task.ratings",
                "`[task.ratings]` applies only to task.kind = \"recommendation\"; remove it",
            ));
        }
        let sinusoid_keys = [
            ("amplitude", t.amplitude.is_some()),
            ("phase", t.phase.is_some()),
            ("x_range", t.x_range.is_some()),
            ("support", t.support.is_some()),
            ("query", t.query.is_some()),
            ("test_grid", t.test_grid.is_some()),
        ];
        let classification_keys = [
            ("data", t.data.is_some()),
            ("target", t.target.is_some()),
            ("image_size", t.image_size.is_some()),
            ("channels", t.channels.is_some()),
            ("ways", t.ways.is_some()),
            ("shots", t.shots.is_some()),
            ("queries", t.queries.is_some()),
            ("same_group", t.same_group),
            ("split", t.split.is_some()),
            ("split_by_group", t.split_by_group),
            ("split_seed", t.split_seed != 0),
            ("omniglot", t.omniglot.is_some()),
            ("rotations", t.rotations),
            ("reflections", t.reflections),
            ("resample", t.resample.is_some()),
            ("split_alphabets", t.split_alphabets.is_some()),
            ("cache_dir", t.cache_dir.is_some()),
            ("augment", t.augment.is_some()),
            ("validation_data", t.validation_data.is_some()),
            ("text_column", t.text_column.is_some()),
            ("group_column", t.group_column.is_some()),
            ("split_groups", t.split_groups.is_some()),
        ];
        match t.kind.as_str() {
            "sinusoid" => {
                if let Some((key, _)) = classification_keys.iter().find(|(_, set)| *set) {
                    return Err(KeyProblem::new(
                        format!("task.{key}"),
                        format!(
                            "`task.{key}` applies only to task.kind = \"classification\"; remove \
                             it for sinusoid tasks"
                        ),
                    ));
                }
                self.sinusoid_ranges()?;
                if self.algorithm.name == AlgorithmKind::Protonet {
                    return Err(KeyProblem::new(
                        "algorithm.name",
                        "algorithm `protonet` needs task.kind = \"classification\"; use maml, \
                         reptile, meta_sgd or anil for sinusoid tasks",
                    ));
                }
                if matches!(self.model.arch.as_str(), "conv4" | "encoder") {
                    return Err(KeyProblem::new(
                        "model.arch",
                        format!(
                            "`model.arch` = \"{}\" needs classification tasks; use \"mlp\" for \
                             sinusoid tasks",
                            self.model.arch
                        ),
                    ));
                }
                Ok(())
            }
            "classification" => {
                if let Some((key, _)) = sinusoid_keys.iter().find(|(_, set)| *set) {
                    return Err(KeyProblem::new(
                        format!("task.{key}"),
                        format!(
                            "`task.{key}` applies only to task.kind = \"sinusoid\"; for \
                             classification set ways, shots and queries instead"
                        ),
                    ));
                }
                self.episode_spec()?;
                self.classification_ranges()
            }
            "recommendation" => self.check_recommendation(&classification_keys, &sinusoid_keys),
            other => Err(KeyProblem::new(
                "task.kind",
                format!(
                    "`task.kind` = \"{other}\" is unknown{}: use \"sinusoid\", \
                     \"classification\" or \"recommendation\"",
                    did_you_mean(other, &["sinusoid", "classification", "recommendation"])
                ),
            )),
        }
    }

    fn check_recommendation(
        &self,
        classification_keys: &[(&str, bool)],
        sinusoid_keys: &[(&str, bool)],
    ) -> std::result::Result<(), KeyProblem> {
        let t = &self.task;
        let foreign = classification_keys
            .iter()
            .chain(sinusoid_keys)
            .find(|(key, set)| *set && *key != "data");
        if let Some((key, _)) = foreign {
            return Err(KeyProblem::new(
                format!("task.{key}"),
                format!(
                    "`task.{key}` does not apply to task.kind = \"recommendation\"; remove it \
                     (the recommender's settings live in [task.ratings])"
                ),
            ));
        }
        if let Some(ratings) = &t.ratings {
            ratings
                .check()
                .map_err(|(key, message)| KeyProblem::new(key, message))?;
        }
        if self.model.arch != "recommender" {
            return Err(KeyProblem::new(
                "model.arch",
                format!(
                    "task.kind = \"recommendation\" needs model.arch = \"recommender\" (feature \
                     embeddings and an MLP that predicts the rating), got \"{}\"",
                    self.model.arch
                ),
            ));
        }
        if self.algorithm.name == AlgorithmKind::Protonet {
            return Err(KeyProblem::new(
                "algorithm.name",
                "algorithm `protonet` classifies; recommendation predicts ratings: use maml, \
                 meta_sgd, anil or reptile",
            ));
        }
        if self.training.validate_every > 0 {
            return Err(KeyProblem::new(
                "training.validate_every",
                "recommendation runs have no validation tasks (the cold partitions are scored \
                 by meta-eval): set training.validate_every = 0",
            ));
        }
        Ok(())
    }

    fn sinusoid_ranges(&self) -> std::result::Result<(), KeyProblem> {
        let t = &self.task;
        for (key, range) in [
            ("amplitude", t.amplitude),
            ("phase", t.phase),
            ("x_range", t.x_range),
        ] {
            if let Some([lo, hi]) = range {
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                    return Err(KeyProblem::new(
                        format!("task.{key}"),
                        format!(
                            "`task.{key}` must be [min, max] with finite min <= max, got [{lo}, {hi}]"
                        ),
                    ));
                }
            }
        }
        for (key, value, what) in [
            ("support", t.support, "support points per task"),
            ("query", t.query, "query points per task"),
            ("test_grid", t.test_grid, "query points of a test task"),
        ] {
            if value == Some(0) {
                return Err(at_least(&format!("task.{key}"), 0, 1, what));
            }
        }
        Ok(())
    }

    fn classification_ranges(&self) -> std::result::Result<(), KeyProblem> {
        let t = &self.task;
        if let Some([height, width]) = t.image_size {
            if height == 0 || width == 0 {
                return Err(KeyProblem::new(
                    "task.image_size",
                    format!(
                        "`task.image_size` must be [height, width] with both >= 1, got \
                         [{height}, {width}]"
                    ),
                ));
            }
            if t.rotations && height != width {
                return Err(KeyProblem::new(
                    "task.image_size",
                    format!(
                        "`task.rotations` needs square images, but task.image_size is \
                         [{height}, {width}]; make height and width equal"
                    ),
                ));
            }
        }
        if let Some(channels) = t.channels.filter(|c| !matches!(c, 1 | 3)) {
            return Err(KeyProblem::new(
                "task.channels",
                format!("`task.channels` must be 1 (grey) or 3 (RGB), got {channels}"),
            ));
        }
        if let Some(fractions) = t.split {
            let in_range = fractions
                .iter()
                .all(|f| f.is_finite() && (0.0..=1.0).contains(f));
            let sum: f64 = fractions.iter().sum();
            if !in_range || (sum - 1.0).abs() > 1e-6 {
                return Err(KeyProblem::new(
                    "task.split",
                    format!(
                        "`task.split` must be three fractions [train, validation, test], each in \
                         [0, 1], summing to 1; got {fractions:?} (sum {sum})"
                    ),
                ));
            }
            if fractions[0] == 0.0 {
                return Err(KeyProblem::new(
                    "task.split",
                    format!(
                        "`task.split` = {fractions:?} leaves no classes for meta-training; give \
                         the first (train) fraction a value > 0"
                    ),
                ));
            }
            if fractions[1] == 0.0 && self.training.validate_every > 0 {
                return Err(KeyProblem::new(
                    "task.split",
                    format!(
                        "`task.split` = {fractions:?} leaves no validation classes, but \
                         training.validate_every = {} asks for validation; give the second \
                         fraction a value > 0 or set training.validate_every = 0",
                        self.training.validate_every
                    ),
                ));
            }
        }
        if let Some(alphabets) = &t.split_alphabets {
            if t.split.is_some() || t.split_by_group {
                return Err(KeyProblem::new(
                    "task.split_alphabets",
                    "`task.split_alphabets` names the alphabets of each split; remove task.split \
                     and task.split_by_group, which would divide them another way",
                ));
            }
            if alphabets.train.is_empty() {
                return Err(KeyProblem::new(
                    "task.split_alphabets",
                    "`task.split_alphabets.train` is empty: name the alphabets to meta-train on",
                ));
            }
        }
        if let Some(groups) = &t.split_groups {
            if t.split.is_some() || t.split_by_group || t.split_alphabets.is_some() {
                return Err(KeyProblem::new(
                    "task.split_groups",
                    "`task.split_groups` names the groups of each split; remove task.split, \
                     task.split_by_group and task.split_alphabets, which would divide them \
                     another way",
                ));
            }
            if t.group_column.is_none() {
                return Err(KeyProblem::new(
                    "task.split_groups",
                    "`task.split_groups` names groups, but no `task.group_column` says which \
                     column holds each row's group; add it (e.g. group_column = \"domain\")",
                ));
            }
            if groups.train.is_empty() {
                return Err(KeyProblem::new(
                    "task.split_groups",
                    "`task.split_groups.train` is empty: name the groups to meta-train on",
                ));
            }
            if groups.validation.is_empty() && self.training.validate_every > 0 {
                return Err(KeyProblem::new(
                    "task.split_groups",
                    format!(
                        "`task.split_groups.validation` is empty, but training.validate_every = \
                         {} asks for validation; name validation groups or set \
                         training.validate_every = 0",
                        self.training.validate_every
                    ),
                ));
            }
        }
        for (key, set) in [
            ("group_column", t.group_column.is_some()),
            ("split_groups", t.split_groups.is_some()),
        ] {
            if set && t.text_column.is_none() {
                return Err(KeyProblem::new(
                    format!("task.{key}"),
                    format!(
                        "`task.{key}` applies to text data (with task.text_column); for images \
                         use split_by_group or, for Omniglot, split_alphabets"
                    ),
                ));
            }
        }
        let text_model = self.model.arch == "encoder";
        if text_model != t.text_column.is_some() {
            return Err(if text_model {
                KeyProblem::new(
                    "task.text_column",
                    "`model.arch` = \"encoder\" reads texts: set `task.text_column` to the CSV \
                     column holding them",
                )
            } else {
                KeyProblem::new(
                    "task.text_column",
                    "`task.text_column` makes the data texts, which only a text encoder reads: set \
                     [model] arch = \"encoder\" and encoder = \"DIR|hf:NAME\"",
                )
            });
        }
        if let Some((key, message)) = t.augment.as_ref().and_then(|a| a.problem()) {
            return Err(KeyProblem::new(key, message));
        }
        Ok(())
    }

    fn check_model(&self) -> std::result::Result<(), KeyProblem> {
        let m = &self.model;
        if !matches!(m.arch.as_str(), "mlp" | "conv4" | "encoder" | "recommender") {
            return Err(KeyProblem::new(
                "model.arch",
                format!(
                    "`model.arch` = \"{}\" is unknown{}: use \"mlp\", \"conv4\", \"encoder\" \
                     or \"recommender\"",
                    m.arch,
                    did_you_mean(&m.arch, &["mlp", "conv4", "encoder", "recommender"])
                ),
            ));
        }
        if m.arch == "recommender" && self.task.kind != "recommendation" {
            return Err(KeyProblem::new(
                "model.arch",
                "`model.arch` = \"recommender\" needs task.kind = \"recommendation\"",
            ));
        }
        if (m.arch == "encoder") != m.encoder.is_some() {
            return Err(KeyProblem::new(
                "model.encoder",
                if m.encoder.is_some() {
                    format!(
                        "`model.encoder` applies only to model.arch = \"encoder\" (here \"{}\"); \
                         set arch = \"encoder\" or remove it",
                        m.arch
                    )
                } else {
                    "`model.arch` = \"encoder\" starts from a pre-trained text encoder: set \
                     `model.encoder` to its folder, hf:OWNER/MODEL, or a text model trained by \
                     metalearn"
                        .to_string()
                },
            ));
        }
        if let Err(e) = m.activation.parse::<Activation>() {
            let names = ["relu", "sigmoid", "tanh", "softmax", "linear"];
            return Err(KeyProblem::new(
                "model.activation",
                format!(
                    "`model.activation`: {e}{}",
                    did_you_mean(&m.activation, &names)
                ),
            ));
        }
        if let Some(position) = m.hidden.iter().position(|&size| size == 0) {
            return Err(KeyProblem::new(
                "model.hidden",
                format!(
                    "`model.hidden` sizes must each be >= 1, but entry {position} of {:?} is 0; \
                     remove the entry or give it units",
                    m.hidden
                ),
            ));
        }
        if m.width == 0 {
            return Err(at_least("model.width", 0, 1, "filters per convolution"));
        }
        if m.embedding == 0 {
            return Err(at_least("model.embedding", 0, 1, "embedding units"));
        }
        Ok(())
    }

    fn check_algorithm(&self) -> std::result::Result<(), KeyProblem> {
        self.algorithm.check()
    }

    fn check_training(&self) -> std::result::Result<(), KeyProblem> {
        let t = &self.training;
        if t.iterations == 0 {
            return Err(at_least("training.iterations", 0, 1, "meta-iterations"));
        }
        if t.meta_batch == 0 {
            return Err(at_least(
                "training.meta_batch",
                0,
                1,
                "tasks per meta-iteration",
            ));
        }
        positive_finite("training.outer_lr", t.outer_lr)?;
        match t.schedule {
            Schedule::Constant => {}
            Schedule::Cosine { min_factor } => {
                if !(min_factor.is_finite() && (0.0..=1.0).contains(&min_factor)) {
                    return Err(KeyProblem::new(
                        "training.schedule",
                        format!(
                            "`training.schedule.min_factor` is the final rate as a fraction of \
                             outer_lr and must be in [0, 1], got {min_factor}"
                        ),
                    ));
                }
            }
            Schedule::Step { every, factor } => {
                if every == 0 {
                    return Err(KeyProblem::new(
                        "training.schedule",
                        "`training.schedule.every` (iterations between decays) must be >= 1, got 0",
                    ));
                }
                if !(factor.is_finite() && factor > 0.0 && factor <= 1.0) {
                    return Err(KeyProblem::new(
                        "training.schedule",
                        format!(
                            "`training.schedule.factor` is the decay per step and must be in \
                             (0, 1], got {factor}"
                        ),
                    ));
                }
            }
        }
        if t.validate_every > 0 && t.validation_tasks == 0 {
            return Err(KeyProblem::new(
                "training.validation_tasks",
                "`training.validation_tasks` must be >= 1 when validating; raise it or set \
                 training.validate_every = 0 to skip validation",
            ));
        }
        Ok(())
    }

    fn check_eval(&self) -> std::result::Result<(), KeyProblem> {
        let e = &self.eval;
        if e.episodes == 0 {
            return Err(at_least("eval.episodes", 0, 1, "test tasks"));
        }
        if e.baseline_iterations == 0 {
            return Err(at_least(
                "eval.baseline_iterations",
                0,
                1,
                "joint-training steps of the transfer baseline",
            ));
        }
        positive_finite("eval.baseline_lr", e.baseline_lr)
    }

    /// The episode shape of `[task]` (classification).
    pub fn episode(&self) -> Result<EpisodeSpec> {
        self.episode_spec().map_err(KeyProblem::into_error)
    }

    fn episode_spec(&self) -> std::result::Result<EpisodeSpec, KeyProblem> {
        let t = &self.task;
        let spec = EpisodeSpec {
            ways: t.ways.unwrap_or(5),
            shots: t.shots.unwrap_or(1),
            queries: t.queries.unwrap_or(15),
            same_group: t.same_group,
        };
        if spec.ways < 2 {
            return Err(at_least(
                "task.ways",
                spec.ways,
                2,
                "classes per task: a task tells at least two classes apart",
            ));
        }
        if spec.shots == 0 {
            return Err(at_least("task.shots", 0, 1, "support examples per class"));
        }
        if spec.queries == 0 {
            return Err(at_least("task.queries", 0, 1, "query examples per class"));
        }
        Ok(spec)
    }
}
