//! `metalearn embed`: sentence embeddings of a CSV column with a pre-trained encoder, written
//! as safetensors (`embeddings` `[rows, dim]`, f32) or CSV (one row per text, `dim_0..`).

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;
use serde_json::json;

use crate::console::Console;
use metalearn::data::text::load_labelled_texts;
use metalearn::error::{Error, Result};
use metalearn::text::TextEncoder;

/// Arguments of `embed`.
#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    /// The encoder: a Hugging Face / sentence-transformers folder, or hf:OWNER/MODEL from the
    /// Hugging Face Hub.
    #[arg(long, value_name = "DIR|hf:NAME")]
    pub encoder: PathBuf,
    /// The CSV file holding the texts.
    #[arg(long, value_name = "FILE.csv")]
    pub data: PathBuf,
    /// The column holding the texts.
    #[arg(long, value_name = "COLUMN")]
    pub text_column: String,
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
    let encoder = TextEncoder::load(&args.encoder, DType::F32)?;
    let texts = load_labelled_texts(&args.data, &args.text_column, None)?;
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
