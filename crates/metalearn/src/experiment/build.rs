//! Wiring an experiment: from the settings to the data sources, the task source the sampler
//! draws from, and the network. The one place that knows data loaders, task samplers and
//! architectures at once; `crate::meta::build_algorithm` makes the algorithm.

use std::path::Path;

use candle_core::{DType, Device};

use crate::data::classes::{ClassPool, SplitSpec};
use crate::data::csv::load_text_columns;
use crate::data::text::load_labelled_texts;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::ExperimentConfig;
use crate::meta::learner::MetaLearner;
use crate::meta::AlgorithmKind;
use crate::nn::architecture::{Architecture, Layer};
use crate::nn::params::ParamSet;
use crate::tasks::episodic::EpisodicSampler;
use crate::tasks::sinusoid::SinusoidTasks;
use crate::tasks::{TaskKind, TaskSource};
use crate::text::{TextEncoder, TextTokenizer, TokenizerRecord};
use crate::train::optim::OptimizerConfig;

impl ExperimentConfig {
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

    /// Regression or classification with its ways.
    pub fn task_kind(&self) -> Result<TaskKind> {
        Ok(match self.task.kind.as_str() {
            "sinusoid" | "recommendation" => TaskKind::Regression,
            _ => TaskKind::Classification {
                ways: self.episode()?.ways,
            },
        })
    }

