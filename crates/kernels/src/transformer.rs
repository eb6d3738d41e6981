//! Inference of a post-norm transformer encoder block (BERT) in one call, in f32 on the CPU:
//! the four projections and the feed-forward layer are matrix products over all tokens of the
//! batch at once (the `gemm` crate, on every thread); attention runs per sequence in plain
//! loops; bias, residual, layer norm and GELU are fused into single passes.
//!
//! Only for forward passes whose result is not differentiated (embedding sentences, scoring):
//! it has no backward pass. With candle's own operations the same block took about twice as
//! long, most of it outside the matrix products: one small batched product per sequence and
//! head for attention, and a dozen passes over the activations per layer norm, softmax and
//! GELU (candle's GELU calls a scalar `erf`).

use candle_core::{Device, Storage, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::{contiguous_slice, vectorized};

/// Shape and constants of one block.
#[derive(Clone, Copy, Debug)]
pub struct BlockShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence (padded).
    pub seq: usize,
    /// Width of a token's activation.
    pub hidden: usize,
    /// Attention heads (dividing `hidden`).
    pub heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate: usize,
    /// Layer-norm epsilon.
    pub eps: f64,
}

/// The block's weights, matrices `[in, out]`, in this order: query, key, value, output
/// projections (weight, bias each), attention layer norm (gamma, beta), feed-forward in and out
/// (weight, bias each), output layer norm (gamma, beta).
pub type BlockWeights<'a> = [&'a Tensor; 16];

/// The block's output for activations `h` (`[batch, seq, hidden]`, f32, CPU) with padding
/// `mask` (`[batch, seq]`, 1 for tokens, 0 for padding).
pub fn encoder_block(
    h: &Tensor,
    mask: &Tensor,
    weights: BlockWeights,
    shape: BlockShape,
) -> candle_core::Result<Tensor> {
    let BlockShape {
        batch,
        seq,
        hidden,
        heads,
        intermediate,
        ..
    } = shape;
    if h.dims() != [batch, seq, hidden] || mask.dims() != [batch, seq] || hidden % heads != 0 {
        return Err(candle_core::Error::Msg(format!(
            "encoder block: activations {:?} and mask {:?} do not fit {shape:?}",
            h.dims(),
            mask.dims()
        )));
    }
    let mut inputs: Vec<&Tensor> = vec![h, mask];
    inputs.extend(weights);
    let out = with_cpu_slices(&inputs, "encoder block", |slices| {
        let [x, mask, qw, qb, kw, kb, vw, vb, ow, ob, g1, b1, fw, fb, f2w, f2b, g2, b2] =
            slices[..]
        else {
            unreachable!("18 inputs")
        };
        let rows = batch * seq;
        let eps = shape.eps as f32;
        let q = affine(x, qw, qb, rows, hidden, hidden);
        let k = affine(x, kw, kb, rows, hidden, hidden);
        let v = affine(x, vw, vb, rows, hidden, hidden);
        let context = attention(&q, &k, &v, mask, shape);
        let mut h1 = affine(&context, ow, ob, rows, hidden, hidden);
        add_and_normalize(&mut h1, x, g1, b1, hidden, eps);
        let mut inner = affine(&h1, fw, fb, rows, hidden, intermediate);
        gelu_in_place(&mut inner);
        let mut out = affine(&inner, f2w, f2b, rows, intermediate, hidden);
        add_and_normalize(&mut out, &h1, g2, b2, hidden, eps);
        out
    })?;
    Tensor::from_vec(out, (batch, seq, hidden), &Device::Cpu)
}

/// Products with at most this many rows (a few short sentences) skip the `gemm` crate's
/// packing and thread pool: each thread multiplies its own slice of columns in place.
const SMALL_ROWS: usize = 48;

