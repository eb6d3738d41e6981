//! The XOR transfer-learning demo: pre-train a small MLP on XOR, save it, load the weights into a
//! fresh model, and fine-tune it on new labels — the whole transfer-learning round trip on four
//! built-in examples, with no download.
//!
//! It also re-runs the literal textbook configuration (2 hidden ReLU units, Adam with Keras' default
//! learning rate 0.001, 100 epochs of one batch) over many seeds and counts how often it reaches
//! 100% accuracy, to show why the demo uses a wider layer and a larger learning rate.
//!
//! ```
//! use metalearn::demos::xor::{run_xor_demo, XorDemoOptions};
//!
//! # fn main() -> metalearn::Result<()> {
//! let report = run_xor_demo(&XorDemoOptions { literal_seeds: 2, ..XorDemoOptions::default() })?;
//! assert_eq!(report.pretrain.after.accuracy, 1.0);
//! assert_eq!(report.finetune.after.accuracy, 1.0);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::nn::architecture::Layer;
use crate::sequential::fit::FitOptions;
use crate::sequential::Sequential;
use crate::train::loss::Loss;
use crate::train::metrics::Metric;
use crate::train::optim::OptimizerConfig;

/// The four XOR inputs.
pub const XOR_INPUTS: [[f32; 2]; 4] = [[0., 0.], [0., 1.], [1., 0.], [1., 1.]];
/// XOR labels, the pre-training task.
pub const XOR_LABELS: [f32; 4] = [0., 1., 1., 0.];
/// The fine-tuning task's labels (`NOT x1`): half of them disagree with XOR.
pub const FINETUNE_LABELS: [f32; 4] = [1., 1., 0., 0.];

/// Settings of the XOR demo. The defaults are the configuration that learns XOR for every seed
/// checked (2-16-1 ReLU MLP, Adam lr 0.05, 300 epochs of batch 4).
#[derive(Clone, Debug)]
pub struct XorDemoOptions {
    /// Seed of the initial weights and of shuffling.
    pub seed: u64,
    /// Where to save the pre-trained checkpoint; `None` uses a temporary folder removed at the end.
    pub checkpoint: Option<PathBuf>,
    /// Hidden ReLU units.
    pub hidden_units: usize,
    /// Adam learning rate (both phases).
    pub learning_rate: f64,
    /// Pre-training epochs.
    pub pretrain_epochs: usize,
    /// Fine-tuning epochs.
    pub finetune_epochs: usize,
    /// Seeds on which the literal 2-unit configuration is tried (0 skips that check).
    pub literal_seeds: u64,
}

impl Default for XorDemoOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            checkpoint: None,
            hidden_units: 16,
            learning_rate: 0.05,
            pretrain_epochs: 300,
            finetune_epochs: 300,
            literal_seeds: 50,
        }
    }
}

/// Loss and accuracy of a model on the four examples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Score {
    /// Binary cross-entropy.
    pub loss: f64,
    /// Fraction of the four examples classified correctly.
    pub accuracy: f64,
}

/// Scores before and after one training phase.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Phase {
    /// Before training.
    pub before: Score,
    /// After training.
    pub after: Score,
    /// Epochs run.
    pub epochs: usize,
}

/// How the literal 2-hidden-unit, lr 0.001, 100-epoch configuration fares over many seeds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiteralCheck {
    /// Seeds tried (0..seeds).
    pub seeds: u64,
    /// Seeds that reached 100% accuracy on XOR.
    pub reached_100: u64,
    /// Mean final accuracy over the seeds.
    pub mean_accuracy: f64,
}

/// Everything the demo measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct XorReport {
    /// Seed used.
    pub seed: u64,
    /// Pre-training on XOR.
    pub pretrain: Phase,
    /// The saved checkpoint (removed afterwards when it was temporary).
    pub checkpoint: String,
    /// Whether the checkpoint was kept on disk.
    pub checkpoint_kept: bool,
    /// The freshly built model after loading the saved weights, on XOR.
    pub reloaded: Score,
    /// Fine-tuning the reloaded model on the new labels.
    pub finetune: Phase,
    /// The literal configuration's success rate, when checked.
    pub literal: Option<LiteralCheck>,
}

