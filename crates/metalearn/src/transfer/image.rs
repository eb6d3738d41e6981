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
    /// The linear probe, then every layer and the head trained together (batch-norm
    /// statistics kept from pre-training), with random horizontal flips.
    Finetune,
}

impl ImageMethod {
    /// Every method, by its command-line name.
    pub const ALL: [(&'static str, ImageMethod); 3] = [
        ("linear-probe", ImageMethod::LinearProbe),
        ("prototype", ImageMethod::Prototype),
        ("finetune", ImageMethod::Finetune),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        crate::config::suggest::name_of(&self, &Self::ALL)
    }
}

impl std::str::FromStr for ImageMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let hint = if s == "lora" {
            " (LoRA applies to text encoders)"
        } else {
            ""
        };
        crate::config::suggest::lookup_named(s, &Self::ALL, "image method", hint)
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
    /// With `finetune`: passes over the training images.
    pub epochs: usize,
    /// With `finetune`: images per step.
    pub batch_size: usize,
    /// With `finetune`: Adam's learning rate (every layer and the head).
    pub lr: f64,
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
    /// With `finetune`: the mean training loss of each epoch.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub epoch_losses: Vec<f64>,
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
            ImageMethod::LinearProbe | ImageMethod::Finetune => {
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
        let mut epoch_losses = Vec::new();
        let params = if settings.method == ImageMethod::Finetune {
            let kept: Vec<PathBuf> = embedded
                .kept
                .iter()
                .map(|&i| list.paths[i].clone())
                .collect();
            let (tuned, losses) = finetune(
                &network,
                params,
                &stats,
                &backbone.preprocess,
                &kept,
                &ids,
                settings,
                progress,
            )?;
            epoch_losses = losses;
            tuned
        } else {
            params
        };
        let model = Backbone::new(
            &backbone.name,
            network,
            params,
            stats,
            backbone.preprocess.clone(),
        )?;
        let report = ImageTrainReport {
            epoch_losses,
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

/// Trains every parameter of `network` (backbone, normalisation, head) on the images with
/// Adam; batch norm uses the pre-trained running statistics `stats` throughout (a few images
/// per class are too few to re-estimate them). Each image is flipped left-right with
/// probability 1/2 every epoch. Returns the trained parameters and each epoch's mean loss.
#[allow(clippy::too_many_arguments)]
fn finetune(
    network: &Network,
    params: crate::nn::params::ParamSet,
    stats: &crate::nn::params::ParamSet,
    preprocess: &Preprocess,
    paths: &[PathBuf],
    ids: &[u32],
    settings: &ImageTrainSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<(crate::nn::params::ParamSet, Vec<f64>)> {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    if settings.epochs == 0
        || settings.batch_size == 0
        || !settings.lr.is_finite()
        || settings.lr <= 0.0
    {
        return Err(Error::Config(
            "fine-tuning needs --epochs, --batch-size and --lr above zero".into(),
        ));
    }
    let size = preprocess.size;
    let per_image = 3 * size * size;
    let inputs: Vec<Vec<f32>> = paths
        .par_iter()
        .map(|p| crate::vision::features::image_input(p, preprocess))
        .collect::<Result<_>>()?;
    let names = params.names().to_vec();
    let vars = params.to_vars()?;
    let mut optimizer = crate::train::optim::Optimizer::new(
        crate::train::optim::OptimizerConfig::adam(settings.lr),
        vars.len(),
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(settings.seed);
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    let mut losses = Vec::with_capacity(settings.epochs);
    for epoch in 0..settings.epochs {
        order.shuffle(&mut rng);
        let mut total = 0.0;
        for batch in order.chunks(settings.batch_size) {
            let mut values = Vec::with_capacity(batch.len() * per_image);
            for &i in batch {
                if rng.gen_bool(0.5) {
                    values.extend(flipped(&inputs[i], size));
                } else {
                    values.extend_from_slice(&inputs[i]);
                }
            }
            let x = Tensor::from_vec(values, (batch.len(), 3, size, size), &Device::Cpu)?;
            let labels: Vec<f32> = batch.iter().map(|&i| ids[i] as f32).collect();
            let y = Tensor::from_vec(labels, batch.len(), &Device::Cpu)?;
            let current = crate::nn::params::ParamSet::from_vars(&names, &vars)?;
            let mut ctx = ForwardCtx::eval(Some(stats)).first_order();
            let logits = network.forward(&current, &x, &mut ctx)?;
            let loss = crate::train::loss::Loss::CategoricalCrossEntropy.compute(&logits, &y)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::NonFinite(format!(
                    "fine-tuning loss became {value} in epoch {}; nothing was saved: try a \
                     smaller --lr",
                    epoch + 1
                )));
            }
            total += value * batch.len() as f64;
            let grads = crate::runtime::backward(&loss)?;
            let grads: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
            optimizer.step(&vars, &grads)?;
        }
        let mean = total / inputs.len() as f64;
        progress(&format!(
            "epoch {}/{}: loss {mean:.4}",
            epoch + 1,
            settings.epochs
        ));
        losses.push(mean);
    }
    Ok((
        crate::nn::params::ParamSet::from_vars(&names, &vars)?,
        losses,
    ))
}

/// A `[3, size, size]` input mirrored left-right.
fn flipped(input: &[f32], size: usize) -> Vec<f32> {
    let mut out = input.to_vec();
    for row in out.chunks_mut(size) {
        row.reverse();
    }
    out
}
