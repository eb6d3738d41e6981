//! `metalearn adapt`: adapt a meta-trained model to a user's own small task (a support file) and
//! write predictions for a query file.

use std::path::PathBuf;

use candle_core::{DType, D};
use clap::Args;
use serde_json::json;

use metalearn::data::Dataset;
use metalearn::error::{Error, Result};
use metalearn::experiment::load_meta_model;
use metalearn::tasks::TaskKind;

/// Arguments of `adapt`.
#[derive(Args, Debug, Clone)]
pub struct AdaptArgs {
    /// A meta-learning checkpoint or a meta-train output folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The support set: a CSV file with a target column, or an image folder with one
    /// sub-folder per class. For a text model, a CSV file whose text column is the one of the
    /// model's config.
    #[arg(long)]
    pub support: PathBuf,
    /// The query set, in the same format (the target column / class folders are optional for
    /// CSV: when present, the metric is reported).
    #[arg(long)]
    pub query: PathBuf,
    /// Target column of CSV files (default: the one in the model's config, else `y`).
    #[arg(long)]
    pub target: Option<String>,
    /// Text models: the CSV column holding the text (default: the one in the model's config).
    #[arg(long, value_name = "COLUMN")]
    pub text_column: Option<String>,
    /// Adaptation steps (default: the model's eval_inner_steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Where to write predictions (CSV).
    #[arg(long, default_value = "predictions.csv")]
    pub out: PathBuf,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

fn load(
    path: &std::path::Path,
    target: &str,
    image: Option<&metalearn::data::image_folder::ImageFolderOptions>,
    classes: Option<&[String]>,
) -> Result<Dataset> {
    if path.is_dir() {
        let options = image.cloned().unwrap_or_default();
        metalearn::data::image_folder::load_image_folder(path, &options)
    } else {
        metalearn::data::csv::load_csv_with_classes(path, target, classes)
    }
}

/// Whether the header of the CSV file at `path` names `column` (cells are trimmed, as the
/// loader trims them).
fn csv_has_column(path: &std::path::Path, column: &str) -> Result<bool> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| {
        Error::Data(format!(
            "{}: cannot read the CSV file ({e}); check the path",
            path.display()
        ))
    })?;
    let headers = reader
        .byte_headers()
        .map_err(|e| Error::Data(format!("{}: cannot read the header: {e}", path.display())))?;
    Ok(headers.iter().any(|h| {
        String::from_utf8_lossy(h)
            .trim()
            .trim_start_matches('\u{feff}')
            == column
    }))
}

/// Runs `adapt`.
pub fn run(args: &AdaptArgs) -> Result<()> {
    let (learner, mut config, model_path) =
        load_meta_model(&args.model, &candle_core::Device::Cpu)?;
    if let Some(column) = &args.text_column {
        if config.task.text_column.is_none() {
            return Err(Error::Config(format!(
                "--text-column applies to text models, and {} was not meta-trained on texts",
                model_path.display()
            )));
        }
        config.task.text_column = Some(column.clone());
    }
    let target = args
        .target
        .clone()
        .or_else(|| config.task.target.clone())
        .unwrap_or_else(|| "y".into());
    let image = {
        let [height, width] = config.task.image_size.unwrap_or([28, 28]);
        metalearn::data::image_folder::ImageFolderOptions {
            height,
            width,
            channels: config.task.channels.unwrap_or(1),
        }
    };
    let text = config.task.text_column.is_some();
    let support = if text {
        config.text_dataset(&args.support, Some(&target), None)?
    } else {
        load(&args.support, &target, Some(&image), None)?
    };
    let expected = learner.network().architecture().input_shape.clone();
    // Token ids may be shorter than the model's longest sequence.
    if !text && support.input_shape() != expected {
        return Err(Error::Shape(format!(
            "{}: examples have shape {:?} but the model expects {:?}",
            args.support.display(),
            support.input_shape(),
            expected
        )));
    }
    if let TaskKind::Classification { ways } = learner.task_kind() {
        let n = support.num_classes().unwrap_or(0);
        if n != ways {
            return Err(Error::Data(format!(
                "{}: the support set has {n} classes but the model was meta-trained for {ways}-way tasks",
                args.support.display()
            )));
        }
    }
    // Query files may lack the target column: then only predictions are written.
    let query_x;
    let query = if text {
        let has_target = csv_has_column(&args.query, &target)?;
        let q = config.text_dataset(
            &args.query,
            has_target.then_some(target.as_str()),
            support.class_names.as_deref(),
        )?;
        query_x = q.x.clone();
        has_target.then_some(q)
    } else if args.query.is_dir() {
        let q = load(&args.query, &target, Some(&image), None)?;
        if q.class_names != support.class_names {
            return Err(Error::Data(format!(
                "{}: the query classes {:?} differ from the support classes {:?}; use the same \
                 class sub-folders in both",
                args.query.display(),
                q.class_names.clone().unwrap_or_default(),
                support.class_names.clone().unwrap_or_default()
            )));
        }
        query_x = q.x.clone();
        Some(q)
    } else if csv_has_column(&args.query, &target)? {
        let q = metalearn::data::csv::load_csv_with_classes(
            &args.query,
            &target,
            support.class_names.as_deref(),
        )?;
        query_x = q.x.clone();
        Some(q)
    } else {
        query_x = metalearn::data::csv::load_csv_features(&args.query, &support.feature_names)?;
        None
    };
    let adapted = learner.adapt((&support.x, &support.y), args.steps)?;
    let pred = learner.predict(&adapted, &query_x)?.to_dtype(DType::F32)?;
    let mut writer = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::Data(format!("cannot write predictions: {e}"));
    let mut result = json!({
        "model": model_path.display().to_string(),
        "predictions": args.out.display().to_string(),
        "support_examples": support.len(),
        "query_examples": query_x.dim(0)?,
    });
    match learner.task_kind() {
        TaskKind::Regression => {
            writer.write_record(["prediction"]).map_err(csv_err)?;
            for v in pred.flatten_all()?.to_vec1::<f32>()? {
                writer.write_record([v.to_string()]).map_err(csv_err)?;
            }
        }
        TaskKind::Classification { .. } => {
            let names = support.class_names.clone().unwrap_or_else(|| {
                (0..pred.dim(1).unwrap_or(0))
                    .map(|i| i.to_string())
                    .collect()
            });
            let probs = metalearn::nn::ops::softmax(&pred)?;
            let best = pred.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let mut header = vec!["predicted".to_string()];
            header.extend(names.iter().map(|n| format!("p_{n}")));
            writer.write_record(&header).map_err(csv_err)?;
            for (row, b) in probs.to_vec2::<f32>()?.into_iter().zip(best) {
                let mut rec = vec![names[b as usize].clone()];
                rec.extend(row.iter().map(|p| format!("{p:.6}")));
                writer.write_record(&rec).map_err(csv_err)?;
            }
        }
    }
    if let Some(q) = &query {
        let score = learner.metric().compute(&pred, &q.y, 0.5)?;
        result[learner.metric().name()] = json!(score);
        if !args.json {
            println!("query {}: {score:.4}", learner.metric().name());
        }
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| Error::Data(format!("cannot write predictions: {e}")))?;
    metalearn::fsutil::atomic_write(&args.out, &bytes)?;
    if args.json {
        println!("{result}");
    } else {
        println!(
            "predictions for {} examples written to {}",
            query_x.dim(0)?,
            args.out.display()
        );
    }
    Ok(())
}
