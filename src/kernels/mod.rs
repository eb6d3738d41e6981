//! Fast CPU kernels: the convolutional path as candle custom ops, and the MAML meta-gradient of
//! small MLPs in plain loops ([`mlp_maml`]).
//!
//! The plain candle implementation in [`crate::nn::network`] stays the reference: every kernel
//! here is tested against it in values, gradients and second-order gradients. The kernels are on
//! by default; `METALEARN_KERNELS=reference` (or [`set_enabled`]) switches back to the reference
//! path. On devices other than the CPU the reference path is always used.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNSET);

thread_local! {
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether the fast CPU kernels are used (by forward passes started on this thread).
pub fn enabled() -> bool {
    if let Some(on) = OVERRIDE.with(|o| o.get()) {
        return on;
    }
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("METALEARN_KERNELS").map_or(true, |v| v != "reference");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Switches the fast CPU kernels on or off for the whole process.
pub fn set_enabled(on: bool) {
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// Runs `f` with the fast kernels switched on or off for forward passes started on this
/// thread only (tests run both paths side by side this way).
pub fn with_kernels<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = OVERRIDE.with(|o| o.replace(Some(on)));
    let out = f();
    OVERRIDE.with(|o| o.set(before));
    out
}

pub mod conv;
pub mod first_block;
pub mod fused;
pub mod mlp_maml;
pub mod norm;
pub mod pool;
pub(crate) mod winograd;

use candle_core::{CpuStorage, DType, Layout, WithDType};

/// The contiguous data of a CPU tensor's storage as a slice of `T`.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::Msg(format!(
            "{op}: the input must be contiguous"
        ))),
    }
}

/// The error for a dtype a kernel does not support (all kernels take f32 and f64).
pub(crate) fn unsupported(op: &str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: dtype {dtype:?} is not supported (use f32 or f64)"
    ))
}

/// Runs `$body` with `T` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! with_float {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => Err($crate::kernels::unsupported($op, other)),
        }
    };
}
pub(crate) use with_float;
