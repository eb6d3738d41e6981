//! Fused kernels for first-order training: a whole convolution, and batch-norm + ReLU +
//! max-pooling, each one graph node with a hand-written backward pass.
//!
//! Their backward passes compute gradients directly (never materialising patch matrices or
//! per-step intermediates) and return constants: the gradients are right, but cannot be
//! differentiated again. The forward path uses them only when the caller says no second-order
//! gradient will be taken (`ForwardCtx::differentiable_backward` in the `metalearn` crate off);
//! otherwise it composes the differentiable kernels of
//! [`crate::differentiable_conv`] (or [`crate::conv`] for strided
//! convolutions), [`crate::pool`] and [`crate::norm`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::conv::{col2im_add, im2col_into, ConvGeometry};
use crate::gemm::gemm_into;
use crate::parallel::{
    chunks, filled_in_parallel, independent_chunks, sum_over_parts, REDUCTION_GROUPS,
};
use crate::pool::pooled_window;
use crate::pool::PoolGeometry;
use crate::winograd;
use crate::winograd::WeightLayout::{Filters, PatchOrder};
use crate::{contiguous_slice, parameter_gradient, to_f64s, vectorized, with_data, with_float};

/// Output rows a convolution chunk aims for: enough for an efficient GEMM, few enough that
/// the chunk's patch matrix stays in cache.
const CHUNK_ROWS: usize = 256;

/// Output tiles a Winograd chunk aims for (its transformed inputs and products, 36 values per
/// tile and channel, stay in the core's cache).
const WINOGRAD_CHUNK_TILES: usize = 32;

/// A whole convolution on image rows: `(x [.., images·h·w, c], weight [k·k·c, filters] or
/// [tasks, k·k·c, filters])` → `[.., images·oh·ow, filters]`. With a task dimension on the
/// weight, images are split evenly between tasks in order.
#[derive(Clone, Copy, Debug)]
pub struct ConvRows(pub ConvGeometry);

impl ConvRows {
    pub(crate) fn tasks_and_filters(
        &self,
        weight_dims: &[usize],
    ) -> candle_core::Result<(usize, usize)> {
        let g = &self.0;
        let (tasks, k, filters) = match *weight_dims {
            [k, f] => (1, k, f),
            [t, k, f] => (t, k, f),
            _ => (0, 0, 0),
        };
        if tasks == 0 || k != g.patch_len() || !g.images.is_multiple_of(tasks) {
            return Err(candle_core::Error::Msg(format!(
                "conv_rows: weight {weight_dims:?} does not fit {} images with patches of {}",
                g.images,
                g.patch_len()
            )));
        }
        Ok((tasks, filters))
    }