    /// Builds the task source of `[task]` (a command-line `--data` is written into `task.data`
    /// before this is called).
    pub fn task_source(&self) -> Result<Box<dyn TaskSource>> {
        if self.task.kind == "sinusoid" {
            return Ok(Box::new(self.sinusoid()?));
        }
        if self.task.kind == "recommendation" {
            return Ok(Box::new(self.recommendation_tasks(self.training.seed)?));
        }
        let path = self
            .task
            .data
            .clone()
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
        if let Some(text_column) = &self.task.text_column {
            return self.text_source(&path, text_column);
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

    /// The `[task.ratings]` settings (MovieLens' columns when the section is absent).
    pub fn ratings_config(&self) -> crate::data::ratings::RatingsConfig {
        self.task
            .ratings
            .clone()
            .unwrap_or_else(crate::data::ratings::RatingsConfig::movielens)
    }

    /// The recommender data of `task.data` (read once per process and configuration).
    pub fn ratings_data(&self) -> Result<std::sync::Arc<crate::data::ratings::RatingsData>> {
        let path = self.task.data.clone().ok_or_else(|| {
            Error::Config(
                "task.data (or --data) is required: the folder with ratings.csv, users.csv and \
                 items.csv"
                    .into(),
            )
        })?;
        crate::data::ratings::load_ratings_cached(&path, &self.ratings_config())
    }

    /// Every user of every partition as a task, support and query drawn with `seed`.
    pub fn recommendation_tasks(
        &self,
        seed: u64,
    ) -> Result<crate::tasks::recommendation::RecommendationTasks> {
        crate::tasks::recommendation::RecommendationTasks::new(
            self.ratings_data()?,
            &self.ratings_config(),
            seed,
        )
    }

    /// The learner that meta-training starts from: the network of `[model]` for inputs of
    /// `input_shape` with fresh weights, or, with `model.arch = "encoder"`, the pre-trained
    /// encoder's weights (and a fresh head for the MAML family).
    pub fn initial_learner(
        &self,
        input_shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<MetaLearner> {
        let arch = self.architecture(input_shape)?;
        let mut learner = MetaLearner::new_on(
            &arch,
            self.algorithm.clone(),
            self.task_kind()?,
            OptimizerConfig::adam(self.training.outer_lr),
            self.training.seed,
            dtype,
            device,
        )?;
        if self.model.arch == "recommender" {
            // The head starts at the mean warm rating, so training begins from the global-mean
            // predictor rather than from zero (a squared error of ~13 on a 1–5 scale).
            let mean = self.ratings_data()?.warm_mean();
            let mut meta = learner.meta_params();
            meta.weights = meta.weights.map(|name, t| {
                Ok(if name == "head.bias" {
                    t.ones_like()?.affine(mean, 0.0)?
                } else {
                    t.copy()?
                })
            })?;
            meta.inner_lrs = match meta.inner_lrs {
                Some(rates) => Some(rates.map(|_, t| Ok(t.copy()?))?),
                None => None,
            };
            learner.set_meta_params(&meta)?;
        }
        if self.model.arch == "encoder" {
            let encoder = self.text_encoder()?;
            let mut meta = learner.meta_params();
            let mut weights = ParamSet::new();
            for (name, fresh) in meta.weights.iter() {
                let value = match encoder.params().try_get(name) {
                    Some(pre_trained) => pre_trained.to_dtype(dtype)?.to_device(device)?,
                    None => fresh.copy()?,
                };
                weights.insert(name.clone(), value)?;
            }
            meta.weights = weights;
            // Fresh copies: a variable cannot be set from a tensor that shares its storage.
            meta.inner_lrs = match meta.inner_lrs {
                Some(rates) => Some(rates.map(|_, t| Ok(t.copy()?))?),
                None => None,
            };
            learner.set_meta_params(&meta)?;
        }
        Ok(learner)
    }

    /// The texts of a CSV file for this experiment's text model (`adapt`'s support and query
    /// files): `task.text_column` tokenised by the encoder's tokenizer and, with `target`, the
    /// labels as class ids, numbered by `classes` when given (a label outside them is an error
    /// naming its line) or by the file's own labels, sorted.
    pub fn text_dataset(
        &self,
        path: &Path,
        target: Option<&str>,
        classes: Option<&[String]>,
    ) -> Result<Dataset> {
        let text_column = self.task.text_column.as_deref().ok_or_else(|| {
            Error::Config(
                "this model does not read texts (its config has no task.text_column)".into(),
            )
        })?;
        let texts = load_labelled_texts(path, text_column, target)?;
        let tokens = self.text_tokenizer()?.encode_batch(&texts.text_refs())?;
        let x = tokens.to_tensor(DType::F32, &Device::Cpu)?;
        let class_names = match (target, classes) {
            (None, _) => None,
            (Some(_), Some(classes)) => Some(classes.to_vec()),
            (Some(_), None) => Some(texts.classes(None)),
        };
        let ids: Vec<f32> = match &class_names {
            None => vec![0.0; texts.len()],
            Some(names) => texts
                .labels
                .iter()
                .zip(&texts.lines)
                .map(|(label, line)| {
                    names
                        .iter()
                        .position(|n| n == label)
                        .map(|i| i as f32)
                        .ok_or_else(|| {
                            Error::Data(format!(
                                "{}:{line}: label `{label}` is not one of the classes {names:?}",
                                path.display()
                            ))
                        })
                })
                .collect::<Result<_>>()?,
        };
        let y = candle_core::Tensor::from_vec(ids, texts.len(), &Device::Cpu)?;
        Ok(Dataset {
            x,
            y,
            feature_names: vec![text_column.to_string()],
            target_name: target.unwrap_or_default().to_string(),
            class_names,
            source: path.display().to_string(),
        })
    }

    /// The tokenizer of this experiment's text model: the one set by
    /// [`Self::with_stored_tokenizer`] (e.g. stored in the checkpoint the config came from),
    /// else that of `model.encoder`.
    pub fn text_tokenizer(&self) -> Result<TextTokenizer> {
        match &self.stored_tokenizer {
            Some(record) => record.tokenizer(),
            None => Ok(self.text_encoder()?.tokenizer().clone()),
        }
    }

    /// What a checkpoint of this experiment's model stores of its tokenizer: `None` unless the
    /// model is a text encoder (`model.arch = "encoder"`).
    pub fn tokenizer_record(&self) -> Result<Option<TokenizerRecord>> {
        if self.model.arch != "encoder" {
            return Ok(None);
        }
        match &self.stored_tokenizer {
            Some(record) => Ok(Some(record.clone())),
            None => Ok(Some(self.text_encoder()?.tokenizer_record())),
        }
    }

    /// This config with a tokenizer already read: one a checkpoint stored, or
    /// [`Self::tokenizer_record`] kept so that the encoder is not read again for it (`None`:
    /// texts are tokenised by `model.encoder`'s tokenizer).
    pub fn with_stored_tokenizer(mut self, record: Option<TokenizerRecord>) -> Self {
        self.stored_tokenizer = record;
        self
    }

    /// The pre-trained text encoder of `model.encoder`.
    pub fn text_encoder(&self) -> Result<TextEncoder> {
        let spec = self.model.encoder.as_ref().ok_or_else(|| {
            Error::Config("model.encoder (the text encoder to start from) is required".into())
        })?;
        TextEncoder::load(spec, DType::F32)
    }

    /// Episodes over the texts of a CSV file: each row's `text_column` tokenised by the
    /// encoder's tokenizer (padded to the longest; the encoder drops the padding columns an
    /// episode does not need), classes from `target`, groups from `group_column`, divided by
    /// `split_groups` or the `split` fractions.
    fn text_source(&self, path: &Path, text_column: &str) -> Result<Box<dyn TaskSource>> {
        let t = &self.task;
        let target = t.target.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "task.target (the label column) is required for the CSV file {}",
                path.display()
            ))
        })?;
        let mut columns = vec![(text_column, "text"), (target, "label")];
        if let Some(group) = &t.group_column {
            columns.push((group.as_str(), "group"));
        }
        let rows = load_text_columns(path, &columns)?;
        if rows.is_empty() {
            return Err(Error::Data(format!("{}: no data rows", path.display())));
        }
        let texts: Vec<&str> = rows.iter().map(|(_, cells)| cells[0].as_str()).collect();
        let tokens = self.text_tokenizer()?.encode_batch(&texts)?;
        let x = tokens.to_tensor(DType::F32, &Device::Cpu)?;

