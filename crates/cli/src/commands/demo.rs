//! `metalearn demo`: self-contained demonstrations on built-in data.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use metalearn::demos::xor::{prefer_one_thread, run_xor_demo, XorDemoOptions};
use metalearn::error::{Error, Result};

/// Arguments of `demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Which demo.
    #[command(subcommand)]
    pub demo: DemoKind,
}

/// The demos.
#[derive(Subcommand, Debug, Clone)]
pub enum DemoKind {
    /// Transfer learning on XOR: pre-train, save, load into a fresh model, fine-tune on new labels.
    Xor(XorArgs),
    /// Meta-learning on sinusoids: MAML against the transfer baseline, MSE after 0, 1 and 10
    /// steps on new tasks, and a PNG of one new task.
    Sine(SineArgs),
}

/// Arguments of `demo sine`.
#[derive(Args, Debug, Clone)]
pub struct SineArgs {
    /// Seed of the initial weights and of the tasks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// MAML meta-iterations (meta-batch 10); the baseline takes as many joint-training steps.
    #[arg(long, default_value_t = 20000)]
    pub iterations: u64,
    /// New tasks to score both models on.
    #[arg(long, default_value_t = 200)]
    pub tasks: usize,
    /// Where to write the plot of one new task.
    #[arg(long, value_name = "FILE.png", default_value = "sine-demo.png")]
    pub plot: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `demo xor`.
#[derive(Args, Debug, Clone)]
pub struct XorArgs {
    /// Seed of the initial weights and of shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the pre-trained checkpoint here (default: a temporary file, removed at the end).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Seeds on which to try the literal 2-hidden-unit, lr 0.001, 100-epoch configuration
    /// (0 skips it).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub literal_seeds: u64,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `demo`.
pub fn run(args: &DemoArgs) -> Result<()> {
    match &args.demo {
        DemoKind::Xor(xor) => run_xor(xor),
        DemoKind::Sine(sine) => run_sine(sine),
    }
}

fn run_sine(args: &SineArgs) -> Result<()> {
    use metalearn::demos::sine::{run_sine_demo, SineDemoOptions};
    if args.iterations == 0 || args.tasks == 0 {
        return Err(Error::Config(
            "--iterations and --tasks must be >= 1".into(),
        ));
    }
    let report = run_sine_demo(&SineDemoOptions {
        iterations: args.iterations,
        baseline_iterations: args.iterations as usize,
        eval_tasks: args.tasks,
        seed: args.seed,
        plot: Some(args.plot.clone()),
        progress: !args.quiet && !args.json && crate::console::stderr_is_terminal(),
        ..SineDemoOptions::default()
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_value(&report).expect("report serialises")
        );
        return Ok(());
    }
    println!(
        "MAML meta-trained {} iterations in {:.1} s; transfer baseline trained in {:.1} s",
        args.iterations, report.maml_train_seconds, report.baseline_train_seconds
    );
    println!(
        "MSE on {} new tasks (mean ± 95% CI):",
        report.maml.steps_0.n
    );
    for (name, c) in [("MAML", &report.maml), ("transfer", &report.baseline)] {
        println!(
            "{name:>9}: 0 steps {:.3} ± {:.3} | 1 step {:.3} ± {:.3} | 10 steps {:.3} ± {:.3}",
            c.steps_0.mean,
            c.steps_0.ci95,
            c.steps_1.mean,
            c.steps_1.ci95,
            c.steps_10.mean,
            c.steps_10.ci95
        );
    }
    println!("plot of one new task written to {}", args.plot.display());
    Ok(())
}

fn run_xor(args: &XorArgs) -> Result<()> {
    prefer_one_thread();
    let report = run_xor_demo(&XorDemoOptions {
        seed: args.seed,
        checkpoint: args.out.clone(),
        literal_seeds: args.literal_seeds,
        ..XorDemoOptions::default()
    })?;
    if args.json {
        let mut summary = serde_json::json!({
            "command": "demo xor",
            "seed": report.seed,
            "pretrain_loss": report.pretrain.after.loss,
            "pretrain_accuracy": report.pretrain.after.accuracy,
            "pretrain_loss_before": report.pretrain.before.loss,
            "pretrain_accuracy_before": report.pretrain.before.accuracy,
            "reloaded_loss": report.reloaded.loss,
            "reloaded_accuracy": report.reloaded.accuracy,
            "finetune_loss": report.finetune.after.loss,
            "finetune_accuracy": report.finetune.after.accuracy,
            "finetune_loss_before": report.finetune.before.loss,
            "finetune_accuracy_before": report.finetune.before.accuracy,
            "checkpoint": if report.checkpoint_kept { Some(&report.checkpoint) } else { None },
        });
        if let Some(lit) = &report.literal {
            summary["literal_seeds"] = lit.seeds.into();
            summary["literal_reached_100"] = lit.reached_100.into();
            summary["literal_mean_accuracy"] = lit.mean_accuracy.into();
        }
        println!("{summary}");
    } else {
        for line in report.lines() {
            println!("{line}");
        }
    }
    if report.pretrain.after.accuracy < 1.0 || report.finetune.after.accuracy < 1.0 {
        return Err(Error::Data(format!(
            "the demo did not reach 100% accuracy with seed {} (pre-train {:.0}%, fine-tune \
             {:.0}%)",
            args.seed,
            report.pretrain.after.accuracy * 100.0,
            report.finetune.after.accuracy * 100.0
        )));
    }
    Ok(())
}
