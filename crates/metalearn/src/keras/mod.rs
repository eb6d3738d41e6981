//! Keras files in and out: a Keras user's `Sequential` model read into a metalearn
//! [`Sequential`](crate::Sequential) ([`import`]), and a metalearn model written as a file Keras loads ([`export`]).
//!
//! Reads the three formats Keras writes, through the pure-Rust `hdf5-pure` crate (no system
//! HDF5 library):
//!
//! - `.keras`: a zip of `config.json` (the architecture) and `model.weights.h5`;
//! - `.weights.h5` (Keras 3 `save_weights`): `/layers/<class_name_in_snake_case>[_N]/vars/0..k`,
//!   numbered by class in model order; the architecture comes from elsewhere;
//! - legacy `.h5`: a full model (`model.save("x.h5")`: the `model_config` attribute and the
//!   weights under `/model_weights`) or weights only (`save_weights("model_weights.h5")`): a
//!   `layer_names` attribute and one group per layer whose `weight_names` attribute gives the
//!   datasets, matched to the layers with weights by order.
//!
//! Models: `Sequential`, or functional models that are a plain chain of layers. Layers:
//! InputLayer, Dense (with every activation metalearn has), Conv2D (square kernels,
//! `valid` or odd-kernel stride-1 `same` padding), BatchNormalization, MaxPooling2D, Flatten,
//! Dropout, Activation, ReLU and Softmax. Keras images are channels-last; the imported model
//! takes metalearn's `[channels, height, width]`, with its convolution kernels (HWIO → OIHW)
//! and the rows of a Dense after Flatten (H·W·C → C·H·W order) converted, so that it predicts
//! what Keras predicts.

mod names;
mod read;
mod write;

pub use read::{compile_settings, import, KerasCompile, SUPPORTED_LAYERS};
pub use write::{export, KerasFormat};
