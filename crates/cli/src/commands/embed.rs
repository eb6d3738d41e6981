//! `metalearn embed`: sentence embeddings of a CSV column with a pre-trained encoder, or the
//! pooled features of images with a pre-trained backbone, written as safetensors
//! (`embeddings` `[rows, dim]`, f32; for images the paths in the metadata) or CSV (one row per
//! text or image, `dim_0..`; for images a `path` column first).

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;
use serde_json::json;

use crate::args::BackboneArgs;
use crate::console::Console;
use metalearn::data::image_list::ImageList;
use metalearn::data::text::load_labelled_texts;
use metalearn::error::{Error, Result};
use metalearn::text::TextEncoder;
use metalearn::vision::features::{embed_images, EmbedOptions};
use metalearn::vision::Backbone;

/// Arguments of `embed`.
#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    /// The encoder: a Hugging Face / sentence-transformers folder, or hf:OWNER/MODEL from the
    /// Hugging Face Hub.
    #[arg(long, value_name = "DIR|hf:NAME", required_unless_present = "backbone")]
    pub encoder: Option<PathBuf>,
    /// The CSV file holding the texts; with --backbone, an image folder (one sub-folder per
    /// class, or any tree of images) or a CSV file with a path column.
    #[arg(long, value_name = "FILE.csv|FOLDER")]
    pub data: PathBuf,
    /// The column holding the texts.
    #[arg(long, value_name = "COLUMN", required_unless_present = "backbone")]
    pub text_column: Option<String>,
    /// Images: the pre-trained backbone and how images are read.
    #[command(flatten)]
    pub image: BackboneArgs,
    /// Where to write: FILE.safetensors or FILE.csv.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Texts per forward pass.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub batch_size: usize,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `embed`.
pub fn run(args: &EmbedArgs) -> Result<()> {
    let console = Console::new(args.json, false);
    let format = match args.out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => "safetensors",
        Some("csv") => "csv",
        _ => {
            return Err(Error::Config(format!(
                "--out {}: name a .safetensors or a .csv file",
                args.out.display()
            )))
        }
    };
    if args.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    if let Some(backbone) = &args.image.backbone {
        return run_images(args, backbone, format, &console);
    }
    let (Some(encoder), Some(text_column)) = (&args.encoder, &args.text_column) else {
        return Err(Error::Config(
            "give --encoder DIR and --text-column COLUMN (texts) or --backbone FILE (images)"
                .into(),
        ));
    };
    let encoder = TextEncoder::load(encoder, DType::F32)?;
    let texts = load_labelled_texts(&args.data, text_column, None)?;
    let started = std::time::Instant::now();
    let embedded = encoder.embed(&texts.text_refs(), args.batch_size)?;
    let seconds = started.elapsed().as_secs_f64();
    let (rows, dim) = embedded.vectors.dims2()?;
    let bytes = if format == "csv" {
        let csv_error = |e: csv::Error| Error::Data(format!("cannot format embeddings: {e}"));
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer
            .write_record((0..dim).map(|d| format!("dim_{d}")))
            .map_err(csv_error)?;
        for row in embedded.vectors.to_vec2::<f32>()? {
            writer
                .write_record(row.iter().map(|v| v.to_string()))
                .map_err(csv_error)?;
        }
        writer
            .into_inner()
            .map_err(|e| Error::Data(format!("cannot format embeddings: {e}")))?
    } else {
        let tensors = [("embeddings", embedded.vectors.clone())];
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.to_string(), t)), None)
            .map_err(|e| Error::Data(format!("cannot write safetensors: {e}")))?
    };
    metalearn::fsutil::atomic_write(&args.out, &bytes)?;
    if embedded.truncated > 0 {
        console.note(&format!(
            "{} of {rows} texts were longer than the model's {} tokens and were cut",
            embedded.truncated,
            encoder.tokenizer().max_length()
        ));
    }
    console.line(&format!(
        "wrote {rows} embeddings of dimension {dim} to {} ({:.1} s, {:.0} texts/s)",
        args.out.display(),
        seconds,
        rows as f64 / seconds.max(1e-9)
    ));
    console.finish(
        json!({
            "command": "embed",
            "rows": rows,
            "dim": dim,
            "truncated": embedded.truncated,
            "tokens": embedded.tokens,
            "seconds": seconds,
            "out": args.out.display().to_string(),
        })
        .as_object()
        .expect("object"),
    );
    Ok(())
}

