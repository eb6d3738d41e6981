//! The `metalearn` command-line tool: one file per command, each with a clap `Args` struct and a
//! `run(&args)` function; [`Command`] lists them. Adding a command is adding a file and a variant.

use clap::{Parser, Subcommand};

use metalearn::error::Result;

pub mod adapt;
pub mod bench;
pub mod data;
pub mod demo;
pub mod embed;
pub mod eval_runs;
pub mod evaluate;
pub mod export_keras;
pub mod finetune;
pub mod import_keras;
pub mod inspect;
pub mod meta_eval;
pub mod meta_train;
pub mod plot;
pub mod predict;
pub mod recommend;
pub mod train;

/// Transfer learning and meta-learning from the command line: train, fine-tune, evaluate and
/// predict with self-describing checkpoints; every command takes --json for scripts.
#[derive(Parser, Debug)]
#[command(name = "metalearn", version, about, long_about = None)]
pub struct Cli {
    /// Compute threads (default: all cores); works before or after the command name.
    #[arg(long, global = true, value_name = "N", value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Parses `--threads`: a whole number of at least 1.
fn parse_threads(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => {
            Err("the thread count must be at least 1 (omit --threads to use every core)".into())
        }
        Err(_) => Err(format!(
            "`{text}` is not a whole number of threads, e.g. --threads 2"
        )),
    }
}

/// Applies `--threads`: sets `RAYON_NUM_THREADS`, which rayon's global pool, candle's CPU
/// kernels and `metalearn::runtime::init`'s backward pool read when they start. It must run
/// before `runtime::init` and any tensor operation, as `main` does.
pub fn apply_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model on a CSV file (MLP), an image folder (Conv-4), or texts on a pre-trained
    /// sentence encoder (--encoder), and save a checkpoint.
    Train(Box<train::TrainArgs>),
    /// Fine-tune a checkpoint on new data: all layers, some frozen, a new head or a linear probe.
    Finetune(Box<finetune::FinetuneArgs>),
    /// Print the loss and metrics of a checkpoint on labelled data.
    Evaluate(evaluate::EvaluateArgs),
    /// Write a checkpoint's predictions for new data to a CSV file.
    Predict(predict::PredictArgs),
    /// Run a built-in demo (no download needed).
    Demo(demo::DemoArgs),
    /// Meta-train a model (MAML, Reptile, Meta-SGD, ANIL, ProtoNet) from a TOML config.
    MetaTrain(meta_train::MetaTrainArgs),
    /// Score a meta-trained model on new tasks: mean and 95% CI, optionally beside the transfer baseline.
    MetaEval(meta_eval::MetaEvalArgs),
    /// Adapt a meta-trained model to your own support set and predict a query set.
    Adapt(adapt::AdaptArgs),
    /// Recommend items to a new user from a few ratings (a meta-trained recommendation model).
    Recommend(recommend::RecommendArgs),
    /// Write sentence embeddings of a CSV column with a pre-trained encoder.
    Embed(embed::EmbedArgs),
    /// Download public data sets (Omniglot, CLINC150, MovieLens-1M) with checksum verification.
    Data(data::DataArgs),
    /// Score a meta-trained model on the official Omniglot one-shot benchmark (20 runs).
    EvalRuns(eval_runs::EvalRunsArgs),
    /// Draw the training and validation curves of a JSONL training log as a PNG.
    Plot(plot::PlotArgs),
    /// Describe a checkpoint: layers and shapes, parameter counts, algorithm, training progress.
    Inspect(inspect::InspectArgs),
    /// Time the benchmark workloads (ms per iteration, peak memory).
    Bench(bench::BenchArgs),
    /// Read a Keras model (.keras, .h5, .weights.h5) into a metalearn checkpoint.
    ImportKeras(import_keras::ImportKerasArgs),
    /// Write a checkpoint as a Keras file (.keras, .weights.h5 or legacy .h5).
    ExportKeras(export_keras::ExportKerasArgs),
}

/// Runs the parsed command line.
pub fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Train(args) => train::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Demo(args) => demo::run(args),
        Command::MetaTrain(args) => meta_train::run(args, cli.threads),
        Command::MetaEval(args) => meta_eval::run(args),
        Command::Adapt(args) => adapt::run(args),
        Command::Recommend(args) => recommend::run(args),
        Command::Data(args) => data::run(args),
        Command::EvalRuns(args) => eval_runs::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run_bench(args),
        Command::Embed(args) => embed::run(args),
        Command::ImportKeras(args) => import_keras::run(args),
        Command::ExportKeras(args) => export_keras::run(args),
    }
}

/// An error and its causes as one line, `outer: cause: root cause`, skipping causes whose text
/// the outer message already contains.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn error_chain_includes_causes_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = metalearn::Error::io("a.csv", io);
        let text = error_chain(&err);
        assert_eq!(text.matches("no such file").count(), 1, "{text}");
        assert!(text.contains("a.csv"), "{text}");
    }
}
