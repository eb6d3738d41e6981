//! `metalearn finetune`: transfer learning from a saved checkpoint — train all of it, freeze some
//! layers, replace the head for a new set of classes, or train only the head (linear probe).

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use crate::args::DataArgs;
use crate::args::{data_source, TrainingArgs};
use crate::console::{format_scores, report_text_run, Console};
use metalearn::data::csv::load_csv_features;
use metalearn::data::image_folder::ImageFolderOptions;
use metalearn::data::Dataset;
use metalearn::error::{Error, Result};
use metalearn::nn::architecture::{Architecture, Layer};
use metalearn::sequential::{LayerRef, Sequential};
use metalearn::train::loss::Loss;
use metalearn::train::metrics::Metric;
use metalearn::transfer::config::load_for;
use metalearn::transfer::text::{
    train_text_and_save, TextClassifier, TextMethod, TextRunSettings, TextSection, TextTrainPlan,
};
use metalearn::transfer::{
    fit_and_save, load_dataset, load_model, plan_head, push_head, DataInfo, DataSource, HeadPlan,
    OutputKind,
};

/// Default epochs of `finetune`.
pub const DEFAULT_EPOCHS: usize = 10;

/// Arguments of `finetune`.
#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    /// The checkpoint to start from (written by `train` or `finetune`).
    #[arg(long, value_name = "CKPT")]
    pub from: Option<PathBuf>,
    /// The new training data.
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to save the fine-tuned model; the log goes to PATH.log.jsonl.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Layers to keep fixed: names or 0-based indices, comma-separated (e.g. dense_1,2).
    #[arg(long, value_name = "LAYERS")]
    pub freeze: Option<String>,
    /// Replace the head (last dense layer) by a fresh one with N outputs, for a new set of
    /// classes (N = classes, or 1 for a 0/1 target with binary cross-entropy).
    #[arg(long, value_name = "N")]
    pub new_head: Option<usize>,
    /// Train only the head; every other layer is frozen.
    #[arg(long)]
    pub linear_probe: bool,
    /// Text models: the CSV column holding the text (default: the one the model was trained
    /// on).
    #[arg(long, value_name = "COLUMN")]
    pub text_column: Option<String>,
    /// Text models: add each class's label, with `_` and `-` read as spaces, as one more
    /// training example of its class.
    #[arg(long)]
    pub labels_as_examples: bool,
    /// Optimiser, loss, schedule and output options.
    #[command(flatten)]
    pub training: TrainingArgs,
}

/// The layers of a comma-separated `--freeze` list.
pub fn parse_layer_list(text: &str) -> Result<Vec<LayerRef>> {
    let refs: Vec<LayerRef> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(LayerRef::from)
        .collect();
    if refs.is_empty() {
        return Err(Error::Config(
            "--freeze needs layer names or indices separated by commas, e.g. dense_1,2".into(),
        ));
    }
    Ok(refs)
}

/// A copy of `model` whose last dense layer (and any activation after it) is replaced by the
/// head of `plan`, drawn from `seed`; every other parameter and statistic is kept.
fn with_new_head(model: &Sequential, plan: &HeadPlan, seed: u64) -> Result<Sequential> {
    let old = model.architecture();
    let head_at = old
        .layers
        .iter()
        .rposition(|l| matches!(l.layer, Layer::Dense { .. }))
        .ok_or_else(|| Error::Config("the model has no dense layer to replace".into()))?;
    let mut arch = Architecture::new(&old.input_shape);
    arch.layers = old.layers[..head_at].to_vec();
    push_head(&mut arch, plan)?;
    let mut fresh = Sequential::from_architecture(arch, seed)?;
    let kept = model.params();
    // Fresh copies: a variable cannot be set from a tensor that shares its own storage.
    let params = fresh
        .params()
        .overlay(&kept.filter(|name| !name.starts_with("head.")))
        .map(|_, t| Ok(t.detach().copy()?))?;
    fresh.set_params(&params)?;
    fresh.set_buffers(model.buffers().clone());
    Ok(fresh)
}

