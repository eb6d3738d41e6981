//! The first block of a convolutional network (convolution, batch-norm, max-pooling and ReLU)
//! as one graph node, for when its input needs no gradient (the images themselves) and its
//! patches are short (a few input channels).
//!
//! That block's convolution output is the network's largest tensor: for Conv-4 on 28×28 grey
//! images, 64 channels at full resolution, 16 times the block's pooled output. The separate
//! kernels write it, read it for the statistics, read it to pool, keep it for the backward pass,
//! and write and read its gradient. Here it exists one image at a time, in cache:
//! - the batch statistics come from the patches' sums `S` and Gram matrix `G` (`k·k·c` square):
//!   for `y = p·w`, the mean is `S·w / n` and the second moment `wᵀ G w / n`;
//! - the forward and backward passes recompute each image's convolution (a few multiply-adds
//!   per output) and pool it;
//! - the weight gradient is the sparse part at the pooling winners, one small product per image,
//!   plus the dense centring part of batch-norm's gradient, `k1·y + k0` per channel, whose
//!   product with the patches is `k1·(G w) + k0·S` and needs no pass over the images.
//!
//! Like the other fused kernels its backward pass is first-order only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::conv::{im2col_into, ConvGeometry};
use crate::conv_pool;
use crate::fused::BnPoolRelu;
use crate::gemm::gemm_into;
use crate::parallel::{filled_in_parallel, REDUCTION_GROUPS};
use crate::{contiguous_slice, parameter_gradient, to_f64s, vectorized, with_data, with_float};

/// The longest patch (`k·k·c`) the first-block kernel takes: beyond it, recomputing the
/// convolution costs more than keeping its output.
pub const MAX_PATCH: usize = 32;

/// Per task, the sums and Gram matrix of the convolution's patch rows, shifted by the task's
/// per-channel input mean so that the moments derived from them keep their precision.
#[derive(Clone, Debug)]
pub struct PatchMoments {
    /// Patch length `k·k·c`.
    pub kc: usize,
    /// Patch rows per task.
    pub rows: usize,
    /// `[tasks·kc]`: the value subtracted from each patch entry (its channel's mean).
    pub shift: Vec<f64>,
    /// `[tasks·kc]`: Σ over rows of the shifted patch.
    pub sums: Vec<f64>,
    /// `[tasks·kc·kc]`: Σ over rows of the shifted patch's outer product with itself.
    pub gram: Vec<f64>,
}

