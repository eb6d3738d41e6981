//! A register-blocked matrix product for the small products inside the convolution kernels.
//!
//! The Winograd products are 36 products of about 64×64 by 64×64 per chunk of images; at that
//! size a general GEMM spends as long packing its operands and dispatching as multiplying
//! (measured on the adaptation workload: 38% of the time in the `gemm` crate's microkernel, about
//! 20% more around it). The operands already sit in the core's cache, so this product works on
//! them where they lie: a block of up to 6 output rows by 2 vectors of columns is held in 12
//! registers while the shared dimension is walked, each step one broadcast per row and two
//! vector loads of the right operand's row. It needs AVX2 and FMA (checked at run time) and a
//! right operand whose rows are contiguous; otherwise [`multiply`] declines and the caller uses
//! the general GEMM. On CPUs with AVX-512F, products whose column count is a whole number of
//! 512-bit vectors hold 6 rows by 4 such vectors (24 of its 32 registers) instead: twice the
//! multiply-adds per instruction (measured on a 2-core Xeon: a first-order MAML meta-batch on
//! Conv-4 1,370 → 1,144 ms, a ProtoNet episode 297 → 246 ms).

use candle_core::{DType, WithDType};

/// `dst[m×n] (+)= a[m×k] · b[k×n]`, or `false` (nothing written) where this CPU or these
/// strides are not served. `a` is given by its pointer, row stride and column stride, `b` by its
/// pointer and row stride (its columns are contiguous), `dst` by its pointer and row stride.
///
/// # Safety
/// The pointers must address every value of the shapes and strides given, `dst` writable and
/// not overlapping the operands.
pub(crate) unsafe fn multiply<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize),
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // AVX-512 where the columns are whole vectors of it; a partial one would run scalar.
        let wide_lanes = 64 / std::mem::size_of::<T>();
        let wide = n % wide_lanes == 0 && crate::has_avx512();
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if !(wide || avx2) {
            return false;
        }
        macro_rules! call {
            ($kernel:path) => {
                $kernel(
                    (m, n, k),
                    (dst.0.cast(), dst.1),
                    accumulate,
                    (a.0.cast(), a.1, a.2),
                    (b.0.cast(), b.1),
                )
            };
        }
        // Safety: the features were just detected; the caller vouches for the memory.
        unsafe {
            match (T::DTYPE, wide) {
                (DType::F32, true) => call!(x86::multiply_f32_avx512),
                (DType::F32, false) => call!(x86::multiply_f32),
                (DType::F64, true) => call!(x86::multiply_f64_avx512),
                (DType::F64, false) => call!(x86::multiply_f64),
                _ => return false,
            }
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ((m, n, k), dst, accumulate, a, b);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The vector operations of one float type and instruction set, so that one blocked loop
    /// serves all four: `$rows` output rows by up to `$wide` vectors of columns are held in
    /// registers (AVX2's 16 registers take 6 by 2, AVX-512's 32 take 6 by 4).
    macro_rules! product_for {
        ($name:ident, $feature:literal, $rows:literal, $wide:literal, $t:ty, $vec:ty,
         $lanes:expr, $zero:ident, $load:ident, $store:ident, $broadcast:ident, $fmadd:ident,
         $add:ident) => {
            /// See [`super::multiply`].
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                (m, n, k): (usize, usize, usize),
                (c, c_rs): (*mut $t, usize),
                accumulate: bool,
                (a, a_rs, a_cs): (*const $t, usize, usize),
                (b, b_rs): (*const $t, usize),
            ) {
                /// One block: `R` rows by `V` vectors of columns, at `a`, `b` and `c` already
                /// offset to the block.
                #[target_feature(enable = $feature)]
                #[inline]
                unsafe fn block<const R: usize, const V: usize>(
                    k: usize,
                    (c, c_rs): (*mut $t, usize),
                    accumulate: bool,
                    (a, a_rs, a_cs): (*const $t, usize, usize),
                    (b, b_rs): (*const $t, usize),
                ) {
                    // Safety (whole block): every offset lies in the shapes the caller gave.
                    unsafe {
                        let mut acc = [[$zero(); V]; R];
                        for p in 0..k {
                            let b_row = b.add(p * b_rs);
                            let mut bv: [$vec; V] = [$zero(); V];
                            for (v, bv) in bv.iter_mut().enumerate() {
                                *bv = $load(b_row.add(v * $lanes));
                            }
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let av = $broadcast(*a.add(r * a_rs + p * a_cs));
                                for v in 0..V {
                                    acc[v] = $fmadd(av, bv[v], acc[v]);
                                }
                            }
                        }
                        for (r, acc) in acc.iter().enumerate() {
                            let row = c.add(r * c_rs);
                            for v in 0..V {
                                let at = row.add(v * $lanes);
                                let value = if accumulate {
                                    $add($load(at), acc[v])
                                } else {
                                    acc[v]
                                };
                                $store(at, value);
                            }
                        }
                    }
                }

                /// The blocks of `R` rows starting at row `i`, across all columns.
                #[target_feature(enable = $feature)]
                #[inline]
                unsafe fn rows<const R: usize>(
                    i: usize,
                    (n, k): (usize, usize),
                    (c, c_rs): (*mut $t, usize),
                    accumulate: bool,
                    (a, a_rs, a_cs): (*const $t, usize, usize),
                    (b, b_rs): (*const $t, usize),
                ) {
                    // Safety (whole function): every offset lies in the shapes the caller gave.
                    unsafe {
                        let (a, c) = (a.add(i * a_rs), c.add(i * c_rs));
                        let a = (a, a_rs, a_cs);
                        let mut j = 0;
                        if $wide >= 4 {
                            while j + 4 * $lanes <= n {
                                block::<R, 4>(k, (c.add(j), c_rs), accumulate, a, (b.add(j), b_rs));
                                j += 4 * $lanes;
                            }
                        }
                        while j + 2 * $lanes <= n {
                            block::<R, 2>(k, (c.add(j), c_rs), accumulate, a, (b.add(j), b_rs));
                            j += 2 * $lanes;
                        }
                        if j + $lanes <= n {
                            block::<R, 1>(k, (c.add(j), c_rs), accumulate, a, (b.add(j), b_rs));
                            j += $lanes;
                        }
                        // The last columns, fewer than a vector, one at a time.
                        for j in j..n {
                            for r in 0..R {
                                let mut sum: $t = 0.0;
                                for p in 0..k {
                                    sum += *a.0.add(r * a_rs + p * a_cs) * *b.add(p * b_rs + j);
                                }
                                let at = c.add(r * c_rs + j);
                                *at = if accumulate { *at + sum } else { sum };
                            }
                        }
                    }
                }

                let (ab, cc) = ((a, a_rs, a_cs), (c, c_rs));
                let mut i = 0;
                // Safety: offsets stay inside the caller's shapes.
                unsafe {
                    while i + $rows <= m {
                        rows::<$rows>(i, (n, k), cc, accumulate, ab, (b, b_rs));
                        i += $rows;
                    }
                    match m - i {
                        5 => rows::<5>(i, (n, k), cc, accumulate, ab, (b, b_rs)),
                        4 => rows::<4>(i, (n, k), cc, accumulate, ab, (b, b_rs)),
                        3 => rows::<3>(i, (n, k), cc, accumulate, ab, (b, b_rs)),
                        2 => rows::<2>(i, (n, k), cc, accumulate, ab, (b, b_rs)),
                        1 => rows::<1>(i, (n, k), cc, accumulate, ab, (b, b_rs)),
                        _ => {}
                    }
                }
            }
        };
    }

    product_for!(
        multiply_f32,
        "avx2,fma",
        6,
        2,
        f32,
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
    product_for!(
        multiply_f64,
        "avx2,fma",
        6,
        2,
        f64,
        __m256d,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_add_pd
    );
    product_for!(
        multiply_f32_avx512,
        "avx512f",
        6,
        4,
        f32,
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps
    );
    product_for!(
        multiply_f64_avx512,
        "avx512f",
        6,
        4,
        f64,
        __m512d,
        8,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_add_pd
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product by the definition, in f64.
    fn naive(
        (m, n, k): (usize, usize, usize),
        a: &[f64],
        (a_rs, a_cs): (usize, usize),
        b: &[f64],
        b_rs: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a[i * a_rs + p * a_cs] * b[p * b_rs + j])
                    .sum();
            }
        }
        out
    }

    fn check<T: WithDType>(tolerance: f64) {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        // Odd sizes: partial row blocks, a single-vector column block and scalar columns.
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 19, 5),
            (13, 37, 64),
            (64, 64, 64),
            (6, 16, 0),
            (11, 8, 3),
            // Whole AVX-512 vectors: blocks of 4, 2 and 1 vectors of 16 floats (or 8 doubles).
            (7, 112, 9),
            (12, 64, 64),
        ] {
            // `a` transposed in memory (column stride larger than row stride) on odd shapes, to
            // cover both layouts the kernels use.
            let transposed = m % 2 == 1;
            let (a_rs, a_cs) = if transposed { (1, m + 2) } else { (k + 3, 1) };
            let b_rs = n + 1;
            let a: Vec<f64> = (0..(m + 2) * (k + 3)).map(|_| next()).collect();
            let b: Vec<f64> = (0..(k.max(1)) * b_rs).map(|_| next()).collect();
            let start: Vec<f64> = (0..m * (n + 2)).map(|_| next()).collect();
            let expected = naive((m, n, k), &a, (a_rs, a_cs), &b, b_rs);
            let (at, bt): (Vec<T>, Vec<T>) = (
                a.iter().map(|&v| T::from_f64(v)).collect(),
                b.iter().map(|&v| T::from_f64(v)).collect(),
            );
            for accumulate in [false, true] {
                let mut dst: Vec<T> = start.iter().map(|&v| T::from_f64(v)).collect();
                // Safety: the buffers hold the shapes and strides given.
                let served = unsafe {
                    multiply(
                        (m, n, k),
                        (dst.as_mut_ptr(), n + 2),
                        accumulate,
                        (at.as_ptr(), a_rs, a_cs),
                        (bt.as_ptr(), b_rs),
                    )
                };
                if !served {
                    eprintln!("small_gemm: this CPU lacks AVX2/FMA; nothing to check");
                    return;
                }
                for i in 0..m {
                    for j in 0..n + 2 {
                        let before = start[i * (n + 2) + j];
                        let want = if j >= n {
                            before
                        } else if accumulate {
                            before + expected[i * n + j]
                        } else {
                            expected[i * n + j]
                        };
                        let got = dst[i * (n + 2) + j].to_f64();
                        assert!(
                            (got - want).abs() <= tolerance * (1.0 + want.abs()),
                            "{m}×{n}×{k} accumulate={accumulate} at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn products_equal_the_definition_in_f32_and_f64() {
        check::<f32>(1e-5);
        check::<f64>(1e-12);
    }
}
