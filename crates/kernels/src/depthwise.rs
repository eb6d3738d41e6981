//! Depthwise convolution over channel-major images (`[n, c, h, w]`, one `k`x`k` kernel per
//! channel, `[c, 1, k, k]`) as a candle custom op with its backward pass: direct loops over
//! each image plane, in parallel, where the reference path gathers `k·k` shifted copies of the
//! input (which, for the early layers of a mobile network at 224x224, is gigabytes per batch).
//! First order only: the backward ops themselves have no backward, so this serves training
//! steps where no gradient of a gradient is taken.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::{contiguous_slice, with_float};

/// Kernel size, stride and zero padding `[top, bottom, left, right]` of a depthwise
/// convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depthwise {
    /// Kernel side.
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding: top, bottom, left, right.
    pub padding: [usize; 4],
}

impl Depthwise {
    /// The convolution of `x` (`[n, c, h, w]`) with `weight` (`[c, 1, k, k]`).
    pub fn apply(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2(&weight.contiguous()?, *self)
    }

    fn out_size(&self, h: usize, w: usize) -> candle_core::Result<(usize, usize)> {
        let [t, b, l, r] = self.padding;
        let (ph, pw) = (h + t + b, w + l + r);
        if self.stride == 0 || ph < self.kernel || pw < self.kernel {
            return Err(candle_core::Error::Msg(format!(
                "depthwise convolution: kernel {} with stride {} does not fit a {h}x{w} input \
                 padded by {:?}",
                self.kernel, self.stride, self.padding
            )));
        }
        Ok((
            (ph - self.kernel) / self.stride + 1,
            (pw - self.kernel) / self.stride + 1,
        ))
    }

    fn dims(
        &self,
        x: &[usize],
        w: &[usize],
    ) -> candle_core::Result<(usize, usize, usize, usize, usize, usize)> {
        let &[n, c, h, wd] = x else {
            return Err(candle_core::Error::Msg(format!(
                "depthwise convolution needs [n, c, h, w] input, got {x:?}"
            )));
        };
        if w != [c, 1, self.kernel, self.kernel] {
            return Err(candle_core::Error::Msg(format!(
                "depthwise convolution: kernels {w:?} do not fit {c} channels of a {}x{} kernel",
                self.kernel, self.kernel
            )));
        }
        let (oh, ow) = self.out_size(h, wd)?;
        Ok((n, c, h, wd, oh, ow))
    }

    /// Calls `f(oy, ox, iy, ix, tap)` for every output pixel and kernel tap that reads an
    /// input pixel inside the image.
    #[inline(always)]
    fn taps(&self, h: usize, w: usize, oh: usize, ow: usize, mut f: impl FnMut(usize, usize)) {
        let k = self.kernel;
        let (top, left) = (self.padding[0] as isize, self.padding[2] as isize);
        for oy in 0..oh {
            for ky in 0..k {
                let iy = (oy * self.stride + ky) as isize - top;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for ox in 0..ow {
                    for kx in 0..k {
                        let ix = (ox * self.stride + kx) as isize - left;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        f(
                            oy * ow + ox,
                            (iy as usize * w + ix as usize) * k * k + ky * k + kx,
                        );
                    }
                }
            }
        }
    }
}

/// Splits `taps`' packed second argument back into (input pixel, tap).
#[inline(always)]
fn unpack(packed: usize, kk: usize) -> (usize, usize) {
    (packed / kk, packed % kk)
}

