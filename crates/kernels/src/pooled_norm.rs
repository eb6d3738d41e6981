//! Batch-norm (batch statistics), 2×2-style max-pooling and ReLU of the differentiable path as
//! a small family of ops, so that second-order MAML's graphs hold a few nodes per block
//! instead of a dozen full-resolution candle operations and their accumulations.
//!
//! With the window winners fixed (taken on the batch-norm output, outside the graph), the block
//! is `out = relu(p·a + b)` on the pooled convolution output `p`, where per task and channel
//! `a = γ/√(σ² + ε)` and `b = β − μ·a`, and `μ`, `σ²` are the moments of the full-resolution
//! output `y`. Two forward ops carry it:
//! - [`Select`] `y → s`: the winners of `y` and its moments, packed as `[.., pooled rows + 2, c]`
//!   (the last two rows are `μ` and `σ²`), so that `y` has one consumer in the graph;
//! - [`AffineRelu`] `(s, θ) → out`, with `θ = [γ; β]` as `[.., 2, c]`.
//!
//! Their backward passes are the ops [`Restore`] (`A`ᵀ: scatter plus the moments' derivative)
//! and [`AffineReluInput`] / [`AffineReluParams`], graph nodes again, so the inner loop's
//! gradient can be differentiated. The backward passes of those three are written here as plain
//! loops that return tensors without a graph: second order is exact, a third derivative is
//! refused with candle's "no backward" error.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::norm::moments;
use crate::pool::PoolGeometry;
use crate::{contiguous_slice, with_float};

/// The fixed part of one block: geometry, task count, window winners and moments.
#[derive(Clone, Debug)]
pub struct PooledNorm {
    /// Pooling geometry over all tasks' images.
    pub pool: PoolGeometry,
    /// Tasks (groups of rows with their own statistics); 1 for a plain batch.
    pub groups: usize,
    /// Batch-norm's ε.
    pub eps: f64,
    /// Per pooled element (all groups, row-major), the flat index of its window's winner in `y`.
    winners: Arc<Vec<u32>>,
    /// Per group and channel, the mean and biased variance of `y`.
    mean: Arc<Vec<f64>>,
    var: Arc<Vec<f64>>,
}

/// `y [.., rows, c] → s [.., pooled rows + 2, c]`: the winners, then the mean and variance rows.
#[derive(Clone, Debug)]
pub struct Select(pub PooledNorm);

/// `(g_s, y, s) → g_y`: the adjoint of [`Select`] at `y`, `scatter(g_p) + g_μ/n + 2/n·g_σ²·(y − μ)`.
#[derive(Clone, Debug)]
pub struct Restore(pub PooledNorm);

/// `(s, θ) → relu(p·a + b)`.
#[derive(Clone, Debug)]
pub struct AffineRelu(pub PooledNorm);

/// `(g, s, θ) → g_s`: the gradient of [`AffineRelu`] with respect to `s`.
#[derive(Clone, Debug)]
pub struct AffineReluInput(pub PooledNorm);

/// `(g, s, θ) → g_θ`: the gradient of [`AffineRelu`] with respect to `θ`.
#[derive(Clone, Debug)]
pub struct AffineReluParams(pub PooledNorm);

/// Per channel of one group: the affine map and what its derivatives need.
struct Channel {
    mu: f64,
    /// `1/√(σ² + ε)`.
    r: f64,
    gamma: f64,
    /// `γ·r`.
    a: f64,
    /// `β − μ·a`.
    b: f64,
}

impl Channel {
    /// `∂a/∂σ² = −γ·r³/2`.
    fn q(&self) -> f64 {
        -0.5 * self.gamma * self.r * self.r * self.r
    }
}

fn channels<T: WithDType>(s: &[T], theta: &[T], pooled: usize, c: usize, eps: f64) -> Vec<Channel> {
    (0..c)
        .map(|ch| {
            let mu = s[pooled * c + ch].to_f64();
            let var = s[(pooled + 1) * c + ch].to_f64();
            let (gamma, beta) = (theta[ch].to_f64(), theta[c + ch].to_f64());
            let r = 1.0 / (var + eps).sqrt();
            let a = gamma * r;
            Channel {
                mu,
                r,
                gamma,
                a,
                b: beta - mu * a,
            }
        })
        .collect()
}