        let mut class_names: Vec<String> = rows.iter().map(|(_, c)| c[1].clone()).collect();
        class_names.sort();
        class_names.dedup();
        let class_of = |name: &str| class_names.binary_search_by(|c| c.as_str().cmp(name));
        let labels: Vec<usize> = rows
            .iter()
            .map(|(_, c)| class_of(&c[1]).expect("every label is a class"))
            .collect();
        let (groups, group_names) = match &t.group_column {
            Some(column) => {
                let (groups, names) = class_groups(path, column, &rows, &labels, &class_names)?;
                (Some(groups), names)
            }
            None => (None, Vec::new()),
        };
        let pool = ClassPool::new(x, &labels, class_names, groups.clone())?;
        let sampler = match (&t.split_groups, &groups) {
            (Some(split), Some(groups)) => {
                let mut lists: [Vec<usize>; 3] = Default::default();
                for (slot, names) in [&split.train, &split.validation, &split.test]
                    .into_iter()
                    .enumerate()
                {
                    for name in names {
                        let group =
                            group_names.iter().position(|g| g == name).ok_or_else(|| {
                                Error::Config(format!(
                                    "task.split_groups names `{name}`, which is not a value of \
                                 column `{}` in {}{}; the groups are: {}",
                                    t.group_column.as_deref().unwrap_or_default(),
                                    path.display(),
                                    crate::config::suggest::did_you_mean(
                                        name,
                                        &group_names.iter().map(String::as_str).collect::<Vec<_>>()
                                    ),
                                    group_names.join(", ")
                                ))
                            })?;
                        lists[slot].extend(
                            groups
                                .iter()
                                .enumerate()
                                .filter(|(_, &g)| g == group)
                                .map(|(class, _)| class),
                        );
                    }
                }
                EpisodicSampler::with_splits(pool, self.episode()?, lists)?
            }
            _ => {
                let split = SplitSpec {
                    fractions: t.split.unwrap_or([0.6, 0.2, 0.2]),
                    by_group: t.split_by_group,
                    seed: t.split_seed,
                };
                EpisodicSampler::new(pool, self.episode()?, &split)?
            }
        };
        Ok(Box::new(sampler))
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
            let validation_data = OmniglotData::load(validation_path, &validation_options)?;
            let validation = self.omniglot_sampler(&validation_data, &validation_split)?;
            let sampler = self.omniglot_sampler(&data, &main_split)?;
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
        let sampler = self.omniglot_sampler(&data, &split)?;
        let sampler = self.supersample(sampler, &data, path, &options)?;
        Ok(Box::new(self.augmented(sampler)?))
    }

    /// Episodes of this config's shape over `data`'s classes, divided by `split`.
    fn omniglot_sampler(
        &self,
        data: &crate::data::omniglot::OmniglotData,
        split: &crate::data::omniglot::OmniglotSplit,
    ) -> Result<EpisodicSampler> {
        EpisodicSampler::with_splits(data.class_pool()?, self.episode()?, data.split(split)?)
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
            "recommender" => {
                let data = self.ratings_data()?;
                let mut arch = Architecture::new(&[data.slots()]);
                arch.push_named(
                    "embeddings",
                    Layer::FeatureEmbedding {
                        fields: data.fields.clone(),
                    },
                )?;
                let activation: crate::nn::architecture::Activation =
                    self.model.activation.parse()?;
                for (i, &units) in self.model.hidden.iter().enumerate() {
                    arch.push_named(&format!("fc{}", i + 1), Layer::dense(units))?;
                    arch.push_named(&format!("act{}", i + 1), Layer::activation(activation))?;
                }
                arch.push_named("head", Layer::dense(1))?;
                Ok(arch)
            }
            "encoder" => {
                let mut arch = self.text_encoder()?.network().architecture().clone();
                if !protonet {
                    arch.push_named(crate::text::HEAD, Layer::dense(outputs))?;
                }
                Ok(arch)
            }
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

/// Each class's group id (groups numbered by sorted name) from the group column, and the group
/// names; a class whose rows name two groups is an error naming both lines.
fn class_groups(
    path: &Path,
    column: &str,
    rows: &[(u64, Vec<String>)],
    labels: &[usize],
    class_names: &[String],
) -> Result<(Vec<usize>, Vec<String>)> {
    let mut names: Vec<String> = rows.iter().map(|(_, c)| c[2].clone()).collect();
    names.sort();
    names.dedup();
    let mut first: Vec<Option<(usize, u64)>> = vec![None; class_names.len()];
    for ((line, cells), &class) in rows.iter().zip(labels) {
        let group = names
            .binary_search(&cells[2])
            .expect("every group value is a name");
        match first[class] {
            None => first[class] = Some((group, *line)),
            Some((seen, seen_line)) if seen != group => {
                return Err(Error::Data(format!(
                    "{}:{line}: class `{}` is in {column} `{}` here but `{}` on line \
                     {seen_line}; every class belongs to one group",
                    path.display(),
                    class_names[class],
                    names[group],
                    names[seen]
                )))
            }
            Some(_) => {}
        }
    }
    let groups = first
        .into_iter()
        .map(|g| g.map(|(group, _)| group).unwrap_or(0))
        .collect();
    Ok((groups, names))
}