/// Runs `f` on the contiguous f32 CPU data of every tensor of `tensors`, in order; `op` names
/// the kernel in errors.
fn with_cpu_slices<R>(
    tensors: &[&Tensor],
    op: &str,
    f: impl FnOnce(&[&[f32]]) -> R,
) -> candle_core::Result<R> {
    let tensors: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(cpu) => slices.push(contiguous_slice::<f32>(cpu, layout, op)?),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{op}: the fused kernel runs on the CPU only"
                )))
            }
        }
    }
    Ok(f(&slices))
}

/// Layer norm of one row in place: `(row - mean) / sqrt(var + eps) · gamma + beta`.
#[inline(always)]
fn normalize_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let width = row.len() as f32;
    let mean = sum(row.iter().copied()) / width;
    let var = sum(row.iter().map(|a| (a - mean) * (a - mean))) / width;
    let inv = 1.0 / (var + eps).sqrt();
    for ((a, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *a = (*a - mean) * inv * g + b;
    }
}

/// `x [rows, k] · w [k, n] + bias`, on every thread.
fn affine(x: &[f32], w: &[f32], bias: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    out.par_chunks_mut(n * 64).for_each(|block| {
        for row in block.chunks_exact_mut(n) {
            row.copy_from_slice(bias);
        }
    });
    if rows <= SMALL_ROWS {
        // Column slices of 64 values (whole vectors), one or more per thread.
        let threads = rayon::current_num_threads().max(1);
        let width = n.div_ceil(threads).div_ceil(64) * 64;
        let dst = SendPtr(out.as_mut_ptr());
        (0..n.div_ceil(width)).into_par_iter().for_each(|part| {
            let first = part * width;
            let cols = width.min(n - first);
            let dst = &dst;
            // Safety: each part writes its own columns of `out`; `x` and `w` are read-only and
            // hold rows·k and k·n values.
            unsafe {
                crate::gemm::gemm_into(
                    (rows, cols, k),
                    dst.0.add(first),
                    n,
                    true,
                    (x.as_ptr(), k, 1),
                    (w.as_ptr().add(first), n, 1),
                );
            }
        });
        return out;
    }
    // Safety: the slices hold rows·k, k·n and rows·n values, row-major.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    out
}

/// A raw pointer that threads may share because each writes a disjoint part.
struct SendPtr(*mut f32);
// Safety: see the users: every thread writes only its own columns.
unsafe impl Sync for SendPtr {}

/// Masked multi-head attention: per sequence and head, `softmax(q kᵀ / √d + mask) v`.
fn attention(q: &[f32], k: &[f32], v: &[f32], mask: &[f32], shape: BlockShape) -> Vec<f32> {
    let BlockShape {
        seq, hidden, heads, ..
    } = shape;
    let dim = hidden / heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut context = vec![0f32; q.len()];
    context
        .par_chunks_mut(seq * hidden)
        .enumerate()
        .for_each(|(b, out)| {
            let base = b * seq * hidden;
            let mask = &mask[b * seq..(b + 1) * seq];
            let mut scores = vec![0f32; seq];
            vectorized!(for head in 0..heads {
                let col = head * dim;
                for i in 0..seq {
                    let qi = &q[base + i * hidden + col..base + i * hidden + col + dim];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        if mask[j] == 0.0 {
                            *s = f32::NEG_INFINITY;
                            continue;
                        }
                        let kj = &k[base + j * hidden + col..base + j * hidden + col + dim];
                        *s = dot(qi, kj) * scale;
                        max = max.max(*s);
                    }
                    let mut total = 0.0;
                    for s in scores.iter_mut() {
                        *s = if *s == f32::NEG_INFINITY {
                            0.0
                        } else {
                            exp(*s - max)
                        };
                        total += *s;
                    }
                    let target = &mut out[i * hidden + col..i * hidden + col + dim];
                    target.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        if p == 0.0 {
                            continue;
                        }
                        let weight = p / total;
                        let vj = &v[base + j * hidden + col..base + j * hidden + col + dim];
                        for (t, &vv) in target.iter_mut().zip(vj) {
                            *t += weight * vv;
                        }
                    }
                }
            })
        });
    context
}

