//! # metalearn-kernels
//!
//! The lowest layer of metalearn: how candle runs in this process ([`runtime`]: second-order
//! gradients, thread counts, a backward pass that keeps gradients of gradients) and fast CPU
//! kernels for the convolutional path and the transformer encoder as candle custom ops, each
//! with its own backward pass.
//!
//! This crate knows nothing of models, tasks or algorithms. The plain candle implementation in
//! the `metalearn` crate's `nn::network` stays the reference: every kernel here is tested against
//! it there in values, gradients and second-order gradients. The kernels are on by default;
//! `METALEARN_KERNELS=reference` (or [`set_enabled`]) switches back to the reference path. On
//! devices other than the CPU the reference path is always used.

#![warn(missing_docs)]

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

pub mod adam;
pub mod conv;
pub(crate) mod conv_pool;
pub mod depthwise;
pub mod differentiable_conv;
pub mod first_block;
pub mod fused;
mod gemm;
pub mod mobile;
pub mod norm;
mod parallel;
pub mod pool;
pub mod pooled_norm;
pub mod runtime;
pub(crate) mod small_gemm;
pub mod transformer;
pub mod transformer_training;
pub(crate) mod winograd;

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, WithDType};

thread_local! {
    /// Per-thread scratch buffers reused across kernel calls, so that hot loops neither allocate
    /// nor zero memory; kept as `u64` words so that a slice of any kernel dtype fits aligned.
    static SCRATCH: [RefCell<Vec<u64>>; 2] = const { [RefCell::new(Vec::new()), RefCell::new(Vec::new())] };
}

/// Runs `f` on two scratch slices of `a` and `b` values from this thread's reusable buffers.
/// Their contents are whatever an earlier call left: `f` must write every value before reading
/// it. (A nested call on the same thread gets fresh zeroed vectors instead.)
pub(crate) fn with_scratch<T: WithDType, R>(
    a: usize,
    b: usize,
    f: impl FnOnce(&mut [T], &mut [T]) -> R,
) -> R {
    fn view<T>(buffer: &mut Vec<u64>, len: usize) -> &mut [T] {
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if buffer.len() < words {
            buffer.resize(words, 0);
        }
        // Safety: the buffer holds at least `len` values of T, is 8-byte aligned (enough for
        // every kernel dtype), and every bit pattern is a valid value of those plain number
        // types.
        unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr().cast::<T>(), len) }
    }
    SCRATCH.with(
        |buffers| match (buffers[0].try_borrow_mut(), buffers[1].try_borrow_mut()) {
            (Ok(mut x), Ok(mut y)) => f(view(&mut x, a), view(&mut y, b)),
            _ => f(&mut vec![T::zero(); a], &mut vec![T::zero(); b]),
        },
    )
}

/// Whether this CPU has AVX-512F (32 registers of 512 bits), for the hand-written kernels that
/// have a variant for it. Detected once: the answer cannot change while the process runs.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// Runs `f` compiled for the widest vector instructions this CPU has (AVX2 and FMA on recent
/// x86-64), picked at run time so that the binary still runs on CPUs without them. Only code
/// inlined into `f` is recompiled, so callers go through [`vectorized!`], which marks the
/// closure `#[inline(always)]`, and the loops it calls are `#[inline(always)]` too. Floats are
/// neither reassociated nor contracted into fused multiply-adds, so results are unchanged.
#[inline(always)]
pub(crate) fn run_vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `vectorized!(expr)` evaluates `expr` through [`run_vectorized`]. (Measured: the max-pool
/// winner search, a compare and two selects per lane, ran 3.5x faster than in the baseline
/// SSE2 build, where selects on 32-bit lanes don't vectorise well.)
macro_rules! vectorized {
    ($body:expr) => {
        $crate::run_vectorized(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use vectorized;

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

/// Runs `f` on the contiguous CPU data of `t` as `&[T]`.
pub(crate) fn with_data<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(contiguous_slice::<T>(cpu, layout, "kernel")?)),
        _ => Err(candle_core::Error::Msg(
            "the fast kernels run on the CPU only".into(),
        )),
    }
}

/// The values of `v` in f64 (kernels sum gradients in f64).
pub(crate) fn to_f64s<T: WithDType>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// A parameter's gradient, computed in f64, as a tensor of the parameter's shape and dtype.
pub(crate) fn parameter_gradient(v: Vec<f64>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())
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
            other => Err($crate::unsupported($op, other)),
        }
    };
}
pub(crate) use with_float;
