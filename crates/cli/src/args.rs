//! Argument groups and switches that several commands share.

use std::path::PathBuf;

use clap::Args;

use crate::console::Console;
use metalearn::data::image_folder::ImageFolderOptions;
use metalearn::error::{Error, Result};
use metalearn::train::loss::Loss;
use metalearn::transfer::config::FileConfig;
use metalearn::transfer::text::{TextMethod, TextTrainPlan};
use metalearn::transfer::{optimizer_from, DataFiles, DataSource, TrainPlan};

/// Where examples come from: `--data FILE --target COLUMN` or `--images DIR`.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// CSV file with a header row and one example per row.
    #[arg(long, value_name = "FILE", conflicts_with = "images")]
    pub data: Option<PathBuf>,
    /// The CSV column to predict (every other column is a feature).
    #[arg(long, value_name = "COLUMN")]
    pub target: Option<String>,
    /// Image folder with one sub-folder per class (instead of --data).
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// The CSV's feature columns, in the model's order, for a model without stored feature
    /// names (imported from Keras): comma-separated names. Default: every column but the target,
    /// in file order.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub features: Option<Vec<String>>,
}

impl DataArgs {
    /// The files these flags name, for the library's loaders.
    pub fn files(&self) -> DataFiles {
        DataFiles {
            data: self.data.clone(),
            target: self.target.clone(),
            images: self.images.clone(),
            features: self.features.clone(),
        }
    }
}

/// The device chosen by a command's `--cuda` switch: the first CUDA GPU, or the CPU.
pub fn compute_device(cuda: bool) -> Result<candle_core::Device> {
    if !cuda {
        return Ok(candle_core::Device::Cpu);
    }
    candle_core::Device::new_cuda(0).map_err(|e| {
        Error::Config(format!(
            "--cuda: no CUDA device ({e}); build with `--features cuda` on a machine with an \
             NVIDIA GPU, or drop --cuda to run on the CPU"
        ))
    })
}

/// Optimiser, loss and schedule options shared by `train` and `finetune`. Each may also be set in
/// the `--config` file; a flag wins over the file.
#[derive(Args, Debug, Clone, Default)]
pub struct TrainingArgs {
    /// Optimiser: sgd, adam or adamw [default: adam].
    #[arg(long, value_name = "NAME")]
    pub optimizer: Option<String>,
    /// Learning rate [default: 0.001, or 0.01 for sgd].
    #[arg(long, value_name = "RATE")]
    pub lr: Option<f64>,
    /// Weight decay [default: 0, or 0.01 for adamw].
    #[arg(long, value_name = "DECAY")]
    pub weight_decay: Option<f64>,
    /// SGD momentum [default: 0].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Loss: cross_entropy, binary_cross_entropy, bce_logits or mse [default: from the target:
    /// cross_entropy for more than 2 classes, binary_cross_entropy for 0/1, mse for numbers].
    #[arg(long, value_name = "NAME")]
    pub loss: Option<String>,
    /// Passes over the training data.
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Examples per gradient step [default: 32].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Fraction of the examples (drawn at random with --seed) held out for validation; the
    /// checkpoint then holds the epoch with the lowest validation loss.
    #[arg(long, value_name = "FRACTION")]
    pub validation_split: Option<f64>,
    /// Stop after this many epochs without improvement of the validation (or training) loss.
    #[arg(long, value_name = "PATIENCE")]
    pub early_stopping: Option<usize>,
    /// Seed of the initial weights, the validation split and shuffling [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// TOML file with any of these options (keys named like the flags, `_` for `-`).
    #[arg(long, value_name = "FILE.TOML")]
    pub config: Option<PathBuf>,
    /// Print one JSON object with the final metrics as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Print nothing but errors (and the JSON line with --json).
    #[arg(long)]
    pub quiet: bool,
}

impl TrainingArgs {
    /// The plan of a text model trained by `method`, with the optimiser flags over its
    /// defaults; flags that need a training encoder are refused for the other methods.
    pub fn text_plan(
        &self,
        method: TextMethod,
        top_layers: Option<usize>,
        lora_rank: Option<usize>,
        max_steps: Option<usize>,
        contrastive_weight: Option<f64>,
    ) -> Result<TextTrainPlan> {
        let mut plan = TextTrainPlan::for_method(method);
        let optimised = method.uses_optimizer();
        for (given, applies, flag) in [
            (self.epochs.is_some(), optimised, "--epochs"),
            (self.lr.is_some(), optimised, "--lr"),
            (self.batch_size.is_some(), optimised, "--batch-size"),
            (max_steps.is_some(), optimised, "--max-steps"),
            (
                top_layers.is_some(),
                method == TextMethod::Finetune,
                "--top-layers",
            ),
            (
                lora_rank.is_some(),
                method == TextMethod::Lora,
                "--lora-rank",
            ),
            (
                contrastive_weight.is_some(),
                matches!(method, TextMethod::Finetune | TextMethod::Lora),
                "--contrastive-weight",
            ),
        ] {
            if given && !applies {
                return Err(Error::Config(format!(
                    "{flag} does not apply to --method {}{}",
                    method.name(),
                    match flag {
                        "--top-layers" => " (only to finetune)",
                        "--lora-rank" => " (only to lora)",
                        "--contrastive-weight" => {
                            " (only to finetune and lora, which train the encoder and the head \
                             together)"
                        }
                        _ => " (only to finetune, lora and setfit, which train the encoder)",
                    }
                )));
            }
        }
        plan.max_steps = max_steps;
        plan.epochs = self.epochs.unwrap_or(plan.epochs);
        plan.batch_size = self.batch_size.unwrap_or(plan.batch_size);
        plan.lr = self.lr.unwrap_or(plan.lr);
        plan.weight_decay = self.weight_decay.unwrap_or(plan.weight_decay);
        plan.top_layers = top_layers;
        plan.lora_rank = lora_rank.unwrap_or(plan.lora_rank);
        plan.seed = self.seed.unwrap_or(0);
        plan.contrastive_weight = contrastive_weight.unwrap_or(plan.contrastive_weight);
        plan.check()?;
        Ok(plan)
    }

