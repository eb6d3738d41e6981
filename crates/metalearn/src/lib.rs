//! # metalearn
//!
//! Transfer learning and meta-learning on [candle](https://github.com/huggingface/candle).
//!
//! A model is a serialisable [`Architecture`] plus an ordered, named [`ParamSet`]; the forward
//! pass is a pure function of (parameters, input, mode), so meta-learning algorithms run the same
//! network with per-task fast weights. On top sits a Keras-style [`Sequential`] model.
//!
//! ```
//! use metalearn::{Layer, Loss, Metric, OptimizerConfig, Sequential, FitOptions};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> metalearn::Result<()> {
//! let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &Device::Cpu)?;
//! let y = Tensor::new(&[0f32, 1., 1., 0.], &Device::Cpu)?;
//! let mut model = Sequential::builder(&[2])
//!     .add(Layer::dense(8))
//!     .add(Layer::relu())
//!     .add(Layer::dense(1))
//!     .add(Layer::sigmoid())
//!     .build(42)?;
//! model.compile(OptimizerConfig::adam(0.05), Loss::BinaryCrossEntropy, &[Metric::Accuracy])?;
//! let history = model.fit(&x, &y, FitOptions::new().epochs(300).batch_size(4).seed(1))?;
//! assert_eq!(history.last().unwrap().metrics["accuracy"], 1.0);
//! let scores = model.evaluate(&x, &y, 4)?;
//! println!("loss {:.4}", scores["loss"]);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demos;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod fsutil;
pub mod hub;
pub mod inspect;
pub mod keras;
pub mod kernels;
pub mod meta;
pub mod meta_training;
pub mod nn;
pub mod plot;
pub mod progress;
pub mod sequential;
pub mod tasks;
pub mod text;

pub use metalearn_kernels::runtime;
pub mod train;
pub mod transfer;
pub mod vision;
pub mod workloads;

pub use checkpoint::{Checkpoint, Provenance};
pub use data::csv::{load_csv, load_csv_features, load_csv_with_classes};
pub use data::image_folder::{load_image_folder, ImageFolderOptions};
pub use data::Dataset;
pub use error::{Error, Result};
pub use nn::architecture::{Activation, Architecture, Layer};
pub use nn::network::{ForwardCtx, Mode, Network};
pub use nn::params::ParamSet;
pub use sequential::fit::{Callback, Control, FitOptions, Validation};
pub use sequential::{CompileConfig, LayerRef, Model, Sequential};
pub use train::history::{EpochLog, History};
pub use train::loss::Loss;
pub use train::metrics::Metric;
pub use train::optim::{Optimizer, OptimizerConfig};

/// The README's Rust examples, compiled and run as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExamples;
