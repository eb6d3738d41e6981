//! The pieces of a transformer encoder block for first-order training, in f32 or f64 on the
//! CPU, each one graph node with a hand-written backward pass: an affine layer (`x W + b`),
//! multi-head attention within packed sequences, layer norm, GELU, and the selection of a
//! padded batch's token rows (and their placing back) that lets a block skip the padding.
//!
//! Built from candle's own operations, one training step of a 6-layer sentence encoder spent
//! more time outside the matrix products than in them: a dozen passes over the activations per
//! layer norm, softmax and GELU forward and backward (a scalar `erf`), a reduction per bias
//! gradient, one small batched product per sequence and head, and fresh memory for every
//! intermediate. Here each piece reads its inputs once forward and once backward.
//!
//! The backward passes return constants: gradients are exact but cannot be differentiated
//! again, so callers use these only when no second-order gradient is wanted.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::gemm::strided_gemm;
use crate::parallel::REDUCTION_GROUPS;
use crate::transformer::dot;
use crate::{contiguous_slice, parameter_gradient, vectorized, with_data, with_float};

/// The float types of the kernels, with the few functions they need.
trait Real: WithDType + Send + Sync {
    /// `e^x`.
    fn exp_of(self) -> Self;
    /// The exact GELU, `x Φ(x)`.
    fn gelu(self) -> Self;
    /// Its derivative, `Φ(x) + x φ(x)`.
    fn gelu_derivative(self) -> Self;
}

/// `1 / √(2π)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

impl Real for f32 {
    #[inline(always)]
    fn exp_of(self) -> f32 {
        crate::transformer::exp(self)
    }
    #[inline(always)]
    fn gelu(self) -> f32 {
        crate::transformer::gelu(self)
    }
    #[inline(always)]
    fn gelu_derivative(self) -> f32 {
        let cdf = 0.5 * (1.0 + crate::transformer::erf(self * std::f32::consts::FRAC_1_SQRT_2));
        cdf + self * INV_SQRT_2PI as f32 * crate::transformer::exp(-0.5 * self * self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp_of(self) -> f64 {
        self.exp()
    }
    #[inline(always)]
    fn gelu(self) -> f64 {
        0.5 * self * (1.0 + candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2))
    }
    #[inline(always)]
    fn gelu_derivative(self) -> f64 {
        let cdf =
            0.5 * (1.0 + candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2));
        cdf + self * INV_SQRT_2PI * (-0.5 * self * self).exp()
    }
}

/// A tensor of `values` shaped like `like`.
fn like<T: WithDType>(values: Vec<T>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, like.shape(), like.device())
}

/// `dst [m×n] = (accumulate ? dst : 0) + a [m×k] · b [k×n]` on every thread; each operand is
/// given by its pointer, row stride and column stride.
///
/// # Safety
/// The pointers must hold the values their shapes and strides reach, and `dst` must not
/// overlap `a` or `b`.
unsafe fn product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
) {
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    // Safety: the caller's shapes and strides; dst is m×n, row-major.
    unsafe { strided_gemm((m, n, k), dst, n, accumulate, a, b, threads) }
}

/// An affine layer over the last dimension: `(x [.., in], weight [in, out], bias [out])` →
/// `[.., out]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Linear;