impl PooledNorm {
    /// Takes the moments of `y` (`[groups, rows, c]` or `[rows, c]`, no gradient needed) and the
    /// winners of the batch-norm output `y·a + b` with `γ`, `β` (`[groups, c]` or `[c]`).
    pub fn new(
        pool: PoolGeometry,
        y: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> candle_core::Result<Self> {
        let groups = if y.rank() == 3 { y.dim(0)? } else { 1 };
        let c = pool.channels;
        let rows = pool.images / groups * pool.height * pool.width;
        if y.elem_count() != groups * rows * c || !pool.images.is_multiple_of(groups) {
            return Err(candle_core::Error::Msg(format!(
                "pooled_norm: shape {:?} does not hold {groups} groups of {} images of {}x{}x{c}",
                y.dims(),
                pool.images / groups.max(1),
                pool.height,
                pool.width
            )));
        }
        let per_group = |t: &Tensor| -> candle_core::Result<Vec<f64>> {
            let v = t
                .to_dtype(candle_core::DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            match v.len() {
                n if n == c => Ok(v.repeat(groups)),
                n if n == groups * c => Ok(v),
                n => Err(candle_core::Error::Msg(format!(
                    "pooled_norm: {n} batch-norm parameters for {groups} groups of {c} channels"
                ))),
            }
        };
        let (gamma, beta) = (per_group(gamma)?, per_group(beta)?);
        let y = y.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(candle_core::Error::Msg(
                "pooled_norm: CPU tensors only".into(),
            ));
        };
        let (mean, var, winners) = with_float!("pooled_norm", cpu.dtype(), T => {
            let y = contiguous_slice::<T>(cpu, layout, "pooled_norm")?;
            let (mean, var) = moments(y, groups, rows, c);
            let a: Vec<T> = (0..groups * c)
                .map(|i| T::from_f64(gamma[i] / (var[i] + eps).sqrt()))
                .collect();
            let b: Vec<T> = (0..groups * c)
                .map(|i| T::from_f64(beta[i]) - T::from_f64(mean[i]) * a[i])
                .collect();
            Ok::<_, candle_core::Error>((mean, var, window_winners(&pool, groups, y, &a, &b)))
        })?;
        Ok(Self {
            pool,
            groups,
            eps,
            winners: Arc::new(winners),
            mean: Arc::new(mean),
            var: Arc::new(var),
        })
    }

    /// Rows of `y` per group.
    fn rows(&self) -> usize {
        self.pool.images / self.groups * self.pool.height * self.pool.width
    }

    /// Pooled rows per group.
    fn pooled(&self) -> usize {
        self.pool.images / self.groups * self.pool.out_height() * self.pool.out_width()
    }

    /// The shape of `y` with `rows` rows per group.
    fn shape(&self, rows: usize) -> Shape {
        if self.groups > 1 {
            Shape::from((self.groups, rows, self.pool.channels))
        } else {
            Shape::from((rows, self.pool.channels))
        }
    }

    /// Per group, the channel-wise mean and biased variance of `y`.
    pub fn moments(&self) -> (&[f64], &[f64]) {
        (&self.mean, &self.var)
    }

    /// `relu(batch-norm(y))` pooled: the block's output `[.., pooled rows, c]`, differentiable
    /// twice in `y`, `gamma` and `beta`.
    pub fn forward(
        &self,
        y: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let s = y.contiguous()?.apply_op1(Select(self.clone()))?;
        let theta = Tensor::stack(&[gamma, beta], gamma.rank() - 1)?;
        s.apply_op2(&theta.contiguous()?, AffineRelu(self.clone()))
    }

    fn check(&self, op: &str, name: &str, dims: &[usize], rows: usize) -> candle_core::Result<()> {
        let c = self.pool.channels;
        if dims.iter().product::<usize>() != self.groups * rows * c || dims.last() != Some(&c) {
            return Err(candle_core::Error::Msg(format!(
                "{op}: {name} has shape {dims:?}, expected {} groups of {rows} rows of {c} channels",
                self.groups
            )));
        }
        Ok(())
    }

    /// Checks the `(g, s, θ)` arguments of the ops that take [`AffineRelu`]'s gradient;
    /// returns `θ`'s groups.
    fn check_gradient_args(
        &self,
        op: &str,
        [g, s, theta]: [&Layout; 3],
    ) -> candle_core::Result<usize> {
        self.check(op, "the gradient", g.dims(), self.pooled())?;
        self.check(op, "the statistics", s.dims(), self.pooled() + 2)?;
        self.theta_groups(op, theta.dims())
    }

    /// `θ`'s groups: one shared by all, or one per group.
    fn theta_groups(&self, op: &str, dims: &[usize]) -> candle_core::Result<usize> {
        let n: usize = dims.iter().product();
        let c = self.pool.channels;
        if n == 2 * c {
            Ok(1)
        } else if n == 2 * c * self.groups {
            Ok(self.groups)
        } else {
            Err(candle_core::Error::Msg(format!(
                "{op}: batch-norm parameters of shape {dims:?} for {} groups of {c} channels",
                self.groups
            )))
        }
    }
}

/// The flat index of each window's winner of `y·a + b` (first maximum in row-major order).
fn window_winners<T: WithDType>(
    g: &PoolGeometry,
    groups: usize,
    y: &[T],
    a: &[T],
    b: &[T],
) -> Vec<u32> {
    let (oh, ow, c, s) = (g.out_height(), g.out_width(), g.channels, g.size);
    let images_per_group = g.images / groups;
    let mut out = vec![0u32; g.images * oh * ow * c];
    out.par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (image, oy) = (row / oh, row % oh);
            let group = image / images_per_group;
            let (a, b) = (&a[group * c..][..c], &b[group * c..][..c]);
            let mut best = vec![T::zero(); c];
            for ox in 0..ow {
                let win = &mut dst[ox * c..][..c];
                let first = ((image * g.height + oy * s) * g.width + ox * s) * c;
                for ch in 0..c {
                    best[ch] = y[first + ch] * a[ch] + b[ch];
                    win[ch] = (first + ch) as u32;
                }
                // Selects rather than branches: which position wins is as good as random.
                for at in (0..s * s)
                    .skip(1)
                    .map(|i| first + ((i / s) * g.width + i % s) * c)
                {
                    for ch in 0..c {
                        let z = y[at + ch] * a[ch] + b[ch];
                        let better = z > best[ch];
                        best[ch] = if better { z } else { best[ch] };
                        win[ch] = if better { (at + ch) as u32 } else { win[ch] };
                    }
                }
            }
        });
    out
}

