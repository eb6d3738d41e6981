//! `metalearn import-keras`: a Keras model (`.keras`, `.h5`, or weights-only `.weights.h5` with
//! `--architecture`) as a metalearn checkpoint that `predict`, `evaluate`, `finetune` and
//! `inspect` take like any other.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::console::Console;
use metalearn::error::Result;
use metalearn::transfer::{import_keras, save_model};

/// Arguments of `import-keras`.
#[derive(Args, Debug, Clone)]
pub struct ImportKerasArgs {
    /// The Keras file: model.keras, a full-model .h5, or weights (.weights.h5, legacy .h5).
    pub file: PathBuf,
    /// For a weights-only file: the model's .keras file, or a metalearn checkpoint of it.
    #[arg(long, value_name = "FILE")]
    pub architecture: Option<PathBuf>,
    /// The checkpoint to write (atomically).
    #[arg(long, value_name = "CKPT.safetensors")]
    pub out: PathBuf,
    /// Print one JSON object with a summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `import-keras`.
pub fn run(args: &ImportKerasArgs) -> Result<()> {
    let console = Console::new(args.json, false);
    let (model, info) = import_keras(&args.file, args.architecture.as_deref())?;
    save_model(&model, &info, &args.out)?;
    let arch = model.architecture();
    console.line(&format!(
        "imported {} ({} layers, {} parameters, input {:?}, output {:?}) to {}",
        args.file.display(),
        arch.layers.len(),
        model.param_count(),
        arch.input_shape,
        info.output,
        args.out.display()
    ));
    let mut report = crate::console::Report::new();
    report.insert("checkpoint".into(), json!(args.out.display().to_string()));
    report.insert("layers".into(), json!(arch.layers.len()));
    report.insert("parameters".into(), json!(model.param_count()));
    report.insert("input_shape".into(), json!(arch.input_shape));
    report.insert("output".into(), json!(info.output));
    report.insert("target_kind".into(), json!(info.target_kind));
    console.finish(&report);
    Ok(())
}
