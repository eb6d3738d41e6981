//! `metalearn train`: train an MLP on a CSV file or a Conv-4 network on an image folder, and save
//! a self-describing checkpoint with a per-epoch JSONL log beside it.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::args::{data_source, BackboneArgs, DataArgs, TextArgs, TrainingArgs};
use crate::console::{format_scores, report_text_run};
use metalearn::data::image_folder::ImageFolderOptions;
use metalearn::error::{Error, Result};
use metalearn::nn::architecture::{Activation, Architecture};
use metalearn::sequential::Sequential;
use metalearn::transfer::config::load_for;
use metalearn::transfer::image::{ImageClassifier, ImageMethod, ImageTrainSettings};
use metalearn::transfer::text::{train_text_and_save, TextRunSettings, TextTrainPlan};
use metalearn::transfer::{
    fit_and_save, load_dataset, parse_hidden, plan_head, push_head, DataInfo, DataSource,
    ImageShape,
};
use metalearn::vision::features::EmbedOptions;

/// Default epochs of `train`.
pub const DEFAULT_EPOCHS: usize = 20;
/// Default hidden layers of the CSV model.
pub const DEFAULT_HIDDEN: &str = "64,32";
/// Default filters per convolution of the image model.
pub const DEFAULT_FILTERS: usize = 64;

/// Arguments of `train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Training data.
    #[command(flatten)]
    pub data: DataArgs,
    /// Image height after resizing (with --images) [default: 28].
    #[arg(long, value_name = "PIXELS")]
    pub height: Option<usize>,
    /// Image width after resizing (with --images) [default: 28].
    #[arg(long, value_name = "PIXELS")]
    pub width: Option<usize>,
    /// Image channels, 1 (grey) or 3 (colour) (with --images) [default: 1].
    #[arg(long)]
    pub channels: Option<usize>,
    /// Where to save the model (a .safetensors checkpoint); the log goes to PATH.log.jsonl.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Hidden layer sizes of the MLP, comma-separated ("none" for a linear model)
    /// [default: 64,32].
    #[arg(long, value_name = "SIZES")]
    pub hidden: Option<String>,
    /// Hidden-layer activation: relu, tanh, sigmoid or linear [default: relu].
    #[arg(long, value_name = "NAME")]
    pub activation: Option<String>,
    /// Filters per convolution of the image model [default: 64].
    #[arg(long, value_name = "N")]
    pub filters: Option<usize>,
    /// Optimiser, loss, schedule and output options.
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Text classification on a pre-trained encoder.
    #[command(flatten)]
    pub text: TextArgs,
    /// Image classification on a pre-trained backbone.
    #[command(flatten)]
    pub image: BackboneArgs,
    /// Text models: how to transfer: linear-probe (frozen encoder, logistic regression),
    /// prototype (nearest class mean, no training), finetune (linear probe, then encoder and
    /// head together), lora (linear probe, then LoRA adapters and head) or setfit
    /// (contrastive fine-tuning on pairs, then a logistic-regression head) [default:
    /// finetune]. Image models (--backbone): linear-probe, prototype or finetune (the linear
    /// probe, then every layer with Adam: --epochs 10, --batch-size 16, --lr 1e-4 by default)
    /// [default: linear-probe].
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
    /// Text and image models: draw this many training rows per class (the few-shot protocol;
    /// the draw follows --seed).
    #[arg(long, value_name = "K")]
    pub shots_per_class: Option<usize>,
    /// Text models: rows with this label are out of scope: not a class; a rejection threshold
    /// on the model's confidence is chosen on --validation-data and stored in the model.
    #[arg(long, value_name = "LABEL")]
    pub unknown_label: Option<String>,
    /// Text models: labelled validation CSV (same columns), scored after training.
    #[arg(long, value_name = "FILE")]
    pub validation_data: Option<PathBuf>,
    /// Text models with --method finetune: train only the top N transformer blocks.
    #[arg(long, value_name = "N")]
    pub top_layers: Option<usize>,
    /// Text models with --method lora: the adapters' rank [default: 8].
    #[arg(long, value_name = "R")]
    pub lora_rank: Option<usize>,
    /// Text models that train the encoder: at most N optimiser steps (the learning-rate
    /// schedule is laid out over them).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,
    /// Text models: add each class's label, with `_` and `-` read as spaces, as one more
    /// training example of its class (helps when labels are words, such as `book_flight`).
    #[arg(long)]
    pub labels_as_examples: bool,
    /// Text models with --method finetune or lora: add W times a supervised contrastive loss
    /// (temperature 0.1) on the batch's embeddings to the cross-entropy; batches are then
    /// made of same-class pairs [default: 0, cross-entropy alone].
    #[arg(long, value_name = "W")]
    pub contrastive_weight: Option<f64>,
}

