//! A stride-1 convolution followed by an affine map per filter, 2×2 max-pooling and ReLU,
//! computed one pooling window at a time so that the convolution's output is never stored.
//!
//! It serves the forward pass of the first block ([`crate::first_block`]), whose patch
//! is short (9 values on grey images): there an im2col product is a matrix product with a
//! shared dimension of 9, which spends as long storing its 64-channel full-resolution output
//! and reading it back to pool as multiplying. Here the four outputs of a window are summed in
//! registers for two vectors of filters at a time (four on CPUs with AVX-512F, where the filters
//! are whole 512-bit vectors), each step one broadcast per output and one
//! fused multiply-add per vector, then scaled, shifted, pooled and rectified in registers.
//! The sums run over the taps in patch order with fused multiply-adds from zero, as the
//! register-blocked product of the im2col path does ([`crate::small_gemm`]), so the
//! convolution's values are the same to the bit, and the backward pass, which recomputes them
//! that way to find the pooling winners, picks the ones the forward pass used.
//! Measured on the adaptation workload (one thread, 100 images of 28×28 in two forward passes
//! per episode, timed around the block over 200 episodes): the first block went from 4.65 ms
//! to 2.30 ms per episode.
//!
//! It needs AVX2 and FMA (checked at run time) and a filter count that is a multiple of the
//! vector width; otherwise [`convolve_and_pool`] declines and the caller takes the im2col path.

use candle_core::{DType, WithDType};

/// The geometry of one padded image and its pooled output.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    /// Values in one row of the padded image (padded width × channels).
    pub(crate) padded_row: usize,
    /// Input channels.
    pub(crate) channels: usize,
    /// Kernel side.
    pub(crate) kernel: usize,
    /// Pooled output height and width.
    pub(crate) pooled: (usize, usize),
    /// Filters.
    pub(crate) filters: usize,
}

/// Whether [`convolve_and_pool`] serves `filters` filters of dtype `T` on this CPU.
pub(crate) fn serves<T: WithDType>(filters: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let lanes = match T::DTYPE {
            DType::F32 => 8,
            DType::F64 => 4,
            _ => return false,
        };
        filters > 0
            && filters.is_multiple_of(lanes)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = filters;
        false
    }
}

