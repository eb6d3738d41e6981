//! Encoders by name from the Hugging Face Hub (`hf:sentence-transformers/all-MiniLM-L6-v2`,
//! optionally `@REVISION`), through [`crate::hub`]: the files a sentence encoder needs, and
//! the pooling configurations its `modules.json` names.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::hub::{download_files, offline_reason, source, Fetched};
pub use crate::hub::{HubName, HubOptions, HUB_PREFIX};
use crate::text::pretrained::ModuleEntry;

/// Files every encoder needs.
const REQUIRED: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
/// Files that describe a sentence-transformers model when it has them.
const OPTIONAL: [&str; 2] = ["modules.json", "sentence_bert_config.json"];

/// The folder of an encoder given as a folder path or as `hf:NAME`: a folder is returned as it
/// is; a Hub name is downloaded into the cache (or found there) with the options of the
/// environment, and its snapshot folder is returned.
pub fn locate_encoder(spec: &Path) -> Result<PathBuf> {
    match spec.to_str().and_then(HubName::parse) {
        Some(name) => download_encoder(&name?, &HubOptions::from_env()),
        None => Ok(spec.to_path_buf()),
    }
}

/// Downloads (or finds in the cache) the files of the encoder `name` and returns the folder
/// that holds them, in the layout `TextEncoder::from_folder` reads.
pub fn download_encoder(name: &HubName, options: &HubOptions) -> Result<PathBuf> {
    let missing = |file: &str| {
        let why = if let Some(offline) = offline_reason(options) {
            offline
        } else if file == "model.safetensors" {
            "the Hub repository has no model.safetensors; metalearn reads safetensors weights \
             only (a repository with only pytorch_model.bin must be converted: load it in \
             Python and save_pretrained(..., safe_serialization=True) into a folder, then pass \
             that folder)"
                .to_string()
        } else {
            "the Hub repository has no such file (or no such model or revision); an encoder \
             needs config.json, model.safetensors and tokenizer.json"
                .to_string()
        };
        Error::Data(format!("{name}: {file} not found: {why}"))
    };
    let folder = download_files(name, &REQUIRED, &OPTIONAL, options, &missing)?;
    let modules = folder.join("modules.json");
    if modules.is_file() {
        let entries: Vec<ModuleEntry> = read_json(&modules, "")?;
        let source = source(name, options)?;
        for entry in entries.iter().filter(|e| e.kind.ends_with("Pooling")) {
            let file = format!("{}/config.json", entry.path.trim_matches('/'));
            if let Fetched::Absent = source.fetch(name, &file, options)? {
                return Err(missing(&file));
            }
        }
    }
    Ok(folder)
}