    pub(crate) fn forward<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        tasks: usize,
        filters: usize,
    ) -> Vec<T> {
        let g = &self.0;
        if winograd::applies(g) {
            return winograd_convolution(g, x, w, tasks, filters);
        }
        let (pixels, kc) = (g.out_height() * g.out_width(), g.patch_len());
        let parts = independent_chunks(g.images, tasks, pixels, CHUNK_ROWS);
        let lengths: Vec<usize> = parts.iter().map(|c| c.2 * pixels * filters).collect();
        filled_in_parallel(&lengths, |part, dst| {
            let (task, first, count) = parts[part];
            let mut cols = vec![T::zero(); count * pixels * kc];
            vectorized!(im2col_into(g, x, first, count, &mut cols));
            let w_task = &w[task * kc * filters..];
            // Safety: the slices hold exactly the m×k, k×n and m×n values addressed.
            unsafe {
                gemm_into(
                    (count * pixels, filters, kc),
                    dst.as_mut_ptr(),
                    filters,
                    false,
                    (cols.as_ptr(), kc, 1),
                    (w_task.as_ptr(), filters, 1),
                )
            }
        })
    }

    /// Gradients of the input (when `want_x`) and of the weight.
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        grad: &[T],
        tasks: usize,
        filters: usize,
        want_x: bool,
    ) -> (Option<Vec<T>>, Vec<T>) {
        let g = &self.0;
        let (pixels, kc) = (g.out_height() * g.out_width(), g.patch_len());
        let image_len = g.height * g.width * g.channels;
        let parts = chunks(g.images, tasks, pixels, CHUNK_ROWS);
        let dx = want_x.then(|| {
            if let Some(wino) = winograd::input_gradient_geometry(g, filters) {
                let flipped = winograd::flipped_weights(w, tasks, g.channels, filters);
                return winograd_convolution(&wino, grad, &flipped, tasks, g.channels);
            }
            let lengths: Vec<usize> = parts.iter().map(|c| c.2 * image_len).collect();
            filled_in_parallel(&lengths, |part, dst| {
                let (task, first, count) = parts[part];
                let mut cols = vec![T::zero(); count * pixels * kc];
                let g_chunk = &grad[first * pixels * filters..];
                let w_task = &w[task * kc * filters..];
                // d cols = d y · wᵀ; wᵀ is w read with swapped strides.
                unsafe {
                    gemm_into(
                        (count * pixels, kc, filters),
                        cols.as_mut_ptr(),
                        kc,
                        false,
                        (g_chunk.as_ptr(), filters, 1),
                        (w_task.as_ptr(), 1, filters),
                    )
                }
                // Adds into the zeroed piece.
                vectorized!(col2im_add(g, &cols, count, dst));
            })
        });
        (dx, self.weight_gradient(x, grad, tasks, filters))
    }

    /// The weight's gradient `[tasks][k·k·c][filters]` given the input rows `x` and the
    /// output's gradient `grad`.
    pub(crate) fn weight_gradient<T: WithDType>(
        &self,
        x: &[T],
        grad: &[T],
        tasks: usize,
        filters: usize,
    ) -> Vec<T> {
        let g = &self.0;
        if winograd::applies(g) {
            return winograd_weight_gradient(g, x, grad, tasks, filters);
        }
        let (pixels, kc) = (g.out_height() * g.out_width(), g.patch_len());
        let parts = chunks(g.images, tasks, pixels, CHUNK_ROWS);
        // d w (per task) = Σ over chunks of colsᵀ · d y.
        sum_over_parts(&parts, tasks, kc * filters, |acc, (_, first, count)| {
            let mut cols = vec![T::zero(); count * pixels * kc];
            vectorized!(im2col_into(g, x, first, count, &mut cols));
            let g_chunk = &grad[first * pixels * filters..];
            // Safety: cols is (count·pixels)×kc, the gradient rows (count·pixels)×filters and
            // acc kc×filters.
            unsafe {
                gemm_into(
                    (kc, filters, count * pixels),
                    acc.as_mut_ptr(),
                    filters,
                    true,
                    (cols.as_ptr(), 1, kc),
                    (g_chunk.as_ptr(), filters, 1),
                )
            }
        })
    }
}

/// A 3×3 stride-1 convolution of image rows `x` with the weight `w` (`[tasks][9·c][filters]`)
/// by Winograd's F(4×4, 3×3), in parallel over chunks of images.
fn winograd_convolution<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    w: &[T],
    tasks: usize,
    filters: usize,
) -> Vec<T> {
    let u = winograd::transformed_weights(w, PatchOrder, tasks, g.channels, filters);
    let pixels = g.out_height() * g.out_width();
    let parts = independent_chunks(
        g.images,
        tasks,
        winograd::tiles_per_image(g),
        WINOGRAD_CHUNK_TILES,
    );
    let lengths: Vec<usize> = parts.iter().map(|c| c.2 * pixels * filters).collect();
    filled_in_parallel(&lengths, |part, dst| {
        let (task, first, count) = parts[part];
        let u_task = &u[task * winograd::POSITIONS * g.channels * filters..];
        winograd::convolve_images(g, x, u_task, filters, (first, count), dst);
    })
}

/// The weight gradient of a Winograd convolution: the transformed weight's gradient summed
/// over chunks of images in fixed groups (deterministic), then transformed back.
fn winograd_weight_gradient<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    grad: &[T],
    tasks: usize,
    filters: usize,
) -> Vec<T> {
    let per_task = winograd::POSITIONS * g.channels * filters;
    let parts = chunks(
        g.images,
        tasks,
        winograd::tiles_per_image(g),
        WINOGRAD_CHUNK_TILES,
    );
    let du = sum_over_parts(&parts, tasks, per_task, |du, (_, first, count)| {
        winograd::accumulate_transformed_weight_gradient(g, x, grad, filters, (first, count), du);
    });
    winograd::weight_gradient(&du, tasks, g.channels, filters)
}

