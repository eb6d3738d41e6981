//! `metalearn evaluate`: the loss and metrics of a checkpoint on labelled data.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::args::DataArgs;
use crate::console::{format_scores, scores_to_report, Console};
use metalearn::error::{Error, Result};
use metalearn::sequential::Sequential;
use metalearn::train::loss::Loss;
use metalearn::train::metrics::Metric;
use metalearn::train::optim::OptimizerConfig;
use metalearn::transfer::{load_for_model, load_model, DataInfo, OutputKind};

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
