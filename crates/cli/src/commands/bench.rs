//! `metalearn bench`: times the benchmark workloads (see [`metalearn::workloads`]).

use clap::Args;

use metalearn::error::{Error, Result};
use metalearn::workloads::{default_iterations, run, BenchResult, WORKLOADS};

/// Arguments of `bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workload to time (repeat for several; `all` for every one): protonet-conv4, maml-conv4,
    /// fomaml-conv4, maml-sine, maml-sine-5, adapt-protonet-conv4.
    #[arg(long = "workload", required = true)]
    pub workloads: Vec<String>,
    /// Timed iterations (default: 5 for the conv workloads, 500 for the sine ones, 50 for adapt).
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Use the plain candle operations instead of the fast CPU kernels (the reference path).
    #[arg(long)]
    pub reference: bool,
    /// Run on the first CUDA GPU (needs a build with the `cuda` feature).
    #[arg(long)]
    pub cuda: bool,
    /// Print one JSON object per workload (`ms_per_iter`, `peak_rss_mb`, ...).
    #[arg(long)]
    pub json: bool,
}

/// Runs `bench`.
pub fn run_bench(args: &BenchArgs) -> Result<()> {
    let mut names: Vec<String> = Vec::new();
    for name in &args.workloads {
        if name == "all" {
            names.extend(WORKLOADS.iter().map(|s| s.to_string()));
        } else if WORKLOADS.contains(&name.as_str()) {
            names.push(name.clone());
        } else {
            return Err(Error::Config(format!(
                "unknown workload `{name}`; choose from: {}, or all",
                WORKLOADS.join(", ")
            )));
        }
    }
    if args.reference {
        metalearn::kernels::set_enabled(false);
    }
    let device = crate::args::compute_device(args.cuda)?;
    for name in names {
        let iterations = args.iterations.unwrap_or_else(|| default_iterations(&name));
        let result = run(&name, iterations, &device)?;
        // Under MPI every rank times the same split meta-step; rank 0 reports it.
        if metalearn::distributed::world().is_root() {
            print_result(&result, args.json);
        }
    }
    Ok(())
}

fn print_result(result: &BenchResult, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(result).expect("bench result serialises")
        );
        return;
    }
    let rss = result
        .peak_rss_mb
        .map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
    println!(
        "metalearn {} on {}: {:.2} ms/iter (min {:.2}) over {} iterations, peak RSS {rss}, {} threads, {} kernels",
        result.workload,
        result.device,
        result.ms_per_iter,
        result.min_ms,
        result.iterations,
        result.threads,
        if result.fast_kernels { "fast" } else { "reference" }
    );
}
