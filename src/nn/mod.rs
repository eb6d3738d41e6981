//! Networks: architectures, parameter sets, the pure forward pass and the Keras-style model.

pub mod architecture;
mod fast_path;
pub mod network;
pub mod ops;
pub mod params;
pub mod sequential;