/// The head plan of an existing model, checked against the new data and the requested loss.
fn keep_head(
    model: &Sequential,
    info: &DataInfo,
    ds: &Dataset,
    requested: Option<Loss>,
) -> Result<HeadPlan> {
    let units = model.network().output_shape().last().copied().unwrap_or(1);
    let loss = requested
        .or_else(|| model.compile_config().map(|c| c.loss))
        .unwrap_or(match info.output {
            OutputKind::ClassLogits => Loss::CategoricalCrossEntropy,
            OutputKind::Probability => Loss::BinaryCrossEntropy,
            OutputKind::BinaryLogit => Loss::BinaryCrossEntropyWithLogits,
            OutputKind::Value => Loss::Mse,
        });
    let fits = match info.output {
        OutputKind::ClassLogits => loss == Loss::CategoricalCrossEntropy,
        OutputKind::Probability => loss == Loss::BinaryCrossEntropy,
        OutputKind::BinaryLogit => loss == Loss::BinaryCrossEntropyWithLogits,
        OutputKind::Value => loss == Loss::Mse,
    };
    if !fits {
        return Err(Error::Config(format!(
            "--loss {} does not fit the model's head ({:?} output); keep the model's loss or use \
             --new-head N",
            loss.name(),
            info.output
        )));
    }
    if matches!(
        info.output,
        OutputKind::Probability | OutputKind::BinaryLogit
    ) {
        // Fails with a message unless the new target is 0/1.
        plan_head(ds, Some(loss))?;
    }
    Ok(HeadPlan {
        target_kind: info.target_kind,
        units,
        sigmoid: info.output == OutputKind::Probability,
        loss,
        metrics: if info.output == OutputKind::Value {
            vec![Metric::Mae]
        } else {
            vec![Metric::Accuracy]
        },
        output: info.output,
        num_classes: (info.output == OutputKind::ClassLogits)
            .then_some(units)
            .or(info.num_classes),
    })
}

/// Uses the model's feature columns of a CSV data set (so extra or reordered columns are fine),
/// or the file's own columns when the names differ but their number fits the model's input.
fn align_features(
    ds: &mut Dataset,
    info: &DataInfo,
    path: &Path,
    model: &Sequential,
    console: &Console,
) -> Result<()> {
    if ds.feature_names == info.feature_names {
        return Ok(());
    }
    let all_present = !info.feature_names.is_empty()
        && info
            .feature_names
            .iter()
            .all(|f| ds.feature_names.contains(f));
    if all_present {
        ds.x = load_csv_features(path, &info.feature_names)?;
        ds.feature_names = info.feature_names.clone();
        return Ok(());
    }
    let inputs: usize = model.architecture().input_shape.iter().product();
    let found: usize = ds.input_shape().iter().product();
    if found != inputs {
        return Err(Error::Shape(format!(
            "{}: has {found} feature column(s) {:?} but the model reads {inputs} ({:?}); give a \
             file with the model's feature columns",
            path.display(),
            ds.feature_names,
            info.feature_names
        )));
    }
    console.note(&format!(
        "note: the feature columns {:?} differ from the model's {:?}; using this file's columns in \
         their order",
        ds.feature_names, info.feature_names
    ));
    Ok(())
}