    /// Merges flags over the config file into a plan; `default_epochs` applies when neither sets
    /// the epochs.
    pub fn plan(
        &self,
        cfg: &FileConfig,
        default_epochs: usize,
        console: &Console,
    ) -> Result<TrainPlan> {
        let optimizer_name = self
            .optimizer
            .clone()
            .or_else(|| cfg.optimizer.clone())
            .unwrap_or_else(|| "adam".into());
        let default_lr = if optimizer_name.eq_ignore_ascii_case("sgd") {
            0.01
        } else {
            0.001
        };
        let optimizer = optimizer_from(
            &optimizer_name,
            self.lr.or(cfg.lr).unwrap_or(default_lr),
            self.weight_decay.or(cfg.weight_decay),
            self.momentum.or(cfg.momentum),
        )?;
        Ok(TrainPlan {
            optimizer,
            epochs: self.epochs.or(cfg.epochs).unwrap_or(default_epochs),
            batch_size: self.batch_size.or(cfg.batch_size).unwrap_or(32),
            validation_split: self.validation_split.or(cfg.validation_split),
            early_stopping: self.early_stopping.or(cfg.early_stopping),
            seed: self.seed.or(cfg.seed).unwrap_or(0),
            progress: console.progress(),
        })
    }

    /// The requested loss, if any.
    pub fn loss(&self, cfg: &FileConfig) -> Result<Option<Loss>> {
        self.loss
            .as_deref()
            .or(cfg.loss.as_deref())
            .map(str::parse::<Loss>)
            .transpose()
    }

    /// The console for `--json` / `--quiet`.
    pub fn console(&self) -> Console {
        Console::new(self.json, self.quiet)
    }
}

/// The data source of `train` or `finetune` from flags, else from the config file.
pub fn data_source(
    data: &DataArgs,
    cfg: &FileConfig,
    image: impl FnOnce() -> Result<ImageFolderOptions>,
) -> Result<DataSource> {
    let (csv, images) = if data.data.is_some() || data.images.is_some() {
        (data.data.clone(), data.images.clone())
    } else {
        (cfg.data.clone(), cfg.images.clone())
    };
    match (csv, images) {
        (Some(_), Some(_)) => Err(Error::Config(
            "give either --data (CSV) or --images (folder), not both".into(),
        )),
        (Some(path), None) => {
            let target = data
                .target
                .clone()
                .or_else(|| cfg.target.clone())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "--target COLUMN is required with --data {}: name the column to predict",
                        path.display()
                    ))
                })?;
            Ok(DataSource::Csv { path, target })
        }
        (None, Some(dir)) => Ok(DataSource::Images {
            dir,
            options: image()?,
        }),
        (None, None) => Err(Error::Config(
            "no training data: give --data FILE.csv --target COLUMN, or --images DIR".into(),
        )),
    }
}

/// The text side of a command: a sentence encoder and the CSV column holding the text.
#[derive(Args, Debug, Clone, Default)]
pub struct TextArgs {
    /// Sentence encoder to build on: a Hugging Face / sentence-transformers folder
    /// (config.json, model.safetensors, tokenizer.json), hf:OWNER/MODEL (optionally
    /// @REVISION) from the Hugging Face Hub (standard cache; HF_ENDPOINT, HF_HOME and
    /// HF_HUB_OFFLINE=1 honoured), or a text model trained by metalearn. Makes `train` a text
    /// classifier.
    #[arg(long, value_name = "DIR|hf:NAME")]
    pub encoder: Option<PathBuf>,
    /// The CSV column holding the text (default for a text model: the column it was trained
    /// on).
    #[arg(long, value_name = "COLUMN")]
    pub text_column: Option<String>,
}

/// The image side of a command: a pre-trained image backbone and how image lists are read.
#[derive(Args, Debug, Clone, Default)]
pub struct BackboneArgs {
    /// Pre-trained image backbone: a weights file (`.safetensors`, or a PyTorch `.pth` read
    /// without running code) in the lukemelas EfficientNet-PyTorch names, a timm folder
    /// (config.json, model.safetensors), or hf:OWNER/MODEL from the Hugging Face Hub. Makes `train` an
    /// image classifier and `embed` embed images.
    #[arg(long, value_name = "FILE")]
    pub backbone: Option<PathBuf>,
    /// The backbone's architecture: efficientnet_lite0 to efficientnet_lite4 (default: taken
    /// from the file or folder name when it names one).
    #[arg(long, value_name = "NAME")]
    pub architecture: Option<String>,
    /// Image data as a CSV file: the column holding the image paths (relative to the CSV's
    /// folder).
    #[arg(long, value_name = "COLUMN", default_value = "path")]
    pub path_column: String,
    /// Skip images that cannot be read (and count them) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_images: bool,
}

/// The image data flag of an image-model command.
pub fn image_data(data: Option<&PathBuf>) -> Result<&PathBuf> {
    data.ok_or_else(|| {
        Error::Config(
            "--data FOLDER|FILE.csv is required: a folder with one sub-folder of images per \
             class, or a CSV with image paths (and labels)"
                .into(),
        )
    })
}
