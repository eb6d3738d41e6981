//! Switches for the fast CPU kernels of the `metalearn-kernels` crate: on by default, off with
//! `METALEARN_KERNELS=reference`, for the whole process ([`set_enabled`]) or for the forward
//! passes one thread starts ([`with_kernels`]). Off, every layer runs the plain candle reference
//! path of [`crate::nn::network`].

pub use metalearn_kernels::{enabled, set_enabled, with_kernels};
