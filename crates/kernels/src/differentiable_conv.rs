//! A stride-1 convolution of image rows that is differentiable to any order without patch
//! matrices in the graph.
//!
//! Two ops close the family under differentiation:
//! - [`Conv`] `(x, w) → y` runs the fused convolution kernel (Winograd or im2col per chunk);
//! - [`ConvWeightGradient`] `(x, dy) → dw` runs the fused weight-gradient kernel.
//!
//! `Conv`'s input gradient is itself a `Conv`: of `dy`, with the weight's kernel positions
//! reversed and its channel and filter axes swapped, padded by `k − 1 − p` (`transposed`).
//! Both ops are bilinear, so every derivative is one of the two again, with candle operations
//! only on the (small) weights. Second-order MAML differentiates through them; on the composed
//! path they replace im2col + matrix product, whose patch matrices are 9x the input for 3x3
//! kernels and appear again in every derivative.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};

use crate::conv::ConvGeometry;
use crate::fused::ConvRows;
use crate::{contiguous_slice, with_float};

/// `(x [.., images·h·w, c], w [tasks?, k·k·c, filters]) → [.., images·oh·ow, filters]`.
#[derive(Clone, Copy, Debug)]
pub struct Conv(pub ConvGeometry);

/// `(x [.., images·h·w, c], dy [.., images·oh·ow, filters]) → dw`, shaped like the weight of
/// [`Conv`]: `[k·k·c, filters]`, or `[tasks, k·k·c, filters]` when `tasks` is set.
#[derive(Clone, Copy, Debug)]
pub struct ConvWeightGradient {
    /// The convolution's geometry.
    pub geometry: ConvGeometry,
    /// Task count of a task-batched weight (`None`: one weight for all images).
    pub tasks: Option<usize>,
}

/// Whether [`Conv`] can run `geometry` differentiably: its input gradient must be a
/// convolution again ([`ConvGeometry::input_gradient`]).
pub fn applies(geometry: &ConvGeometry) -> bool {
    geometry.input_gradient(1).is_some()
}

/// The weight of the input gradient's convolution: kernel positions reversed (a 180° rotation)
/// and channel and filter axes swapped, `[tasks?, k·k·c, f]` → `[tasks?, k·k·f, c]`, written in
/// differentiable candle operations.
fn transposed(w: &Tensor, g: &ConvGeometry) -> candle_core::Result<Tensor> {
    let kk = g.kernel * g.kernel;
    let batched = w.rank() == 3;
    let filters = w.dim(w.rank() - 1)?;
    let reversed: Vec<u32> = (0..kk as u32).rev().collect();
    let reversed = Tensor::new(reversed.as_slice(), w.device())?;
    if batched {
        let tasks = w.dim(0)?;
        w.reshape((tasks, kk, g.channels, filters))?
            .index_select(&reversed, 1)?
            .transpose(2, 3)?
            .contiguous()?
            .reshape((tasks, kk * filters, g.channels))
    } else {
        w.reshape((kk, g.channels, filters))?
            .index_select(&reversed, 0)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((kk * filters, g.channels))
    }
}

/// `Conv` of `x` with `w`, as a differentiable graph node.
pub fn conv(x: &Tensor, w: &Tensor, geometry: ConvGeometry) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv(geometry))
}

/// The gradient of `Σ conv(x, w) · dy` with respect to `x`: a `Conv` of `dy` with the
/// transposed weight.
fn input_gradient(dy: &Tensor, w: &Tensor, geometry: &ConvGeometry) -> candle_core::Result<Tensor> {
    let filters = w.dim(w.rank() - 1)?;
    let transposed_geometry = geometry.input_gradient(filters).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "conv: the input gradient of {geometry:?} is not a convolution"
        ))
    })?;
    conv(dy, &transposed(w, geometry)?, transposed_geometry)
}

/// The gradient of `Σ conv(x, w) · dy` with respect to `w`.
fn weight_gradient(
    x: &Tensor,
    dy: &Tensor,
    w: &Tensor,
    geometry: &ConvGeometry,
) -> candle_core::Result<Tensor> {
    let tasks = (w.rank() == 3).then(|| w.dim(0)).transpose()?;
    x.contiguous()?.apply_op2(
        &dy.contiguous()?,
        ConvWeightGradient {
            geometry: *geometry,
            tasks,
        },
    )
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        ConvRows(self.0).cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| input_gradient(grad, w, &self.0));
        let dw = w.track_op().then(|| weight_gradient(x, grad, w, &self.0));
        Ok((dx.transpose()?, dw.transpose()?))
    }
}

impl CustomOp2 for ConvWeightGradient {
    fn name(&self) -> &'static str {
        "conv_weight_gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        let tasks = self.tasks.unwrap_or(1);
        let filters = *l2.dims().last().unwrap_or(&0);
        let op = ConvRows(*g);
        // Checks the input rows and the output gradient against the geometry.
        let input_shape = g.reshaped(
            "conv_weight_gradient",
            l1.dims(),
            g.height * g.width,
            g.channels,
            g.out_height() * g.out_width(),
            filters,
        )?;
        if input_shape.dims() != l2.dims() || filters == 0 || !g.images.is_multiple_of(tasks) {
            return Err(candle_core::Error::Msg(format!(
                "conv_weight_gradient: output gradient {:?} does not fit input {:?} ({} tasks)",
                l2.dims(),
                l1.dims(),
                tasks
            )));
        }
        let shape = match self.tasks {
            Some(t) => Shape::from((t, g.patch_len(), filters)),
            None => Shape::from((g.patch_len(), filters)),
        };
        with_float!("conv_weight_gradient", s1.dtype(), T => {
            let x = contiguous_slice::<T>(s1, l1, "conv_weight_gradient")?;
            let dy = contiguous_slice::<T>(s2, l2, "conv_weight_gradient")?;
            Ok((T::to_cpu_storage_owned(op.weight_gradient(x, dy, tasks, filters)), shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // dw = Σ x-patches ⊗ dy is bilinear: its derivative along dy is a convolution of x with
        // the incoming gradient, and along x the input gradient of that convolution.
        let dx = x
            .track_op()
            .then(|| input_gradient(dy, grad, &self.geometry));
        let ddy = dy.track_op().then(|| conv(x, grad, self.geometry));
        Ok((dx.transpose()?, ddy.transpose()?))
    }
}