impl PatchMoments {
    /// The moments of the patches of `x` (image rows, `tasks` equal groups of images).
    pub fn of<T: WithDType>(g: &ConvGeometry, x: &[T], tasks: usize) -> Self {
        let (kc, c) = (g.patch_len(), g.channels);
        let per_task = g.images / tasks;
        let pixels = g.out_height() * g.out_width();
        let image_len = g.height * g.width * c;
        let mut shift = Vec::with_capacity(tasks * kc);
        for t in 0..tasks {
            let data = &x[t * per_task * image_len..(t + 1) * per_task * image_len];
            let mut mean = vec![0f64; c];
            for row in data.chunks_exact(c) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v.to_f64();
                }
            }
            let count = (data.len() / c).max(1) as f64;
            for _ in 0..g.kernel * g.kernel {
                shift.extend(mean.iter().map(|m| m / count));
            }
        }
        let group_len = g.images.div_ceil(REDUCTION_GROUPS).max(1);
        // Groups never cross a task: one group list per task, summed in order.
        let (mut sums, mut gram) = (vec![0f64; tasks * kc], vec![0f64; tasks * kc * kc]);
        for t in 0..tasks {
            let shift_t: Vec<T> = shift[t * kc..(t + 1) * kc]
                .iter()
                .map(|&s| T::from_f64(s))
                .collect();
            let images: Vec<usize> = (t * per_task..(t + 1) * per_task).collect();
            let partials: Vec<(Vec<f64>, Vec<f64>)> = images
                .par_chunks(group_len)
                .map(|group| {
                    let (mut s, mut q) = (vec![0f64; kc], vec![0f64; kc * kc]);
                    let mut cols = vec![T::zero(); pixels * kc];
                    let mut image_gram = vec![T::zero(); kc * kc];
                    for &image in group {
                        vectorized!(im2col_into(g, x, image, 1, &mut cols));
                        let mut image_sums = vec![T::zero(); kc];
                        for row in cols.chunks_exact_mut(kc) {
                            for ((v, &sh), sum) in row.iter_mut().zip(&shift_t).zip(&mut image_sums)
                            {
                                *v -= sh;
                                *sum += *v;
                            }
                        }
                        // Safety: cols is pixels×kc, image_gram kc×kc.
                        unsafe {
                            gemm_into(
                                (kc, kc, pixels),
                                image_gram.as_mut_ptr(),
                                kc,
                                false,
                                (cols.as_ptr(), 1, kc),
                                (cols.as_ptr(), kc, 1),
                            )
                        }
                        for (acc, v) in s.iter_mut().zip(&image_sums) {
                            *acc += v.to_f64();
                        }
                        for (acc, v) in q.iter_mut().zip(&image_gram) {
                            *acc += v.to_f64();
                        }
                    }
                    (s, q)
                })
                .collect();
            for (s, q) in partials {
                for (acc, v) in sums[t * kc..].iter_mut().zip(s) {
                    *acc += v;
                }
                for (acc, v) in gram[t * kc * kc..].iter_mut().zip(q) {
                    *acc += v;
                }
            }
        }
        Self {
            kc,
            rows: per_task * pixels,
            shift,
            sums,
            gram,
        }
    }

    fn tasks(&self) -> usize {
        self.sums.len() / self.kc.max(1)
    }

    /// Per task and filter, the mean and biased variance of the convolution output `p·w`, for
    /// the weight `w` (`[tasks][kc][filters]`, or one `[kc][filters]` for all tasks).
    pub fn output_moments(&self, w: &[f64], filters: usize) -> (Vec<f64>, Vec<f64>) {
        let (tasks, kc, n) = (self.tasks(), self.kc, self.rows as f64);
        let (mut means, mut vars) = (Vec::new(), Vec::new());
        for t in 0..tasks {
            let wt = task_weight(w, t, kc, filters);
            for f in 0..filters {
                let column = |k: usize| wt[k * filters + f];
                let (s, sh, gram) = self.task(t);
                let shifted_mean = (0..kc).map(|k| s[k] * column(k)).sum::<f64>() / n;
                let second = (0..kc)
                    .map(|k| column(k) * (0..kc).map(|j| gram[k * kc + j] * column(j)).sum::<f64>())
                    .sum::<f64>()
                    / n;
                let offset: f64 = (0..kc).map(|k| sh[k] * column(k)).sum();
                means.push(shifted_mean + offset);
                vars.push((second - shifted_mean * shifted_mean).max(0.0));
            }
        }
        (means, vars)
    }

    /// Task `t`'s sums, shift and Gram matrix.
    fn task(&self, t: usize) -> (&[f64], &[f64], &[f64]) {
        let kc = self.kc;
        (
            &self.sums[t * kc..(t + 1) * kc],
            &self.shift[t * kc..(t + 1) * kc],
            &self.gram[t * kc * kc..(t + 1) * kc * kc],
        )
    }
}

/// Task `t`'s `[kc][filters]` block of a weight that is per task or shared.
fn task_weight<T>(w: &[T], t: usize, kc: usize, filters: usize) -> &[T] {
    let len = kc * filters;
    if w.len() > len {
        &w[t * len..(t + 1) * len]
    } else {
        &w[..len]
    }
}

/// Convolution (no bias: batch-norm cancels it), batch-norm, max-pooling and ReLU of the
/// images `input`: `(w, gamma, beta)` → pooled rows. `w` is `[kc, filters]` or
/// `[tasks, kc, filters]`; `gamma`, `beta` and the statistics follow [`BnPoolRelu`], whose
/// pooling geometry describes the convolution's output.
#[derive(Clone, Debug)]
pub struct ConvBnPoolRelu {
    /// The convolution.
    pub conv: ConvGeometry,
    /// Batch-norm, pooling and ReLU of the convolution's output.
    pub bn: BnPoolRelu,
    /// The images as contiguous rows `[.., images·h·w, c]`; they get no gradient.
    pub input: Tensor,
    /// The patches' moments; needed with batch statistics.
    pub patches: Option<PatchMoments>,
}

/// Per-image scratch buffers, allocated once per group of images.
struct Scratch<T> {
    cols: Vec<T>,
    y: Vec<T>,
}

impl ConvBnPoolRelu {
    fn filters(&self) -> usize {
        self.bn.pool.channels
    }

    fn scratch<T: WithDType>(&self) -> Scratch<T> {
        let pixels = self.conv.out_height() * self.conv.out_width();
        Scratch {
            cols: vec![T::zero(); pixels * self.conv.patch_len()],
            y: vec![T::zero(); pixels * self.filters()],
        }
    }