impl CustomOp2 for ConvRows {
    fn name(&self) -> &'static str {
        "conv_rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let (tasks, filters) = self.tasks_and_filters(l2.dims())?;
        let shape = g.reshaped(
            "conv_rows",
            l1.dims(),
            g.height * g.width,
            g.channels,
            g.out_height() * g.out_width(),
            filters,
        )?;
        with_float!("conv_rows", s1.dtype(), T => {
            let x = contiguous_slice::<T>(s1, l1, "conv_rows")?;
            let w = contiguous_slice::<T>(s2, l2, "conv_rows")?;
            Ok((T::to_cpu_storage_owned(self.forward(x, w, tasks, filters)), shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (tasks, filters) = self.tasks_and_filters(w.dims())?;
        let want_x = x.track_op();
        with_float!("conv_rows", x.dtype(), T => {
            let (dx, dw) = with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| {
                    with_data::<T, _>(grad, |gs| self.backward(xs, ws, gs, tasks, filters, want_x))
                })
            })???;
            let dx = dx.map(|d| Tensor::from_vec(d, x.shape(), x.device())).transpose()?;
            Ok((dx, Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
        })
    }
}

/// Batch normalisation with given statistics, then max-pooling, then ReLU, on image rows:
/// `(y [.., images·h·w, c], gamma, beta)` → pooled rows. `gamma` and `beta` are `[c]`, or
/// `[tasks, c]` with images split evenly between tasks.
///
/// `mean` and `inv_std` (per task and channel) are the statistics to normalise with. With
/// `batch_statistics`, they are the batch's own (from `y`), and the backward pass includes
/// their dependence on `y`, as batch-norm in training mode does; otherwise they are constants
/// (running statistics).
#[derive(Clone, Debug)]
pub struct BnPoolRelu {
    /// Pooling geometry (`images` counts all tasks' images).
    pub pool: PoolGeometry,
    /// Per task and channel means, `[tasks·c]`.
    pub mean: Vec<f64>,
    /// Per task and channel `1 / sqrt(var + eps)`, `[tasks·c]`.
    pub inv_std: Vec<f64>,
    /// Whether the statistics are the batch's own.
    pub batch_statistics: bool,
}

/// Per-channel constants of one task: `z = y · a + b` is the normalised, scaled, shifted value.
pub(crate) struct TaskAffine<T> {
    pub(crate) a: Vec<T>,
    pub(crate) b: Vec<T>,
}

impl BnPoolRelu {
    pub(crate) fn tasks(&self) -> usize {
        self.mean.len() / self.pool.channels.max(1)
    }

    pub(crate) fn affine<T: WithDType>(&self, gamma: &[f64], beta: &[f64]) -> Vec<TaskAffine<T>> {
        let c = self.pool.channels;
        let per_task_params = gamma.len() > c;
        (0..self.tasks())
            .map(|t| {
                let p = if per_task_params { t * c } else { 0 };
                let (mut a, mut b) = (Vec::with_capacity(c), Vec::with_capacity(c));
                for ch in 0..c {
                    let scale = gamma[p + ch] * self.inv_std[t * c + ch];
                    a.push(T::from_f64(scale));
                    b.push(T::from_f64(beta[p + ch] - self.mean[t * c + ch] * scale));
                }
                TaskAffine { a, b }
            })
            .collect()
    }

    /// For every pooled pixel of image `image` and every channel, the winning input (its offset
    /// in the image, into `at`) and its normalised value (into `best`); both are laid out as the
    /// image's pooled output. Ties go to the first input in window order. The channel loop is
    /// branch-free (a compare and two selects on 32-bit lanes), so it vectorises.
    #[inline(always)]
    pub(crate) fn winners<T: WithDType>(
        &self,
        y: &[T],
        image: usize,
        affine: &TaskAffine<T>,
        at: &mut [u32],
        best: &mut [T],
    ) {
        let g = &self.pool;
        let (ow, c, s) = (g.out_width(), g.channels, g.size);
        let (a, b) = (&affine.a[..c], &affine.b[..c]);
        let image_len = g.height * g.width * c;
        let y = &y[image * image_len..(image + 1) * image_len];
        let pixels = at.chunks_exact_mut(c).zip(best.chunks_exact_mut(c));
        for (pixel, (at, best)) in pixels.enumerate() {
            let (oy, ox) = (pixel / ow, pixel % ow);
            if s == 2 {
                // The usual 2×2 window, its four rows compared in registers and each output
                // stored once (the general loop's conditional stores become slow masked
                // stores).
                let top = (2 * oy * g.width + 2 * ox) * c;
                let offsets = [top, top + c, top + g.width * c, top + g.width * c + c];
                let [r0, r1, r2, r3] = offsets.map(|o| &y[o..o + c]);
                for ch in 0..c {
                    let (mut m, mut from) = (r0[ch] * a[ch] + b[ch], offsets[0]);
                    for (row, offset) in [(r1, offsets[1]), (r2, offsets[2]), (r3, offsets[3])] {
                        let z = row[ch] * a[ch] + b[ch];
                        let better = z > m;
                        m = if better { z } else { m };
                        from = if better { offset } else { from };
                    }
                    best[ch] = m;
                    at[ch] = (from + ch) as u32;
                }
                continue;
            }
            for dy in 0..s {
                for dx in 0..s {
                    let offset = ((oy * s + dy) * g.width + ox * s + dx) * c;
                    let row = &y[offset..offset + c];
                    let first = dy == 0 && dx == 0;
                    let lanes = at
                        .iter_mut()
                        .zip(best.iter_mut())
                        .zip(row.iter().zip(a.iter().zip(b)));
                    for (ch, ((at, best), (&v, (&a, &b)))) in lanes.enumerate() {
                        let z = v * a + b;
                        let better = first || z > *best;
                        *best = if better { z } else { *best };
                        *at = if better { (offset + ch) as u32 } else { *at };
                    }
                }
            }
        }
    }

    fn forward<T: WithDType>(&self, y: &[T], gamma: &[f64], beta: &[f64]) -> Vec<T> {
        let g = &self.pool;
        let c = g.channels;
        let per_image = g.out_height() * g.out_width() * c;
        let per_task = g.images / self.tasks();
        let affine = self.affine::<T>(gamma, beta);
        filled_in_parallel(&vec![per_image; g.images], |image, dst| {
            vectorized!(self.pooled_values(y, image, &affine[image / per_task], dst));
        })
    }

    /// The forward pass of one image: each window's largest normalised value, through ReLU.
    /// Unlike [`Self::winners`] it tracks no positions, so the channel loop is a plain
    /// vectorisable maximum.
    #[inline(always)]
    pub(crate) fn pooled_values<T: WithDType>(
        &self,
        y: &[T],
        image: usize,
        affine: &TaskAffine<T>,
        dst: &mut [T],
    ) {
        let g = &self.pool;
        let (oh, ow, c, s) = (g.out_height(), g.out_width(), g.channels, g.size);
        let (a, b) = (&affine.a[..c], &affine.b[..c]);
        let base = image * g.height * g.width * c;
        for (pixel, best) in dst.chunks_exact_mut(c).take(oh * ow).enumerate() {
            let (oy, ox) = (pixel / ow, pixel % ow);
            if s == 2 {
                // As in `winners`: the 2×2 window in registers, one plain store per output.
                let top = base + (2 * oy * g.width + 2 * ox) * c;
                let offsets = [top, top + c, top + g.width * c, top + g.width * c + c];
                pooled_window(offsets.map(|o| &y[o..o + c]), (a, b), best);
                continue;
            }
            for dy in 0..s {
                for dx in 0..s {
                    let at = base + ((oy * s + dy) * g.width + ox * s + dx) * c;
                    let row = &y[at..at + c];
                    if dy == 0 && dx == 0 {
                        for (((out, &v), &a), &b) in best.iter_mut().zip(row).zip(a).zip(b) {
                            *out = v * a + b;
                        }
                    } else {
                        for (((out, &v), &a), &b) in best.iter_mut().zip(row).zip(a).zip(b) {
                            let z = v * a + b;
                            *out = if z > *out { z } else { *out };
                        }
                    }
                }
            }
            for out in best.iter_mut() {
                if *out < T::zero() {
                    *out = T::zero();
                }
            }
        }
    }

    /// Gradients of `y`, `gamma` and `beta` (the last two per task when `per_task_params`).
    fn backward<T: WithDType>(
        &self,
        y: &[T],
        gamma: &[f64],
        beta: &[f64],
        grad: &[T],
    ) -> (Vec<T>, Vec<f64>, Vec<f64>) {
        let g = &self.pool;
        let c = g.channels;
        let tasks = self.tasks();
        let per_task = g.images / tasks;
        let image_len = g.height * g.width * c;
        let affine = self.affine::<T>(gamma, beta);
        // The winners, found once for both passes: per pooled output, the winning input's offset
        // in its image and its normalised value.
        let pooled_len = g.out_height() * g.out_width() * c;
        let mut winner_at = vec![0u32; g.images * pooled_len];
        let mut winner_z = vec![T::zero(); g.images * pooled_len];
        winner_at
            .par_chunks_mut(pooled_len)
            .zip(winner_z.par_chunks_mut(pooled_len))
            .enumerate()
            .for_each(|(image, (at, z))| {
                vectorized!(self.winners(y, image, &affine[image / per_task], at, z))
            });
        // Pass 1: per task and channel, Σ dz and Σ dz·ŷ over the winners (dz = incoming
        // gradient where ReLU passes it). Fixed groups summed in order: deterministic.
        let zero = || (vec![0f64; tasks * c], vec![0f64; tasks * c]);
        let group_len = g.images.div_ceil(REDUCTION_GROUPS).max(1);
        let (sum_dz, sum_dz_yhat) = (0..g.images.div_ceil(group_len))
            .into_par_iter()
            .map(|group| {
                let images = group * group_len..((group + 1) * group_len).min(g.images);
                images.fold(zero(), |(mut s1, mut s2), image| {
                    let t = image / per_task;
                    let (mean, inv_std) = (&self.mean[t * c..], &self.inv_std[t * c..]);
                    let channels = t * c..(t + 1) * c;
                    let (sum1, sum2) = (&mut s1[channels.clone()], &mut s2[channels]);
                    let pooled = image * pooled_len..(image + 1) * pooled_len;
                    let y = &y[image * image_len..(image + 1) * image_len];
                    for ((at, z), dz) in winner_at[pooled.clone()]
                        .chunks_exact(c)
                        .zip(winner_z[pooled.clone()].chunks_exact(c))
                        .zip(grad[pooled].chunks_exact(c))
                    {
                        // Branch-free, as in the first block's backward pass: whether ReLU
                        // passed a winner is as good as random; a blocked one adds zero.
                        for ch in 0..c {
                            let passed = z[ch] > T::zero();
                            let dz = dz[ch].to_f64();
                            let yhat = (y[at[ch] as usize].to_f64() - mean[ch]) * inv_std[ch];
                            sum1[ch] += if passed { dz } else { 0.0 };
                            sum2[ch] += if passed { dz * yhat } else { 0.0 };
                        }
                    }
                    (s1, s2)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold(zero(), |(mut a1, mut a2), (b1, b2)| {
                for i in 0..a1.len() {
                    a1[i] += b1[i];
                    a2[i] += b2[i];
                }
                (a1, a2)
            });
        // Pass 2: d y = a·(dz − mean(dz) − ŷ·mean(dz·ŷ)) with batch statistics, a = γ/σ (the
        // centring terms are absent with running statistics). The centring part is linear in
        // y: y·k1 + k0 per channel.
        let centring: Vec<(Vec<T>, Vec<T>)> = (0..tasks)
            .map(|t| {
                (0..c)
                    .map(|ch| {
                        let (k1, k0) = self.centring(t, ch, gamma, &sum_dz, &sum_dz_yhat);
                        (T::from_f64(k1), T::from_f64(k0))
                    })
                    .unzip()
            })
            .collect();
        let mut dy = vec![T::zero(); g.images * image_len];
        dy.par_chunks_mut(image_len)
            .enumerate()
            .for_each(|(image, dst)| {
                let t = image / per_task;
                let aff = &affine[t];
                let base = image * image_len;
                if self.batch_statistics {
                    let (k1, k0) = (&centring[t].0[..c], &centring[t].1[..c]);
                    for (d_row, y_row) in dst
                        .chunks_exact_mut(c)
                        .zip(y[base..base + image_len].chunks_exact(c))
                    {
                        for ch in 0..c {
                            d_row[ch] = y_row[ch] * k1[ch] + k0[ch];
                        }
                    }
                }
                let pooled = image * pooled_len..(image + 1) * pooled_len;
                for ((at, z), dz) in winner_at[pooled.clone()]
                    .chunks_exact(c)
                    .zip(winner_z[pooled.clone()].chunks_exact(c))
                    .zip(grad[pooled].chunks_exact(c))
                {
                    for ch in 0..c {
                        let passed = z[ch] > T::zero();
                        let dz = if passed { dz[ch] } else { T::zero() };
                        dst[at[ch] as usize] += aff.a[ch] * dz;
                    }
                }
            });
        let (d_gamma, d_beta) = self.parameter_gradients(gamma.len(), &sum_dz, &sum_dz_yhat);
        (dy, d_gamma, d_beta)
    }

    /// The centring part of the gradient of task `t`'s channel `ch` with batch statistics:
    /// `d y = k1·y + k0` over all its rows, from Σ dz and Σ dz·ŷ over the winners.
    pub(crate) fn centring(
        &self,
        t: usize,
        ch: usize,
        gamma: &[f64],
        sum_dz: &[f64],
        sum_dz_yhat: &[f64],
    ) -> (f64, f64) {
        let g = &self.pool;
        let c = g.channels;
        let k = t * c + ch;
        let a = gamma[if gamma.len() > c { k } else { ch }] * self.inv_std[k];
        let rows_per_task = (g.images / self.tasks() * g.height * g.width) as f64;
        let (m1, m2) = (sum_dz[k] / rows_per_task, sum_dz_yhat[k] / rows_per_task);
        let k1 = -a * m2 * self.inv_std[k];
        let k0 = -a * (m1 - m2 * self.mean[k] * self.inv_std[k]);
        (k1, k0)
    }

    /// Gradients of `gamma` and `beta` (`params` values: `[c]` or `[tasks·c]`) from Σ dz·ŷ and
    /// Σ dz per task and channel.
    pub(crate) fn parameter_gradients(
        &self,
        params: usize,
        sum_dz: &[f64],
        sum_dz_yhat: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        let c = self.pool.channels;
        let (mut d_gamma, mut d_beta) = (vec![0f64; params], vec![0f64; params]);
        let per_task_params = params > c;
        for t in 0..self.tasks() {
            for ch in 0..c {
                let p = if per_task_params { t * c + ch } else { ch };
                d_gamma[p] += sum_dz_yhat[t * c + ch];
                d_beta[p] += sum_dz[t * c + ch];
            }
        }
        (d_gamma, d_beta)
    }

    /// Checks the statistics against the pooling geometry, and that `gamma` and `beta` are `[c]`
    /// or `[tasks, c]`.
    pub(crate) fn check_statistics_and_params(
        &self,
        gamma: &[usize],
        beta: &[usize],
    ) -> candle_core::Result<()> {
        let g = &self.pool;
        let (c, tasks) = (g.channels, self.tasks());
        let params_ok = |d: &[usize]| d == [c] || d == [tasks, c];
        if c == 0
            || tasks == 0
            || self.inv_std.len() != self.mean.len()
            || !g.images.is_multiple_of(tasks)
            // The backward pass keeps winners as 32-bit offsets inside an image.
            || g.height * g.width * c > u32::MAX as usize
        {
            return Err(candle_core::Error::Msg(format!(
                "bn_pool_relu: {} statistics of {c} channels do not fit {} images of {}x{}x{c}",
                self.mean.len(),
                g.images,
                g.height,
                g.width
            )));
        }
        if params_ok(gamma) && params_ok(beta) {
            Ok(())
        } else {
            Err(candle_core::Error::Msg(format!(
                "batch-norm parameters gamma {gamma:?} and beta {beta:?} must be [{c}] or [{tasks}, {c}]"
            )))
        }
    }

    fn check(&self, y: &[usize], gamma: &[usize], beta: &[usize]) -> candle_core::Result<Shape> {
        let g = &self.pool;
        let c = g.channels;
        let tasks = self.tasks();
        self.check_statistics_and_params(gamma, beta)?;
        let total: usize = y.iter().product();
        if total != g.images * g.height * g.width * c || y.last() != Some(&c) {
            return Err(candle_core::Error::Msg(format!(
                "bn_pool_relu: shapes y {y:?}, gamma {gamma:?}, beta {beta:?} do not fit {} images of {}x{}x{c} in {tasks} tasks",
                g.images, g.height, g.width
            )));
        }
        let r = y.len();
        let mut out = y.to_vec();
        out[r - 2] = y[r - 2] / (g.height * g.width) * (g.out_height() * g.out_width());
        Ok(Shape::from(out))
    }
}

impl CustomOp3 for BnPoolRelu {
    fn name(&self) -> &'static str {
        "bn_pool_relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = self.check(l1.dims(), l2.dims(), l3.dims())?;
        with_float!("bn_pool_relu", s1.dtype(), T => {
            let y = contiguous_slice::<T>(s1, l1, "bn_pool_relu")?;
            let gamma = to_f64s(contiguous_slice::<T>(s2, l2, "bn_pool_relu")?);
            let beta = to_f64s(contiguous_slice::<T>(s3, l3, "bn_pool_relu")?);
            Ok((T::to_cpu_storage_owned(self.forward(y, &gamma, &beta)), shape))
        })
    }

    fn bwd(
        &self,
        y: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        with_float!("bn_pool_relu", y.dtype(), T => {
            let gamma_v = with_data::<T, _>(gamma, to_f64s)?;
            let beta_v = with_data::<T, _>(beta, to_f64s)?;
            let (dy, dg, db) = with_data::<T, _>(y, |ys| {
                with_data::<T, _>(grad, |gs| self.backward(ys, &gamma_v, &beta_v, gs))
            })??;
            Ok((
                Some(Tensor::from_vec(dy, y.shape(), y.device())?),
                Some(parameter_gradient(dg, gamma)?),
                Some(parameter_gradient(db, beta)?),
            ))
        })
    }
}

/// A whole block after the first — convolution, batch-norm, max-pooling and ReLU — as one
/// graph node: `(x [.., images·h·w, c], weight, [gamma, beta] stacked)` → pooled rows.
///
/// `convolved` is the convolution's output, computed beforehand (outside the graph) to take
/// its batch statistics; forward pools it and backward reuses it. Keeping it out of the graph
/// means the backward pass never allocates, zeroes and accumulates a gradient tensor of its
/// full, unpooled size, as it does for every graph node.
#[derive(Clone, Debug)]
pub struct ConvBlock {
    /// The convolution.
    pub conv: ConvRows,
    /// Batch-norm, pooling and ReLU, with their statistics.
    pub bn: BnPoolRelu,
    /// The convolution's output for `x` and the weight, as [`ConvRows`] gives it.
    pub convolved: Tensor,
}

impl ConvBlock {
    /// The stacked parameters' halves (`gamma`, `beta`) in f64.
    fn halves<T: WithDType>(params: &[T]) -> (Vec<f64>, Vec<f64>) {
        let (gamma, beta) = params.split_at(params.len() / 2);
        (to_f64s(gamma), to_f64s(beta))
    }

    fn check(&self, x: &[usize], w: &[usize], params: &[usize]) -> candle_core::Result<Shape> {
        let g = &self.conv.0;
        let (_, filters) = self.conv.tasks_and_filters(w)?;
        let inputs: usize = x.iter().product();
        if inputs != g.images * g.height * g.width * g.channels || filters != self.bn.pool.channels
        {
            return Err(candle_core::Error::Msg(format!(
                "conv_block: input {x:?} and weight {w:?} do not fit {} images of {}x{}x{} into {} filters",
                g.images, g.height, g.width, g.channels, self.bn.pool.channels
            )));
        }
        match params.split_first() {
            Some((2, half)) => self.bn.check(self.convolved.dims(), half, half),
            _ => Err(candle_core::Error::Msg(format!(
                "conv_block: parameters {params:?} are not gamma and beta stacked on a first axis of 2"
            ))),
        }
    }
}

impl CustomOp3 for ConvBlock {
    fn name(&self) -> &'static str {
        "conv_block"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        l1: &Layout,
        _w: &CpuStorage,
        l2: &Layout,
        params: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = self.check(l1.dims(), l2.dims(), l3.dims())?;
        with_float!("conv_block", params.dtype(), T => {
            let (gamma, beta) = Self::halves(contiguous_slice::<T>(params, l3, "conv_block")?);
            let out = with_data::<T, _>(&self.convolved, |y| self.bn.forward(y, &gamma, &beta))?;
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (tasks, filters) = self.conv.tasks_and_filters(w.dims())?;
        with_float!("conv_block", x.dtype(), T => {
            let (gamma, beta) = with_data::<T, _>(params, Self::halves)?;
            let (dy, mut d_params, d_beta) = with_data::<T, _>(&self.convolved, |ys| {
                with_data::<T, _>(grad, |gs| self.bn.backward(ys, &gamma, &beta, gs))
            })??;
            d_params.extend(d_beta);
            let (dx, dw) = with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| {
                    self.conv.backward(xs, ws, &dy, tasks, filters, x.track_op())
                })
            })??;
            let dx = dx.map(|d| Tensor::from_vec(d, x.shape(), x.device())).transpose()?;
            Ok((
                dx,
                Some(Tensor::from_vec(dw, w.shape(), w.device())?),
                Some(parameter_gradient(d_params, params)?),
            ))
        })
    }
}

/// Convolution (3×3, stride 1, by Winograd's F(4×4, 3×3)), batch-norm with constant statistics
/// (`z = y·a + b` per filter), 2×2 max-pooling and ReLU, for inference: `(x [images·h·w, c],
/// weight [filters, c, 3, 3] as the layer holds it, [a; b] stacked as [2, filters])` → pooled
/// rows
/// `[images·⌊oh/2⌋·⌊ow/2⌋, filters]`. Each output tile is pooled as it is made, so the
/// convolution's full-resolution output is never stored. Forward only (it has no backward
/// pass): the fast path uses it where nothing needs a gradient.
#[derive(Clone, Copy, Debug)]
pub struct InferenceBlock(pub ConvGeometry);

impl InferenceBlock {
    /// Whether a block with this convolution and pooling size runs on this kernel.
    pub fn applies(g: &ConvGeometry, pool_size: usize) -> bool {
        pool_size == 2 && winograd::applies(g)
    }
}

impl CustomOp3 for InferenceBlock {
    fn name(&self) -> &'static str {
        "inference_block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let filters = l2.dims().first().copied().unwrap_or(0);
        let inputs: usize = l1.dims().iter().product();
        if l2.dims() != [filters, g.channels, 3, 3]
            || !Self::applies(g, 2)
            || inputs != g.images * g.height * g.width * g.channels
            || l3.dims() != [2, filters]
        {
            return Err(candle_core::Error::Msg(format!(
                "inference_block: input {:?}, weight {:?} and parameters {:?} do not fit {} images of {}x{}x{} into {} filters by a 3x3 stride-1 convolution",
                l1.dims(), l2.dims(), l3.dims(), g.images, g.height, g.width, g.channels, filters
            )));
        }
        let pooled = (g.out_height() / 2) * (g.out_width() / 2);
        with_float!("inference_block", s1.dtype(), T => {
            let x = contiguous_slice::<T>(s1, l1, "inference_block")?;
            let w = contiguous_slice::<T>(s2, l2, "inference_block")?;
            let (a, b) = contiguous_slice::<T>(s3, l3, "inference_block")?.split_at(filters);
            let u = winograd::transformed_weights(w, Filters, 1, g.channels, filters);
            let parts = independent_chunks(
                g.images,
                1,
                winograd::tiles_per_image(g),
                WINOGRAD_CHUNK_TILES,
            );
            let lengths: Vec<usize> = parts.iter().map(|c| c.2 * pooled * filters).collect();
            let out = filled_in_parallel(&lengths, |part, dst| {
                let (_, first, count) = parts[part];
                winograd::convolve_and_pool_images(g, x, &u, (a, b), (first, count), dst);
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from((g.images * pooled, filters))))
        })
    }
}
