//! Networks: architectures, parameter sets and the pure forward pass (the reference layer path
//! and the CPU fast path).

pub mod architecture;
mod fast_path;
pub mod features;
pub mod folded;
pub mod layers;
pub mod network;
pub mod ops;
pub mod params;
mod transformer;
