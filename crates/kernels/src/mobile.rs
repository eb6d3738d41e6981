//! Inference kernels for convolutional networks in channels-last layout (`[n, h, w, c]` f32
//! buffers): pointwise (1x1) and dense convolutions as matrix products, depthwise convolutions
//! as direct loops, each with its bias, activation and optional residual added in the same
//! pass over the output, and global average pooling. Batch norm is expected folded into the
//! convolution's weights and bias by the caller. No gradients: these serve feature
//! extraction and prediction of pre-trained backbones (EfficientNet, MobileNet).

use rayon::prelude::*;

/// The activation applied to a convolution's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// max(0, x).
    Relu,
    /// min(max(0, x), 6).
    Relu6,
}

impl Activation {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
        }
    }
}

/// A channels-last batch of feature maps.
#[derive(Clone, Debug, PartialEq)]
pub struct Nhwc {
    /// Values in `[n, h, w, c]` order.
    pub data: Vec<f32>,
    /// Images.
    pub n: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

impl Nhwc {
    /// From channel-major images `[n, c, h, w]`.
    pub fn from_nchw(values: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        let mut data = vec![0f32; values.len()];
        data.par_chunks_mut(h * w * c)
            .enumerate()
            .for_each(|(image, out)| {
                let src = &values[image * c * h * w..(image + 1) * c * h * w];
                for ch in 0..c {
                    for p in 0..h * w {
                        out[p * c + ch] = src[ch * h * w + p];
                    }
                }
            });
        Self { data, n, h, w, c }
    }

    /// Pixels (`n · h · w`), the rows of the matrix the buffer is.
    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// Output size and padding of a convolution along one side: `(out, before)`.
fn out_size(side: usize, k: usize, stride: usize, before: usize, after: usize) -> usize {
    (side + before + after - k) / stride + 1
}

/// `out[m×n] = a[m×k] · b[k×n]`, all row-major.
///
/// # Safety
/// The slices must hold at least the values their shapes say.
unsafe fn matmul(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    (m, k, n): (usize, usize, usize),
    parallelism: ::gemm::Parallelism,
) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && out.len() >= m * n);
    // Safety: the caller's shapes; the three buffers are distinct borrows.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Pixels per parallel piece of a pointwise convolution.
const ROWS_PER_PIECE: usize = 256;

/// A 1x1 convolution: `out[p, :] = act(x[p, :] · weight + bias (+ residual[p, :]))`, with
/// `weight` `[c_in, c_out]` row-major.
pub fn pointwise(
    x: &Nhwc,
    weight: &[f32],
    bias: &[f32],
    activation: Activation,
    residual: Option<&Nhwc>,
) -> Nhwc {
    let (cin, cout) = (x.c, bias.len());
    assert_eq!(weight.len(), cin * cout, "pointwise weight shape");
    if let Some(r) = residual {
        assert_eq!((r.pixels(), r.c), (x.pixels(), cout), "residual shape");
    }
    let mut data = vec![0f32; x.pixels() * cout];
    let threads = rayon::current_num_threads();
    let epilogue = |first: usize, out: &mut [f32]| {
        let res = residual.map(|r| &r.data[first * cout..first * cout + out.len()]);
        for (i, row) in out.chunks_mut(cout).enumerate() {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
            if let Some(res) = res {
                for (v, r) in row.iter_mut().zip(&res[i * cout..(i + 1) * cout]) {
                    *v += r;
                }
            }
            if activation != Activation::None {
                row.iter_mut().for_each(|v| *v = activation.apply(*v));
            }
        }
    };
    if x.pixels() < ROWS_PER_PIECE * threads {
        // Too few pixels to give every thread its own rows (a single small image's late
        // layers): one product, split by the gemm crate across the output.
        // Safety: as below, for the whole matrix.
        unsafe {
            matmul(
                &x.data,
                weight,
                &mut data,
                (x.pixels(), cin, cout),
                ::gemm::Parallelism::Rayon(threads),
            )
        };
        epilogue(0, &mut data);
    } else {
        data.par_chunks_mut(ROWS_PER_PIECE * cout)
            .enumerate()
            .for_each(|(piece, out)| {
                let first = piece * ROWS_PER_PIECE;
                let rows = out.len() / cout;
                let a = &x.data[first * cin..(first + rows) * cin];
                // Safety: `a` is rows x cin, `weight` cin x cout and `out` rows x cout, all
                // row-major and distinct.
                unsafe { matmul(a, weight, out, (rows, cin, cout), ::gemm::Parallelism::None) };
                epilogue(first, out);
            });
    }
    Nhwc {
        data,
        n: x.n,
        h: x.h,
        w: x.w,
        c: cout,
    }
}

/// A depthwise `k`x`k` convolution with `stride` and zero padding `[top, bottom, left,
/// right]`: every channel with its own kernel; `weight` is `[k·k, c]` (tap-major).
pub fn depthwise(
    x: &Nhwc,
    weight: &[f32],
    bias: &[f32],
    k: usize,
    stride: usize,
    padding: [usize; 4],
    activation: Activation,
) -> Nhwc {
    let c = x.c;
    assert_eq!(weight.len(), k * k * c, "depthwise weight shape");
    let [top, bottom, left, right] = padding;
    let oh = out_size(x.h, k, stride, top, bottom);
    let ow = out_size(x.w, k, stride, left, right);
    let mut data = vec![0f32; x.n * oh * ow * c];
    data.par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(row_index, out)| {
            let (image, oy) = (row_index / oh, row_index % oh);
            let src = &x.data[image * x.h * x.w * c..(image + 1) * x.h * x.w * c];
            for ox in 0..ow {
                let acc = &mut out[ox * c..(ox + 1) * c];
                acc.copy_from_slice(bias);
                for ky in 0..k {
                    let iy = (oy * stride + ky) as isize - top as isize;
                    if iy < 0 || iy >= x.h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * stride + kx) as isize - left as isize;
                        if ix < 0 || ix >= x.w as isize {
                            continue;
                        }
                        let pixel = (iy as usize * x.w + ix as usize) * c;
                        let input = &src[pixel..pixel + c];
                        let tap = &weight[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                        for ((a, &v), &w) in acc.iter_mut().zip(input).zip(tap) {
                            *a += v * w;
                        }
                    }
                }
                if activation != Activation::None {
                    acc.iter_mut().for_each(|v| *v = activation.apply(*v));
                }
            }
        });
    Nhwc {
        data,
        n: x.n,
        h: oh,
        w: ow,
        c,
    }
}

