//! Max-pooling over channels-last image rows (see [`crate::conv`] for the layout).
//!
//! Given which input wins each window, max-pooling is a linear selection. [`PoolGather`]
//! (select the winners) and [`PoolScatter`] (put values back at the winners) are adjoint and
//! each is the other's backward pass, so pooling is exactly differentiable to any order. The
//! winners are recomputed from the pooled input rather than stored; ties go to the first
//! position in the window (row-major).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::{contiguous_slice, with_float};

/// Shape of a batch of channels-last images and of the square pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Images in the batch (all tasks together).
    pub images: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels.
    pub channels: usize,
    /// Window side and stride.
    pub size: usize,
}

impl PoolGeometry {
    /// Output height (trailing rows that do not fill a window are dropped).
    pub fn out_height(&self) -> usize {
        self.height / self.size
    }
    /// Output width.
    pub fn out_width(&self) -> usize {
        self.width / self.size
    }

    fn check(&self, op: &str, dims: &[usize], pixels: usize) -> candle_core::Result<Shape> {
        let r = dims.len();
        let total: usize = dims.iter().product();
        if r < 2
            || dims[r - 1] != self.channels
            || !dims[r - 2].is_multiple_of(pixels)
            || total != self.images * pixels * self.channels
        {
            return Err(candle_core::Error::Msg(format!(
                "{op}: shape {dims:?} does not hold {} images of {pixels} pixels of {} channels",
                self.images, self.channels
            )));
        }
        Ok(Shape::from(dims))
    }

    fn pooled_shape(&self, dims: &[usize]) -> Shape {
        let r = dims.len();
        let mut out = dims.to_vec();
        out[r - 2] =
            dims[r - 2] / (self.height * self.width) * (self.out_height() * self.out_width());
        Shape::from(out)
    }

    fn full_shape(&self, dims: &[usize]) -> Shape {
        let r = dims.len();
        let mut out = dims.to_vec();
        out[r - 2] =
            dims[r - 2] / (self.out_height() * self.out_width()) * (self.height * self.width);
        Shape::from(out)
    }
}

/// For every pooled pixel `(image, oy, ox)` and channel, the flat index into the input of the
/// window's winner, written through `visit(pooled_offset, input_offset)` row by row in parallel.
/// `visit` gets the pooled row's output chunk too, so callers can write without locking.
fn for_each_winner<T: WithDType, O: Send>(
    g: &PoolGeometry,
    src: &[T],
    out: &mut [O],
    out_row_len: usize,
    visit: impl Fn(&mut [O], usize, usize) + Sync,
) {
    let (oh, ow, c) = (g.out_height(), g.out_width(), g.channels);
    out.par_chunks_mut(out_row_len)
        .enumerate()
        .for_each(|(row, dst)| {
            let (image, oy) = (row / oh, row % oh);
            let mut best = vec![0usize; c];
            for ox in 0..ow {
                window_winners(g, src, image, (oy, ox), &mut best);
                for (ch, &b) in best.iter().enumerate() {
                    visit(dst, ox * c + ch, b);
                }
            }
        });
}

/// Fills `best` with the flat input index of each channel's winner in the window of pooled
/// pixel `(oy, ox)` of `image` (the first maximum in row-major window order).
fn window_winners<T: WithDType>(
    g: &PoolGeometry,
    src: &[T],
    image: usize,
    (oy, ox): (usize, usize),
    best: &mut [usize],
) {
    let (c, s) = (g.channels, g.size);
    let first = ((image * g.height + oy * s) * g.width + ox * s) * c;
    for (ch, b) in best.iter_mut().enumerate() {
        *b = first + ch;
    }
    for dy in 0..s {
        for dx in 0..s {
            if dy == 0 && dx == 0 {
                continue;
            }
            let at = ((image * g.height + oy * s + dy) * g.width + ox * s + dx) * c;
            for (ch, b) in best.iter_mut().enumerate() {
                if src[at + ch] > src[*b] {
                    *b = at + ch;
                }
            }
        }
    }
}

/// Max-pooling: image rows `[.., images·h·w, c]` → `[.., images·(h/s)·(w/s), c]`.
#[derive(Clone, Copy, Debug)]
pub struct MaxPool(pub PoolGeometry);

/// Selects the input values at the winners of `src`'s windows: `(t, src)` → pooled shape.
#[derive(Clone, Copy, Debug)]
pub struct PoolGather(pub PoolGeometry);