/// A tensor's contiguous CPU data as a slice of `T`, within `$body`.
macro_rules! with_slices {
    ($op:expr, $t:ident, [$($name:ident = $tensor:expr),+] => $body:expr) => {{
        $(let $name = $tensor.contiguous()?;)+
        let dtype = [$(&$name),+][0].dtype();
        $(let $name = $name.storage_and_layout();)+
        with_float!($op, dtype, $t => {
            $(let $name = match &*$name.0 {
                Storage::Cpu(cpu) => contiguous_slice::<$t>(cpu, $name.1, $op)?,
                _ => return Err(candle_core::Error::Msg(format!("{}: CPU tensors only", $op))),
            };)+
            $body
        })
    }};
}

/// A derivative computed by the loops here, as a tensor. Where `grad` keeps a graph (a
/// third-order pass), the result is a node whose backward pass is candle's "not supported"
/// error rather than a silent constant.
fn tensor<T: WithDType>(v: Vec<T>, shape: Shape, grad: &Tensor) -> candle_core::Result<Tensor> {
    if !grad.track_op() {
        return Tensor::from_vec(v, shape, grad.device());
    }
    let computed = Computed(std::sync::Mutex::new(Some((
        T::to_cpu_storage_owned(v),
        shape,
    ))));
    grad.apply_op1(computed)
}

/// Hands over a precomputed result once; it has no backward pass.
struct Computed(std::sync::Mutex<Option<(CpuStorage, Shape)>>);

impl CustomOp1 for Computed {
    fn name(&self) -> &'static str {
        "pooled_norm_third_order"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("pooled_norm: poisoned result".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("pooled_norm: result taken twice".into()))
    }
}

impl CustomOp1 for Select {
    fn name(&self) -> &'static str {
        "pooled_norm_select"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = &self.0;
        n.check(self.name(), "y", l.dims(), n.rows())?;
        let (c, pooled) = (n.pool.channels, n.pooled());
        with_float!(self.name(), s.dtype(), T => {
            let y = contiguous_slice::<T>(s, l, self.name())?;
            let mut out = Vec::with_capacity(n.groups * (pooled + 2) * c);
            for g in 0..n.groups {
                let winners = &n.winners[g * pooled * c..][..pooled * c];
                out.extend(winners.iter().map(|&w| y[w as usize]));
                out.extend(n.mean[g * c..][..c].iter().map(|&v| T::from_f64(v)));
                out.extend(n.var[g * c..][..c].iter().map(|&v| T::from_f64(v)));
            }
            Ok((T::to_cpu_storage_owned(out), n.shape(pooled + 2)))
        })
    }

    fn bwd(&self, y: &Tensor, s: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op3(
            &y.contiguous()?,
            s,
            Restore(self.0.clone()),
        )?))
    }
}