fn forward<T: WithDType>(
    g: &Depthwise,
    x: &[T],
    w: &[T],
    dims: (usize, usize, usize, usize, usize, usize),
) -> Vec<T> {
    let (n, c, h, wd, oh, ow) = dims;
    let kk = g.kernel * g.kernel;
    let mut out = vec![T::zero(); n * c * oh * ow];
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, dst)| {
            let ch = plane % c;
            let src = &x[plane * h * wd..(plane + 1) * h * wd];
            let kernel = &w[ch * kk..(ch + 1) * kk];
            g.taps(h, wd, oh, ow, |o, packed| {
                let (i, tap) = unpack(packed, kk);
                dst[o] += src[i] * kernel[tap];
            });
        });
    out
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise_conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1.dims(), l2.dims())?;
        let (n, c, _, _, oh, ow) = dims;
        with_float!("depthwise_conv", s1.dtype(), T => {
            let x = contiguous_slice::<T>(s1, l1, "depthwise_conv")?;
            let w = contiguous_slice::<T>(s2, l2, "depthwise_conv")?;
            Ok((T::to_cpu_storage_owned(forward(self, x, w, dims)), Shape::from((n, c, oh, ow))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let gx = grad.apply_op2(&w.contiguous()?, DepthwiseInputGrad(*self, h, wd))?;
        let gw = grad.apply_op2(&x.contiguous()?, DepthwiseWeightGrad(*self))?;
        Ok((Some(gx), Some(gw)))
    }
}

/// The gradient with respect to the input: (output gradient, kernels) to `[n, c, h, w]`.
#[derive(Clone, Copy, Debug)]
struct DepthwiseInputGrad(Depthwise, usize, usize);

/// The gradient with respect to the kernels: (output gradient, input) to `[c, 1, k, k]`.
#[derive(Clone, Copy, Debug)]
struct DepthwiseWeightGrad(Depthwise);

fn no_second_order() -> candle_core::Error {
    candle_core::Error::Msg(
        "the depthwise convolution kernel is first order only: take second-order gradients \
         with the fast kernels off (METALEARN_KERNELS=reference)"
            .into(),
    )
}

impl CustomOp2 for DepthwiseInputGrad {
    fn name(&self) -> &'static str {
        "depthwise_conv_input_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let DepthwiseInputGrad(g, h, wd) = *self;
        let &[n, c, oh, ow] = l1.dims() else {
            return Err(candle_core::Error::Msg(
                "depthwise gradient: bad shape".into(),
            ));
        };
        if g.out_size(h, wd)? != (oh, ow) || l2.dims() != [c, 1, g.kernel, g.kernel] {
            return Err(candle_core::Error::Msg(
                "depthwise gradient: shapes disagree".into(),
            ));
        }
        let kk = g.kernel * g.kernel;
        with_float!("depthwise_conv_input_grad", s1.dtype(), T => {
            let gy = contiguous_slice::<T>(s1, l1, "depthwise_conv_input_grad")?;
            let w = contiguous_slice::<T>(s2, l2, "depthwise_conv_input_grad")?;
            let mut out = vec![T::from_f64(0.0); n * c * h * wd];
            out.par_chunks_mut(h * wd).enumerate().for_each(|(plane, dst)| {
                let ch = plane % c;
                let src = &gy[plane * oh * ow..(plane + 1) * oh * ow];
                let kernel = &w[ch * kk..(ch + 1) * kk];
                g.taps(h, wd, oh, ow, |o, packed| {
                    let (i, tap) = unpack(packed, kk);
                    dst[i] += src[o] * kernel[tap];
                });
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, c, h, wd))))
        })
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Err(no_second_order())
    }
}

impl CustomOp2 for DepthwiseWeightGrad {
    fn name(&self) -> &'static str {
        "depthwise_conv_weight_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (&[n, c, oh, ow], &[n2, c2, h, wd]) = (l1.dims(), l2.dims()) else {
            return Err(candle_core::Error::Msg(
                "depthwise gradient: bad shape".into(),
            ));
        };
        if (n, c) != (n2, c2) || g.out_size(h, wd)? != (oh, ow) {
            return Err(candle_core::Error::Msg(
                "depthwise gradient: shapes disagree".into(),
            ));
        }
        let kk = g.kernel * g.kernel;
        with_float!("depthwise_conv_weight_grad", s1.dtype(), T => {
            let gy = contiguous_slice::<T>(s1, l1, "depthwise_conv_weight_grad")?;
            let x = contiguous_slice::<T>(s2, l2, "depthwise_conv_weight_grad")?;
            let mut out = vec![T::from_f64(0.0); c * kk];
            // One channel's kernel gradient sums over the images in a fixed order.
            out.par_chunks_mut(kk).enumerate().for_each(|(ch, dst)| {
                for image in 0..n {
                    let plane = image * c + ch;
                    let src = &x[plane * h * wd..(plane + 1) * h * wd];
                    let gplane = &gy[plane * oh * ow..(plane + 1) * oh * ow];
                    g.taps(h, wd, oh, ow, |o, packed| {
                        let (i, tap) = unpack(packed, kk);
                        dst[tap] += gplane[o] * src[i];
                    });
                }
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from((c, 1, g.kernel, g.kernel))))
        })
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Err(no_second_order())
    }
}