/// `embed --backbone`: the pooled features of every image.
fn run_images(
    args: &EmbedArgs,
    backbone_file: &std::path::Path,
    format: &str,
    console: &Console,
) -> Result<()> {
    let backbone = Backbone::load(
        backbone_file,
        args.image.architecture.as_deref(),
        DType::F32,
    )?;
    let list = if args.data.is_dir() {
        ImageList::tree(&args.data)?
    } else {
        ImageList::read(&args.data, &args.image.path_column, None)?
    };
    let options = EmbedOptions {
        batch_size: args.batch_size,
        skip_bad_images: args.image.skip_bad_images,
        // Embedding is the product here; a cache would only duplicate it.
        cache: None,
    };
    let started = std::time::Instant::now();
    let bar = metalearn::progress::bar(list.paths.len() as u64, console.progress(), "embedding");
    let embedded = embed_images(&backbone, &list.paths, &options, &mut |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let (rows, dim) = embedded.features.dims2()?;
    let paths: Vec<String> = embedded
        .kept
        .iter()
        .map(|&i| {
            let p = &list.paths[i];
            p.strip_prefix(&list.root)
                .unwrap_or(p)
                .display()
                .to_string()
        })
        .collect();
    let bytes = if format == "csv" {
        let csv_error = |e: csv::Error| Error::Data(format!("cannot format features: {e}"));
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer
            .write_record(
                std::iter::once("path".to_string()).chain((0..dim).map(|d| format!("dim_{d}"))),
            )
            .map_err(csv_error)?;
        for (path, row) in paths.iter().zip(embedded.features.to_vec2::<f32>()?) {
            writer
                .write_record(
                    std::iter::once(path.clone()).chain(row.iter().map(|v| v.to_string())),
                )
                .map_err(csv_error)?;
        }
        writer
            .into_inner()
            .map_err(|e| Error::Data(format!("cannot format features: {e}")))?
    } else {
        let tensors = [("embeddings", embedded.features.clone())];
        let metadata = std::collections::HashMap::from([(
            "paths".to_string(),
            serde_json::to_string(&paths).expect("paths serialise"),
        )]);
        safetensors::serialize(
            tensors.iter().map(|(n, t)| (n.to_string(), t)),
            Some(metadata),
        )
        .map_err(|e| Error::Data(format!("cannot write safetensors: {e}")))?
    };
    metalearn::fsutil::atomic_write(&args.out, &bytes)?;
    for (path, reason) in embedded.skipped.iter().take(5) {
        console.note(&format!("skipped {}: {reason}", path.display()));
    }
    if embedded.skipped.len() > 5 {
        console.note(&format!(
            "... and {} more skipped",
            embedded.skipped.len() - 5
        ));
    }
    console.line(&format!(
        "wrote {rows} features of dimension {dim} to {} ({:.1} s, {:.1} images/s{})",
        args.out.display(),
        seconds,
        rows as f64 / seconds.max(1e-9),
        if embedded.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} unreadable images skipped", embedded.skipped.len())
        }
    ));
    console.finish(
        json!({
            "command": "embed",
            "rows": rows,
            "dim": dim,
            "skipped": embedded.skipped.len(),
            "seconds": seconds,
            "images_per_sec": rows as f64 / seconds.max(1e-9),
            "backbone": backbone.name,
            "out": args.out.display().to_string(),
        })
        .as_object()
        .expect("object"),
    );
    Ok(())
}