impl CustomOp3 for Restore {
    fn name(&self) -> &'static str {
        "pooled_norm_restore"
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
        let n = &self.0;
        let (c, rows, pooled) = (n.pool.channels, n.rows(), n.pooled());
        n.check(self.name(), "the gradient", l1.dims(), pooled + 2)?;
        n.check(self.name(), "y", l2.dims(), rows)?;
        n.check(self.name(), "the statistics", l3.dims(), pooled + 2)?;
        with_float!(self.name(), s1.dtype(), T => {
            let gs = contiguous_slice::<T>(s1, l1, self.name())?;
            let y = contiguous_slice::<T>(s2, l2, self.name())?;
            let s = contiguous_slice::<T>(s3, l3, self.name())?;
            let mut out = vec![T::from_f64(0.0); n.groups * rows * c];
            out.par_chunks_mut(rows * c).enumerate().for_each(|(g, dy)| {
                let (gs, s) = (&gs[g * (pooled + 2) * c..], &s[g * (pooled + 2) * c..]);
                let (y, base) = (&y[g * rows * c..][..rows * c], g * rows * c);
                let scale = 2.0 / rows as f64;
                let k1: Vec<T> = (0..c)
                    .map(|ch| T::from_f64(scale * gs[(pooled + 1) * c + ch].to_f64()))
                    .collect();
                let k0: Vec<T> = (0..c)
                    .map(|ch| {
                        let mu = s[pooled * c + ch].to_f64();
                        T::from_f64(gs[pooled * c + ch].to_f64() / rows as f64
                            - scale * gs[(pooled + 1) * c + ch].to_f64() * mu)
                    })
                    .collect();
                for (d, y) in dy.chunks_exact_mut(c).zip(y.chunks_exact(c)) {
                    for ch in 0..c {
                        d[ch] = y[ch] * k1[ch] + k0[ch];
                    }
                }
                let winners = &n.winners[g * pooled * c..][..pooled * c];
                for (&w, &gp) in winners.iter().zip(&gs[..pooled * c]) {
                    dy[w as usize - base] += gp;
                }
            });
            Ok((T::to_cpu_storage_owned(out), n.shape(rows)))
        })
    }

    fn bwd(
        &self,
        gs: &Tensor,
        y: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = &self.0;
        let (c, rows, pooled) = (n.pool.channels, n.rows(), n.pooled());
        let scale = 2.0 / rows as f64;
        with_slices!(self.name(), T, [h = grad, gsv = gs, yv = y, sv = s] => {
            let mut d_gs = vec![T::from_f64(0.0); n.groups * (pooled + 2) * c];
            let mut d_y = vec![T::from_f64(0.0); n.groups * rows * c];
            let mut d_s = vec![T::from_f64(0.0); n.groups * (pooled + 2) * c];
            d_gs.par_chunks_mut((pooled + 2) * c)
                .zip(d_y.par_chunks_mut(rows * c))
                .zip(d_s.par_chunks_mut((pooled + 2) * c))
                .enumerate()
                .for_each(|(g, ((d_gs, d_y), d_s))| {
                    let (gs, s) = (&gsv[g * (pooled + 2) * c..], &sv[g * (pooled + 2) * c..]);
                    let (h, y, base) = (&h[g * rows * c..][..rows * c], &yv[g * rows * c..][..rows * c], g * rows * c);
                    let winners = &n.winners[g * pooled * c..][..pooled * c];
                    for (d, &w) in d_gs[..pooled * c].iter_mut().zip(winners) {
                        *d = h[w as usize - base];
                    }
                    let k: Vec<T> = (0..c)
                        .map(|ch| T::from_f64(scale * gs[(pooled + 1) * c + ch].to_f64()))
                        .collect();
                    let mu: Vec<T> = (0..c).map(|ch| s[pooled * c + ch]).collect();
                    let (mut sum_h, mut sum_hy) = (vec![0f64; c], vec![0f64; c]);
                    for ((d, h), y) in d_y.chunks_exact_mut(c).zip(h.chunks_exact(c)).zip(y.chunks_exact(c)) {
                        for ch in 0..c {
                            d[ch] = h[ch] * k[ch];
                            sum_h[ch] += h[ch].to_f64();
                            sum_hy[ch] += (h[ch] * (y[ch] - mu[ch])).to_f64();
                        }
                    }
                    for ch in 0..c {
                        d_gs[pooled * c + ch] = T::from_f64(sum_h[ch] / rows as f64);
                        d_gs[(pooled + 1) * c + ch] = T::from_f64(scale * sum_hy[ch]);
                        d_s[pooled * c + ch] = T::from_f64(-k[ch].to_f64() * sum_h[ch]);
                    }
                });
            Ok((
                Some(tensor(d_gs, n.shape(pooled + 2), grad)?),
                Some(tensor(d_y, n.shape(rows), grad)?),
                Some(tensor(d_s, n.shape(pooled + 2), grad)?),
            ))
        })
    }
}