/// A dense `k`x`k` convolution (every input channel to every output channel) through
/// gathered patches and a matrix product; `weight` is `[k·k·c_in, c_out]` (tap-major, then
/// input channel). For the stems of image networks, where `c_in` is 3.
pub fn dense(
    x: &Nhwc,
    weight: &[f32],
    bias: &[f32],
    k: usize,
    stride: usize,
    padding: [usize; 4],
    activation: Activation,
) -> Nhwc {
    let (cin, cout) = (x.c, bias.len());
    assert_eq!(weight.len(), k * k * cin * cout, "dense conv weight shape");
    let [top, bottom, left, right] = padding;
    let oh = out_size(x.h, k, stride, top, bottom);
    let ow = out_size(x.w, k, stride, left, right);
    let patch = k * k * cin;
    let mut data = vec![0f32; x.n * oh * ow * cout];
    data.par_chunks_mut(ow * cout)
        .enumerate()
        .for_each(|(row_index, out)| {
            let (image, oy) = (row_index / oh, row_index % oh);
            let src = &x.data[image * x.h * x.w * cin..(image + 1) * x.h * x.w * cin];
            let mut patches = vec![0f32; ow * patch];
            for ox in 0..ow {
                let row = &mut patches[ox * patch..(ox + 1) * patch];
                for ky in 0..k {
                    let iy = (oy * stride + ky) as isize - top as isize;
                    for kx in 0..k {
                        let ix = (ox * stride + kx) as isize - left as isize;
                        if iy < 0 || iy >= x.h as isize || ix < 0 || ix >= x.w as isize {
                            continue;
                        }
                        let pixel = (iy as usize * x.w + ix as usize) * cin;
                        let at = (ky * k + kx) * cin;
                        row[at..at + cin].copy_from_slice(&src[pixel..pixel + cin]);
                    }
                }
            }
            // Safety: `patches` is ow x patch, `weight` patch x cout, `out` ow x cout.
            unsafe {
                matmul(
                    &patches,
                    weight,
                    out,
                    (ow, patch, cout),
                    ::gemm::Parallelism::None,
                )
            };
            for row in out.chunks_mut(cout) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v = activation.apply(*v + b);
                }
            }
        });
    Nhwc {
        data,
        n: x.n,
        h: oh,
        w: ow,
        c: cout,
    }
}

