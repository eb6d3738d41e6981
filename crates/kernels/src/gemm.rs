//! A single-threaded matrix product into a caller's buffer: the hand-written small kernels of
//! [`crate::small_gemm`] where they apply, the `gemm` crate otherwise. Callers parallelise over
//! chunks themselves.

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
        Parallelism::None,
    )
}