/// Per-channel sums over one group's pooled rows of `m·g` and `m·g·(p − μ)`, where `m` is ReLU's
/// pass mask `p·a + b > 0`; `visit(row_offset, ch, m)` sees every element's mask on the way,
/// as 1 or 0 to multiply by: the mask is as good as random, so branches on it mispredict.
fn masked_sums<T: WithDType>(
    g: &[T],
    p: &[T],
    ch_params: &[Channel],
    mut visit: impl FnMut(usize, usize, T),
) -> (Vec<f64>, Vec<f64>) {
    let c = ch_params.len();
    let a: Vec<T> = ch_params.iter().map(|k| T::from_f64(k.a)).collect();
    let b: Vec<T> = ch_params.iter().map(|k| T::from_f64(k.b)).collect();
    let mu: Vec<T> = ch_params.iter().map(|k| T::from_f64(k.mu)).collect();
    let (one, zero) = (T::one(), T::zero());
    let (mut sum_g, mut sum_gp) = (vec![0f64; c], vec![0f64; c]);
    for (i, (g, p)) in g.chunks_exact(c).zip(p.chunks_exact(c)).enumerate() {
        for ch in 0..c {
            let m = if p[ch] * a[ch] + b[ch] > zero {
                one
            } else {
                zero
            };
            let mg = m * g[ch];
            sum_g[ch] += mg.to_f64();
            sum_gp[ch] += (mg * (p[ch] - mu[ch])).to_f64();
            visit(i * c, ch, m);
        }
    }
    (sum_g, sum_gp)
}

/// One group's part of the gradient ops' inputs: pooled rows `p`, incoming gradient `g`, and
/// the per-channel affine map with its means as `T`.
struct GroupView<'a, T> {
    p: &'a [T],
    g: &'a [T],
    channels: Vec<Channel>,
    mu: Vec<T>,
}

/// Runs `body(group, view, d_g, d_s)` on every group in parallel, with that group's chunks of
/// the zero-initialised gradients for `g` (`[.., pooled rows, c]`) and `s` (`[.., pooled rows
/// + 2, c]`); returns both gradients and the bodies' results in group order.
fn per_group_gradients<T: WithDType, R: Send>(
    n: &PooledNorm,
    theta_groups: usize,
    (g, s, theta): (&[T], &[T], &[T]),
    body: impl Fn(usize, &GroupView<T>, &mut [T], &mut [T]) -> R + Sync,
) -> (Vec<T>, Vec<T>, Vec<R>) {
    let (c, pooled) = (n.pool.channels, n.pooled());
    let mut d_g = vec![T::zero(); n.groups * pooled * c];
    let mut d_s = vec![T::zero(); n.groups * (pooled + 2) * c];
    let results = d_g
        .par_chunks_mut(pooled * c)
        .zip(d_s.par_chunks_mut((pooled + 2) * c))
        .enumerate()
        .map(|(grp, (d_g, d_s))| {
            let s = &s[grp * (pooled + 2) * c..][..(pooled + 2) * c];
            let theta = &theta[(grp % theta_groups) * 2 * c..];
            let channels = channels(s, theta, pooled, c, n.eps);
            let view = GroupView {
                p: &s[..pooled * c],
                g: &g[grp * pooled * c..][..pooled * c],
                mu: channels.iter().map(|k| T::from_f64(k.mu)).collect(),
                channels,
            };
            body(grp, &view, d_g, d_s)
        })
        .collect();
    (d_g, d_s, results)
}

