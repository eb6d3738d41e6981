//! Convolution as patch extraction (im2col) plus one matrix product, on channels-last data.
//!
//! Activations are kept as *rows*: a tensor `[rows, channels]` (or `[tasks, rows, channels]`)
//! whose rows run over images, then image rows, then image columns — NHWC memory order without
//! the reshapes, so that no graph node is spent on views. [`Im2Col`] turns such rows into patch
//! rows `[out_rows, k·k·channels]` (patch order: kernel row, kernel column, channel); the
//! convolution is then a GEMM with the weight reshaped to `[k·k·channels, filters]`.
//! `Col2Im` is the adjoint of [`Im2Col`] (it sums patches back into images); each is the
//! other's backward pass, so convolutions built from them are differentiable to any order.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::{contiguous_slice, vectorized, with_float};

/// Shape of a batch of channels-last images and of a square convolution window over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Images in the batch (all tasks together).
    pub images: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels.
    pub channels: usize,
    /// Kernel side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl ConvGeometry {
    /// Output height.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Output width.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Length of one patch row: `kernel · kernel · channels`.
    pub fn patch_len(&self) -> usize {
        self.kernel * self.kernel * self.channels
    }

    /// The geometry of this convolution's input gradient as a convolution, where it is one
    /// (stride 1, padding below the kernel size): the output's rows (`filters` channels)
    /// convolved with the rotated, channel-swapped weight, padded by `kernel − 1 − padding` so
    /// that the result has the input's size.
    pub fn input_gradient(&self, filters: usize) -> Option<ConvGeometry> {
        (self.stride == 1 && self.padding < self.kernel).then(|| ConvGeometry {
            images: self.images,
            height: self.out_height(),
            width: self.out_width(),
            channels: filters,
            kernel: self.kernel,
            stride: 1,
            padding: self.kernel - 1 - self.padding,
        })
    }

    /// The shape `dims` with its rows (second-to-last dimension) rescaled from `from_rows_per_image`
    /// to `to_rows_per_image` and its last dimension set to `last`; checks `dims` against the
    /// geometry.
    pub(crate) fn reshaped(
        &self,
        op: &str,
        dims: &[usize],
        from_rows_per_image: usize,
        from_last: usize,
        to_rows_per_image: usize,
        to_last: usize,
    ) -> candle_core::Result<Shape> {
        let r = dims.len();
        let total: usize = dims.iter().product();
        if r < 2
            || dims[r - 1] != from_last
            || !dims[r - 2].is_multiple_of(from_rows_per_image)
            || total != self.images * from_rows_per_image * from_last
        {
            return Err(candle_core::Error::Msg(format!(
                "{op}: input shape {dims:?} does not hold {} images of {from_rows_per_image} rows of {from_last}",
                self.images
            )));
        }
        let mut out = dims.to_vec();
        out[r - 2] = dims[r - 2] / from_rows_per_image * to_rows_per_image;
        out[r - 1] = to_last;
        Ok(Shape::from(out))
    }
}

/// Patch extraction: rows of images `[.., images·h·w, c]` → patch rows
/// `[.., images·oh·ow, k·k·c]`.
#[derive(Clone, Copy, Debug)]
pub struct Im2Col(pub ConvGeometry);

/// The adjoint of [`Im2Col`]: patch rows back to image rows, overlapping patches summed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Col2Im(pub ConvGeometry);