impl Linear {
    fn sizes(x: &[usize], w: &[usize], b: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
        match (x.last(), w, b) {
            (Some(&input), &[w_in, out], &[b_out]) if w_in == input && b_out == out => {
                Ok((x.iter().product::<usize>() / input.max(1), input, out))
            }
            _ => Err(candle_core::Error::Msg(format!(
                "linear: input {x:?}, weight {w:?} and bias {b:?} do not fit together"
            ))),
        }
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (rows, input, out) = Self::sizes(l1.dims(), l2.dims(), l3.dims())?;
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = out;
        with_float!("linear", s1.dtype(), T => {
            let x = contiguous_slice::<T>(s1, l1, "linear")?;
            let w = contiguous_slice::<T>(s2, l2, "linear")?;
            let bias = contiguous_slice::<T>(s3, l3, "linear")?;
            let mut y = vec![T::from_f64(0.0); rows * out];
            for row in y.chunks_exact_mut(out) {
                row.copy_from_slice(bias);
            }
            // Safety: x is rows×input, w input×out and y rows×out, all row-major.
            unsafe {
                product(
                    (rows, out, input),
                    y.as_mut_ptr(),
                    true,
                    (x.as_ptr(), input, 1),
                    (w.as_ptr(), out, 1),
                )
            };
            Ok((T::to_cpu_storage_owned(y), Shape::from(dims)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, input, out) = Self::sizes(x.dims(), w.dims(), bias.dims())?;
        with_float!("linear", x.dtype(), T => {
            with_data::<T, _>(grad, |g| {
                let dx = if x.track_op() {
                    let mut dx = vec![T::from_f64(0.0); rows * input];
                    with_data::<T, _>(w, |w| {
                        // dx = g · wᵀ. Safety: g is rows×out, wᵀ (w read by columns) out×input.
                        unsafe {
                            product(
                                (rows, input, out),
                                dx.as_mut_ptr(),
                                false,
                                (g.as_ptr(), out, 1),
                                (w.as_ptr(), 1, out),
                            )
                        }
                    })?;
                    Some(like(dx, x)?)
                } else {
                    None
                };
                let dw = if w.track_op() {
                    let mut dw = vec![T::from_f64(0.0); input * out];
                    with_data::<T, _>(x, |x| {
                        // dw = xᵀ · g. Safety: xᵀ (x read by columns) is input×rows.
                        unsafe {
                            product(
                                (input, out, rows),
                                dw.as_mut_ptr(),
                                false,
                                (x.as_ptr(), 1, input),
                                (g.as_ptr(), out, 1),
                            )
                        }
                    })?;
                    Some(like(dw, w)?)
                } else {
                    None
                };
                let db = if bias.track_op() {
                    Some(like(column_sums(g, out), bias)?)
                } else {
                    None
                };
                Ok((dx, dw, db))
            })?
        })
    }
}

/// Sums of the columns of a row-major matrix `width` wide, by column blocks on every thread
/// (each column summed in row order, so the result does not depend on the thread count).
fn column_sums<T: WithDType + Send + Sync>(g: &[T], width: usize) -> Vec<T> {
    let mut sums = vec![T::zero(); width];
    let block = width.div_ceil(4 * rayon::current_num_threads()).max(16);
    sums.par_chunks_mut(block)
        .enumerate()
        .for_each(|(part, sums)| {
            let columns = part * block..part * block + sums.len();
            vectorized!(for row in g.chunks_exact(width) {
                for (s, v) in sums.iter_mut().zip(&row[columns.clone()]) {
                    *s += *v;
                }
            })
        });
    sums
}

/// Multi-head attention within sequences whose tokens are packed one after another (no
/// padding): `(q, k, v)`, each `[tokens, hidden]` → per sequence and head,
/// `softmax(q kᵀ / √d) v`. Padding is removed before (with [`SelectRows`]), so the matrix
/// products of a batch of short sentences do no work for it.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Attention heads (dividing the width).
    pub heads: usize,
    /// Each sequence's first row and number of tokens, in row order, covering every row.
    pub sequences: Vec<(usize, usize)>,
}

impl Attention {
    fn check(&self, dims: &[&[usize]]) -> candle_core::Result<usize> {
        let hidden = dims[0].last().copied().unwrap_or(0);
        let rows: usize = self.sequences.iter().map(|s| s.1).sum();
        let contiguous = self
            .sequences
            .iter()
            .scan(0, |next, &(start, len)| {
                let ok = start == *next;
                *next += len;
                Some(ok)
            })
            .all(|ok| ok);
        let fits = |d: &[usize]| d == [rows, hidden];
        if dims.iter().all(|d| fits(d)) && self.heads > 0 && hidden % self.heads == 0 && contiguous
        {
            Ok(hidden)
        } else {
            Err(candle_core::Error::Msg(format!(
                "attention: q, k, v {dims:?} do not fit {} packed sequences of {rows} tokens \
                 with {} heads",
                self.sequences.len(),
                self.heads
            )))
        }
    }

    /// `values` (`rows · hidden`) cut into one mutable slice per sequence.
    fn per_sequence<'a, T>(&self, mut values: &'a mut [T], hidden: usize) -> Vec<&'a mut [T]> {
        let mut out = Vec::with_capacity(self.sequences.len());
        for &(_, len) in &self.sequences {
            let (head, rest) = values.split_at_mut(len * hidden);
            out.push(head);
            values = rest;
        }
        out
    }