impl CustomOp2 for AffineRelu {
    fn name(&self) -> &'static str {
        "pooled_norm_affine_relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = &self.0;
        let (c, pooled) = (n.pool.channels, n.pooled());
        n.check(self.name(), "the statistics", l1.dims(), pooled + 2)?;
        let tg = n.theta_groups(self.name(), l2.dims())?;
        with_float!(self.name(), s1.dtype(), T => {
            let s = contiguous_slice::<T>(s1, l1, self.name())?;
            let theta = contiguous_slice::<T>(s2, l2, self.name())?;
            let mut out = vec![T::from_f64(0.0); n.groups * pooled * c];
            out.par_chunks_mut(pooled * c).enumerate().for_each(|(g, out)| {
                let s = &s[g * (pooled + 2) * c..];
                let k = channels(s, &theta[(g % tg) * 2 * c..], pooled, c, n.eps);
                let a: Vec<T> = k.iter().map(|k| T::from_f64(k.a)).collect();
                let b: Vec<T> = k.iter().map(|k| T::from_f64(k.b)).collect();
                for (o, p) in out.chunks_exact_mut(c).zip(s[..pooled * c].chunks_exact(c)) {
                    for ch in 0..c {
                        let z = p[ch] * a[ch] + b[ch];
                        o[ch] = if z > T::from_f64(0.0) { z } else { T::from_f64(0.0) };
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(out), n.shape(pooled)))
        })
    }

    fn bwd(
        &self,
        s: &Tensor,
        theta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (s, theta) = (s.contiguous()?, theta.contiguous()?);
        let d_s = grad.apply_op3(&s, &theta, AffineReluInput(self.0.clone()))?;
        let d_theta = grad.apply_op3(&s, &theta, AffineReluParams(self.0.clone()))?;
        Ok((Some(d_s), Some(d_theta.reshape(theta.shape())?)))
    }
}

impl CustomOp3 for AffineReluInput {
    fn name(&self) -> &'static str {
        "pooled_norm_affine_relu_input"
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
        let n = &self.0;
        let (c, pooled) = (n.pool.channels, n.pooled());
        let tg = n.check_gradient_args(self.name(), [l1, l2, l3])?;
        with_float!(self.name(), s1.dtype(), T => {
            let g = contiguous_slice::<T>(s1, l1, self.name())?;
            let s = contiguous_slice::<T>(s2, l2, self.name())?;
            let theta = contiguous_slice::<T>(s3, l3, self.name())?;
            let mut out = vec![T::from_f64(0.0); n.groups * (pooled + 2) * c];
            out.par_chunks_mut((pooled + 2) * c).enumerate().for_each(|(grp, out)| {
                let s = &s[grp * (pooled + 2) * c..];
                let g = &g[grp * pooled * c..][..pooled * c];
                let k = channels(s, &theta[(grp % tg) * 2 * c..], pooled, c, n.eps);
                let a: Vec<T> = k.iter().map(|k| T::from_f64(k.a)).collect();
                let (sum_g, sum_gp) = masked_sums(g, &s[..pooled * c], &k, |i, ch, m| {
                    out[i + ch] = m * g[i + ch] * a[ch];
                });
                for ch in 0..c {
                    out[pooled * c + ch] = T::from_f64(-k[ch].a * sum_g[ch]);
                    out[(pooled + 1) * c + ch] = T::from_f64(k[ch].q() * sum_gp[ch]);
                }
            });
            Ok((T::to_cpu_storage_owned(out), n.shape(pooled + 2)))
        })
    }

    fn bwd(
        &self,
        g: &Tensor,
        s: &Tensor,
        theta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Output rows: a·m·g, −a·Σ m·g, q·Σ m·g·(p − μ); `grad` is (k_p, k_μ, k_σ²).
        let n = &self.0;
        let (c, pooled) = (n.pool.channels, n.pooled());
        let tg = n.theta_groups(self.name(), theta.dims())?;
        with_slices!(self.name(), T, [kv = grad, gv = g, sv = s, tv = theta] => {
            let (d_g, d_s, d_theta) = per_group_gradients(n, tg, (gv, sv, tv), |grp, view, d_g, d_s| {
                let k = &kv[grp * (pooled + 2) * c..];
                let (p, g, mu, ch_params) = (view.p, view.g, &view.mu, &view.channels);
                let f = |v: f64| T::from_f64(v);
                let a: Vec<T> = ch_params.iter().map(|p| f(p.a)).collect();
                let k_mu: Vec<T> = (0..c).map(|ch| k[pooled * c + ch]).collect();
                let k_var: Vec<T> = (0..c).map(|ch| k[(pooled + 1) * c + ch]).collect();
                let q: Vec<T> = ch_params.iter().map(|p| f(p.q())).collect();
                let mut sum_kpg = vec![0f64; c];
                let (sum_g, sum_gp) = masked_sums(g, p, ch_params, |i, ch, m| {
                    let j = i + ch;
                    d_g[j] = m * (a[ch] * (k[j] - k_mu[ch]) + q[ch] * k_var[ch] * (p[j] - mu[ch]));
                    d_s[j] = m * q[ch] * k_var[ch] * g[j];
                    sum_kpg[ch] += (m * k[j] * g[j]).to_f64();
                });
                let mut d_theta = vec![0f64; 2 * c];
                for (ch, pr) in ch_params.iter().enumerate() {
                    let (km, kv) = (k_mu[ch].to_f64(), k_var[ch].to_f64());
                    let r3 = pr.r * pr.r * pr.r;
                    d_s[pooled * c + ch] = f(-pr.q() * kv * sum_g[ch]);
                    d_s[(pooled + 1) * c + ch] = f(pr.q() * (sum_kpg[ch] - km * sum_g[ch])
                        + kv * 0.75 * pr.gamma * r3 * pr.r * pr.r * sum_gp[ch]);
                    d_theta[ch] = pr.r * (sum_kpg[ch] - km * sum_g[ch]) - 0.5 * r3 * kv * sum_gp[ch];
                }
                d_theta
            });
            let d_theta = fold_theta::<T>(&d_theta, tg, c);
            Ok((
                Some(tensor(d_g, n.shape(pooled), grad)?),
                Some(tensor(d_s, n.shape(pooled + 2), grad)?),
                Some(tensor(d_theta, theta.shape().clone(), grad)?),
            ))
        })
    }
}