/// Writes the patch rows of images `first..first + count` into `out`
/// (`count·oh·ow·k·k·c` values).
#[inline(always)]
pub(crate) fn im2col_into<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    first: usize,
    count: usize,
    out: &mut [T],
) {
    let (oh, ow, kc, c) = (g.out_height(), g.out_width(), g.patch_len(), g.channels);
    for (row, dst) in out.chunks_exact_mut(ow * kc).take(count * oh).enumerate() {
        let (image, oy) = (first + row / oh, row % oh);
        for ox in 0..ow {
            let patch = &mut dst[ox * kc..(ox + 1) * kc];
            let ix0 = (ox * g.stride) as isize - g.padding as isize;
            let columns_inside = ix0 >= 0 && ix0 as usize + g.kernel <= g.width;
            for ky in 0..g.kernel {
                let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                let row_inside = iy >= 0 && iy < g.height as isize;
                if row_inside && columns_inside {
                    // The window's row is k·c contiguous values of the image.
                    let src = ((image * g.height + iy as usize) * g.width + ix0 as usize) * c;
                    let at = ky * g.kernel * c;
                    patch[at..at + g.kernel * c].copy_from_slice(&x[src..src + g.kernel * c]);
                    continue;
                }
                for kx in 0..g.kernel {
                    let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                    let at = (ky * g.kernel + kx) * c;
                    if row_inside && ix >= 0 && ix < g.width as isize {
                        let src = ((image * g.height + iy as usize) * g.width + ix as usize) * c;
                        patch[at..at + c].copy_from_slice(&x[src..src + c]);
                    } else {
                        patch[at..at + c].fill(T::zero());
                    }
                }
            }
        }
    }
}