impl XorReport {
    /// The report as human-readable lines.
    pub fn lines(&self) -> Vec<String> {
        let s = |score: &Score| {
            format!(
                "loss {:.4}  accuracy {:.0}%",
                score.loss,
                score.accuracy * 100.0
            )
        };
        let mut out = vec![
            format!("XOR transfer-learning demo (seed {})", self.seed),
            format!(
                "pre-train on XOR {:?}: before {}",
                XOR_LABELS,
                s(&self.pretrain.before)
            ),
            format!(
                "  after {} epochs:            {}",
                self.pretrain.epochs,
                s(&self.pretrain.after)
            ),
            format!(
                "saved to {}{}",
                self.checkpoint,
                if self.checkpoint_kept {
                    ""
                } else {
                    " (temporary)"
                }
            ),
            format!("loaded into a fresh model:     {}", s(&self.reloaded)),
            format!(
                "fine-tune on {:?}: before {}",
                FINETUNE_LABELS,
                s(&self.finetune.before)
            ),
            format!(
                "  after {} epochs:            {}",
                self.finetune.epochs,
                s(&self.finetune.after)
            ),
        ];
        if let Some(lit) = &self.literal {
            out.push(format!(
                "literal config (2 hidden units, Adam lr 0.001, 100 epochs): reached 100% on {} of {} seeds (mean accuracy {:.0}%)",
                lit.reached_100,
                lit.seeds,
                lit.mean_accuracy * 100.0
            ));
        }
        out
    }
}

/// The XOR inputs and the given labels as tensors.
pub fn xor_data(labels: &[f32; 4]) -> Result<(Tensor, Tensor)> {
    let x = Tensor::new(&XOR_INPUTS, &Device::Cpu)?;
    let y = Tensor::new(labels, &Device::Cpu)?;
    Ok((x, y))
}

/// A 2-`hidden`-1 MLP (ReLU hidden layer, sigmoid output) with weights drawn from `seed`.
pub fn xor_model(hidden: usize, seed: u64) -> Result<Sequential> {
    Sequential::builder(&[2])
        .add(Layer::dense(hidden))
        .add(Layer::relu())
        .add(Layer::dense(1))
        .add(Layer::sigmoid())
        .build(seed)
}

fn score(model: &Sequential, x: &Tensor, y: &Tensor) -> Result<Score> {
    let scores = model.evaluate(x, y, 4)?;
    let get = |k: &str| {
        scores
            .get(k)
            .copied()
            .ok_or_else(|| Error::Config(format!("evaluate returned no `{k}`")))
    };
    Ok(Score {
        loss: get("loss")?,
        accuracy: get("accuracy")?,
    })
}

/// Compiles `model` with Adam at `lr` and BCE, trains it on `(x, y)` in full batches, and returns
/// the scores before and after.
fn train_phase(
    model: &mut Sequential,
    x: &Tensor,
    y: &Tensor,
    lr: f64,
    epochs: usize,
    seed: u64,
) -> Result<Phase> {
    model.compile(
        OptimizerConfig::adam(lr),
        Loss::BinaryCrossEntropy,
        &[Metric::Accuracy],
    )?;
    let before = score(model, x, y)?;
    model.fit(
        x,
        y,
        FitOptions::new().epochs(epochs).batch_size(4).seed(seed),
    )?;
    let after = score(model, x, y)?;
    Ok(Phase {
        before,
        after,
        epochs,
    })
}

/// Trains the literal configuration (2 hidden units, Adam lr 0.001, 100 epochs, one batch of 4)
/// on XOR for seeds `0..seeds` and counts the runs that reach 100% accuracy.
pub fn literal_check(seeds: u64) -> Result<LiteralCheck> {
    let (x, y) = xor_data(&XOR_LABELS)?;
    let mut reached = 0;
    let mut accuracy_sum = 0.0;
    for seed in 0..seeds {
        let mut model = xor_model(2, seed)?;
        let phase = train_phase(&mut model, &x, &y, 0.001, 100, seed)?;
        accuracy_sum += phase.after.accuracy;
        if phase.after.accuracy == 1.0 {
            reached += 1;
        }
    }
    Ok(LiteralCheck {
        seeds,
        reached_100: reached,
        mean_accuracy: if seeds == 0 {
            0.0
        } else {
            accuracy_sum / seeds as f64
        },
    })
}

