//! `metalearn predict`: a checkpoint's predictions for new data, written to a CSV file: the
//! predicted class (name, or id) and one probability per class, or the predicted value.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use clap::Args;
use serde_json::json;

use crate::args::DataArgs;
use crate::console::Console;
use metalearn::data::image_list::ImageList;
use metalearn::data::text::load_labelled_texts;
use metalearn::error::{Error, Result};
use metalearn::nn::ops;
use metalearn::transfer::image::ImageClassifier;
use metalearn::transfer::text::TextClassifier;
use metalearn::transfer::{load_for_model, load_model, DataInfo, OutputKind};
use metalearn::vision::features::EmbedOptions;

/// Arguments of `predict`.
#[derive(Args, Debug, Clone)]
pub struct PredictArgs {
    /// The checkpoint to predict with.
    #[arg(long, value_name = "CKPT")]
    pub model: PathBuf,
    /// Input data: the model's feature columns are read by name; other columns are ignored.
    #[command(flatten)]
    pub data: DataArgs,
    /// The CSV file to write (atomically).
    #[arg(long, value_name = "PRED.csv")]
    pub out: PathBuf,
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
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Per-example class probabilities `[n, classes]` from the model's raw output.
fn class_probabilities(output: &Tensor, kind: OutputKind) -> Result<Option<Tensor>> {
    let output = output.to_dtype(DType::F64)?;
    let n = output.dim(0)?;
    let positive = match kind {
        OutputKind::ClassLogits => return Ok(Some(ops::softmax(&output)?)),
        OutputKind::Value => return Ok(None),
        OutputKind::Probability => output.reshape((n, 1))?,
        OutputKind::BinaryLogit => ops::sigmoid(&output.reshape((n, 1))?)?,
    };
    let negative = positive.affine(-1.0, 1.0)?;
    Ok(Some(Tensor::cat(&[&negative, &positive], 1)?))
}

/// The prediction table as CSV bytes.
pub fn prediction_csv(output: &Tensor, info: &DataInfo) -> Result<Vec<u8>> {
    let csv_error = |e: csv::Error| Error::Data(format!("cannot format predictions: {e}"));
    let mut writer = csv::Writer::from_writer(Vec::new());
    match class_probabilities(output, info.output)? {
        Some(probs) => {
            let classes = probs.dim(1)?;
            let mut header = vec!["prediction".to_string(), "class_id".to_string()];
            header.extend((0..classes).map(|c| format!("prob_{}", info.class_label(c))));
            writer.write_record(&header).map_err(csv_error)?;
            for row in probs.to_vec2::<f64>()? {
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                let mut record = vec![info.class_label(best), best.to_string()];
                record.extend(row.iter().map(|p| format!("{p:.6}")));
                writer.write_record(&record).map_err(csv_error)?;
            }
        }
        None => {
            let values = output.to_dtype(DType::F64)?;
            let n = values.dim(0)?;
            let outputs = values.elem_count() / n.max(1);
            let values = values.reshape((n, outputs))?.to_vec2::<f64>()?;
            let header: Vec<String> = if outputs == 1 {
                vec![format!("predicted_{}", info.target_name)]
            } else {
                (0..outputs)
                    .map(|i| format!("predicted_{}_{i}", info.target_name))
                    .collect()
            };
            writer.write_record(&header).map_err(csv_error)?;
            for row in values {
                writer
                    .write_record(row.iter().map(|v| v.to_string()))
                    .map_err(csv_error)?;
            }
        }
    }
    writer
        .into_inner()
        .map_err(|e| Error::Data(format!("cannot format predictions: {e}")))
}

/// Runs `predict`.
pub fn run(args: &PredictArgs) -> Result<()> {
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
    let (model, info) = load_model(&args.model)?;
    let (x, _, n) = load_for_model(&info, &model, &args.data.files(), false)?;
    let output = model.predict(&x, args.batch_size)?;
    let bytes = prediction_csv(&output, &info)?;
    metalearn::fsutil::atomic_write(&args.out, &bytes)?;
    console.line(&format!(
        "wrote {} predictions to {}",
        n,
        args.out.display()
    ));
    console.finish(
        &[
            ("command".to_string(), json!("predict")),
            ("examples".to_string(), json!(n)),
            ("out".to_string(), json!(args.out.display().to_string())),
            ("model".to_string(), json!(args.model.display().to_string())),
        ]
        .into_iter()
        .collect(),
    );
    Ok(())
}

/// `predict` of a text model: one row per text with the predicted label (the unknown label
/// below the stored threshold), its confidence and the best known class.
fn run_text(args: &PredictArgs, model: &TextClassifier, console: &Console) -> Result<()> {
    let data = args.data.data.as_ref().ok_or_else(|| {
        Error::Config("--data FILE.csv is required: the texts to classify".into())
    })?;
    let text_column = args
        .text_column
        .as_deref()
        .unwrap_or(&model.section().text_column);
    let texts = load_labelled_texts(data, text_column, None)?;
    let predictions = model.predict(&texts.text_refs(), args.batch_size)?;
    let csv_error = |e: csv::Error| Error::Data(format!("cannot format predictions: {e}"));
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record(["prediction", "confidence", "best_class"])
        .map_err(csv_error)?;
    for p in &predictions {
        writer
            .write_record([
                p.label.as_str(),
                &format!("{:.6}", p.confidence),
                &p.best_class,
            ])
            .map_err(csv_error)?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| Error::Data(format!("cannot format predictions: {e}")))?;
    metalearn::fsutil::atomic_write(&args.out, &bytes)?;
    console.line(&format!(
        "wrote {} predictions to {}",
        predictions.len(),
        args.out.display()
    ));
    console.finish(
        json!({
            "command": "predict",
            "predictions": predictions.len(),
            "out": args.out.display().to_string(),
            "unknown": predictions
                .iter()
                .filter(|p| model.unknown().is_some_and(|u| u.label == p.label))
                .count(),
        })
        .as_object()
        .expect("object"),
    );
    Ok(())
}

/// `predict` of an image model: one row per image with the predicted class and its
/// probability.
fn run_image(args: &PredictArgs, model: &ImageClassifier, console: &Console) -> Result<()> {
    let data = crate::args::image_data(args.data.data.as_ref().or(args.data.images.as_ref()))?;
    let list = ImageList::read(data, &args.path_column, None)?;
    let options = EmbedOptions {
        batch_size: 32,
        skip_bad_images: args.skip_bad_images,
        ..EmbedOptions::default()
    };
    let predictions = model.predict(&list, &options)?;
    let csv_error = |e: csv::Error| Error::Data(format!("cannot format predictions: {e}"));
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record(["path", "label", "confidence"])
        .map_err(csv_error)?;
    for p in &predictions {
        let path = p.path.strip_prefix(&list.root).unwrap_or(&p.path);
        writer
            .write_record([
                path.display().to_string(),
                p.label.clone(),
                format!("{:.6}", p.confidence),
            ])
            .map_err(csv_error)?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| Error::Data(format!("cannot format predictions: {e}")))?;
    metalearn::fsutil::atomic_write(&args.out, &bytes)?;
    let skipped = list.paths.len() - predictions.len();
    if skipped > 0 {
        console.note(&format!("skipped {skipped} unreadable images"));
    }
    console.line(&format!(
        "wrote {} predictions to {}",
        predictions.len(),
        args.out.display()
    ));
    console.finish(
        &[
            ("command".to_string(), json!("predict")),
            ("examples".to_string(), json!(predictions.len())),
            ("skipped".to_string(), json!(skipped)),
            ("out".to_string(), json!(args.out.display().to_string())),
            ("model".to_string(), json!(args.model.display().to_string())),
        ]
        .into_iter()
        .collect(),
    );
    Ok(())
}
