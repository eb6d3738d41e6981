//! Image classification on a pre-trained backbone: a frozen backbone with a logistic-regression
//! head (`linear-probe`) or nearest class prototypes (`prototype`), trained from a class-folder
//! tree or a CSV of image paths, optionally on K images per class; saved as one
//! self-contained checkpoint (architecture, weights, running statistics, preprocessing and
//! class names), scored and used for prediction without the original weights file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::data::image_list::{draw_per_class, ImageList};
use crate::error::{Error, Result};
use crate::nn::architecture::Layer;
use crate::nn::network::{ForwardCtx, Network};
use crate::transfer::probe::{logistic_regression, prototype_head};
use crate::vision::backbone::{Backbone, Preprocess};
use crate::vision::features::{embed_images, EmbedOptions};

/// The checkpoint section of an image classifier.
pub const VISION_SECTION: &str = "vision";

/// What an image classifier's checkpoint records besides its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionSection {
    /// The backbone's architecture name (e.g. `efficientnet_lite0`).
    pub backbone: String,
    /// The weights file the backbone came from.
    pub source: String,
    /// How images become inputs.
    pub preprocess: Preprocess,
    /// Class names; output `i` is class `i`.
    pub classes: Vec<String>,
    /// The transfer method it was trained with.
    pub method: String,
}

/// How an image classifier is trained on a frozen backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageMethod {
    /// Logistic regression on the L2-normalised features.
    LinearProbe,
    /// Nearest class prototype by cosine (no training).
    Prototype,
}

impl ImageMethod {
    /// Every method, by its command-line name.
    pub const ALL: [(&'static str, ImageMethod); 2] = [
        ("linear-probe", ImageMethod::LinearProbe),
        ("prototype", ImageMethod::Prototype),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(n, _)| *n)
            .expect("listed")
    }
}

impl std::str::FromStr for ImageMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                let later = if s == "finetune" || s == "lora" {
                    " (fine-tuning image backbones is not available yet)"
                } else {
                    ""
                };
                Error::Config(format!(
                    "unknown image method `{s}`{later}{}; choose one of: {}",
                    crate::config::suggest::did_you_mean(s, &names),
                    names.join(", ")
                ))
            })
    }
}

/// Everything an image-classifier training run needs.
#[derive(Clone, Debug)]
pub struct ImageTrainSettings {
    /// The backbone's weights file.
    pub backbone: PathBuf,
    /// Its architecture name (needed for a bare weights file).
    pub architecture: Option<String>,
    /// A class-folder tree or a CSV file of image paths.
    pub data: PathBuf,
    /// The CSV column holding the image paths.
    pub path_column: String,
    /// The CSV column holding the labels.
    pub label_column: String,
    /// The transfer method.
    pub method: ImageMethod,
    /// Train on this many images per class, drawn with `seed` (all images when `None`).
    pub shots_per_class: Option<usize>,
    /// Seed of the draw.
    pub seed: u64,
    /// Inverse L2 strength of the logistic-regression head (scikit-learn's `C`).
    pub c: f64,
    /// Full-batch optimisation steps of the logistic-regression head.
    pub head_steps: usize,
    /// How images are embedded.
    pub embed: EmbedOptions,
}

/// What a training run did.
#[derive(Clone, Debug, Serialize)]
pub struct ImageTrainReport {
    /// The method.
    pub method: String,
    /// Images trained on.
    pub images: usize,
    /// Classes.
    pub classes: usize,
    /// Images skipped as unreadable.
    pub skipped: usize,
    /// Seconds spent embedding.
    pub embed_seconds: f64,
    /// Seconds spent in all.
    pub seconds: f64,
}

/// Accuracy of a classifier on labelled images.
#[derive(Clone, Debug, Serialize)]
pub struct ImageScores {
    /// Share of images classified right.
    pub accuracy: f64,
    /// Images scored.
    pub images: usize,
    /// Images skipped as unreadable.
    pub skipped: usize,
    /// Whether the features came from the cache.
    pub cached: bool,
}

