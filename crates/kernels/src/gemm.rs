//! Matrix products into a caller's buffer, on strided operands: single-threaded (the
//! hand-written small kernels of [`crate::small_gemm`] where they apply, the `gemm` crate
//! otherwise; callers parallelise over chunks themselves), or the `gemm` crate on a thread pool.

use candle_core::WithDType;
use gemm::Parallelism;

use crate::small_gemm;

/// `dst[m×n] (+)= a[m×k] · b[k×n]`, single-threaded (callers parallelise over chunks). Each
/// matrix is given by its pointer, row stride and column stride.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
) {
    // Safety: the caller's shapes and strides, passed on unchanged.
    if b.2 == 1
        && unsafe { small_gemm::multiply((m, n, k), (dst, dst_rs), accumulate, a, (b.0, b.1)) }
    {
        return;
    }
    // Safety: as above.
    unsafe { strided_gemm((m, n, k), dst, dst_rs, accumulate, a, b, Parallelism::None) }
}

/// `dst[m×n] (+)= a[m×k] · b[k×n]` through the `gemm` crate, on `parallelism`'s threads; each
/// matrix is given by its pointer, row stride and column stride (`dst`'s columns are adjacent).
///
/// # Safety
/// The pointers must hold the values their shapes and strides reach, and `dst` must not
/// overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn strided_gemm<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.0,
        a.2 as isize,
        a.1 as isize,
        b.0,
        b.2 as isize,
        b.1 as isize,
        if accumulate { T::one() } else { T::zero() },
        T::one(),
        false,
        false,
        false,
        parallelism,
    )
}
