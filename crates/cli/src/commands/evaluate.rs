//! `metalearn evaluate`: the loss and metrics of a checkpoint on labelled data.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::args::DataArgs;
use crate::console::{format_scores, scores_to_report, Console};
use metalearn::data::image_list::ImageList;
use metalearn::data::text::load_labelled_texts;
use metalearn::error::{Error, Result};
use metalearn::sequential::Sequential;
use metalearn::train::loss::Loss;
use metalearn::train::metrics::Metric;
use metalearn::train::optim::OptimizerConfig;
use metalearn::transfer::image::ImageClassifier;
use metalearn::transfer::text::{score_texts, TextClassifier};
use metalearn::transfer::{load_for_model, load_model, DataInfo, OutputKind};
use metalearn::vision::features::EmbedOptions;

/// Arguments of `evaluate`.
#[derive(Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// The checkpoint to evaluate.
    #[arg(long, value_name = "CKPT")]
    pub model: PathBuf,
    /// Labelled data; --target defaults to the column the model was trained on.
    #[command(flatten)]
    pub data: DataArgs,
    /// Examples per forward pass.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub batch_size: usize,
    /// Text models saved as LoRA adapters: the base encoder (a folder or hf:NAME) when it is
    /// no longer where it was trained; it must be the same model (checked by SHA-256).
    #[arg(long, value_name = "DIR|hf:NAME")]
    pub encoder: Option<PathBuf>,
    /// Text models: the CSV column holding the text (default: the one it was trained on).
    #[arg(long, value_name = "COLUMN")]
    pub text_column: Option<String>,
    /// Image models with a CSV file: the column holding the image paths (relative to the
    /// CSV's folder).
    #[arg(long, value_name = "COLUMN", default_value = "path")]
    pub path_column: String,
    /// Image models: skip images that cannot be read (and count them) instead of stopping.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Print one JSON object with the loss and metrics as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Compiles a model that carries no training configuration, with the loss its output implies.
pub fn ensure_compiled(model: &mut Sequential, info: &DataInfo) -> Result<()> {
    if model.compile_config().is_some() {
        return Ok(());
    }
    let (loss, metrics) = match info.output {
        OutputKind::ClassLogits => (Loss::CategoricalCrossEntropy, vec![Metric::Accuracy]),
        OutputKind::Probability => (Loss::BinaryCrossEntropy, vec![Metric::Accuracy]),
        OutputKind::BinaryLogit => (Loss::BinaryCrossEntropyWithLogits, vec![Metric::Accuracy]),
        OutputKind::Value => (Loss::Mse, vec![Metric::Mae]),
    };
    model.compile(OptimizerConfig::adam(1e-3), loss, &metrics)
}

/// Runs `evaluate`.
pub fn run(args: &EvaluateArgs) -> Result<()> {
    let console = Console::new(args.json, false);
    if args.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    if let Some(model) = TextClassifier::load_if_text(&args.model, args.encoder.as_deref())? {
        return run_text(args, &model, &console);
    }
    if let Some(model) = ImageClassifier::load_if_image(&args.model)? {
        return run_image(args, &model, &console);
    }
    let (mut model, info) = load_model(&args.model)?;
    ensure_compiled(&mut model, &info)?;
    let (x, y, n) = load_for_model(&info, &model, &args.data.files(), true)?;
    let y = y.ok_or_else(|| Error::Data("the data has no target values".into()))?;
    let mut summary = scores_to_report(model.evaluate(&x, &y, args.batch_size)?);
    console.line(&format!("{} examples: {}", n, format_scores(&summary, "")));
    summary.insert("command".into(), json!("evaluate"));
    summary.insert("examples".into(), json!(n));
    summary.insert("model".into(), json!(args.model.display().to_string()));
    console.finish(&summary);
    Ok(())
}

/// `evaluate` of a text model: accuracy (the unknown label as one more class), closed-set
/// accuracy, in-scope accuracy and out-of-scope recall and precision.
fn run_text(args: &EvaluateArgs, model: &TextClassifier, console: &Console) -> Result<()> {
    let data = args.data.data.as_ref().ok_or_else(|| {
        Error::Config("--data FILE.csv is required: the labelled texts to score".into())
    })?;
    let section = model.section();
    let text_column = args.text_column.as_deref().unwrap_or(&section.text_column);
    let label_column = args.data.target.as_deref().unwrap_or(&section.label_column);
    let texts = load_labelled_texts(data, text_column, Some(label_column))?;
    let scores = score_texts(model, &texts, args.batch_size)?;
    let mut line = format!(
        "{} texts: accuracy {:.4}, closed-set accuracy {:.4}",
        scores.rows, scores.accuracy, scores.closed_accuracy
    );
    if let Some(recall) = scores.oos_recall {
        line.push_str(&format!(
            ", in-scope accuracy {:.4}, out-of-scope recall {recall:.4}, precision {}",
            scores.in_scope_accuracy,
            scores
                .oos_precision
                .map_or("n/a".to_string(), |p| format!("{p:.4}"))
        ));
    }
    console.line(&line);
    let mut summary = serde_json::Map::new();
    summary.insert("command".into(), json!("evaluate"));
    summary.insert("examples".into(), json!(scores.rows));
    summary.insert("model".into(), json!(args.model.display().to_string()));
    if let serde_json::Value::Object(fields) =
        serde_json::to_value(&scores).expect("scores serialise")
    {
        summary.extend(fields);
    }
    console.finish(&summary);
    Ok(())
}

/// `evaluate` of an image model: accuracy on labelled images.
fn run_image(args: &EvaluateArgs, model: &ImageClassifier, console: &Console) -> Result<()> {
    let data = crate::args::image_data(args.data.data.as_ref().or(args.data.images.as_ref()))?;
    let label = args.data.target.as_deref().unwrap_or("label");
    let list = ImageList::read(data, &args.path_column, Some(label))?;
    let options = EmbedOptions {
        batch_size: 32,
        skip_bad_images: args.skip_bad_images,
        ..EmbedOptions::default()
    };
    let started = std::time::Instant::now();
    let scores = model.evaluate(&list, &options)?;
    let seconds = started.elapsed().as_secs_f64();
    if scores.skipped > 0 {
        console.note(&format!("skipped {} unreadable images", scores.skipped));
    }
    console.line(&format!(
        "{} images: accuracy {:.4} ({:.1} s{})",
        scores.images,
        scores.accuracy,
        seconds,
        if scores.cached {
            ", features from the cache"
        } else {
            ""
        }
    ));
    let mut summary = serde_json::to_value(&scores)
        .expect("scores serialise")
        .as_object()
        .cloned()
        .unwrap_or_default();
    summary.insert("command".into(), json!("evaluate"));
    summary.insert("seconds".into(), json!(seconds));
    summary.insert("model".into(), json!(args.model.display().to_string()));
    console.finish(&summary);
    Ok(())
}