/// One prediction.
#[derive(Clone, Debug, Serialize)]
pub struct ImagePrediction {
    /// The image.
    pub path: PathBuf,
    /// The predicted class.
    pub label: String,
    /// Its probability (softmax of the outputs).
    pub confidence: f64,
}

/// A backbone with a classification head over its pooled, L2-normalised feature.
#[derive(Clone, Debug)]
pub struct ImageClassifier {
    /// The whole network (backbone, `normalize`, `head`); its features are the backbone's.
    pub model: Backbone,
    /// Names, preprocessing and method.
    pub section: VisionSection,
}

impl ImageClassifier {
    /// Trains a classifier as `settings` say; `progress` receives one line per phase.
    pub fn train(
        settings: &ImageTrainSettings,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Self, ImageTrainReport)> {
        let started = Instant::now();
        let backbone = Backbone::load(
            &settings.backbone,
            settings.architecture.as_deref(),
            DType::F32,
        )?;
        let mut list = ImageList::read(
            &settings.data,
            &settings.path_column,
            Some(&settings.label_column),
        )?;
        let classes = list.classes()?;
        if let Some(k) = settings.shots_per_class {
            let rows = draw_per_class(list.labels()?, k, settings.seed, None, &list.source)?;
            list = list.select(&rows);
        }
        progress(&format!(
            "embedding {} images with {} ({}x{})",
            list.paths.len(),
            backbone.name,
            backbone.preprocess.size,
            backbone.preprocess.size
        ));
        let embed_started = Instant::now();
        let embedded = embed_images(&backbone, &list.paths, &settings.embed, &mut |_| {})?;
        let embed_seconds = embed_started.elapsed().as_secs_f64();
        let labels = list.labels()?;
        let ids: Vec<u32> = embedded
            .kept
            .iter()
            .map(|&i| classes.iter().position(|c| *c == labels[i]).expect("known") as u32)
            .collect();
        for (class_id, class) in classes.iter().enumerate() {
            if !ids.contains(&(class_id as u32)) {
                return Err(Error::Data(format!(
                    "{}: class `{class}` has no readable image left to train on",
                    list.source
                )));
            }
        }
        let features = crate::nn::ops::l2_normalize(&embedded.features)?;
        let (weight, bias) = match settings.method {
            ImageMethod::LinearProbe => {
                progress(&format!(
                    "fitting a logistic-regression head (C = {}, {} steps)",
                    settings.c, settings.head_steps
                ));
                logistic_regression(
                    &features,
                    &ids,
                    classes.len(),
                    settings.c,
                    settings.head_steps,
                )?
            }
            ImageMethod::Prototype => prototype_head(&features, &ids, classes.len())?,
        };
        let mut arch = backbone.network.architecture().clone();
        arch.layers.truncate(backbone.feature_layers);
        arch.push_named("normalize", Layer::L2Normalize)?;
        arch.push_named("head", Layer::dense(classes.len()))?;
        let network = Network::build(&arch)?;
        let mut params = backbone.params.filter(|n| {
            let layer = n.split('.').next().unwrap_or_default();
            arch.layers.iter().any(|l| l.name == layer)
        });
        params.insert("head.weight", weight)?;
        params.insert("head.bias", bias)?;
        let stats = backbone.stats.clone();
        let section = VisionSection {
            backbone: backbone.name.clone(),
            source: settings.backbone.display().to_string(),
            preprocess: backbone.preprocess.clone(),
            classes: classes.clone(),
            method: settings.method.name().to_string(),
        };
        let model = Backbone::new(
            &backbone.name,
            network,
            params,
            stats,
            backbone.preprocess.clone(),
        )?;
        let report = ImageTrainReport {
            method: settings.method.name().to_string(),
            images: embedded.kept.len(),
            classes: classes.len(),
            skipped: embedded.skipped.len(),
            embed_seconds,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((Self { model, section }, report))
    }

    /// Writes the self-contained checkpoint.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut ckpt = Checkpoint::new(
            self.model.network.architecture().clone(),
            self.model.params.clone(),
            self.model.stats.clone(),
        );
        ckpt.sections.insert(
            VISION_SECTION.to_string(),
            serde_json::to_value(&self.section).expect("section serialises"),
        );
        ckpt.save(path)
    }

    /// Reads an image classifier's checkpoint; `None` when the checkpoint is of another kind.
    pub fn load_if_image(path: &Path) -> Result<Option<Self>> {
        let ckpt = Checkpoint::load(path, &Device::Cpu)?;
        let Some(section) = ckpt.parsed_section::<VisionSection>(VISION_SECTION)? else {
            return Ok(None);
        };
        let network = Network::build(&ckpt.architecture)?;
        if network.output_shape() != [section.classes.len()] {
            return Err(Error::Checkpoint(format!(
                "{}: the head has {:?} outputs for {} classes",
                path.display(),
                network.output_shape(),
                section.classes.len()
            )));
        }
        let model = Backbone::new(
            &section.backbone,
            network,
            ckpt.params,
            ckpt.buffers,
            section.preprocess.clone(),
        )?;
        Ok(Some(Self { model, section }))
    }

    /// Class probabilities of `list`'s readable images, `[kept, classes]`, and which images
    /// they are; unreadable images are an error unless `options.skip_bad_images`.
    pub fn probabilities(
        &self,
        list: &ImageList,
        options: &EmbedOptions,
    ) -> Result<(Tensor, crate::vision::features::Embedded)> {
        let embedded = embed_images(&self.model, &list.paths, options, &mut |_| {})?;
        let mut ctx = ForwardCtx::eval(Some(&self.model.stats)).first_order();
        let layers = self.model.network.architecture().layers.len();
        let logits = self.model.network.forward_range(
            &self.model.params,
            &embedded.features,
            &mut ctx,
            self.model.feature_layers,
            layers,
            false,
        )?;
        Ok((crate::nn::ops::softmax(&logits)?, embedded))
    }

    /// Accuracy on labelled images (labels must be among the model's classes).
    pub fn evaluate(&self, list: &ImageList, options: &EmbedOptions) -> Result<ImageScores> {
        let labels = list.labels()?;
        for (i, label) in labels.iter().enumerate() {
            if !self.section.classes.contains(label) {
                return Err(Error::Data(format!(
                    "{}: image {} has label `{label}`, which the model does not know (its \
                     classes: {})",
                    list.source,
                    list.paths[i].display(),
                    self.section.classes.join(", ")
                )));
            }
        }
        let (probs, embedded) = self.probabilities(list, options)?;
        let predicted = probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let right = embedded
            .kept
            .iter()
            .zip(&predicted)
            .filter(|(&i, &p)| self.section.classes[p as usize] == labels[i])
            .count();
        Ok(ImageScores {
            accuracy: right as f64 / embedded.kept.len() as f64,
            images: embedded.kept.len(),
            skipped: embedded.skipped.len(),
            cached: embedded.cached,
        })
    }

    /// The predicted class of every readable image.
    pub fn predict(
        &self,
        list: &ImageList,
        options: &EmbedOptions,
    ) -> Result<Vec<ImagePrediction>> {
        let (probs, embedded) = self.probabilities(list, options)?;
        let rows = probs.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        Ok(embedded
            .kept
            .iter()
            .zip(rows)
            .map(|(&i, row)| {
                let (best, confidence) =
                    row.iter().enumerate().fold((0, f64::MIN), |acc, (j, &p)| {
                        if p > acc.1 {
                            (j, p)
                        } else {
                            acc
                        }
                    });
                ImagePrediction {
                    path: list.paths[i].clone(),
                    label: self.section.classes[best].clone(),
                    confidence,
                }
            })
            .collect())
    }
}
