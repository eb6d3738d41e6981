//! Meta-trained models on disk: a `meta-train --out` folder or checkpoint file, read back with
//! the experiment config stored in it.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::experiment::ExperimentConfig;
use crate::meta::learner::MetaLearner;
use crate::meta_training::{BEST_FILE, LATEST_FILE};
use crate::text::TokenizerRecord;

/// The checkpoint a `--model` argument names: a file, or a folder holding best.safetensors (else latest.safetensors).
pub fn resolve_model_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        for name in [BEST_FILE, LATEST_FILE] {
            let candidate = path.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
        }
        return Err(Error::Config(format!(
            "{} holds no {BEST_FILE} or {LATEST_FILE}: pass a checkpoint file or a meta-train --out folder",
            path.display()
        )));
    }
    if !path.exists() {
        return Err(Error::Config(format!(
            "{}: no such checkpoint file or folder",
            path.display()
        )));
    }
    Ok(path.to_path_buf())
}

/// Loads a meta-learning checkpoint onto `device` and the experiment config stored in it.
pub fn load_meta_model(
    path: &Path,
    device: &candle_core::Device,
) -> Result<(MetaLearner, ExperimentConfig, PathBuf)> {
    let path = resolve_model_path(path)?;
    let ckpt = Checkpoint::load(&path, device)?;
    let learner = MetaLearner::from_checkpoint(&ckpt)?;
    let config = stored_config(&ckpt, &path)?
        .ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: has no experiment configuration; it was not written by meta-train",
                path.display()
            ))
        })?
        .with_stored_tokenizer(
            TokenizerRecord::of(&ckpt)
                .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?,
        );
    Ok((learner, config, path))
}

/// The experiment config a meta-train checkpoint (read from `path`) carries, if any.
pub fn stored_config(ckpt: &Checkpoint, path: &Path) -> Result<Option<ExperimentConfig>> {
    ckpt.section("experiment")
        .filter(|v| !v.is_null())
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .map_err(|e| {
            Error::Checkpoint(format!(
                "{}: invalid experiment section: {e}",
                path.display()
            ))
        })
}