/// Writes pooled values at the winners of `src`'s windows, zeros elsewhere: `(t, src)` → the
/// shape of `src`.
#[derive(Clone, Copy, Debug)]
pub struct PoolScatter(pub PoolGeometry);

fn gather<T: WithDType>(g: &PoolGeometry, t: &[T], src: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.images * g.out_height() * g.out_width() * g.channels];
    for_each_winner(g, src, &mut out, g.out_width() * g.channels, |dst, i, b| {
        dst[i] = t[b]
    });
    out
}

fn scatter<T: WithDType>(g: &PoolGeometry, t: &[T], src: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); src.len()];
    // Each image's windows lie inside the image: images are written in parallel.
    let (oh, ow, c) = (g.out_height(), g.out_width(), g.channels);
    let image_len = g.height * g.width * c;
    out.par_chunks_mut(image_len)
        .enumerate()
        .for_each(|(image, dst)| {
            let mut best = vec![0usize; c];
            let base = image * image_len;
            for oy in 0..oh {
                for ox in 0..ow {
                    window_winners(g, src, image, (oy, ox), &mut best);
                    let pooled = ((image * oh + oy) * ow + ox) * c;
                    for (ch, &b) in best.iter().enumerate() {
                        dst[b - base] = t[pooled + ch];
                    }
                }
            }
        });
    out
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        g.check("max_pool_rows", l.dims(), g.height * g.width)?;
        let shape = g.pooled_shape(l.dims());
        with_float!("max_pool_rows", s.dtype(), T => {
            let x = contiguous_slice::<T>(s, l, "max_pool_rows")?;
            Ok((T::to_cpu_storage_owned(gather(g, x, x)), shape))
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op2(&arg.detach(), PoolScatter(self.0))?,
        ))
    }
}

impl CustomOp2 for PoolGather {
    fn name(&self) -> &'static str {
        "pool_gather"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        g.check("pool_gather", l1.dims(), g.height * g.width)?;
        g.check("pool_gather", l2.dims(), g.height * g.width)?;
        let shape = g.pooled_shape(l1.dims());
        with_float!("pool_gather", s1.dtype(), T => {
            let t = contiguous_slice::<T>(s1, l1, "pool_gather")?;
            let src = contiguous_slice::<T>(s2, l2, "pool_gather")?;
            Ok((T::to_cpu_storage_owned(gather(g, t, src)), shape))
        })
    }

    fn bwd(
        &self,
        _t: &Tensor,
        src: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The winners are piecewise constant in `src`: no gradient flows to it.
        let back = grad.contiguous()?.apply_op2(src, PoolScatter(self.0))?;
        Ok((Some(back), None))
    }
}

impl CustomOp2 for PoolScatter {
    fn name(&self) -> &'static str {
        "pool_scatter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        g.check("pool_scatter", l1.dims(), g.out_height() * g.out_width())?;
        g.check("pool_scatter", l2.dims(), g.height * g.width)?;
        let shape = g.full_shape(l1.dims());
        with_float!("pool_scatter", s1.dtype(), T => {
            let t = contiguous_slice::<T>(s1, l1, "pool_scatter")?;
            let src = contiguous_slice::<T>(s2, l2, "pool_scatter")?;
            Ok((T::to_cpu_storage_owned(scatter(g, t, src)), shape))
        })
    }

    fn bwd(
        &self,
        _t: &Tensor,
        src: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let back = grad.contiguous()?.apply_op2(src, PoolGather(self.0))?;
        Ok((Some(back), None))
    }
}

/// Max-pooling of image rows, differentiable to any order.
pub fn max_pool_rows(x: &Tensor, geometry: PoolGeometry) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool(geometry))
}

/// `best[ch] = relu(max over the window's four rows of (row[ch]·a[ch] + b[ch]))` for a 2×2
/// pooling window's rows of channels, compared in order and the first kept on ties. The channel
/// loop is branch-free, so it vectorises, and each output is one plain store.
#[inline(always)]
pub(crate) fn pooled_window<T: WithDType>(rows: [&[T]; 4], (a, b): (&[T], &[T]), best: &mut [T]) {
    let [r0, r1, r2, r3] = rows;
    let c = best.len();
    let (a, b, r0) = (&a[..c], &b[..c], &r0[..c]);
    for ch in 0..c {
        let mut m = r0[ch] * a[ch] + b[ch];
        for row in [r1, r2, r3] {
            let z = row[ch] * a[ch] + b[ch];
            m = if z > m { z } else { m };
        }
        best[ch] = if m < T::zero() { T::zero() } else { m };
    }
}
