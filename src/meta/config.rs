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

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::meta::train::Schedule;
use crate::meta::{AlgorithmConfig, AlgorithmKind};
use crate::nn::architecture::{Activation, Architecture};
use crate::tasks::episodic::{ClassPool, EpisodeSpec, EpisodicSampler, SplitSpec};
use crate::tasks::sinusoid::SinusoidTasks;
use crate::tasks::{TaskKind, TaskSource};

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
    /// Image data: random perturbation of meta-training images, `{ shift = 1.5, rotation = 10,
    /// scale = 0.1, shear = 0.1, stroke = 0.5 }` (see [`crate::data::augment::Augment`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<crate::data::augment::Augment>,
}

/// `[model]`: the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `mlp` or `conv4`.
    #[serde(default = "default_arch")]
    pub arch: String,
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
                        "augment",
                        TableSchema::of::<crate::data::augment::Augment>(),
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
                if self.model.arch == "conv4" {
                    return Err(KeyProblem::new(
                        "model.arch",
                        "`model.arch` = \"conv4\" needs image tasks; use \"mlp\" for sinusoid tasks",
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
            other => Err(KeyProblem::new(
                "task.kind",
                format!(
                    "`task.kind` = \"{other}\" is unknown{}: use \"sinusoid\" or \"classification\"",
                    did_you_mean_value(other, &["sinusoid", "classification"])
                ),
            )),
        }
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
        if let Some((key, message)) = t.augment.as_ref().and_then(|a| a.problem()) {
            return Err(KeyProblem::new(key, message));
        }
        Ok(())
    }

    fn check_model(&self) -> std::result::Result<(), KeyProblem> {
        let m = &self.model;
        if !matches!(m.arch.as_str(), "mlp" | "conv4") {
            return Err(KeyProblem::new(
                "model.arch",
                format!(
                    "`model.arch` = \"{}\" is unknown{}: use \"mlp\" or \"conv4\"",
                    m.arch,
                    did_you_mean_value(&m.arch, &["mlp", "conv4"])
                ),
            ));
        }
        if let Err(e) = m.activation.parse::<Activation>() {
            let names = ["relu", "sigmoid", "tanh", "softmax", "linear"];
            return Err(KeyProblem::new(
                "model.activation",
                format!(
                    "`model.activation`: {e}{}",
                    did_you_mean_value(&m.activation, &names)
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
        let a = &self.algorithm;
        positive_finite("algorithm.inner_lr", a.inner_lr)?;
        if a.name != AlgorithmKind::Protonet && a.inner_steps == 0 {
            return Err(at_least(
                "algorithm.inner_steps",
                0,
                1,
                "inner steps per task in meta-training; eval_inner_steps = 0 scores without adapting",
            ));
        }
        if a.first_order && matches!(a.name, AlgorithmKind::Reptile | AlgorithmKind::Protonet) {
            return Err(KeyProblem::new(
                "algorithm.first_order",
                format!(
                    "`algorithm.first_order` applies to maml, meta_sgd and anil; {} has no \
                     second-order variant, so remove it",
                    a.name.name()
                ),
            ));
        }
        // Whatever else the algorithm's own check requires.
        a.validate()
            .map_err(|e| KeyProblem::new("algorithm", e.to_string()))
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

    /// The sinusoid task distribution of `[task]`.
    pub fn sinusoid(&self) -> Result<SinusoidTasks> {
        let d = SinusoidTasks::default();
        let t = &self.task;
        Ok(SinusoidTasks {
            amplitude: t.amplitude.unwrap_or(d.amplitude),
            phase: t.phase.unwrap_or(d.phase),
            x_range: t.x_range.unwrap_or(d.x_range),
            support: t.support.unwrap_or(d.support),
            query: t.query.unwrap_or(d.query),
            test_grid: t.test_grid.or(d.test_grid),
        })
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

    /// Regression or classification with its ways.
    pub fn task_kind(&self) -> Result<TaskKind> {
        Ok(match self.task.kind.as_str() {
            "sinusoid" => TaskKind::Regression,
            _ => TaskKind::Classification {
                ways: self.episode()?.ways,
            },
        })
    }

    /// Builds the task source. `data` overrides `task.data`.
    pub fn task_source(&self, data: Option<&Path>) -> Result<Box<dyn TaskSource>> {
        if self.task.kind == "sinusoid" {
            return Ok(Box::new(self.sinusoid()?));
        }
        let path = data
            .map(Path::to_path_buf)
            .or_else(|| self.task.data.clone())
            .ok_or_else(|| Error::Config("task.data (or --data) is required".into()))?;
        let omniglot = self
            .task
            .omniglot
            .unwrap_or_else(|| crate::data::omniglot::is_omniglot_path(&path));
        if omniglot {
            return self.omniglot_source(&path);
        }
        if self.task.rotations
            || self.task.reflections
            || self.task.resample.is_some()
            || self.task.split_alphabets.is_some()
            || self.task.validation_data.is_some()
        {
            return Err(Error::Config(format!(
                "task.rotations, task.reflections, task.resample, task.split_alphabets and \
                 task.validation_data apply only to Omniglot \
                 data, and {} is not in the Omniglot layout; remove them or set task.omniglot = true",
                path.display()
            )));
        }
        let dataset = if path.is_dir() {
            let [height, width] = self.task.image_size.unwrap_or([28, 28]);
            let options = crate::data::image_folder::ImageFolderOptions {
                height,
                width,
                channels: self.task.channels.unwrap_or(1),
            };
            crate::data::image_folder::load_image_folder(&path, &options)?
        } else {
            let target = self.task.target.as_deref().ok_or_else(|| {
                Error::Config(format!(
                    "task.target (the label column) is required for the CSV file {}",
                    path.display()
                ))
            })?;
            crate::data::csv::load_csv(&path, target)?
        };
        let labels = dataset.class_ids()?;
        let class_names = dataset.class_names.clone().unwrap_or_else(|| {
            let n = labels.iter().max().map_or(0, |m| m + 1);
            (0..n).map(|i| i.to_string()).collect()
        });
        let pool = ClassPool::new(dataset.x.clone(), &labels, class_names, None)?;
        let split = SplitSpec {
            fractions: self.task.split.unwrap_or([0.6, 0.2, 0.2]),
            by_group: self.task.split_by_group,
            seed: self.task.split_seed,
        };
        let sampler = EpisodicSampler::new(pool, self.episode()?, &split)?;
        Ok(Box::new(self.augmented(sampler)?))
    }

    /// Episodes over an Omniglot archive or folder (see [`crate::data::omniglot`]): classes are
    /// characters grouped by alphabet; `split_alphabets` or the `split` fractions (of alphabets
    /// with `split_by_group`, else of characters) divide them.
    fn omniglot_source(&self, path: &Path) -> Result<Box<dyn TaskSource>> {
        use crate::data::omniglot::{
            AlphabetSplit, CachePolicy, OmniglotData, OmniglotOptions, OmniglotSplit,
        };
        use crate::tasks::WithValidation;
        let t = &self.task;
        if let Some(channels) = t.channels.filter(|&c| c != 1) {
            return Err(Error::Config(format!(
                "task.channels = {channels}, but Omniglot images are grey: use 1 or leave it out"
            )));
        }
        let [height, width] = t.image_size.unwrap_or([28, 28]);
        let options = OmniglotOptions {
            height,
            width,
            resample: t.resample.unwrap_or_default(),
            rotations: t.rotations,
            reflections: t.reflections,
            cache: t
                .cache_dir
                .clone()
                .map_or(CachePolicy::Default, CachePolicy::Dir),
        };
        if t.split_alphabets.is_some() && (t.split.is_some() || t.split_by_group) {
            return Err(Error::Config(
                "task.split_alphabets names the alphabets of each split; remove task.split and \
                 task.split_by_group, which would divide them another way"
                    .into(),
            ));
        }
        let data = OmniglotData::load(path, &options)?;
        if let Some(validation_path) = &t.validation_data {
            let alphabets = t.split_alphabets.clone().ok_or_else(|| {
                Error::Config(
                    "task.validation_data needs task.split_alphabets, whose `validation` list \
                     names the alphabets of the validation data to validate on"
                        .into(),
                )
            })?;
            let validation_split = OmniglotSplit::Alphabets(AlphabetSplit {
                validation: alphabets.validation.clone(),
                ..AlphabetSplit::default()
            });
            let main_split = OmniglotSplit::Alphabets(AlphabetSplit {
                validation: Vec::new(),
                ..alphabets
            });
            // Rotated and mirrored copies are only ever meta-trained on, so the validation
            // archive needs none.
            let validation_options = OmniglotOptions {
                rotations: false,
                reflections: false,
                ..options.clone()
            };
            let validation = OmniglotData::load(validation_path, &validation_options)?
                .sampler(self.episode()?, &validation_split)?;
            let sampler = data.sampler(self.episode()?, &main_split)?;
            let sampler = self.supersample(sampler, &data, path, &options)?;
            return Ok(Box::new(WithValidation::new(
                Box::new(self.augmented(sampler)?),
                Box::new(validation),
            )?));
        }
        let split = match &t.split_alphabets {
            Some(alphabets) => OmniglotSplit::Alphabets(alphabets.clone()),
            None => OmniglotSplit::Fractions(SplitSpec {
                fractions: t.split.unwrap_or([0.6, 0.2, 0.2]),
                by_group: t.split_by_group,
                seed: t.split_seed,
            }),
        };
        let sampler = data.sampler(self.episode()?, &split)?;
        let sampler = self.supersample(sampler, &data, path, &options)?;
        Ok(Box::new(self.augmented(sampler)?))
    }

    /// With augmentation on, gives an Omniglot sampler the images at three times the model's
    /// resolution, so that warps do not blur (see [`crate::data::augment::Supersampled`]).
    fn supersample(
        &self,
        sampler: EpisodicSampler,
        data: &crate::data::omniglot::OmniglotData,
        path: &Path,
        options: &crate::data::omniglot::OmniglotOptions,
    ) -> Result<EpisodicSampler> {
        const FACTOR: usize = 3;
        match &self.task.augment {
            Some(augment) if augment.is_active() => {
                sampler.with_supersampled(data.supersampled(path, options, FACTOR)?)
            }
            _ => Ok(sampler),
        }
    }

    /// Applies `task.augment` (if set) to a sampler's meta-training episodes.
    fn augmented(&self, sampler: EpisodicSampler) -> Result<EpisodicSampler> {
        match &self.task.augment {
            Some(augment) => sampler.with_augment(augment.clone()),
            None => Ok(sampler),
        }
    }

    /// The network for tasks with inputs of `input_shape`.
    pub fn architecture(&self, input_shape: &[usize]) -> Result<Architecture> {
        let kind = self.task_kind()?;
        let protonet = self.algorithm.name == AlgorithmKind::Protonet;
        let outputs = match kind {
            TaskKind::Regression => 1,
            TaskKind::Classification { ways } => ways,
        };
        match self.model.arch.as_str() {
            "conv4" => {
                let shape: [usize; 3] = match input_shape {
                    [c, h, w] => [*c, *h, *w],
                    other => {
                        return Err(Error::Config(format!(
                            "model.arch conv4 needs image inputs [channels, height, width], the data has {other:?}"
                        )))
                    }
                };
                Architecture::conv4(shape, self.model.width, (!protonet).then_some(outputs))
            }
            _ => {
                let input: usize = input_shape.iter().product();
                let mut sizes = vec![input];
                sizes.extend(&self.model.hidden);
                sizes.push(if protonet {
                    self.model.embedding
                } else {
                    outputs
                });
                let mut arch = Architecture::mlp(&sizes, self.model.activation.parse()?)?;
                if input_shape.len() > 1 {
                    arch.input_shape = input_shape.to_vec();
                    arch.layers.insert(
                        0,
                        crate::nn::architecture::NamedLayer {
                            name: "flatten".into(),
                            layer: crate::nn::architecture::Layer::Flatten,
                        },
                    );
                }
                Ok(arch)
            }
        }
    }
}

// Reading config files: syntax, unknown keys, value types and ranges, each error pointing at the
// file, line and column of the key it concerns.

/// A problem with one field's value: its dotted key (e.g. `task.ways`, used to find the key's line
/// in a file) and a message that names it and says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyProblem {
    /// Dotted path of the key, e.g. `task.ways`.
    pub key: String,
    /// What is wrong and what to change.
    pub message: String,
}

impl KeyProblem {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The message as a configuration error, without a location.
    pub fn into_error(self) -> Error {
        Error::Config(self.message)
    }
}

/// "`key` must be >= min (what), got value".
fn at_least(key: &str, value: usize, min: usize, what: &str) -> KeyProblem {
    KeyProblem::new(
        key,
        format!("`{key}` must be >= {min} ({what}), got {value}"),
    )
}

/// Learning rates and the like: finite and strictly positive.
fn positive_finite(key: &str, value: f64) -> std::result::Result<(), KeyProblem> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(KeyProblem::new(
            key,
            format!("`{key}` must be a finite number > 0, got {value}"),
        ))
    }
}

/// The keys one table of a config file accepts, and which of them hold tables checked in turn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSchema {
    /// Accepted keys, in declaration order.
    pub keys: Vec<&'static str>,
    /// Keys whose values are tables, with the keys those accept.
    pub tables: Vec<(&'static str, TableSchema)>,
}

impl TableSchema {
    /// The fields of a struct deserialised with serde's derive.
    pub fn of<T: DeserializeOwned>() -> Self {
        Self::flat(struct_fields::<T>())
    }

    /// A table accepting exactly `keys`.
    pub fn flat(keys: &[&'static str]) -> Self {
        Self {
            keys: keys.to_vec(),
            tables: Vec::new(),
        }
    }

    /// Declares that `key` holds a table accepting `schema`'s keys.
    pub fn with_table(mut self, key: &'static str, schema: TableSchema) -> Self {
        self.tables.push((key, schema));
        self
    }

    /// The schema of the table under `key`, if `key` holds one.
    pub fn table(&self, key: &str) -> Option<&TableSchema> {
        self.tables
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, schema)| schema)
    }

    /// Whether the top level is made of sections (`[task]`, ...) rather than plain keys.
    fn is_sectioned(&self) -> bool {
        !self.tables.is_empty() && self.tables.len() == self.keys.len()
    }

    /// Every table below this one with its dotted path.
    fn sections(&self, prefix: &str) -> Vec<(String, &TableSchema)> {
        let mut out = Vec::new();
        for (name, schema) in &self.tables {
            let path = join_key(prefix, name);
            out.extend(schema.sections(&path));
            out.push((path, schema));
        }
        out
    }
}

/// The field names of a struct with a derived `Deserialize`: serde hands them to
/// `deserialize_struct`, where this deserializer records them and stops.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};

    struct FieldNames<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("field names recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The error is expected: the point is the names recorded on the way.
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

/// Edit distance between two strings, counted in characters: insertions, deletions,
/// substitutions and swaps of two neighbours (`adma` is one edit from `adam`) each cost 1.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The candidate `word` was most likely meant to be: the nearest by edit distance (ignoring case,
/// and `-` versus `_`) within a third of the longer name, else one that contains `word` or is
/// contained in it, else one made of the initials of `word`'s parts; `None` when nothing is
/// close.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let normal = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let word = normal(word);
    let near = candidates
        .iter()
        .map(|&c| (edit_distance(&word, &normal(c)), c))
        .filter(|(d, c)| *d <= (word.len().max(c.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    let containing = || {
        candidates.iter().copied().find(|c| {
            let c = normal(c);
            word.len() >= 3 && c.len() >= 3 && (c.contains(&word) || word.contains(&c))
        })
    };
    // `learning_rate` for `lr`: the initials of the word's parts.
    let initials: String = word
        .split('_')
        .filter_map(|part| part.chars().next())
        .collect();
    let abbreviated = || {
        candidates
            .iter()
            .copied()
            .find(|c| initials.len() >= 2 && normal(c) == initials)
    };
    near.or_else(containing).or_else(abbreviated)
}

/// `" (did you mean \"x\"?)"` for a misspelt value, or nothing.
fn did_you_mean_value(word: &str, candidates: &[&str]) -> String {
    closest(word, candidates)
        .map(|c| format!(" (did you mean \"{c}\"?)"))
        .unwrap_or_default()
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A TOML value reduced to what the checks need: tables with the byte spans of their keys.
enum SpannedNode {
    Table(Vec<(toml::Spanned<String>, toml::Spanned<SpannedNode>)>),
    Value,
}

impl<'de> Deserialize<'de> for SpannedNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> serde::de::Visitor<'de> for NodeVisitor {
            type Value = SpannedNode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<SpannedNode, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<toml::Spanned<String>>()? {
                    entries.push((key, map.next_value::<toml::Spanned<SpannedNode>>()?));
                }
                Ok(SpannedNode::Table(entries))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<SpannedNode, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(SpannedNode::Value)
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
        }
        d.deserialize_any(NodeVisitor)
    }
}

/// One key of a config file: its name, where it and its value are, and its sub-keys if its
/// value is a table.
#[derive(Clone, Debug)]
struct KeyNode {
    name: String,
    key_span: Option<Range<usize>>,
    value_span: Option<Range<usize>>,
    children: Option<Vec<KeyNode>>,
}

impl KeyNode {
    fn from_spanned(
        entries: Vec<(toml::Spanned<String>, toml::Spanned<SpannedNode>)>,
    ) -> Vec<Self> {
        entries
            .into_iter()
            .map(|(key, value)| {
                let key_span = key.span();
                let value_span = value.span();
                let children = match value.into_inner() {
                    SpannedNode::Table(entries) => Some(Self::from_spanned(entries)),
                    SpannedNode::Value => None,
                };
                Self {
                    name: key.into_inner(),
                    key_span: Some(key_span),
                    value_span: Some(value_span),
                    children,
                }
            })
            .collect()
    }

    /// Without positions (when the text holds values the span reader does not take, such as
    /// TOML dates).
    fn from_table(table: &toml::Table) -> Vec<Self> {
        table
            .iter()
            .map(|(name, value)| Self {
                name: name.clone(),
                key_span: None,
                value_span: None,
                children: value.as_table().map(Self::from_table),
            })
            .collect()
    }

    /// The bytes from the key to the end of its value.
    fn extent(&self) -> Option<Range<usize>> {
        let (key, value) = (self.key_span.as_ref()?, self.value_span.as_ref()?);
        Some(key.start.min(value.start)..key.end.max(value.end))
    }
}

/// A config file's text, parsed, with where each key is, so that every error names the file,
/// line and column it concerns.
pub struct ConfigDocument<'a> {
    text: &'a str,
    origin: Option<&'a Path>,
    root: Vec<KeyNode>,
}

impl<'a> ConfigDocument<'a> {
    /// Parses `text`; `origin` is the file it came from, for messages. Fails on TOML syntax
    /// errors, with the line and column.
    pub fn parse(text: &'a str, origin: Option<&'a Path>) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', "; ");
            let at = e.span().map(|span| line_column(text, span.start));
            Error::Config(format!(
                "{}not valid TOML: {message}",
                location_prefix(origin, at)
            ))
        })?;
        let root = match toml::from_str::<SpannedNode>(text) {
            Ok(SpannedNode::Table(entries)) => KeyNode::from_spanned(entries),
            _ => KeyNode::from_table(&table),
        };
        Ok(Self { text, origin, root })
    }

    /// Whether the file sets no key at all (empty, or only comments).
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// A configuration error about the whole file.
    pub fn error(&self, message: &str) -> Error {
        Error::Config(format!("{}{message}", location_prefix(self.origin, None)))
    }

    /// A configuration error located at `key` (a dotted path) when the file sets it.
    pub fn error_at(&self, key: &str, message: &str) -> Error {
        Error::Config(format!(
            "{}{message}",
            location_prefix(self.origin, self.location(key))
        ))
    }

    /// [`ConfigDocument::error_at`] for a [`KeyProblem`].
    pub fn problem_error(&self, problem: &KeyProblem) -> Error {
        self.error_at(&problem.key, &problem.message)
    }

    /// 1-based line and column of `key` (a dotted path such as `task.ways`) when the file sets
    /// it; for a key the file does not set, that of the nearest enclosing table it does set.
    pub fn location(&self, key: &str) -> Option<(usize, usize)> {
        let mut nodes = &self.root;
        let mut found = None;
        for part in key.split('.') {
            let Some(node) = nodes.iter().find(|n| n.name == part) else {
                break;
            };
            found = node.key_span.as_ref().or(found);
            match &node.children {
                Some(children) => nodes = children,
                None => break,
            }
        }
        found.map(|span| line_column(self.text, span.start))
    }

    /// Fails on the first key (in file order) that `schema` does not accept, naming its table,
    /// the closest valid key, the section it belongs to if it is valid elsewhere, and the valid
    /// keys.
    pub fn check_keys(&self, schema: &TableSchema) -> Result<()> {
        self.check_table(&self.root, "", schema, schema)
    }

    fn check_table(
        &self,
        nodes: &[KeyNode],
        path: &str,
        schema: &TableSchema,
        root: &TableSchema,
    ) -> Result<()> {
        for node in nodes {
            if !schema.keys.contains(&node.name.as_str()) {
                let message =
                    unknown_key_message(&node.name, node.children.is_some(), path, schema, root);
                let at = node
                    .key_span
                    .as_ref()
                    .map(|s| line_column(self.text, s.start));
                return Err(Error::Config(format!(
                    "{}{message}",
                    location_prefix(self.origin, at)
                )));
            }
            if let (Some(sub), Some(children)) = (schema.table(&node.name), &node.children) {
                self.check_table(children, &join_key(path, &node.name), sub, root)?;
            }
        }
        Ok(())
    }

    /// Deserialises the file into `T`; a wrong type, a missing key or a bad enum value is
    /// reported with the key's dotted name, its position and the expected form.
    pub fn deserialize<T: DeserializeOwned>(&self, schema: &TableSchema) -> Result<T> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span();
            let key = span
                .as_ref()
                .and_then(|s| {
                    self.innermost_key(s)
                        .or_else(|| key_on_line(self.text, s.start))
                })
                .unwrap_or_default();
            let (message, at) = match missing_field(e.message()) {
                Some(field) => {
                    let table = self.table_requiring(&key, field, schema);
                    let at = self.location(&table);
                    (missing_key_message(&table, field, schema), at)
                }
                None => (
                    explain_type_error(e.message(), &key),
                    span.map(|s| line_column(self.text, s.start)),
                ),
            };
            Error::Config(format!("{}{message}", location_prefix(self.origin, at)))
        })
    }

    /// The dotted path of the deepest key whose text (key and value) contains `span`.
    fn innermost_key(&self, span: &Range<usize>) -> Option<String> {
        let mut nodes = &self.root;
        let mut path: Option<String> = None;
        'descend: loop {
            for node in nodes {
                let Some(extent) = node.extent() else {
                    continue;
                };
                if extent.start <= span.start && span.end <= extent.end {
                    path = Some(join_key(path.as_deref().unwrap_or(""), &node.name));
                    match &node.children {
                        Some(children) => {
                            nodes = children;
                            continue 'descend;
                        }
                        None => break 'descend,
                    }
                }
            }
            break;
        }
        path
    }

    /// Of `key` and the tables enclosing it, the innermost whose schema has `field`.
    fn table_requiring(&self, key: &str, field: &str, schema: &TableSchema) -> String {
        let mut path = key.to_string();
        loop {
            let here = if path.is_empty() {
                Some(schema)
            } else {
                schema_at(schema, &path)
            };
            if here.is_some_and(|s| s.keys.contains(&field)) || path.is_empty() {
                return path;
            }
            path = path
                .rsplit_once('.')
                .map_or(String::new(), |(p, _)| p.to_string());
        }
    }
}