/// Adds the patch rows `cols` of `count` images into their image rows `out`
/// (`count·h·w·c` values).
#[inline(always)]
pub(crate) fn col2im_add<T: WithDType>(g: &ConvGeometry, cols: &[T], count: usize, out: &mut [T]) {
    let (oh, ow, kc, c) = (g.out_height(), g.out_width(), g.patch_len(), g.channels);
    let image_len = g.height * g.width * c;
    for image in 0..count {
        let dst = &mut out[image * image_len..(image + 1) * image_len];
        for oy in 0..oh {
            for ox in 0..ow {
                let patch = &cols[((image * oh + oy) * ow + ox) * kc..][..kc];
                for ky in 0..g.kernel {
                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.height as isize {
                        continue;
                    }
                    for kx in 0..g.kernel {
                        let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                        if ix < 0 || ix >= g.width as isize {
                            continue;
                        }
                        let at = (iy as usize * g.width + ix as usize) * c;
                        let from = (ky * g.kernel + kx) * c;
                        for (d, s) in dst[at..at + c].iter_mut().zip(&patch[from..from + c]) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}

fn im2col<T: WithDType>(g: &ConvGeometry, x: &[T]) -> Vec<T> {
    let per_image = g.out_height() * g.out_width() * g.patch_len();
    let mut out = vec![T::zero(); g.images * per_image];
    out.par_chunks_mut(per_image)
        .enumerate()
        .for_each(|(image, dst)| vectorized!(im2col_into(g, x, image, 1, dst)));
    out
}

fn col2im<T: WithDType>(g: &ConvGeometry, cols: &[T]) -> Vec<T> {
    let image_len = g.height * g.width * g.channels;
    let per_image = g.out_height() * g.out_width() * g.patch_len();
    let mut out = vec![T::zero(); g.images * image_len];
    out.par_chunks_mut(image_len)
        .enumerate()
        .for_each(|(image, dst)| {
            vectorized!(col2im_add(
                g,
                &cols[image * per_image..(image + 1) * per_image],
                1,
                dst
            ))
        });
    out
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let shape = g.reshaped(
            "im2col",
            l.dims(),
            g.height * g.width,
            g.channels,
            g.out_height() * g.out_width(),
            g.patch_len(),
        )?;
        with_float!("im2col", s.dtype(), T => {
            let x = contiguous_slice::<T>(s, l, "im2col")?;
            Ok((T::to_cpu_storage_owned(im2col(g, x)), shape))
        })
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let shape = g.reshaped(
            "col2im",
            l.dims(),
            g.out_height() * g.out_width(),
            g.patch_len(),
            g.height * g.width,
            g.channels,
        )?;
        with_float!("col2im", s.dtype(), T => {
            let cols = contiguous_slice::<T>(s, l, "col2im")?;
            Ok((T::to_cpu_storage_owned(col2im(g, cols)), shape))
        })
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// Patch rows of `x` (image rows `[.., images·h·w, c]`), differentiable to any order.
pub fn im2col_rows(x: &Tensor, geometry: ConvGeometry) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Im2Col(geometry))
}

/// A convolution weight `[.., filters, c, k, k]` as the matrix `[.., k·k·c, filters]` that patch
/// rows multiply (rows in patch order: kernel row, kernel column, channel). candle's strided copy
/// of the equivalent permutation computed every element's index and took about 140 µs for a
/// 64×64×3×3 weight, on the thread that waits for the parallel kernels (measured: 0.85 ms of
/// each adaptation episode's 3 ms of serial time); here each kernel tap's rows are one parallel job. Its
/// backward pass is candle's reshape and permutation, differentiable to any order.
#[derive(Clone, Copy, Debug)]
pub struct PatchOrderWeight;

impl PatchOrderWeight {
    /// `(leading, filters, channels, kernel height, kernel width)` of a weight's dimensions.
    fn split(dims: &[usize]) -> candle_core::Result<(usize, [usize; 4])> {
        match dims.len().checked_sub(4) {
            Some(r) => Ok((
                dims[..r].iter().product(),
                [dims[r], dims[r + 1], dims[r + 2], dims[r + 3]],
            )),
            None => Err(candle_core::Error::Msg(format!(
                "patch_order_weight: a convolution weight has 4 or more dimensions, not {dims:?}"
            ))),
        }
    }
}

impl CustomOp1 for PatchOrderWeight {
    fn name(&self) -> &'static str {
        "patch_order_weight"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let (lead, [f, c, kh, kw]) = Self::split(dims)?;
        let kc = kh * kw * c;
        let mut shape = dims[..dims.len() - 4].to_vec();
        shape.extend([kc, f]);
        with_float!("patch_order_weight", s.dtype(), T => {
            let w = contiguous_slice::<T>(s, l, "patch_order_weight")?;
            let mut out = vec![T::from_f64(0.0); w.len()];
            // In parallel over the output's rows of one kernel tap (c rows of f values each).
            let taps = kh * kw;
            out.par_chunks_mut(c * f).enumerate().for_each(|(block, dst)| {
                let (src, tap) = (&w[block / taps * f * kc..][..f * kc], block % taps);
                for (ch, row) in dst.chunks_exact_mut(f).enumerate() {
                    for (fo, value) in row.iter_mut().enumerate() {
                        *value = src[(fo * c + ch) * taps + tap];
                    }
                }
            });
            debug_assert_eq!(out.len(), lead * kc * f);
            Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = arg.dims();
        let (_, [f, c, kh, kw]) = Self::split(dims)?;
        let r = dims.len() - 4;
        let mut unfolded = dims[..r].to_vec();
        unfolded.extend([kh, kw, c, f]);
        // [.., kh, kw, c, f] → [.., f, c, kh, kw]
        let mut order: Vec<usize> = (0..r).collect();
        order.extend([r + 3, r + 2, r, r + 1]);
        Ok(Some(grad.reshape(unfolded)?.permute(order)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn uniform(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// ⟨im2col x, c⟩ = ⟨x, col2im c⟩ for every x and c, on odd shapes, strides and paddings.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // (images, height, width, channels, kernel, stride, padding)
        let shapes = [
            (3, 7, 8, 1, 3, 1, 1),
            (2, 9, 10, 2, 3, 2, 1),
            (2, 6, 7, 3, 2, 2, 0),
            (1, 5, 6, 4, 3, 1, 0),
            (2, 8, 9, 2, 5, 1, 2),
        ];
        for (i, &(images, height, width, channels, kernel, stride, padding)) in
            shapes.iter().enumerate()
        {
            let g = ConvGeometry {
                images,
                height,
                width,
                channels,
                kernel,
                stride,
                padding,
            };
            let mut rng = ChaCha8Rng::seed_from_u64(500 + i as u64);
            let x = uniform(&mut rng, &[images * height * width, channels]);
            let cols = im2col_rows(&x, g).unwrap();
            let c = uniform(&mut rng, cols.dims());
            let back = c.apply_op1(Col2Im(g)).unwrap();
            let lhs = cols
                .mul(&c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let rhs = x
                .mul(&back)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (lhs - rhs).abs() < 1e-10 * lhs.abs().max(1.0),
                "{g:?}: ⟨im2col x, c⟩ = {lhs} but ⟨x, col2im c⟩ = {rhs}"
            );
        }
    }
}