    /// The geometry for [`conv_pool::convolve_and_pool`], which serves 2×2 pooling of a
    /// stride-1 convolution.
    fn pooling_window(&self) -> Option<conv_pool::Window> {
        let (g, pool) = (&self.conv, &self.bn.pool);
        (g.stride == 1 && pool.size == 2).then(|| conv_pool::Window {
            padded_row: (g.width + 2 * g.padding) * g.channels,
            channels: g.channels,
            kernel: g.kernel,
            pooled: (pool.out_height(), pool.out_width()),
            filters: self.filters(),
        })
    }

    /// Values in one padded image: its rows with `padding` zeros on every side.
    fn padded_len(&self) -> usize {
        let g = &self.conv;
        (g.height + 2 * g.padding) * (g.width + 2 * g.padding) * g.channels
    }

    /// Copies image `image` into the inside of `padded` (whose border stays zero).
    fn pad_into<T: WithDType>(&self, x: &[T], image: usize, padded: &mut [T]) {
        let g = &self.conv;
        let row = g.width * g.channels;
        let padded_row = (g.width + 2 * g.padding) * g.channels;
        for y in 0..g.height {
            let src = &x[(image * g.height + y) * row..][..row];
            padded[(y + g.padding) * padded_row + g.padding * g.channels..][..row]
                .copy_from_slice(src);
        }
    }

    /// Convolves image `image` into `s.y`.
    #[inline(always)]
    fn convolve<T: WithDType>(&self, x: &[T], w: &[T], image: usize, s: &mut Scratch<T>) {
        let (kc, f) = (self.conv.patch_len(), self.filters());
        let pixels = self.conv.out_height() * self.conv.out_width();
        let task = image / (self.conv.images / self.bn.tasks());
        im2col_into(&self.conv, x, image, 1, &mut s.cols);
        let wt = task_weight(w, task, kc, f);
        // Safety: cols is pixels×kc, wt kc×f, y pixels×f.
        unsafe {
            gemm_into(
                (pixels, f, kc),
                s.y.as_mut_ptr(),
                f,
                false,
                (s.cols.as_ptr(), kc, 1),
                (wt.as_ptr(), f, 1),
            )
        }
    }

    fn forward<T: WithDType>(&self, x: &[T], w: &[T], gamma: &[f64], beta: &[f64]) -> Vec<T> {
        let pool = &self.bn.pool;
        let per_image = pool.out_height() * pool.out_width() * pool.channels;
        let per_task = self.conv.images / self.bn.tasks();
        let affine = self.bn.affine::<T>(gamma, beta);
        let images = self.conv.images;
        let group_len = images.div_ceil(4 * rayon::current_num_threads()).max(1);
        let lengths: Vec<usize> = (0..images)
            .step_by(group_len)
            .map(|first| (images - first).min(group_len) * per_image)
            .collect();
        let window = self.pooling_window();
        filled_in_parallel(&lengths, |group, dst| {
            if let Some(window) = window.filter(|_| conv_pool::serves::<T>(self.filters())) {
                let (kc, f) = (self.conv.patch_len(), self.filters());
                let mut padded = vec![T::zero(); self.padded_len()];
                for (i, dst) in dst.chunks_exact_mut(per_image).enumerate() {
                    let image = group * group_len + i;
                    let task = image / per_task;
                    let affine = &affine[task];
                    self.pad_into(x, image, &mut padded);
                    let w = task_weight(w, task, kc, f);
                    let served = conv_pool::convolve_and_pool(
                        &window,
                        &padded,
                        w,
                        (&affine.a, &affine.b),
                        dst,
                    );
                    debug_assert!(served, "conv_pool::serves was checked");
                }
                return;
            }
            let mut s = self.scratch::<T>();
            for (i, dst) in dst.chunks_exact_mut(per_image).enumerate() {
                let image = group * group_len + i;
                vectorized!({
                    self.convolve(x, w, image, &mut s);
                    self.bn
                        .pooled_values(&s.y, 0, &affine[image / per_task], dst);
                });
            }
        })
    }