    /// The attention weights of query `i` of one sequence and head into `weights` (one per
    /// token of the sequence).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn weights<T: Real>(
        q: &[T],
        k: &[T],
        hidden: usize,
        col: usize,
        dim: usize,
        i: usize,
        scale: T,
        weights: &mut [T],
    ) {
        let qi = &q[i * hidden + col..i * hidden + col + dim];
        let mut max = T::from_f64(f64::NEG_INFINITY);
        for (j, w) in weights.iter_mut().enumerate() {
            *w = dot(qi, &k[j * hidden + col..j * hidden + col + dim]) * scale;
            if *w > max {
                max = *w;
            }
        }
        let mut total = T::zero();
        for w in weights.iter_mut() {
            *w = (*w - max).exp_of();
            total += *w;
        }
        let inv = T::one() / total;
        for w in weights.iter_mut() {
            *w *= inv;
        }
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], hidden: usize) -> Vec<T> {
        let heads = self.heads;
        let dim = hidden / heads;
        let scale = T::from_f64(1.0 / (dim as f64).sqrt());
        let mut context = vec![T::zero(); q.len()];
        self.per_sequence(&mut context, hidden)
            .into_par_iter()
            .zip(&self.sequences)
            .for_each(|(out, &(start, len))| {
                let span = start * hidden..(start + len) * hidden;
                let (q, k, v) = (&q[span.clone()], &k[span.clone()], &v[span]);
                let mut weights = vec![T::zero(); len];
                vectorized!(for head in 0..heads {
                    let col = head * dim;
                    for i in 0..len {
                        Self::weights(q, k, hidden, col, dim, i, scale, &mut weights);
                        let target = &mut out[i * hidden + col..i * hidden + col + dim];
                        for (j, &p) in weights.iter().enumerate() {
                            let vj = &v[j * hidden + col..j * hidden + col + dim];
                            for (t, &x) in target.iter_mut().zip(vj) {
                                *t += p * x;
                            }
                        }
                    }
                })
            });
        context
    }

    /// Gradients of q, k and v from the context's gradient `g`; the weights are recomputed.
    fn backward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        g: &[T],
        hidden: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let heads = self.heads;
        let dim = hidden / heads;
        let scale = T::from_f64(1.0 / (dim as f64).sqrt());
        let n = q.len();
        let (mut dq, mut dk, mut dv) = (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]);
        self.per_sequence(&mut dq, hidden)
            .into_par_iter()
            .zip(self.per_sequence(&mut dk, hidden))
            .zip(self.per_sequence(&mut dv, hidden))
            .zip(&self.sequences)
            .for_each(|(((dq, dk), dv), &(start, len))| {
                let span = start * hidden..(start + len) * hidden;
                let (q, k, v, g) = (
                    &q[span.clone()],
                    &k[span.clone()],
                    &v[span.clone()],
                    &g[span],
                );
                let mut weights = vec![T::zero(); len];
                let mut d_scores = vec![T::zero(); len];
                vectorized!(for head in 0..heads {
                    let col = head * dim;
                    let at = |row: usize| row * hidden + col..row * hidden + col + dim;
                    for i in 0..len {
                        Self::weights(q, k, hidden, col, dim, i, scale, &mut weights);
                        let gi = &g[at(i)];
                        // d weight_ij = g_i · v_j; d score_ij = w_ij (d weight_ij − Σ w d weight).
                        let mut weighted = T::zero();
                        for (j, (d, &w)) in d_scores.iter_mut().zip(&weights).enumerate() {
                            *d = dot(gi, &v[at(j)]);
                            weighted += w * *d;
                            for (t, &x) in dv[at(j)].iter_mut().zip(gi) {
                                *t += w * x;
                            }
                        }
                        for (j, (d, &w)) in d_scores.iter().zip(&weights).enumerate() {
                            let ds = w * (*d - weighted) * scale;
                            let (qi, kj) = (&q[at(i)], &k[at(j)]);
                            for (t, &x) in dq[at(i)].iter_mut().zip(kj) {
                                *t += ds * x;
                            }
                            for (t, &x) in dk[at(j)].iter_mut().zip(qi) {
                                *t += ds * x;
                            }
                        }
                    }
                })
            });
        (dq, dk, dv)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        let hidden = self.check(&[l1.dims(), l2.dims(), l3.dims()])?;
        with_float!("attention", s1.dtype(), T => {
            let q = contiguous_slice::<T>(s1, l1, "attention")?;
            let k = contiguous_slice::<T>(s2, l2, "attention")?;
            let v = contiguous_slice::<T>(s3, l3, "attention")?;
            let out = self.forward(q, k, v, hidden);
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let hidden = self.check(&[q.dims(), k.dims(), v.dims()])?;
        with_float!("attention", q.dtype(), T => {
            let (dq, dk, dv) = with_data::<T, _>(q, |qs| {
                with_data::<T, _>(k, |ks| {
                    with_data::<T, _>(v, |vs| {
                        with_data::<T, _>(grad, |gs| self.backward(qs, ks, vs, gs, hidden))
                    })
                })
            })????;
            Ok((Some(like(dq, q)?), Some(like(dk, k)?), Some(like(dv, v)?)))
        })
    }
}

