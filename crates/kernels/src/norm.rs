//! Per-channel batch statistics of channels-last rows, for batch normalisation.
//!
//! [`ChannelMoments`] reads `[.., rows, channels]` once and returns each group's per-channel mean
//! and (biased) variance as `[.., 2, channels]`. Its backward pass is written with candle
//! operations on the input and on the op's own output, so it is differentiable again:
//! second-order meta-gradients through batch normalisation stay exact.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::{contiguous_slice, with_float};

/// Per-channel mean and biased variance over the rows of each group: `[.., rows, c]` →
/// `[.., 2, c]` (row 0: means, row 1: variances). A 2-D input is one group.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChannelMoments;

/// Rows per parallel work item: big enough to amortise the partial sums.
const ROWS_PER_CHUNK: usize = 1024;
/// Rows summed in the data's own precision before carrying the sums in f64.
const SHORT_RUN: usize = 32;

/// Per group, per-channel means and biased variances of `x` (`groups` blocks of `rows × c`),
/// accumulated in f64.
pub fn moments<T: WithDType>(
    x: &[T],
    groups: usize,
    rows: usize,
    c: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut means, mut vars) = (
        Vec::with_capacity(groups * c),
        Vec::with_capacity(groups * c),
    );
    for group in x.chunks(rows * c).take(groups) {
        // Shifting by the first row keeps the one-pass variance accurate when |mean| >> std.
        let shift_t: Vec<T> = group[..c].to_vec();
        let shift: Vec<f64> = shift_t.iter().map(|v| v.to_f64()).collect();
        let zero = || (vec![0f64; c], vec![0f64; c]);
        // One partial sum per fixed chunk, added in chunk order: rayon's fold/reduce split the
        // work adaptively, so their sums changed from run to run when the pool was busy.
        let partials: Vec<(Vec<f64>, Vec<f64>)> = group
            .par_chunks(ROWS_PER_CHUNK * c)
            .map(|chunk| {
                let (mut s, mut q) = zero();
                // Short runs summed in the data's own type (vectorised over channels), then
                // carried in f64.
                let (mut s_run, mut q_run) = (vec![T::zero(); c], vec![T::zero(); c]);
                for run in chunk.chunks(SHORT_RUN * c) {
                    s_run.fill(T::zero());
                    q_run.fill(T::zero());
                    for row in run.chunks_exact(c) {
                        for ch in 0..c {
                            let d = row[ch] - shift_t[ch];
                            s_run[ch] += d;
                            q_run[ch] += d * d;
                        }
                    }
                    for ch in 0..c {
                        s[ch] += s_run[ch].to_f64();
                        q[ch] += q_run[ch].to_f64();
                    }
                }
                (s, q)
            })
            .collect();
        let (sum, sum_sq) = partials
            .into_iter()
            .fold(zero(), |(mut s, mut q), (s2, q2)| {
                for ch in 0..c {
                    s[ch] += s2[ch];
                    q[ch] += q2[ch];
                }
                (s, q)
            });
        let n = rows as f64;
        for ch in 0..c {
            let m = sum[ch] / n;
            means.push(m + shift[ch]);
            vars.push((sum_sq[ch] / n - m * m).max(0.0));
        }
    }
    (means, vars)
}

impl CustomOp1 for ChannelMoments {
    fn name(&self) -> &'static str {
        "channel_moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let r = dims.len();
        if r < 2 || dims[r - 2] == 0 || dims[r - 1] == 0 {
            return Err(candle_core::Error::Msg(format!(
                "channel_moments: needs [.., rows, channels] with rows and channels > 0, got {dims:?}"
            )));
        }
        let (rows, c) = (dims[r - 2], dims[r - 1]);
        let groups: usize = dims[..r - 2].iter().product();
        let mut shape = dims.to_vec();
        shape[r - 2] = 2;
        with_float!("channel_moments", s.dtype(), T => {
            let x = contiguous_slice::<T>(s, l, "channel_moments")?;
            let mut out = Vec::with_capacity(groups * 2 * c);
            let (means, vars) = moments(x, groups, rows, c);
            for g in 0..groups {
                out.extend(means[g * c..(g + 1) * c].iter().map(|&v| T::from_f64(v)));
                out.extend(vars[g * c..(g + 1) * c].iter().map(|&v| T::from_f64(v)));
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d mean / dx = 1/n; d var / dx = 2 (x - mean) / n, with the mean taken from the
        // (differentiable) output so that the second derivative sees it too.
        let r = arg.rank();
        let n = arg.dims()[r - 2] as f64;
        let mean = res.narrow(r - 2, 0, 1)?;
        let grad_mean = grad.narrow(r - 2, 0, 1)?.affine(1.0 / n, 0.0)?;
        let grad_var = grad.narrow(r - 2, 1, 1)?.affine(2.0 / n, 0.0)?;
        Ok(Some(
            arg.broadcast_sub(&mean)?
                .broadcast_mul(&grad_var)?
                .broadcast_add(&grad_mean)?,
        ))
    }
}

/// Per-channel means and biased variances of `x` (`[.., rows, c]`), each `[.., 1, c]`.
pub fn channel_moments(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let r = x.rank();
    let m = x.contiguous()?.apply_op1(ChannelMoments)?;
    Ok((m.narrow(r - 2, 0, 1)?, m.narrow(r - 2, 1, 1)?))
}
