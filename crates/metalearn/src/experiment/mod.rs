//! Experiments: the TOML config of `metalearn meta-train` and `meta-eval` ([`ExperimentConfig`],
//! every value checked once in [`ExperimentConfig::check`]) and the wiring from it to data
//! sources, task samplers and the network (`build.rs`). The only module that knows data
//! loaders, task samplers and algorithms at once.

mod build;
mod settings;

pub use settings::*;