/// Some rows of a matrix, by index: `x [total, width]` → `[rows.len(), width]` (the tokens of
/// a padded batch, without its padding). Its backward pass is [`PlaceRows`].
#[derive(Clone, Debug)]
pub struct SelectRows {
    /// The rows kept, in order.
    pub rows: Arc<Vec<usize>>,
    /// Rows of the input.
    pub total: usize,
}

/// The inverse of [`SelectRows`]: `x [rows.len(), width]` → `[total, width]`, each row put
/// back at its index and zeros elsewhere. Its backward pass is [`SelectRows`].
#[derive(Clone, Debug)]
pub struct PlaceRows {
    /// Where each input row goes.
    pub rows: Arc<Vec<usize>>,
    /// Rows of the output.
    pub total: usize,
}

/// The width of a `[rows, width]` matrix, checked against the expected number of rows.
fn width_of(op: &str, dims: &[usize], rows: usize) -> candle_core::Result<usize> {
    match *dims {
        [r, w] if r == rows => Ok(w),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: expected a matrix of {rows} rows, found shape {dims:?}"
        ))),
    }
}

/// Checks that every row index is below `total`.
fn rows_within(op: &str, rows: &[usize], total: usize) -> candle_core::Result<()> {
    match rows.iter().find(|&&r| r >= total) {
        Some(&bad) => Err(candle_core::Error::Msg(format!(
            "{op}: row {bad} of a matrix of {total} rows"
        ))),
        None => Ok(()),
    }
}

impl CustomOp1 for SelectRows {
    fn name(&self) -> &'static str {
        "select_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = width_of("select_rows", l.dims(), self.total)?;
        rows_within("select_rows", &self.rows, self.total)?;
        with_float!("select_rows", s.dtype(), T => {
            let x = contiguous_slice::<T>(s, l, "select_rows")?;
            let mut out = Vec::with_capacity(self.rows.len() * width);
            for &r in self.rows.iter() {
                out.extend_from_slice(&x[r * width..(r + 1) * width]);
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((self.rows.len(), width))))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let place = PlaceRows {
            rows: self.rows.clone(),
            total: self.total,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&place)?))
    }
}

impl CustomOp1 for PlaceRows {
    fn name(&self) -> &'static str {
        "place_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = width_of("place_rows", l.dims(), self.rows.len())?;
        rows_within("place_rows", &self.rows, self.total)?;
        with_float!("place_rows", s.dtype(), T => {
            let x = contiguous_slice::<T>(s, l, "place_rows")?;
            let mut out = vec![T::from_f64(0.0); self.total * width];
            for (i, &r) in self.rows.iter().enumerate() {
                out[r * width..(r + 1) * width].copy_from_slice(&x[i * width..(i + 1) * width]);
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((self.total, width))))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let select = SelectRows {
            rows: self.rows.clone(),
            total: self.total,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&select)?))
    }
}