/// Runs `finetune`.
pub fn run(args: &FinetuneArgs) -> Result<()> {
    let console = args.training.console();
    let cfg = load_for(args.training.config.as_deref(), "finetune")?;
    let plan = args.training.plan(&cfg, DEFAULT_EPOCHS, &console)?;
    let from = args
        .from
        .clone()
        .or_else(|| cfg.from.clone())
        .ok_or_else(|| {
            Error::Config("--from CKPT is required: the checkpoint to fine-tune".into())
        })?;
    let out = args
        .out
        .clone()
        .or_else(|| cfg.out.clone())
        .ok_or_else(|| {
            Error::Config("--out PATH is required: where to save the fine-tuned model".into())
        })?;
    if let Some(model) = TextClassifier::load_if_text(&from, None)? {
        return run_text(args, &from, &out, model.section(), &console);
    }
    for (given, flag) in [
        (args.text_column.is_some(), "--text-column"),
        (args.labels_as_examples, "--labels-as-examples"),
    ] {
        if given {
            return Err(Error::Config(format!(
                "{flag} applies to text models, and {} is not one",
                from.display()
            )));
        }
    }
    let new_head = args.new_head.or(cfg.new_head);
    let linear_probe = args.linear_probe || cfg.linear_probe.unwrap_or(false);
    let freeze = args
        .freeze
        .clone()
        .or_else(|| cfg.freeze.as_ref().map(|f| f.to_text()));
    let requested_loss = args.training.loss(&cfg)?;

    let (model, old_info) = load_model(&from)?;
    let source = data_source(&args.data, &cfg, || {
        let shape = old_info.image.ok_or_else(|| {
            Error::Config(format!(
                "{} was trained on CSV data: give --data FILE --target COLUMN, not --images",
                from.display()
            ))
        })?;
        Ok(ImageFolderOptions {
            height: shape.height,
            width: shape.width,
            channels: shape.channels,
        })
    })?;
    if matches!(source, DataSource::Csv { .. }) && old_info.image.is_some() {
        return Err(Error::Config(format!(
            "{} was trained on images: give --images DIR, not --data",
            from.display()
        )));
    }
    let keep_classes = if new_head.is_none() {
        old_info.class_names.clone()
    } else {
        None
    };
    let mut ds = load_dataset(&source, keep_classes.as_deref()).map_err(|e| match e {
        Error::Data(msg) if keep_classes.is_some() => {
            Error::Data(format!("{msg} (new classes: --new-head N)"))
        }
        other => other,
    })?;
    if let DataSource::Csv { path, .. } = &source {
        align_features(&mut ds, &old_info, path, &model, &console)?;
    }

    let (head, mut model) = match new_head {
        Some(units) => {
            let (mut head, loss_sentence) = plan_head(&ds, requested_loss)?;
            let fits = match head.output {
                OutputKind::ClassLogits => units >= head.units,
                _ => units == 1,
            };
            if !fits || units == 0 {
                return Err(Error::Config(format!(
                    "--new-head {units} does not fit the data: {} needs {} output(s)",
                    loss_sentence.trim_start_matches("loss: "),
                    head.units
                )));
            }
            head.units = units;
            if head.output == OutputKind::ClassLogits {
                head.num_classes = Some(units);
            }
            console.note(&loss_sentence);
            let model = with_new_head(&model, &head, plan.seed)?;
            console.note(&format!(
                "new head: {units} output(s), weights drawn from seed {}",
                plan.seed
            ));
            (head, model)
        }
        None => {
            let head = keep_head(&model, &old_info, &ds, requested_loss)?;
            console.note(&format!("loss: {} (the model's)", head.loss.name()));
            (head, model)
        }
    };

    model.unfreeze_all();
    if let Some(list) = &freeze {
        model.freeze(&parse_layer_list(list)?)?;
    }
    if linear_probe {
        model.freeze_all_but_head()?;
    }
    let params = model.params();
    let trainable: usize = params
        .iter()
        .filter(|(name, _)| !model.is_frozen(name))
        .map(|(_, t)| t.elem_count())
        .sum();
    if trainable == 0 {
        return Err(Error::Config(
            "every layer is frozen: nothing left to train; freeze fewer layers".into(),
        ));
    }
    let frozen_layers: Vec<String> = model
        .architecture()
        .layers
        .iter()
        .filter(|l| {
            model
                .frozen()
                .iter()
                .any(|p| p.starts_with(&format!("{}.", l.name)))
        })
        .map(|l| l.name.clone())
        .collect();
    console.note(&format!(
        "fine-tuning {} of {} parameters on {} examples from {}{}",
        trainable,
        model.param_count(),
        ds.len(),
        source.path().display(),
        if frozen_layers.is_empty() {
            String::new()
        } else {
            format!(" (frozen: {})", frozen_layers.join(", "))
        }
    ));
    model.set_parent(from.display().to_string());
    model.set_data_provenance(ds.source.clone());

    let info = DataInfo {
        target_kind: head.target_kind,
        output: head.output,
        feature_names: ds.feature_names.clone(),
        target_name: ds.target_name.clone(),
        class_names: if new_head.is_some() {
            ds.class_names.clone()
        } else {
            old_info.class_names.clone()
        },
        num_classes: head.num_classes,
        image: old_info.image,
        source: ds.source.clone(),
        // A kept head keeps the Keras form it came with.
        keras_softmax: if new_head.is_some() {
            None
        } else {
            old_info.keras_softmax
        },
    };
    let mut summary = fit_and_save(&mut model, &ds, &head, &plan, &info, &out)?;
    summary.insert("command".into(), json!("finetune"));
    summary.insert("from".into(), json!(from.display().to_string()));
    summary.insert("frozen_layers".into(), json!(frozen_layers));
    summary.insert("trainable_parameters".into(), json!(trainable));
    summary.insert("parameters".into(), json!(model.param_count()));
    summary.insert("new_head".into(), json!(new_head));

    console.line(&format!("train: {}", format_scores(&summary, "")));
    if summary.contains_key("val_loss") {
        console.line(&format!("val:   {}", format_scores(&summary, "val_")));
    }
    console.line(&format!(
        "saved {} (fine-tuned from {}, {} epochs, {:.2} s)",
        out.display(),
        from.display(),
        summary["epochs"],
        summary["train_seconds"].as_f64().unwrap_or(0.0)
    ));
    console.finish(&summary);
    Ok(())
}

