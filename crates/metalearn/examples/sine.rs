//! Meta-trains MAML and a transfer baseline on sinusoid regression, prints their MSE on new
//! tasks after 0, 1 and 10 adaptation steps, and writes `sine-demo.png`.
//!
//! Run with `cargo run --release --example sine`.

use metalearn::demos::sine::{run_sine_demo, SineDemoOptions};

fn main() -> metalearn::Result<()> {
    let report = run_sine_demo(&SineDemoOptions::default())?;
    println!(
        "MSE on {} new tasks (mean ± 95% CI):",
        report.maml.steps_0.n
    );
    for (name, curve) in [("MAML", &report.maml), ("transfer", &report.baseline)] {
        println!(
            "{name:>9}: 0 steps {:.3} ± {:.3} | 1 step {:.3} ± {:.3} | 10 steps {:.3} ± {:.3}",
            curve.steps_0.mean,
            curve.steps_0.ci95,
            curve.steps_1.mean,
            curve.steps_1.ci95,
            curve.steps_10.mean,
            curve.steps_10.ci95
        );
    }
    if let Some(plot) = &report.plot {
        println!("plot written to {}", plot.display());
    }
    Ok(())
}