/// `y = layer_norm(y + residual) · gamma + beta`, row by row.
fn add_and_normalize(
    y: &mut [f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    width: usize,
    eps: f32,
) {
    y.par_chunks_mut(width)
        .zip(residual.par_chunks(width))
        .for_each(|(row, res)| {
            vectorized!({
                for (a, r) in row.iter_mut().zip(res) {
                    *a += r;
                }
                normalize_row(row, gamma, beta, eps);
            })
        });
}

/// The exact GELU, `x/2 · (1 + erf(x/√2))`, in place.
fn gelu_in_place(values: &mut [f32]) {
    values.par_chunks_mut(4096).for_each(|chunk| {
        vectorized!(for v in chunk.iter_mut() {
            *v = gelu(*v);
        })
    });
}

/// Lanes of the partial sums below: independent accumulators let the compiler keep the loop
/// in vector registers (a single running sum is a chain of dependent additions).
const LANES: usize = 8;

/// `Σ a_i b_i` in [`LANES`] partial sums (f32 for inference, f32 or f64 for training).
#[inline(always)]
pub(crate) fn dot<T: WithDType>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (a_main, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_rest) = b.split_at(a_main.len());
    for (x, y) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail = a_rest
        .iter()
        .zip(b_rest)
        .fold(T::zero(), |s, (x, y)| s + *x * *y);
    acc.iter().fold(T::zero(), |s, &v| s + v) + tail
}

/// `Σ values` in [`LANES`] partial sums.
#[inline(always)]
fn sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0f32; LANES];
    for (i, v) in values.enumerate() {
        acc[i % LANES] += v;
    }
    acc.iter().sum()
}

/// GELU of one value through [`erf`].
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf(x)` to a relative error of about 1.2e-7 (Numerical Recipes' Chebyshev fit of
/// `erfc`), written without branches or calls so that it vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(poly);
    (1.0 - erfc).copysign(x)
}

/// `e^x` for f32 to about 2 ulp, without branches or calls: `x = n ln 2 + r`, a degree-6
/// polynomial of `r`, and `2^n` put into the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5·2^23 trick (vectorises, unlike `round`).
    let shifter = 12_582_912.0f32;
    let n = (x * std::f32::consts::LOG2_E + shifter) - shifter;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Token embeddings for inference: `layer_norm(word[id] + position[p] + token_type[0])` for
/// every token of `ids` (`[batch, seq]` of ids), f32 tables on the CPU.
pub fn embed_tokens(
    ids: &[u32],
    seq: usize,
    tables: [&Tensor; 5],
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (vocab, hidden) = tables[0].dims2()?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(candle_core::Error::Msg(format!(
            "token id {bad} is outside the vocabulary of {vocab} embeddings"
        )));
    }
    let out = with_cpu_slices(&tables, "token embedding", |slices| {
        let [word, position, token_type, gamma, beta] = slices[..] else {
            unreachable!("5 tables")
        };
        if position.len() < seq * hidden {
            return Err(candle_core::Error::Msg(format!(
                "a sequence of {seq} tokens is longer than the model's {} positions",
                position.len() / hidden
            )));
        }
        let mut out = vec![0f32; ids.len() * hidden];
        let eps = eps as f32;
        out.par_chunks_mut(hidden * 64)
            .enumerate()
            .for_each(|(block, rows)| {
                for (r, row) in rows.chunks_exact_mut(hidden).enumerate() {
                    let token = block * 64 + r;
                    let id = ids[token] as usize;
                    let pos = token % seq;
                    let w = &word[id * hidden..(id + 1) * hidden];
                    let p = &position[pos * hidden..(pos + 1) * hidden];
                    vectorized!({
                        for (((o, a), b), c) in
                            row.iter_mut().zip(w).zip(p).zip(&token_type[..hidden])
                        {
                            *o = a + b + c;
                        }
                        normalize_row(row, gamma, beta, eps);
                    })
                }
            });
        Ok(out)
    })??;
    Tensor::from_vec(out, (ids.len() / seq.max(1), seq, hidden), &Device::Cpu)
}