/// The mean of every channel over each image's pixels: `[n, c]`.
pub fn global_avg_pool(x: &Nhwc) -> Vec<f32> {
    let plane = x.h * x.w;
    let mut out = vec![0f32; x.n * x.c];
    out.par_chunks_mut(x.c)
        .enumerate()
        .for_each(|(image, row)| {
            let src = &x.data[image * plane * x.c..(image + 1) * plane * x.c];
            let mut sums = vec![0f64; x.c];
            for pixel in src.chunks(x.c) {
                for (s, &v) in sums.iter_mut().zip(pixel) {
                    *s += v as f64;
                }
            }
            for (o, s) in row.iter_mut().zip(sums) {
                *o = (s / plane as f64) as f32;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct convolution on channel-major data, for comparison.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        weight: &[f32], // [o, c/groups, k, k]
        o: usize,
        k: usize,
        stride: usize,
        pad: [usize; 4],
        groups: usize,
    ) -> (Vec<f32>, usize, usize) {
        let oh = out_size(h, k, stride, pad[0], pad[1]);
        let ow = out_size(w, k, stride, pad[2], pad[3]);
        let (cg, og) = (c / groups, o / groups);
        let mut out = vec![0f32; n * o * oh * ow];
        for b in 0..n {
            for oc in 0..o {
                let g = oc / og;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0f32;
                        for ic in 0..cg {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky) as isize - pad[0] as isize;
                                    let ix = (ox * stride + kx) as isize - pad[2] as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xi =
                                        ((b * c + g * cg + ic) * h + iy as usize) * w + ix as usize;
                                    let wi = ((oc * cg + ic) * k + ky) * k + kx;
                                    acc += x[xi] * weight[wi];
                                }
                            }
                        }
                        out[((b * oh + oy) * ow + ox) * o + oc] = acc;
                    }
                }
            }
        }
        (out, oh, ow)
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn depthwise_and_dense_match_a_direct_convolution() {
        let (n, c, h, w) = (2, 5, 9, 8);
        let x = values(n * c * h * w, 1);
        let nhwc = Nhwc::from_nchw(&x, n, c, h, w);
        for (k, stride, pad) in [
            (3, 1, [1, 1, 1, 1]),
            (3, 2, [0, 1, 0, 1]),
            (5, 2, [1, 2, 1, 2]),
        ] {
            // Depthwise: weights [c, 1, k, k] -> [k*k, c].
            let wd = values(c * k * k, 2);
            let mut taps = vec![0f32; k * k * c];
            for ch in 0..c {
                for t in 0..k * k {
                    taps[t * c + ch] = wd[ch * k * k + t];
                }
            }
            let got = depthwise(
                &nhwc,
                &taps,
                &vec![0.0; c],
                k,
                stride,
                pad,
                Activation::None,
            );
            let (want, oh, ow) = reference(&x, (n, c, h, w), &wd, c, k, stride, pad, c);
            assert_eq!((got.h, got.w), (oh, ow));
            close(&got.data, &want);
            // Dense: weights [o, c, k, k] -> [k*k*c, o].
            let o = 4;
            let wf = values(o * c * k * k, 3);
            let mut rows = vec![0f32; k * k * c * o];
            for oc in 0..o {
                for ic in 0..c {
                    for t in 0..k * k {
                        rows[(t * c + ic) * o + oc] = wf[(oc * c + ic) * k * k + t];
                    }
                }
            }
            let got = dense(
                &nhwc,
                &rows,
                &vec![0.0; o],
                k,
                stride,
                pad,
                Activation::None,
            );
            let (want, _, _) = reference(&x, (n, c, h, w), &wf, o, k, stride, pad, 1);
            close(&got.data, &want);
        }
    }

    #[test]
    fn pointwise_adds_bias_residual_and_clamps() {
        let (n, c, h, w) = (1, 3, 20, 20);
        let x = Nhwc::from_nchw(&values(n * c * h * w, 4), n, c, h, w);
        let weight = values(c * 3, 5);
        let bias = [0.5, -0.5, 7.0];
        let residual = Nhwc::from_nchw(&values(n * 3 * h * w, 6), n, 3, h, w);
        let got = pointwise(&x, &weight, &bias, Activation::Relu6, Some(&residual));
        for p in 0..h * w {
            for j in 0..3 {
                let mut v = bias[j] + residual.data[p * 3 + j];
                for i in 0..c {
                    v += x.data[p * c + i] * weight[i * 3 + j];
                }
                let want = v.clamp(0.0, 6.0);
                assert!((got.data[p * 3 + j] - want).abs() < 1e-5);
            }
        }
        let pooled = global_avg_pool(&got);
        let mean: f32 = (0..h * w).map(|p| got.data[p * 3 + 2]).sum::<f32>() / (h * w) as f32;
        assert!((pooled[2] - mean).abs() < 1e-5);
    }
}
