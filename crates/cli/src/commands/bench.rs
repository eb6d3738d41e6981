//! `metalearn bench`: times the benchmark workloads (see [`metalearn::workloads`]).

use clap::Args;

use metalearn::error::{Error, Result};
use std::path::PathBuf;

use metalearn::data::clinc150::read_clinc150_split;
use metalearn::data::text::load_labelled_texts;
use metalearn::workloads::{
    default_iterations, run, run_text, run_vision, BenchResult, TextInput, TEXT_WORKLOADS,
    VISION_WORKLOADS, WORKLOADS,
};

/// Arguments of `bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workload to time (repeat for several; `all` for every one but the text and vision
    /// ones): protonet-conv4, maml-conv4, fomaml-conv4, maml-sine, maml-sine-5,
    /// adapt-protonet-conv4, melu; encode-minilm, encode-minilm-single, finetune-minilm;
    /// effnet-lite0-forward, effnet-lite0-single.
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
    /// Text workloads (encode-minilm, encode-minilm-single, finetune-minilm): the encoder
    /// folder, or hf:OWNER/MODEL.
    #[arg(long, value_name = "DIR|hf:NAME")]
    pub encoder: Option<PathBuf>,
    /// Text workloads: the sentences: a CSV file (with --text-column), or CLINC150's
    /// data_full.json (its 4,500 `test` queries).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Vision workloads: EfficientNet-Lite0 weights (`.safetensors` or `.pth`, lukemelas
    /// names); random weights when left out (the same arithmetic).
    #[arg(long, value_name = "FILE")]
    pub backbone: Option<PathBuf>,
    /// Text workloads: the CSV column holding the sentences.
    #[arg(long, value_name = "COLUMN", default_value = "text")]
    pub text_column: String,
    /// Text workloads: sentences per batch.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub batch_size: usize,
}

/// Runs `bench`.
pub fn run_bench(args: &BenchArgs) -> Result<()> {
    let mut names: Vec<String> = Vec::new();
    for name in &args.workloads {
        if TEXT_WORKLOADS.contains(&name.as_str()) || VISION_WORKLOADS.contains(&name.as_str()) {
            names.push(name.clone());
        } else if name == "all" {
            names.extend(WORKLOADS.iter().map(|s| s.to_string()));
        } else if WORKLOADS.contains(&name.as_str()) {
            names.push(name.clone());
        } else {
            return Err(Error::Config(format!(
                "unknown workload `{name}`; choose from: {}, {}, {}, or all",
                WORKLOADS.join(", "),
                TEXT_WORKLOADS.join(", "),
                VISION_WORKLOADS.join(", ")
            )));
        }
    }
    if args.reference {
        metalearn::kernels::set_enabled(false);
    }
    let device = crate::args::compute_device(args.cuda)?;
    let mut text_input = None;
    for name in names {
        let iterations = args.iterations.unwrap_or_else(|| default_iterations(&name));
        let result = if TEXT_WORKLOADS.contains(&name.as_str()) {
            if text_input.is_none() {
                text_input = Some(text_input_from(args)?);
            }
            run_text(&name, iterations, text_input.as_ref().expect("set above"))?
        } else if VISION_WORKLOADS.contains(&name.as_str()) {
            run_vision(&name, iterations, args.backbone.as_ref(), &device)?
        } else {
            run(&name, iterations, &device)?
        };
        // Under MPI every rank times the same split meta-step; rank 0 reports it.
        if metalearn::distributed::world().is_root() {
            print_result(&result, args.json);
        }
    }
    Ok(())
}

/// The encoder and sentences of the text workloads.
fn text_input_from(args: &BenchArgs) -> Result<TextInput> {
    let encoder = args.encoder.clone().ok_or_else(|| {
        Error::Config("text workloads need --encoder DIR (a sentence-transformers folder)".into())
    })?;
    let data = args.data.clone().ok_or_else(|| {
        Error::Config(
            "text workloads need --data FILE: a CSV file with a text column, or CLINC150's \
             data_full.json"
                .into(),
        )
    })?;
    let texts = if data.extension().is_some_and(|e| e == "json") {
        read_clinc150_split(&data, "test")?
    } else {
        load_labelled_texts(&data, &args.text_column, None)?.texts
    };
    Ok(TextInput {
        encoder,
        texts,
        batch_size: args.batch_size,
    })
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
    let rate = match (result.sentences_per_sec, result.images_per_sec) {
        (Some(r), _) => format!(", {r:.1} sentences/s"),
        (_, Some(r)) => format!(
            ", {r:.1} images/s, {:.1} GFLOP/s",
            r * result.gflop_per_image.unwrap_or(0.0)
        ),
        _ => String::new(),
    };
    println!(
        "metalearn {} on {}: {:.2} ms/iter (median {:.2}, min {:.2}{rate}) over {} iterations, peak RSS {rss}, {} threads, {} kernels",
        result.workload,
        result.device,
        result.ms_per_iter,
        result.median_ms,
        result.min_ms,
        result.iterations,
        result.threads,
        if result.fast_kernels { "fast" } else { "reference" }
    );
}
