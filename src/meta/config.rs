//! The experiment configuration of `metalearn meta-train`: a TOML file with the sections
//! `[task]`, `[model]`, `[algorithm]`, `[training]` and `[eval]`. Unknown keys are errors.
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
    /// Reads and validates a TOML config file; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every range; messages name the field and what to change.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        self.algorithm.validate()?;
        let t = &self.training;
        if t.iterations == 0 {
            return bad("training.iterations must be >= 1".into());
        }
        if t.meta_batch == 0 {
            return bad("training.meta_batch must be >= 1".into());
        }
        if !(t.outer_lr > 0.0 && t.outer_lr.is_finite()) {
            return bad(format!("training.outer_lr must be > 0, got {}", t.outer_lr));
        }
        if t.validate_every > 0 && t.validation_tasks == 0 {
            return bad("training.validation_tasks must be >= 1 when validating".into());
        }
        if self.eval.episodes == 0 {
            return bad("eval.episodes must be >= 1".into());
        }
        match self.task.kind.as_str() {
            "sinusoid" => {
                self.sinusoid()?.validate()?;
                if self.algorithm.name == AlgorithmKind::Protonet {
                    return bad("algorithm `protonet` needs task.kind = \"classification\"".into());
                }
            }
            "classification" => {
                self.episode()?;
                if self.task.data.is_none() {
                    return bad(
                        "task.data is required for classification: an image folder or a CSV file"
                            .into(),
                    );
                }
            }
            other => {
                return bad(format!(
                    "task.kind `{other}` is unknown: use \"sinusoid\" or \"classification\""
                ))
            }
        }
        match self.model.arch.as_str() {
            "mlp" => {
                self.model.activation.parse::<Activation>()?;
                if self.model.hidden.contains(&0) {
                    return bad("model.hidden sizes must be >= 1".into());
                }
            }
            "conv4" => {
                if self.model.width == 0 {
                    return bad("model.width must be >= 1".into());
                }
            }
            other => return bad(format!("model.arch `{other}` is unknown: use mlp or conv4")),
        }
        Ok(())
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
        let t = &self.task;
        let ways = t.ways.unwrap_or(5);
        let shots = t.shots.unwrap_or(1);
        let queries = t.queries.unwrap_or(15);
        if ways < 2 {
            return Err(Error::Config(format!("task.ways must be >= 2, got {ways}")));
        }
        if shots == 0 || queries == 0 {
            return Err(Error::Config(
                "task.shots and task.queries must be >= 1".into(),
            ));
        }
        Ok(EpisodeSpec {
            ways,
            shots,
            queries,
            same_group: t.same_group,
        })
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
            || self.task.resample.is_some()
            || self.task.split_alphabets.is_some()
        {
            return Err(Error::Config(format!(
                "task.rotations, task.resample and task.split_alphabets apply only to Omniglot \
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
        Ok(Box::new(EpisodicSampler::new(
            pool,
            self.episode()?,
            &split,
        )?))
    }

    /// Episodes over an Omniglot archive or folder (see [`crate::data::omniglot`]): classes are
    /// characters grouped by alphabet; `split_alphabets` or the `split` fractions (of alphabets
    /// with `split_by_group`, else of characters) divide them.
    fn omniglot_source(&self, path: &Path) -> Result<Box<dyn TaskSource>> {
        use crate::data::omniglot::{CachePolicy, OmniglotData, OmniglotOptions, OmniglotSplit};
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
        let split = match &t.split_alphabets {
            Some(alphabets) => OmniglotSplit::Alphabets(alphabets.clone()),
            None => OmniglotSplit::Fractions(SplitSpec {
                fractions: t.split.unwrap_or([0.6, 0.2, 0.2]),
                by_group: t.split_by_group,
                seed: t.split_seed,
            }),
        };
        Ok(Box::new(data.sampler(self.episode()?, &split)?))
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