/// Per-group `[γ; β]` gradients summed into `θ`'s groups (all into one when `θ` is shared).
fn fold_theta<T: WithDType>(per_group: &[Vec<f64>], theta_groups: usize, c: usize) -> Vec<T> {
    let mut out = vec![0f64; theta_groups * 2 * c];
    for (g, v) in per_group.iter().enumerate() {
        let dst = &mut out[(g % theta_groups) * 2 * c..][..2 * c];
        for (d, x) in dst.iter_mut().zip(v) {
            *d += x;
        }
    }
    out.into_iter().map(T::from_f64).collect()
}

impl CustomOp3 for AffineReluParams {
    fn name(&self) -> &'static str {
        "pooled_norm_affine_relu_params"
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
        let n = &self.0;
        let (c, pooled) = (n.pool.channels, n.pooled());
        let tg = n.check_gradient_args(self.name(), [l1, l2, l3])?;
        with_float!(self.name(), s1.dtype(), T => {
            let g = contiguous_slice::<T>(s1, l1, self.name())?;
            let s = contiguous_slice::<T>(s2, l2, self.name())?;
            let theta = contiguous_slice::<T>(s3, l3, self.name())?;
            let per_group: Vec<Vec<f64>> = (0..n.groups)
                .into_par_iter()
                .map(|grp| {
                    let s = &s[grp * (pooled + 2) * c..];
                    let k = channels(s, &theta[(grp % tg) * 2 * c..], pooled, c, n.eps);
                    let g = &g[grp * pooled * c..][..pooled * c];
                    let (sum_g, sum_gp) = masked_sums(g, &s[..pooled * c], &k, |_, _, _| {});
                    let mut out: Vec<f64> = (0..c).map(|ch| k[ch].r * sum_gp[ch]).collect();
                    out.extend(sum_g);
                    out
                })
                .collect();
            let out = fold_theta::<T>(&per_group, tg, c);
            Ok((T::to_cpu_storage_owned(out), Shape::from(l3.dims())))
        })
    }

    fn bwd(
        &self,
        g: &Tensor,
        s: &Tensor,
        theta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Output: (r·Σ m·g·(p − μ), Σ m·g); `grad` is (k_γ, k_β). Nothing flows to θ but
        // through the mask, which is piecewise constant.
        let n = &self.0;
        let (c, pooled) = (n.pool.channels, n.pooled());
        let tg = n.theta_groups(self.name(), theta.dims())?;
        with_slices!(self.name(), T, [kv = grad, gv = g, sv = s, tv = theta] => {
            let (d_g, d_s, _) = per_group_gradients(n, tg, (gv, sv, tv), |grp, view, d_g, d_s| {
                let k = &kv[(grp % tg) * 2 * c..][..2 * c];
                let (p, g, mu, ch_params) = (view.p, view.g, &view.mu, &view.channels);
                let f = |v: f64| T::from_f64(v);
                let kr: Vec<T> = (0..c).map(|ch| f(k[ch].to_f64() * ch_params[ch].r)).collect();
                let (sum_g, sum_gp) = masked_sums(g, p, ch_params, |i, ch, m| {
                    let j = i + ch;
                    d_g[j] = m * (kr[ch] * (p[j] - mu[ch]) + k[c + ch]);
                    d_s[j] = m * kr[ch] * g[j];
                });
                for (ch, pr) in ch_params.iter().enumerate() {
                    let kg = k[ch].to_f64();
                    d_s[pooled * c + ch] = f(-kg * pr.r * sum_g[ch]);
                    d_s[(pooled + 1) * c + ch] = f(-0.5 * kg * pr.r * pr.r * pr.r * sum_gp[ch]);
                }
            });
            Ok((
                Some(tensor(d_g, n.shape(pooled), grad)?),
                Some(tensor(d_s, n.shape(pooled + 2), grad)?),
                None,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::norm::channel_moments;
    use crate::pool::PoolGather;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The block in plain candle operations, with the same winners.
    fn reference(
        pool: PoolGeometry,
        y: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let r = y.rank();
        let (mean, var) = channel_moments(y)?;
        let (gamma, beta) = (gamma.unsqueeze(r - 2)?, beta.unsqueeze(r - 2)?);
        let scale = gamma.broadcast_mul(&var.affine(1.0, eps)?.sqrt()?.recip()?)?;
        let shift = beta.broadcast_sub(&mean.broadcast_mul(&scale)?)?;
        let normalised = y
            .detach()
            .broadcast_mul(&scale.detach())?
            .broadcast_add(&shift.detach())?;
        let pooled = y.apply_op2(&normalised, PoolGather(pool))?;
        pooled.broadcast_mul(&scale)?.broadcast_add(&shift)?.relu()
    }

    /// Values, gradients and second-order gradients (of a weighted sum of the gradients) of
    /// `Σ w·block(y, γ, β)` on the ops and on the reference.
    fn derivatives(pool: PoolGeometry, dims: (&[usize], &[usize]), fast: bool) -> Vec<Vec<f64>> {
        crate::runtime::init();
        let (y_dims, p_dims) = dims;
        let y = Var::from_tensor(&random(y_dims, 1)).unwrap();
        let gamma = Var::from_tensor(&random(p_dims, 2).affine(1.0, 0.3).unwrap()).unwrap();
        let beta = Var::from_tensor(&random(p_dims, 3)).unwrap();
        let eps = 1e-3;
        let out = if fast {
            PooledNorm::new(
                pool,
                y.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                eps,
            )
            .and_then(|b| b.forward(y.as_tensor(), gamma.as_tensor(), beta.as_tensor()))
        } else {
            reference(
                pool,
                y.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                eps,
            )
        }
        .unwrap();
        let w = random(out.dims(), 4);
        let loss = out.mul(&w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = [&y, &gamma, &beta];
        let mut mixed = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
        let mut results = vec![out.flatten_all().unwrap().to_vec1::<f64>().unwrap()];
        for (i, v) in vars.iter().enumerate() {
            let g = grads.get(v.as_tensor()).unwrap();
            results.push(g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
            let weights = random(g.dims(), 10 + i as u64);
            mixed = mixed
                .add(&g.mul(&weights).unwrap().sum_all().unwrap())
                .unwrap();
        }
        let second = crate::runtime::backward(&mixed).unwrap();
        for v in vars {
            // No gradient at all (β enters the gradients only through the mask) is zero.
            let g = match second.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like().unwrap(),
            };
            results.push(g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
        }
        results
    }

    fn assert_close(pool: PoolGeometry, y_dims: &[usize], p_dims: &[usize]) {
        let fast = derivatives(pool, (y_dims, p_dims), true);
        let reference = derivatives(pool, (y_dims, p_dims), false);
        let names = ["values", "d/dy", "d/dγ", "d/dβ", "d²/dy", "d²/dγ", "d²/dβ"];
        for ((name, f), r) in names.iter().zip(&fast).zip(&reference) {
            assert_eq!(f.len(), r.len(), "{name}: lengths");
            let scale = r.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (i, (a, b)) in f.iter().zip(r).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-9 * scale,
                    "{name}[{i}] of {y_dims:?}: ops {a}, reference {b}"
                );
            }
        }
    }

    #[test]
    fn ops_match_candle_composition_to_second_order_per_task() {
        // Three tasks of two 5×7 images (the odd row and column are dropped by the pooling).
        let pool = PoolGeometry {
            images: 6,
            height: 5,
            width: 7,
            channels: 4,
            size: 2,
        };
        assert_close(pool, &[3, 2 * 35, 4], &[3, 4]);
    }

    #[test]
    fn ops_match_candle_composition_to_second_order_one_batch() {
        let pool = PoolGeometry {
            images: 3,
            height: 4,
            width: 6,
            channels: 3,
            size: 2,
        };
        assert_close(pool, &[3 * 24, 3], &[3]);
    }

    #[test]
    fn a_third_derivative_is_an_error() {
        crate::runtime::init();
        let pool = PoolGeometry {
            images: 1,
            height: 2,
            width: 2,
            channels: 1,
            size: 2,
        };
        let y = Var::from_tensor(&random(&[4, 1], 5)).unwrap();
        let (gamma, beta) = (
            Tensor::new(&[1.0f64], &Device::Cpu).unwrap(),
            Tensor::new(&[0.5f64], &Device::Cpu).unwrap(),
        );
        let block = PooledNorm::new(pool, y.as_tensor(), &gamma, &beta, 1e-3).unwrap();
        let out = block
            .forward(y.as_tensor(), &gamma, &beta)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = out.backward().unwrap().get(y.as_tensor()).unwrap().clone();
        let g2 = g.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = g2.get(y.as_tensor()).unwrap().sum_all().unwrap();
        assert!(g2.backward().is_err());
    }
}