/// Runs `train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    if args.text.encoder.is_some() {
        return run_text(args);
    }
    if args.image.backbone.is_some() {
        return run_image(args);
    }
    if let Some(flag) = text_only_flag(args) {
        return Err(Error::Config(format!(
            "{flag} applies to text models (add --encoder DIR and --text-column COLUMN) and, for --method and --shots-per-class, to image models (add --backbone FILE)"
        )));
    }
    let console = args.training.console();
    let cfg = load_for(args.training.config.as_deref(), "train")?;
    let plan = args.training.plan(&cfg, DEFAULT_EPOCHS, &console)?;
    let out = args
        .out
        .clone()
        .or_else(|| cfg.out.clone())
        .ok_or_else(|| Error::Config("--out PATH is required: where to save the model".into()))?;
    let source = data_source(&args.data, &cfg, || {
        let defaults = ImageFolderOptions::default();
        let options = ImageFolderOptions {
            height: args.height.or(cfg.height).unwrap_or(defaults.height),
            width: args.width.or(cfg.width).unwrap_or(defaults.width),
            channels: args.channels.or(cfg.channels).unwrap_or(defaults.channels),
        };
        if options.height == 0 || options.width == 0 || !matches!(options.channels, 1 | 3) {
            return Err(Error::Config(format!(
                "image size {}x{} with {} channel(s) is invalid: height and width must be > 0 and \
                 channels 1 or 3",
                options.height, options.width, options.channels
            )));
        }
        Ok(options)
    })?;
    let activation: Activation = args
        .activation
        .as_deref()
        .or(cfg.activation.as_deref())
        .unwrap_or("relu")
        .parse()?;
    let hidden = parse_hidden(
        &args
            .hidden
            .clone()
            .or_else(|| cfg.hidden.as_ref().map(|h| h.to_text()))
            .unwrap_or_else(|| DEFAULT_HIDDEN.into()),
    )?;
    let filters = args.filters.or(cfg.filters).unwrap_or(DEFAULT_FILTERS);

    let ds = load_dataset(&source, None)?;
    let (head, loss_sentence) = plan_head(&ds, args.training.loss(&cfg)?)?;
    console.note(&loss_sentence);

    let (mut arch, image) = match &source {
        DataSource::Csv { .. } => {
            let features = ds.input_shape().iter().product::<usize>();
            let mut sizes = vec![features];
            sizes.extend(&hidden);
            // `mlp` names its last layer `head`; it is added below with the plan's units instead.
            let mut arch = Architecture::new(&[features]);
            if !hidden.is_empty() {
                sizes.push(1);
                arch = Architecture::mlp(&sizes, activation)?;
                arch.layers.pop();
            }
            (arch, None)
        }
        DataSource::Images { options, .. } => (
            Architecture::conv4(
                [options.channels, options.height, options.width],
                filters,
                None,
            )?,
            Some(ImageShape {
                height: options.height,
                width: options.width,
                channels: options.channels,
            }),
        ),
    };
    push_head(&mut arch, &head)?;
    let mut model = Sequential::from_architecture(arch, plan.seed)?;
    model.set_data_provenance(ds.source.clone());

    let info = DataInfo {
        target_kind: head.target_kind,
        output: head.output,
        feature_names: ds.feature_names.clone(),
        target_name: ds.target_name.clone(),
        class_names: ds.class_names.clone(),
        num_classes: head.num_classes,
        image,
        source: ds.source.clone(),
        keras_softmax: None,
    };
    console.note(&format!(
        "training on {} examples from {}: {} parameters, {} epochs",
        ds.len(),
        source.path().display(),
        model.param_count(),
        plan.epochs
    ));
    let mut summary = fit_and_save(&mut model, &ds, &head, &plan, &info, &out)?;
    summary.insert("command".into(), json!("train"));
    summary.insert("parameters".into(), json!(model.param_count()));

    console.line(&format!("train: {}", format_scores(&summary, "")));
    if summary.contains_key("val_loss") {
        console.line(&format!("val:   {}", format_scores(&summary, "val_")));
    }
    console.line(&format!(
        "saved {} ({} epochs, {:.2} s); log {}",
        out.display(),
        summary["epochs"],
        summary["train_seconds"].as_f64().unwrap_or(0.0),
        summary["log"].as_str().unwrap_or_default()
    ));
    console.finish(&summary);
    Ok(())
}

/// The first text-only flag given without --encoder.
fn text_only_flag(args: &TrainArgs) -> Option<&'static str> {
    [
        (args.text.text_column.is_some(), "--text-column"),
        (args.method.is_some(), "--method"),
        (args.shots_per_class.is_some(), "--shots-per-class"),
        (args.unknown_label.is_some(), "--unknown-label"),
        (args.validation_data.is_some(), "--validation-data"),
        (args.top_layers.is_some(), "--top-layers"),
        (args.lora_rank.is_some(), "--lora-rank"),
        (args.max_steps.is_some(), "--max-steps"),
        (args.labels_as_examples, "--labels-as-examples"),
        (args.contrastive_weight.is_some(), "--contrastive-weight"),
    ]
    .into_iter()
    .find(|(given, _)| *given)
    .map(|(_, flag)| flag)
}