/// Layer norm over the last dimension: `(x [.., width], gamma [width], beta [width])` →
/// `(x − mean) / √(var + eps) · gamma + beta`, row by row.
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    fn width(x: &[usize], gamma: &[usize], beta: &[usize]) -> candle_core::Result<usize> {
        match x.last() {
            Some(&w) if gamma == [w] && beta == [w] && w > 0 => Ok(w),
            _ => Err(candle_core::Error::Msg(format!(
                "layer norm: input {x:?}, gamma {gamma:?} and beta {beta:?} do not fit together"
            ))),
        }
    }

    /// The row's mean and `1 / √(var + eps)`.
    #[inline(always)]
    fn moments<T: WithDType>(&self, row: &[T]) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
        let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    fn forward<T: Real>(&self, x: &[T], gamma: &[T], beta: &[T], width: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(width * 16)
            .zip(x.par_chunks(width * 16))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                    let (mean, inv) = self.moments(x);
                    for (((o, v), g), b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                        *o = T::from_f64((v.to_f64() - mean) * inv) * *g + *b;
                    }
                }
            });
        y
    }

    /// Gradients of x, gamma and beta from the output's gradient `g`; gamma's and beta's are
    /// summed in [`REDUCTION_GROUPS`] fixed groups of rows, in order.
    fn backward<T: Real>(
        &self,
        x: &[T],
        gamma: &[T],
        g: &[T],
        width: usize,
    ) -> (Vec<T>, Vec<f64>, Vec<f64>) {
        let rows = x.len() / width;
        let group_rows = rows.div_ceil(REDUCTION_GROUPS).max(1);
        let mut dx = vec![T::zero(); x.len()];
        let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(group_rows * width)
            .zip(x.par_chunks(group_rows * width))
            .zip(g.par_chunks(group_rows * width))
            .map(|((dx, x), g)| {
                let (mut d_gamma, mut d_beta) = (vec![0f64; width], vec![0f64; width]);
                let mut d_normed = vec![0f64; width];
                for ((dx, x), g) in dx
                    .chunks_exact_mut(width)
                    .zip(x.chunks_exact(width))
                    .zip(g.chunks_exact(width))
                {
                    let (mean, inv) = self.moments(x);
                    let (mut m1, mut m2) = (0.0, 0.0);
                    for c in 0..width {
                        let normed = (x[c].to_f64() - mean) * inv;
                        let gc = g[c].to_f64();
                        d_gamma[c] += gc * normed;
                        d_beta[c] += gc;
                        d_normed[c] = gc * gamma[c].to_f64();
                        m1 += d_normed[c];
                        m2 += d_normed[c] * normed;
                    }
                    let (m1, m2) = (m1 / width as f64, m2 / width as f64);
                    for c in 0..width {
                        let normed = (x[c].to_f64() - mean) * inv;
                        dx[c] = T::from_f64(inv * (d_normed[c] - m1 - normed * m2));
                    }
                }
                (d_gamma, d_beta)
            })
            .collect();
        let (mut d_gamma, mut d_beta) = (vec![0f64; width], vec![0f64; width]);
        for (pg, pb) in partial {
            for c in 0..width {
                d_gamma[c] += pg[c];
                d_beta[c] += pb[c];
            }
        }
        (dx, d_gamma, d_beta)
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
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
        let width = Self::width(l1.dims(), l2.dims(), l3.dims())?;
        with_float!("layer_norm", s1.dtype(), T => {
            let x = contiguous_slice::<T>(s1, l1, "layer_norm")?;
            let gamma = contiguous_slice::<T>(s2, l2, "layer_norm")?;
            let beta = contiguous_slice::<T>(s3, l3, "layer_norm")?;
            let y = self.forward(x, gamma, beta, width);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = Self::width(x.dims(), gamma.dims(), beta.dims())?;
        with_float!("layer_norm", x.dtype(), T => {
            let (dx, dg, db) = with_data::<T, _>(x, |xs| {
                with_data::<T, _>(gamma, |gs| {
                    with_data::<T, _>(grad, |g| self.backward(xs, gs, g, width))
                })
            })???;
            Ok((
                Some(like(dx, x)?),
                Some(parameter_gradient(dg, gamma)?),
                Some(parameter_gradient(db, beta)?),
            ))
        })
    }
}

/// The exact GELU, `x Φ(x)`, elementwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gelu;

/// Elements per parallel chunk of the elementwise passes.
const CHUNK: usize = 4096;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        with_float!("gelu", s.dtype(), T => {
            let x = contiguous_slice::<T>(s, l, "gelu")?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| {
                    vectorized!(for (o, &v) in y.iter_mut().zip(x) {
                        *o = v.gelu();
                    })
                });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        with_float!("gelu", x.dtype(), T => {
            let dx = with_data::<T, _>(x, |xs| {
                with_data::<T, _>(grad, |gs| {
                    let mut dx = vec![T::from_f64(0.0); xs.len()];
                    dx.par_chunks_mut(CHUNK)
                        .zip(xs.par_chunks(CHUNK))
                        .zip(gs.par_chunks(CHUNK))
                        .for_each(|((d, x), g)| {
                            vectorized!(for ((d, &v), &g) in d.iter_mut().zip(x).zip(g) {
                                *d = g * v.gelu_derivative();
                            })
                        });
                    dx
                })
            })??;
            Ok(Some(like(dx, x)?))
        })
    }
}