/// `dst[py][px][f] = relu(max over the 2×2 window of (conv(padded, w)·a + b))`: `padded` is one
/// image with its padding (rows of `padded_row` values, channels last), `w` the `[k·k·c][f]`
/// weight in patch order, `a` and `b` per filter, `dst` the `[ph·pw·f]` pooled output. The
/// window's outputs are compared in the order (0, 0), (0, 1), (1, 0), (1, 1), the first kept on
/// ties, as in [`crate::fused::BnPoolRelu`]. Returns `false` (nothing written) where
/// [`serves`] does not hold.
pub(crate) fn convolve_and_pool<T: WithDType>(
    g: &Window,
    padded: &[T],
    w: &[T],
    (a, b): (&[T], &[T]),
    dst: &mut [T],
) -> bool {
    if !serves::<T>(g.filters) {
        return false;
    }
    let taps = g.kernel * g.kernel * g.channels;
    let (ph, pw) = g.pooled;
    // Every read below stays inside these lengths.
    assert!(w.len() >= taps * g.filters && a.len() >= g.filters && b.len() >= g.filters);
    assert!(dst.len() >= ph * pw * g.filters);
    if ph > 0 && pw > 0 {
        // The windows' inputs: 2·ph + k − 1 rows of 2·pw + k − 1 pixels.
        assert!((2 * pw + g.kernel - 1) * g.channels <= g.padded_row);
        assert!(padded.len() >= (2 * ph + g.kernel - 1) * g.padded_row);
    }
    #[cfg(target_arch = "x86_64")]
    {
        // AVX-512 where the filters are whole vectors of it.
        let wide = g.filters.is_multiple_of(64 / std::mem::size_of::<T>()) && crate::has_avx512();
        macro_rules! call {
            ($kernel:path) => {
                $kernel(
                    g,
                    padded.as_ptr().cast(),
                    w.as_ptr().cast(),
                    (a.as_ptr().cast(), b.as_ptr().cast()),
                    dst.as_mut_ptr().cast(),
                )
            };
        }
        // Safety: the features were checked by `serves` and just above, the lengths before.
        unsafe {
            match (T::DTYPE, wide) {
                (DType::F32, true) => call!(x86::pooled_f32_avx512),
                (DType::F32, false) => call!(x86::pooled_f32),
                (DType::F64, true) => call!(x86::pooled_f64_avx512),
                (DType::F64, false) => call!(x86::pooled_f64),
                _ => return false,
            }
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Window;

    /// The vector operations of one float type and instruction set, so that one loop serves
    /// all four: up to `$wide` vectors of filters are summed at once for the window's four
    /// outputs (AVX2's 16 registers take 2, AVX-512's 32 take 4).
    macro_rules! pooled_for {
        ($name:ident, $feature:literal, $wide:literal, $t:ty, $vec:ty, $lanes:expr,
         $zero:ident, $load:ident, $store:ident, $broadcast:ident, $fmadd:ident, $mul:ident,
         $add:ident, $max:ident) => {
            /// See [`super::convolve_and_pool`]; the caller has checked lengths and features.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                g: &Window,
                padded: *const $t,
                w: *const $t,
                (a, b): (*const $t, *const $t),
                dst: *mut $t,
            ) {
                /// `V` vectors of filters from `first` for the window whose top-left input is at
                /// `top`.
                #[target_feature(enable = $feature)]
                #[inline]
                unsafe fn block<const V: usize>(
                    g: &Window,
                    top: *const $t,
                    w: *const $t,
                    (a, b): (*const $t, *const $t),
                    first: usize,
                    out: *mut $t,
                ) {
                    // Safety (whole block): offsets stay in the lengths the caller checked.
                    unsafe {
                        let (c, row, f) = (g.channels, g.padded_row, g.filters);
                        let mut sums = [[$zero(); V]; 4];
                        for ky in 0..g.kernel {
                            for kx in 0..g.kernel {
                                for ch in 0..c {
                                    let tap = (ky * g.kernel + kx) * c + ch;
                                    let weights = w.add(tap * f + first);
                                    let mut wv = [$zero(); V];
                                    for (v, wv) in wv.iter_mut().enumerate() {
                                        *wv = $load(weights.add(v * $lanes));
                                    }
                                    let at = top.add(ky * row + kx * c + ch);
                                    let inputs = [at, at.add(c), at.add(row), at.add(row + c)];
                                    for (sums, input) in sums.iter_mut().zip(inputs) {
                                        let x = $broadcast(*input);
                                        for v in 0..V {
                                            sums[v] = $fmadd(x, wv[v], sums[v]);
                                        }
                                    }
                                }
                            }
                        }
                        for v in 0..V {
                            let at = first + v * $lanes;
                            let (scale, shift) = ($load(a.add(at)), $load(b.add(at)));
                            // Multiply, then add (not fused), as the backward pass's search
                            // for the winners does: forward and backward pick the same ones.
                            let z = |sum| $add($mul(sum, scale), shift);
                            let mut best = z(sums[0][v]);
                            for sums in &sums[1..] {
                                // max(z, best) keeps `best` on ties and NaN, as `z > best` does.
                                best = $max(z(sums[v]), best);
                            }
                            // max(0, best) keeps `best` unless it is below zero, NaN included.
                            $store(out.add(at), $max($zero(), best));
                        }
                    }
                }

                let (ph, pw) = g.pooled;
                let (c, row, f) = (g.channels, g.padded_row, g.filters);
                // Safety: offsets stay in the lengths the caller checked.
                unsafe {
                    for py in 0..ph {
                        for px in 0..pw {
                            let top = padded.add(2 * py * row + 2 * px * c);
                            let out = dst.add((py * pw + px) * f);
                            let mut first = 0;
                            if $wide >= 4 {
                                while first + 4 * $lanes <= f {
                                    block::<4>(g, top, w, (a, b), first, out);
                                    first += 4 * $lanes;
                                }
                            }
                            while first + 2 * $lanes <= f {
                                block::<2>(g, top, w, (a, b), first, out);
                                first += 2 * $lanes;
                            }
                            if first < f {
                                block::<1>(g, top, w, (a, b), first, out);
                            }
                        }
                    }
                }
            }
        };
    }

    pooled_for!(
        pooled_f32,
        "avx2,fma",
        2,
        f32,
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        _mm256_add_ps,
        _mm256_max_ps
    );
    pooled_for!(
        pooled_f64,
        "avx2,fma",
        2,
        f64,
        __m256d,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_mul_pd,
        _mm256_add_pd,
        _mm256_max_pd
    );
    pooled_for!(
        pooled_f32_avx512,
        "avx512f",
        4,
        f32,
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        _mm512_add_ps,
        _mm512_max_ps
    );
    pooled_for!(
        pooled_f64_avx512,
        "avx512f",
        4,
        f64,
        __m512d,
        8,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_mul_pd,
        _mm512_add_pd,
        _mm512_max_pd
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in the order the kernel promises: per output, fused multiply-adds over
    /// the taps in patch order from zero, then `y·a + b` unfused, the window's maximum, ReLU.
    fn by_definition<T: WithDType>(
        g: &Window,
        padded: &[T],
        w: &[T],
        (a, b): (&[T], &[T]),
        fused_multiply_add: impl Fn(T, T, T) -> T,
    ) -> Vec<T> {
        let (k, c, f) = (g.kernel, g.channels, g.filters);
        let (ph, pw) = g.pooled;
        let mut out = vec![T::zero(); ph * pw * f];
        for py in 0..ph {
            for px in 0..pw {
                for fo in 0..f {
                    let mut best: Option<T> = None;
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let mut y = T::zero();
                        for ky in 0..k {
                            for kx in 0..k {
                                for ch in 0..c {
                                    let row = 2 * py + dy + ky;
                                    let x =
                                        padded[row * g.padded_row + (2 * px + dx + kx) * c + ch];
                                    let tap = (ky * k + kx) * c + ch;
                                    y = fused_multiply_add(x, w[tap * f + fo], y);
                                }
                            }
                        }
                        let z = y * a[fo] + b[fo];
                        best = Some(best.map_or(z, |m| if z > m { z } else { m }));
                    }
                    let m = best.expect("four outputs");
                    out[(py * pw + px) * f + fo] = if m < T::zero() { T::zero() } else { m };
                }
            }
        }
        out
    }

    fn check<T: WithDType>(filter_counts: &[usize], fused_multiply_add: impl Fn(T, T, T) -> T) {
        let mut seed = 11u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        // (height, width, channels, kernel, padding): odd sizes, pooling that leaves a row or
        // column over, paddings 0–2, kernels 1, 2, 3 and 5.
        for &(h, w, c, k, p) in &[
            (7, 6, 1, 3, 1),
            (9, 9, 2, 3, 0),
            (6, 7, 3, 5, 2),
            (5, 5, 1, 1, 0),
            (8, 5, 2, 2, 1),
        ] {
            for &f in filter_counts {
                let (ph_in, pw_in) = (h + 2 * p, w + 2 * p);
                let (out_h, out_w) = (ph_in - k + 1, pw_in - k + 1);
                let g = Window {
                    padded_row: pw_in * c,
                    channels: c,
                    kernel: k,
                    pooled: (out_h / 2, out_w / 2),
                    filters: f,
                };
                // Zeros in the padding, as the caller leaves them.
                let mut padded = vec![T::zero(); ph_in * pw_in * c];
                for y in p..p + h {
                    for x in p..p + w {
                        for ch in 0..c {
                            padded[(y * pw_in + x) * c + ch] = T::from_f64(next());
                        }
                    }
                }
                let weights: Vec<T> = (0..k * k * c * f).map(|_| T::from_f64(next())).collect();
                let a: Vec<T> = (0..f).map(|_| T::from_f64(2.0 * next())).collect();
                let b: Vec<T> = (0..f).map(|_| T::from_f64(next())).collect();
                let (ph, pw) = g.pooled;
                let mut out = vec![T::from_f64(7.0); ph * pw * f];
                if !convolve_and_pool(&g, &padded, &weights, (&a, &b), &mut out) {
                    eprintln!("conv_pool: this CPU lacks AVX2/FMA; nothing to check");
                    return;
                }
                let expected = by_definition(&g, &padded, &weights, (&a, &b), &fused_multiply_add);
                assert!(
                    out.iter().zip(&expected).all(|(o, e)| o.to_f64() == e.to_f64()),
                    "{h}x{w}x{c}, kernel {k}, padding {p}, {f} filters: not the definition's values"
                );
            }
        }
    }

    #[test]
    fn pooled_outputs_equal_the_definition_to_the_bit() {
        // One to three AVX2 vectors; with AVX-512, one, 2 + 1 and 4 of its vectors.
        check::<f32>(&[8, 16, 24, 48, 64], f32::mul_add);
        check::<f64>(&[4, 8, 12, 24, 32], f64::mul_add);
    }

    #[test]
    fn filter_counts_that_are_not_whole_vectors_are_declined() {
        let g = Window {
            padded_row: 4,
            channels: 1,
            kernel: 3,
            pooled: (1, 1),
            filters: 6,
        };
        let mut out = vec![0f32; 6];
        let served =
            convolve_and_pool(&g, &[0.0; 16], &[0.0; 54], (&[0.0; 6], &[0.0; 6]), &mut out);
        assert!(!served);
    }
}