/// `train --backbone`: an image classifier on a frozen pre-trained backbone.
fn run_image(args: &TrainArgs) -> Result<()> {
    let console = args.training.console();
    let backbone = args.image.backbone.clone().expect("checked by the caller");
    let data = args
        .data
        .data
        .clone()
        .or_else(|| args.data.images.clone())
        .ok_or_else(|| {
            Error::Config(
                "--data FOLDER|FILE.csv is required with --backbone: a folder with one \
                 sub-folder of images per class, or a CSV with image paths and labels"
                    .into(),
            )
        })?;
    let out = args
        .out
        .clone()
        .ok_or_else(|| Error::Config("--out PATH is required: where to save the model".into()))?;
    for (given, flag) in [
        (args.text.text_column.is_some(), "--text-column"),
        (args.unknown_label.is_some(), "--unknown-label"),
        (args.validation_data.is_some(), "--validation-data"),
        (args.top_layers.is_some(), "--top-layers"),
        (args.lora_rank.is_some(), "--lora-rank"),
        (args.max_steps.is_some(), "--max-steps"),
        (args.labels_as_examples, "--labels-as-examples"),
        (args.contrastive_weight.is_some(), "--contrastive-weight"),
    ] {
        if given {
            return Err(Error::Config(format!(
                "{flag} applies to text models, not to image models (--backbone)"
            )));
        }
    }
    let method: ImageMethod = args.method.as_deref().unwrap_or("linear-probe").parse()?;
    let settings = ImageTrainSettings {
        architecture: args.image.architecture.clone(),
        backbone,
        data,
        path_column: args.image.path_column.clone(),
        label_column: args.data.target.clone().unwrap_or_else(|| "label".into()),
        method,
        shots_per_class: args.shots_per_class,
        seed: args.training.seed.unwrap_or(0),
        c: 10.0,
        head_steps: 500,
        embed: EmbedOptions {
            batch_size: 32,
            skip_bad_images: args.image.skip_bad_images,
            ..EmbedOptions::default()
        },
        epochs: args.training.epochs.unwrap_or(10),
        batch_size: args.training.batch_size.unwrap_or(16),
        lr: args.training.lr.unwrap_or(1e-4),
    };
    let (model, report) = ImageClassifier::train(&settings, &mut |line| console.note(line))?;
    model.save(&out)?;
    if report.skipped > 0 {
        console.note(&format!("skipped {} unreadable images", report.skipped));
    }
    console.line(&format!(
        "trained a {} image classifier ({} on {}) on {} images of {} classes in {:.1} s \
         (embedding {:.1} s); saved to {}",
        report.method,
        model.section.backbone,
        settings.backbone.display(),
        report.images,
        report.classes,
        report.seconds,
        report.embed_seconds,
        out.display()
    ));
    let mut json = serde_json::to_value(&report)
        .expect("report serialises")
        .as_object()
        .cloned()
        .unwrap_or_default();
    json.insert("out".into(), json!(out.display().to_string()));
    console.finish(&json);
    Ok(())
}

/// `train --encoder`: a text classifier on a pre-trained sentence encoder.
fn run_text(args: &TrainArgs) -> Result<()> {
    let console = args.training.console();
    let encoder = args.text.encoder.clone().expect("checked by the caller");
    let data = args.data.data.clone().ok_or_else(|| {
        Error::Config("--data FILE.csv is required with --encoder: the labelled texts".into())
    })?;
    let text_column = args.text.text_column.clone().ok_or_else(|| {
        Error::Config(
            "--text-column COLUMN is required with --encoder: the column holding the text".into(),
        )
    })?;
    let label_column = args.data.target.clone().ok_or_else(|| {
        Error::Config(
            "--target COLUMN is required with --encoder: the column holding the label".into(),
        )
    })?;
    let out = args
        .out
        .clone()
        .ok_or_else(|| Error::Config("--out PATH is required: where to save the model".into()))?;
    let method = match &args.method {
        Some(method) => method.parse()?,
        None => TextTrainPlan::default().method,
    };
    let mut plan = args.training.text_plan(
        method,
        args.top_layers,
        args.lora_rank,
        args.max_steps,
        args.contrastive_weight,
    )?;
    plan.labels_as_examples = args.labels_as_examples;
    let settings = TextRunSettings {
        encoder,
        data,
        text_column,
        label_column,
        shots_per_class: args.shots_per_class,
        unknown_label: args.unknown_label.clone(),
        validation: args.validation_data.clone(),
        plan,
        out: out.clone(),
    };
    let report = train_text_and_save(&settings, &mut |line| console.note(line))?;
    report_text_run(&console, "train", &report);
    Ok(())
}