/// `finetune` of a text model: its encoder, with the weights it was trained to, is the start
/// for the new data; a head for the new data's classes is fitted first (linear probe), then,
/// unless `--linear-probe`, encoder and head train together (as `train --method finetune`).
fn run_text(
    args: &FinetuneArgs,
    from: &Path,
    out: &Path,
    section: &TextSection,
    console: &Console,
) -> Result<()> {
    for (given, flag) in [
        (args.freeze.is_some(), "--freeze"),
        (args.new_head.is_some(), "--new-head"),
        (args.data.images.is_some(), "--images"),
    ] {
        if given {
            return Err(Error::Config(format!(
                "{flag} does not apply to text models: a text model gets a head for the classes \
                 of the new data; to train only the top blocks use `train --encoder {} \
                 --top-layers N`",
                from.display()
            )));
        }
    }
    let data = args.data.data.clone().ok_or_else(|| {
        Error::Config("--data FILE.csv is required: the labelled texts to fine-tune on".into())
    })?;
    let method = if args.linear_probe {
        TextMethod::LinearProbe
    } else {
        TextMethod::Finetune
    };
    let settings = TextRunSettings {
        encoder: from.to_path_buf(),
        data,
        text_column: args
            .text_column
            .clone()
            .unwrap_or_else(|| section.text_column.clone()),
        label_column: args
            .data
            .target
            .clone()
            .unwrap_or_else(|| section.label_column.clone()),
        shots_per_class: None,
        unknown_label: None,
        validation: None,
        plan: TextTrainPlan {
            labels_as_examples: args.labels_as_examples,
            ..args.training.text_plan(method, None, None, None, None)?
        },
        out: out.to_path_buf(),
    };
    let report = train_text_and_save(&settings, &mut |line| console.note(line))?;
    report_text_run(console, "finetune", &report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalearn::nn::architecture::Activation;
    use metalearn::transfer::TargetKind;

    #[test]
    fn new_head_keeps_the_body_and_resizes_the_head() -> Result<()> {
        let mut arch = Architecture::mlp(&[3, 5, 1], Activation::Relu)?;
        arch.push_named("head_sigmoid", Layer::sigmoid())?;
        let model = Sequential::from_architecture(arch, 1)?;
        let plan = HeadPlan {
            target_kind: TargetKind::Multiclass,
            units: 4,
            sigmoid: false,
            loss: Loss::CategoricalCrossEntropy,
            metrics: vec![Metric::Accuracy],
            output: OutputKind::ClassLogits,
            num_classes: Some(4),
        };
        let tuned = with_new_head(&model, &plan, 7)?;
        let names: Vec<&str> = tuned
            .architecture()
            .layers
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["dense_1", "relu_1", "head"]);
        assert_eq!(tuned.network().output_shape(), [4]);
        let (old, new) = (model.params(), tuned.params());
        for name in ["dense_1.weight", "dense_1.bias"] {
            let diff = old
                .get(name)?
                .sub(new.get(name)?)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name} changed");
        }
        assert_eq!(new.get("head.weight")?.dims(), [5, 4]);
        Ok(())
    }

    #[test]
    fn freeze_list_accepts_names_and_indices() -> Result<()> {
        assert_eq!(
            parse_layer_list("dense_1, 2")?,
            vec![LayerRef::Name("dense_1".into()), LayerRef::Index(2)]
        );
        assert!(parse_layer_list(" , ").is_err());
        Ok(())
    }
}