/// Makes candle run on one thread unless `RAYON_NUM_THREADS` is already set. Call it before any
/// tensor work: four-example models run several times faster on one thread, because candle's
/// per-operation thread start-up costs more than the arithmetic.
pub fn prefer_one_thread() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

/// A folder under the system temporary directory, removed when dropped.
struct TempFolder(PathBuf);

impl TempFolder {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("metalearn-xor-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self(dir))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the demo: pre-train on XOR, save, load into a fresh model, fine-tune on
/// [`FINETUNE_LABELS`], and (optionally) check the literal configuration.
pub fn run_xor_demo(options: &XorDemoOptions) -> Result<XorReport> {
    if options.hidden_units == 0 || options.pretrain_epochs == 0 || options.finetune_epochs == 0 {
        return Err(Error::Config(
            "the XOR demo needs at least one hidden unit and one epoch per phase".into(),
        ));
    }
    let (x, y_pretrain) = xor_data(&XOR_LABELS)?;
    let (_, y_finetune) = xor_data(&FINETUNE_LABELS)?;

    let mut pretrained = xor_model(options.hidden_units, options.seed)?;
    let pretrain = train_phase(
        &mut pretrained,
        &x,
        &y_pretrain,
        options.learning_rate,
        options.pretrain_epochs,
        options.seed,
    )?;

    let (checkpoint, temp) = match &options.checkpoint {
        Some(path) => (path.clone(), None),
        None => {
            let dir = TempFolder::new()?;
            (dir.path().join("xor.safetensors"), Some(dir))
        }
    };
    pretrained.save(&checkpoint)?;

    // A model with different initial weights, so that the scores below come from the file alone.
    let mut model = xor_model(options.hidden_units, options.seed.wrapping_add(1))?;
    model.load_weights(&checkpoint)?;
    model.compile(
        OptimizerConfig::adam(options.learning_rate),
        Loss::BinaryCrossEntropy,
        &[Metric::Accuracy],
    )?;
    let reloaded = score(&model, &x, &y_pretrain)?;

    let finetune = train_phase(
        &mut model,
        &x,
        &y_finetune,
        options.learning_rate,
        options.finetune_epochs,
        options.seed,
    )?;

    let literal = if options.literal_seeds > 0 {
        Some(literal_check(options.literal_seeds)?)
    } else {
        None
    };
    Ok(XorReport {
        seed: options.seed,
        pretrain,
        checkpoint: checkpoint.display().to_string(),
        checkpoint_kept: temp.is_none(),
        reloaded,
        finetune,
        literal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloaded_model_scores_like_the_saved_one() -> Result<()> {
        let report = run_xor_demo(&XorDemoOptions {
            literal_seeds: 0,
            ..XorDemoOptions::default()
        })?;
        assert!((report.reloaded.loss - report.pretrain.after.loss).abs() < 1e-6);
        assert_eq!(report.reloaded.accuracy, report.pretrain.after.accuracy);
        Ok(())
    }

    #[test]
    fn finetune_task_starts_at_half_accuracy_after_learning_xor() -> Result<()> {
        let report = run_xor_demo(&XorDemoOptions {
            seed: 3,
            literal_seeds: 0,
            ..XorDemoOptions::default()
        })?;
        assert_eq!(report.pretrain.after.accuracy, 1.0);
        // XOR and NOT x1 agree on exactly two of the four inputs.
        assert_eq!(report.finetune.before.accuracy, 0.5);
        assert_eq!(report.finetune.after.accuracy, 1.0);
        Ok(())
    }

    #[test]
    fn temporary_checkpoint_is_removed() -> Result<()> {
        let report = run_xor_demo(&XorDemoOptions {
            literal_seeds: 0,
            pretrain_epochs: 5,
            finetune_epochs: 5,
            ..XorDemoOptions::default()
        })?;
        assert!(!report.checkpoint_kept);
        assert!(!Path::new(&report.checkpoint).exists());
        Ok(())
    }
}
