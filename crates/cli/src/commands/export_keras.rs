//! `metalearn export-keras`: a metalearn checkpoint as a Keras file (`.keras`, `.weights.h5`
//! or legacy `.h5`) that Keras 3 loads and predicts with as metalearn does.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::console::Console;
use metalearn::checkpoint::Checkpoint;
use metalearn::error::Result;
use metalearn::keras::{export, KerasFormat};
use metalearn::transfer::{DataInfo, OutputKind, DATA_SECTION};
use metalearn::Sequential;

/// Arguments of `export-keras`.
#[derive(Args, Debug, Clone)]
pub struct ExportKerasArgs {
    /// The checkpoint (from train, finetune or import-keras).
    pub checkpoint: PathBuf,
    /// The file to write: FILE.keras, FILE.weights.h5 or FILE.h5 (legacy full model).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Print one JSON object with a summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `export-keras`.
pub fn run(args: &ExportKerasArgs) -> Result<()> {
    let console = Console::new(args.json, false);
    let format = KerasFormat::of(&args.out)?;
    let ckpt = Checkpoint::load(&args.checkpoint, &candle_core::Device::Cpu)?;
    let model = Sequential::from_checkpoint(&ckpt)?;
    // A classifier's checkpoint holds logits; a Keras classifier predicts probabilities.
    let info: Option<DataInfo> = ckpt
        .section(DATA_SECTION)
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    let softmax = info
        .is_some_and(|i| i.output == OutputKind::ClassLogits && i.keras_softmax.unwrap_or(true));
    export(&model, &args.out, softmax)?;
    console.line(&format!(
        "wrote {} ({format:?}, {} layers{})",
        args.out.display(),
        model.architecture().layers.len(),
        if softmax { " and a final softmax" } else { "" }
    ));
    let mut report = crate::console::Report::new();
    report.insert("file".into(), json!(args.out.display().to_string()));
    report.insert("format".into(), json!(format!("{format:?}")));
    report.insert("final_softmax".into(), json!(softmax));
    console.finish(&report);
    Ok(())
}
