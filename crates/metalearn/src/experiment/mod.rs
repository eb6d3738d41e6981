//! Experiments: the TOML config of `metalearn meta-train` and `meta-eval` ([`ExperimentConfig`],
//! every value checked once in [`ExperimentConfig::check`]) and the wiring from it to data
//! sources, task samplers and the network (`build.rs`), and reading a meta-trained model back
//! with its config (`saved.rs`). The only module that knows data
//! loaders, task samplers and algorithms at once.

mod build;
pub mod recommend;
mod saved;
mod settings;

pub use saved::{load_meta_model, resolve_model_path, stored_config};
pub use settings::*;
