//! Text workloads, timed on a real encoder folder and real sentences:
//!
//! | workload | what one iteration is |
//! | --- | --- |
//! | `encode-minilm` | embedding every given sentence at batch 32 (sorted by length, each batch padded to its longest member, as sentence-transformers does) |
//! | `encode-minilm-single` | embedding one sentence (the next of the first 200, in turn) |
//! | `finetune-minilm` | one fine-tuning step on 32 sentences: forward, cross-entropy of a 150-class head, backward through the whole encoder, AdamW on every weight but the word-embedding table (as `train --method finetune`) |

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::{time_prepared, BenchResult, Prepared};
use crate::error::{Error, Result};
use crate::nn::architecture::Layer;
use crate::nn::network::Network;
use crate::text::TextEncoder;
use crate::transfer::text::train::WORD_TABLE;
use crate::transfer::text::{TextTrainPlan, TextTrainer};

/// The text workloads, by name.
pub const TEXT_WORKLOADS: [&str; 3] = ["encode-minilm", "encode-minilm-single", "finetune-minilm"];

/// What a text workload runs on.
#[derive(Clone, Debug)]
pub struct TextInput {
    /// The encoder folder.
    pub encoder: PathBuf,
    /// The sentences.
    pub texts: Vec<String>,
    /// Sentences per batch.
    pub batch_size: usize,
}

/// Runs a text workload for `iterations` timed iterations (after a warm-up) on the CPU.
pub fn run_text(workload: &str, iterations: usize, input: &TextInput) -> Result<BenchResult> {
    crate::runtime::init();
    if iterations == 0 {
        return Err(Error::Config("--iterations must be at least 1".into()));
    }
    if input.texts.is_empty() || input.batch_size == 0 {
        return Err(Error::Config(
            "text workloads need sentences (--data) and a batch size of at least 1".into(),
        ));
    }
    let encoder = TextEncoder::load(&input.encoder, DType::F32)?;
    let prepared = match workload {
        "encode-minilm" => {
            let texts = input.texts.clone();
            let batch = input.batch_size;
            let count = texts.len();
            Prepared {
                step: Box::new(move || {
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    encoder.embed(&refs, batch).map(|_| ())
                }),
                warmup: 1,
                sentences: Some(count),
            }
        }
        "encode-minilm-single" => {
            let texts: Vec<String> = input.texts.iter().take(200).cloned().collect();
            let mut next = 0;
            Prepared {
                step: Box::new(move || {
                    let text = texts[next % texts.len()].as_str();
                    next += 1;
                    encoder.embed(&[text], 1).map(|_| ())
                }),
                warmup: 5,
                sentences: Some(1),
            }
        }
        "finetune-minilm" => finetune_step(encoder, input)?,
        other => {
            return Err(Error::Config(format!(
                "unknown text workload `{other}`; choose one of: {}",
                TEXT_WORKLOADS.join(", ")
            )))
        }
    };
    time_prepared(workload, prepared, iterations, &Device::Cpu)
}

/// One AdamW step of the whole encoder and a 150-class head on consecutive batches of the
/// sentences, with fixed labels `i mod 150`.
fn finetune_step(encoder: TextEncoder, input: &TextInput) -> Result<Prepared> {
    const CLASSES: usize = 150;
    let mut arch = encoder.network().architecture().clone();
    arch.push_named("head", Layer::dense(CLASSES))?;
    let network = Network::build(&arch)?;
    let mut params = network.init_params(0, &Device::Cpu, DType::F32)?;
    for (name, tensor) in encoder.params().iter() {
        params.replace(name, tensor.clone())?;
    }
    // As `train --method finetune` does: everything but the word-embedding table.
    let trainable: Vec<String> = params
        .names()
        .iter()
        .filter(|n| n.as_str() != WORD_TABLE)
        .cloned()
        .collect();
    let mut trainer = TextTrainer::new(network, params, &trainable, &TextTrainPlan::default())?;
    let (sequences, _) = encoder
        .tokenizer()
        .encode_each(&input.texts.iter().map(String::as_str).collect::<Vec<_>>())?;
    let tokenizer = encoder.tokenizer().clone();
    let batch = input.batch_size;
    let mut next = 0usize;
    Ok(Prepared {
        step: Box::new(move || {
            let rows: Vec<usize> = (0..batch).map(|i| (next + i) % sequences.len()).collect();
            next += batch;
            let refs: Vec<&[u32]> = rows.iter().map(|&i| sequences[i].as_slice()).collect();
            let ids = tokenizer.pad(&refs).to_tensor(DType::F32, &Device::Cpu)?;
            let labels: Vec<f32> = rows.iter().map(|&i| (i % CLASSES) as f32).collect();
            let labels = Tensor::from_vec(labels, rows.len(), &Device::Cpu)?;
            trainer.step(&ids, &labels).map(|_| ())
        }),
        warmup: 2,
        sentences: Some(batch),
    })
}