    /// Gradients of `w`, `gamma` and `beta`.
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        gamma: &[f64],
        beta: &[f64],
        grad: &[T],
    ) -> (Vec<T>, Vec<f64>, Vec<f64>) {
        let (kc, f) = (self.conv.patch_len(), self.filters());
        let tasks = self.bn.tasks();
        let per_task = self.conv.images / tasks;
        let pool = &self.bn.pool;
        let pooled_len = pool.out_height() * pool.out_width() * f;
        let pixels = self.conv.out_height() * self.conv.out_width();
        let affine = self.bn.affine::<T>(gamma, beta);
        // One pass over the images: per task and filter Σ dz and Σ dz·ŷ over the winners
        // (dz = incoming gradient where ReLU passes it), and the weight gradient of the sparse
        // part a·dz at the winners. Fixed groups summed in order: deterministic.
        let group_len = self.conv.images.div_ceil(REDUCTION_GROUPS).max(1);
        let zero = || {
            (
                vec![0f64; tasks * f],
                vec![0f64; tasks * f],
                vec![T::zero(); w.len()],
            )
        };
        let images: Vec<usize> = (0..self.conv.images).collect();
        let partials: Vec<_> = images
            .par_chunks(group_len)
            .map(|group| {
                let (mut s1, mut s2, mut dw) = zero();
                let mut s = self.scratch::<T>();
                let mut dy = vec![T::zero(); pixels * f];
                let (mut at, mut z) = (vec![0u32; pooled_len], vec![T::zero(); pooled_len]);
                for &image in group {
                    let t = image / per_task;
                    vectorized!({
                        self.convolve(x, w, image, &mut s);
                        self.bn.winners(&s.y, 0, &affine[t], &mut at, &mut z);
                    });
                    let (mean, inv_std) = (&self.bn.mean[t * f..], &self.bn.inv_std[t * f..]);
                    let (sum1, sum2) = (&mut s1[t * f..(t + 1) * f], &mut s2[t * f..(t + 1) * f]);
                    dy.fill(T::zero());
                    let dz_image = &grad[image * pooled_len..(image + 1) * pooled_len];
                    let a = &affine[t].a[..f];
                    // Branch-free: whether ReLU passed a window's winner is as good as random.
                    // With a branch this loop took 50 of the pass's 88 ms per ProtoNet episode
                    // (one thread); without, 28 of 60. A blocked winner adds zero to the sums.
                    for ((at, z), dz) in at
                        .chunks_exact(f)
                        .zip(z.chunks_exact(f))
                        .zip(dz_image.chunks_exact(f))
                    {
                        for ch in 0..f {
                            let passed = z[ch] > T::zero();
                            let d = if passed { dz[ch] } else { T::zero() };
                            let yhat = (s.y[at[ch] as usize].to_f64() - mean[ch]) * inv_std[ch];
                            sum1[ch] += if passed { d.to_f64() } else { 0.0 };
                            sum2[ch] += if passed { d.to_f64() * yhat } else { 0.0 };
                            // Windows do not overlap: each position is written at most once.
                            dy[at[ch] as usize] = a[ch] * d;
                        }
                    }
                    let dw_t = if w.len() > kc * f {
                        &mut dw[t * kc * f..]
                    } else {
                        &mut dw[..]
                    };
                    // Safety: cols is pixels×kc, dy pixels×f, dw_t at least kc×f.
                    unsafe {
                        gemm_into(
                            (kc, f, pixels),
                            dw_t.as_mut_ptr(),
                            f,
                            true,
                            (s.cols.as_ptr(), 1, kc),
                            (dy.as_ptr(), f, 1),
                        )
                    }
                }
                (s1, s2, dw)
            })
            .collect();
        let (sum_dz, sum_dz_yhat, mut dw) =
            partials
                .into_iter()
                .fold(zero(), |(mut a1, mut a2, mut a3), (b1, b2, b3)| {
                    a1.iter_mut().zip(b1).for_each(|(a, b)| *a += b);
                    a2.iter_mut().zip(b2).for_each(|(a, b)| *a += b);
                    a3.iter_mut().zip(b3).for_each(|(a, b)| *a += b);
                    (a1, a2, a3)
                });
        if let (true, Some(patches)) = (self.bn.batch_statistics, &self.patches) {
            self.add_centring_gradient(patches, w, gamma, &sum_dz, &sum_dz_yhat, &mut dw);
        }
        let (d_gamma, d_beta) = self
            .bn
            .parameter_gradients(gamma.len(), &sum_dz, &sum_dz_yhat);
        (dw, d_gamma, d_beta)
    }

    /// Adds the weight gradient of batch-norm's centring terms, `d y = k1·y + k0` per task and
    /// filter over all rows, as `k1·(G w) + k0·S` from the patch moments.
    fn add_centring_gradient<T: WithDType>(
        &self,
        patches: &PatchMoments,
        w: &[T],
        gamma: &[f64],
        sum_dz: &[f64],
        sum_dz_yhat: &[f64],
        dw: &mut [T],
    ) {
        let (kc, f) = (self.conv.patch_len(), self.filters());
        let n = patches.rows as f64;
        for t in 0..self.bn.tasks() {
            let (sums, shift, gram) = patches.task(t);
            let wt: Vec<f64> = task_weight(w, t, kc, f)
                .iter()
                .map(|v| v.to_f64())
                .collect();
            let shared = w.len() == kc * f;
            let dw_t = if shared {
                &mut dw[..]
            } else {
                &mut dw[t * kc * f..(t + 1) * kc * f]
            };
            for ch in 0..f {
                let (k1, k0) = self.bn.centring(t, ch, gamma, sum_dz, sum_dz_yhat);
                let column = |k: usize| wt[k * f + ch];
                // y = p'·w + u with p' the shifted patch and u = shift·w; for each patch entry
                // k, Σ p_k·y = (G w)_k + u·S_k + shift_k·(S·w) + n·shift_k·u and Σ p_k = S_k + n·shift_k.
                let u: f64 = (0..kc).map(|k| shift[k] * column(k)).sum();
                let s_w: f64 = (0..kc).map(|k| sums[k] * column(k)).sum();
                for k in 0..kc {
                    let gram_w: f64 = (0..kc).map(|j| gram[k * kc + j] * column(j)).sum();
                    let p_y = gram_w + u * sums[k] + shift[k] * s_w + n * shift[k] * u;
                    let p_sum = sums[k] + n * shift[k];
                    dw_t[k * f + ch] += T::from_f64(k1 * p_y + k0 * p_sum);
                }
            }
        }
    }

    fn check(&self, w: &[usize], gamma: &[usize], beta: &[usize]) -> candle_core::Result<Shape> {
        self.bn.check_statistics_and_params(gamma, beta)?;
        let (g, pool) = (&self.conv, &self.bn.pool);
        let tasks = self.bn.tasks();
        let f = pool.channels;
        let weight_ok = w == [g.patch_len(), f] || w == [tasks, g.patch_len(), f];
        let pool_ok =
            pool.images == g.images && pool.height == g.out_height() && pool.width == g.out_width();
        let stats_ok = !self.bn.batch_statistics || self.patches.is_some();
        if !weight_ok
            || !pool_ok
            || !stats_ok
            || self.input.elem_count() != g.images * g.height * g.width * g.channels
        {
            return Err(candle_core::Error::Msg(format!(
                "conv_bn_pool_relu: weight {w:?} and input {:?} do not fit {g:?} and {pool:?}",
                self.input.dims()
            )));
        }
        let mut out = self.input.dims().to_vec();
        let r = out.len();
        out[r - 2] = out[r - 2] / (g.height * g.width) * (pool.out_height() * pool.out_width());
        out[r - 1] = f;
        Ok(Shape::from(out))
    }
}