/// The dotted key written on the line of `offset` (`key = value` under the last `[header]`),
/// for when key positions are unknown.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let (line, _) = line_column(text, offset);
    let mut table = String::new();
    for (i, content) in text.lines().enumerate() {
        let content = content.trim();
        if content.starts_with('[') {
            table = content
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
        }
        if i + 1 == line {
            let (key, _) = content.split_once('=')?;
            let key = key.trim().trim_matches('"');
            return (!key.is_empty()).then(|| join_key(&table, key));
        }
    }
    None
}

/// `path:line:column: `, `path: `, `line N, column M: ` or nothing.
fn location_prefix(origin: Option<&Path>, at: Option<(usize, usize)>) -> String {
    match (origin, at) {
        (Some(path), Some((line, column))) => format!("{}:{line}:{column}: ", path.display()),
        (Some(path), None) => format!("{}: ", path.display()),
        (None, Some((line, column))) => format!("line {line}, column {column}: "),
        (None, None) => String::new(),
    }
}

fn schema_at<'s>(schema: &'s TableSchema, path: &str) -> Option<&'s TableSchema> {
    path.split('.')
        .try_fold(schema, |schema, part| schema.table(part))
}

/// The words between backquotes in a serde message (`expected one of `a`, `b``).
fn backquoted(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

fn unknown_key_message(
    name: &str,
    is_table: bool,
    path: &str,
    schema: &TableSchema,
    root: &TableSchema,
) -> String {
    let sections = root.sections("");
    let elsewhere: Vec<String> = sections
        .iter()
        .filter(|(p, s)| p != path && s.keys.contains(&name))
        .map(|(p, _)| format!("[{p}]"))
        .collect();
    if path.is_empty() && schema.is_sectioned() {
        let list = schema
            .keys
            .iter()
            .map(|k| format!("[{k}]"))
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(first) = elsewhere.first() {
            return format!(
                "`{name}` must be inside a section: move it under {first} (the sections are {list})"
            );
        }
        let guess = closest(name, &schema.keys)
            .map(|c| format!("; did you mean [{c}]?"))
            .unwrap_or_else(|| ".".into());
        let what = if is_table {
            format!("unknown section [{name}]")
        } else {
            format!("unknown key `{name}` at the top level")
        };
        return format!("{what}{guess} The sections are {list}");
    }
    let place = if path.is_empty() {
        String::new()
    } else {
        format!(" in [{path}]")
    };
    let mut message = format!("unknown key `{name}`{place}");
    let guess = closest(name, &schema.keys);
    match (elsewhere.first(), guess) {
        (Some(section), Some(guess)) => message.push_str(&format!(
            "; it belongs in {section} (or did you mean `{guess}`?)"
        )),
        (Some(section), None) => message.push_str(&format!("; it belongs in {section}.")),
        (None, Some(guess)) => message.push_str(&format!("; did you mean `{guess}`?")),
        (None, None) => message.push('.'),
    }
    let owner = if path.is_empty() {
        String::new()
    } else {
        format!(" of [{path}]")
    };
    message.push_str(&format!(" Valid keys{owner}: {}", schema.keys.join(", ")));
    message
}

fn missing_key_message(table: &str, field: &str, schema: &TableSchema) -> String {
    if table.is_empty() && schema.table(field).is_some() {
        return format!("the [{field}] section is missing; add it (see configs/*.toml)");
    }
    if table.is_empty() {
        return format!("the required key `{field}` is missing");
    }
    format!("[{table}] needs the key `{field}`; add `{field} = ...` to it")
}

/// Rewrites serde's wording ("invalid type: string \"five\", expected usize") as a sentence
/// about the key and the form it takes.
fn explain_type_error(message: &str, key: &str) -> String {
    let message = message.trim();
    let subject = if key.is_empty() {
        "a value".to_string()
    } else {
        format!("`{key}`")
    };
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((got, expected)) = rest.rsplit_once(", expected ") {
            // TOML dates and tables both reach serde as maps.
            let got = match got {
                "map" => "a table or a date",
                "sequence" => "an array",
                other => other,
            };
            return format!("{subject} must be {}, not {got}", expected_words(expected));
        }
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        if let Some((got, expected)) = rest.rsplit_once(", expected ") {
            return format!("{subject} must be {}, got {got}", expected_words(expected));
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("{subject} must be {expected}, but has {got}");
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (got, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let choices = backquoted(expected);
        let guess = did_you_mean_value(got, &choices);
        return format!(
            "{subject} = \"{got}\" is unknown{guess}: use one of {}",
            choices.join(", ")
        );
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (got, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let choices = backquoted(expected);
        let guess = closest(got, &choices)
            .map(|c| format!("; did you mean `{c}`?"))
            .unwrap_or_else(|| ".".into());
        let place = if key.is_empty() {
            String::new()
        } else {
            format!(" in [{key}]")
        };
        return format!(
            "unknown key `{got}`{place}{guess} Valid keys here: {}",
            choices.join(", ")
        );
    }
    if message.starts_with("data did not match any variant of untagged enum") {
        return format!(
            "{subject} must be a comma-separated string (\"64,32\") or an array ([64, 32])"
        );
    }
    format!("{subject}: {message}")
}

/// Serde's names of expected types, in the words of a config file.
fn expected_words(expected: &str) -> String {
    match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number (0 or more, no quotes)".into(),
        "isize" | "i64" | "i32" | "i16" | "i8" => "a whole number (no quotes)".into(),
        "f64" | "f32" => "a number (no quotes)".into(),
        "a boolean" => "true or false (no quotes)".into(),
        "a string" => "a string in quotes".into(),
        "a sequence" => "an array [..]".into(),
        other => other.to_string(),
    }
}