impl CustomOp3 for ConvBnPoolRelu {
    fn name(&self) -> &'static str {
        "conv_bn_pool_relu"
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
        with_float!("conv_bn_pool_relu", s1.dtype(), T => {
            let w = contiguous_slice::<T>(s1, l1, "conv_bn_pool_relu")?;
            let gamma = to_f64s(contiguous_slice::<T>(s2, l2, "conv_bn_pool_relu")?);
            let beta = to_f64s(contiguous_slice::<T>(s3, l3, "conv_bn_pool_relu")?);
            let out = with_data::<T, _>(&self.input, |x| self.forward(x, w, &gamma, &beta))?;
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(
        &self,
        w: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        with_float!("conv_bn_pool_relu", w.dtype(), T => {
            let gamma_v = with_data::<T, _>(gamma, to_f64s)?;
            let beta_v = with_data::<T, _>(beta, to_f64s)?;
            let (dw, dg, db) = with_data::<T, _>(&self.input, |x| {
                with_data::<T, _>(w, |ws| {
                    with_data::<T, _>(grad, |gs| self.backward(x, ws, &gamma_v, &beta_v, gs))
                })
            })???;
            Ok((
                Some(Tensor::from_vec(dw, w.shape(), w.device())?),
                Some(parameter_gradient(dg, gamma)?),
                Some(parameter_gradient(db, beta)?),
            ))
        })
    }
}
