//! The reference forward passes of the text-encoder layers (BERT-style): token embeddings,
//! a post-norm transformer block with a padding mask, sequence pooling and L2 normalisation.
//!
//! Everything is written in candle primitives whose backward passes are themselves
//! differentiable (layer norm from means and square roots, softmax from `nn::ops`, GELU from
//! `erf`), so second-order meta-gradients through an encoder are exact. Activations are
//! `[batch, seq, hidden]`, or `[tasks, batch, seq, hidden]` in task-batched mode, where every
//! parameter carries a leading task dimension.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::nn::architecture::Pooling;
use crate::nn::ops;
use metalearn_kernels::transformer_training;

/// Large negative score added to attention logits of padding positions: after the softmax
/// their weight is exactly zero in f32 and f64.
const MASKED_SCORE: f64 = -1e9;

/// Parameters of one layer, looked up by their short name.
pub(crate) type ParamOf<'a> = dyn Fn(&str) -> Result<&'a Tensor> + 'a;

/// Token embeddings: `ids` is `[batch, seq]` (or `[tasks, batch, seq]`) of token ids stored as
/// floats. Returns the layer-normed embeddings and the padding mask (1 for tokens, 0 for
/// padding) in the float type of the parameters. Trailing columns that are padding in every
/// row are dropped first: they change no output, and data padded to its longest sentence
/// (an episode drawn from a whole data set) would otherwise pay for them in every layer.
pub(crate) fn token_embedding(
    ids: &Tensor,
    p: &ParamOf,
    pad_id: u32,
    eps: f64,
    batched: bool,
    first_order: bool,
) -> Result<(Tensor, Tensor)> {
    let ids = &without_padding_columns(ids, pad_id)?;
    let word = p("word")?;
    let dtype = word.dtype();
    let seq = ids.dim(D::Minus1)?;
    let vocab = word.dim(D::Minus2)?;
    let positions = p("position")?;
    let max_positions = positions.dim(D::Minus2)?;
    if seq > max_positions {
        return Err(Error::Shape(format!(
            "a sequence of {seq} tokens is longer than the model's {max_positions} positions"
        )));
    }
    let mask = ids.ne(pad_id as f64)?.to_dtype(dtype)?;
    let flat_ids = ids.flatten_all()?.to_dtype(DType::U32)?;
    if let Some(h) = fused_embedding(&flat_ids, seq, p, eps, batched)? {
        return Ok((h, mask));
    }
    let max_id = flat_ids.max(0)?.to_scalar::<u32>()?;
    if max_id as usize >= vocab {
        return Err(Error::Shape(format!(
            "token id {max_id} is outside the vocabulary of {vocab} embeddings"
        )));
    }
    let h = if batched {
        // Gather from each task's own table: offset the ids of task t by t · vocab.
        let tasks = ids.dim(0)?;
        let hidden = word.dim(D::Minus1)?;
        let per_task = flat_ids.elem_count() / tasks;
        let offsets: Vec<u32> = (0..tasks)
            .flat_map(|t| std::iter::repeat_n((t * vocab) as u32, per_task))
            .collect();
        let offsets = Tensor::from_vec(offsets, flat_ids.shape(), ids.device())?;
        let table = word.reshape((tasks * vocab, hidden))?;
        let words = table.index_select(&flat_ids.add(&offsets)?, 0)?;
        let mut dims = ids.dims().to_vec();
        dims.push(hidden);
        let words = words.reshape(dims)?;
        let pos = positions.narrow(1, 0, seq)?.unsqueeze(1)?; // [T, 1, seq, hidden]
        let token_type = p("token_type")?.narrow(1, 0, 1)?.unsqueeze(1)?; // [T, 1, 1, hidden]
        words.broadcast_add(&pos)?.broadcast_add(&token_type)?
    } else {
        let hidden = word.dim(1)?;
        let mut dims = ids.dims().to_vec();
        dims.push(hidden);
        let words = word.index_select(&flat_ids, 0)?.reshape(dims)?;
        let pos = positions.narrow(0, 0, seq)?;
        let token_type = p("token_type")?.narrow(0, 0, 1)?;
        words.broadcast_add(&pos)?.broadcast_add(&token_type)?
    };
    let kernels = !batched && first_order && training_kernels_apply(&h);
    let h = layer_norm(&h, p("norm_gamma")?, p("norm_beta")?, eps, batched, kernels)?;
    Ok((h, mask))
}

/// `ids` without its trailing columns that hold only `pad_id` (at least one column is kept).
fn without_padding_columns(ids: &Tensor, pad_id: u32) -> Result<Tensor> {
    let seq = ids.dim(D::Minus1)?;
    if seq <= 1 {
        return Ok(ids.clone());
    }
    let values = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let used = values
        .chunks(seq)
        .map(|row| {
            row.iter()
                .rposition(|&id| id != pad_id)
                .map_or(0, |i| i + 1)
        })
        .max()
        .unwrap_or(0)
        .max(1);
    Ok(if used < seq {
        ids.narrow(D::Minus1, 0, used)?
    } else {
        ids.clone()
    })
}

/// The token embedding through the fused CPU kernel, when it applies (kernels on, f32 tables
/// on the CPU that need no gradient, no task dimension).
fn fused_embedding(
    flat_ids: &Tensor,
    seq: usize,
    p: &ParamOf,
    eps: f64,
    batched: bool,
) -> Result<Option<Tensor>> {
    if !crate::kernels::enabled() || batched || !flat_ids.device().is_cpu() {
        return Ok(None);
    }
    let mut tables = Vec::with_capacity(5);
    for name in ["word", "position", "token_type", "norm_gamma", "norm_beta"] {
        let t = p(name)?;
        if t.track_op() || t.dtype() != DType::F32 {
            return Ok(None);
        }
        tables.push(t);
    }
    let ids = flat_ids.to_vec1::<u32>()?;
    let tables: [&Tensor; 5] = tables.try_into().expect("5 tables");
    Ok(Some(metalearn_kernels::transformer::embed_tokens(
        &ids, seq, tables, eps,
    )?))
}

/// Options of one transformer block's forward pass.
pub(crate) struct BlockOptions {
    pub heads: usize,
    pub eps: f64,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub batched: bool,
    /// Whether the backward pass must itself be differentiable (GELU then uses `erf`, not
    /// candle's fused GELU, whose derivative is written with rounded constants).
    pub differentiable: bool,
}

/// One post-norm encoder block over `h` with padding `mask` (`[.., batch, seq]`).
pub(crate) fn transformer_block(
    h: &Tensor,
    mask: &Tensor,
    p: &ParamOf,
    opt: &BlockOptions,
) -> Result<Tensor> {
    if let Some(out) = fused_block(h, mask, p, opt)? {
        return Ok(out);
    }
    if !opt.batched && !opt.differentiable && h.rank() == 3 && training_kernels_apply(h) {
        if let Some(packed) = PackedTokens::of(h, mask)? {
            let out = block_body(&packed.select(h)?, Attend::Packed(&packed), p, opt)?;
            return packed.place(&out, h.dims());
        }
    }
    block_body(h, Attend::Masked(mask), p, opt)
}

/// How a block's attention sees its tokens.
enum Attend<'a> {
    /// Padded `[.., batch, seq, hidden]` activations with their padding mask; candle's own
    /// operations.
    Masked(&'a Tensor),
    /// Packed rows of tokens without padding; the first-order training kernels throughout.
    Packed(&'a PackedTokens),
}

/// The block's layers after the choice of path: the projections, attention, output
/// projection, layer norms and feed-forward layer.
fn block_body(h: &Tensor, attend: Attend, p: &ParamOf, opt: &BlockOptions) -> Result<Tensor> {
    let b = opt.batched;
    let kernels = matches!(attend, Attend::Packed(_));
    let projection = |name: &str, x: &Tensor| -> Result<Tensor> {
        let y = linear(
            x,
            p(&format!("{name}_weight"))?,
            p(&format!("{name}_bias"))?,
            b,
            kernels,
        )?;
        if opt.lora_rank == 0 || !(name == "q" || name == "v") {
            return Ok(y);
        }
        let a = p(&format!("{name}_lora_a"))?;
        let up = p(&format!("{name}_lora_b"))?;
        let low = matmul_last(x, a, b)?;
        let delta = matmul_last(&low, up, b)?;
        Ok(y.add(&delta.affine(opt.lora_alpha / opt.lora_rank as f64, 0.0)?)?)
    };
    let (q, k, v) = (
        projection("q", h)?,
        projection("k", h)?,
        projection("v", h)?,
    );
    let context = match attend {
        Attend::Masked(mask) => attention(&q, &k, &v, mask, opt.heads)?,
        Attend::Packed(packed) => q.apply_op3(
            &k,
            &v,
            transformer_training::Attention {
                heads: opt.heads,
                sequences: packed.sequences.clone(),
            },
        )?,
    };
    let attended = linear(&context, p("o_weight")?, p("o_bias")?, b, kernels)?;
    let h = layer_norm(
        &attended.add(h)?,
        p("attn_norm_gamma")?,
        p("attn_norm_beta")?,
        opt.eps,
        b,
        kernels,
    )?;
    let inner = linear(&h, p("ff1_weight")?, p("ff1_bias")?, b, kernels)?;
    let inner = if kernels {
        inner.apply_op1(transformer_training::Gelu)?
    } else if opt.differentiable {
        gelu(&inner)?
    } else {
        inner.gelu_erf()?
    };
    let out = linear(&inner, p("ff2_weight")?, p("ff2_bias")?, b, kernels)?;
    layer_norm(
        &out.add(&h)?,
        p("ff_norm_gamma")?,
        p("ff_norm_beta")?,
        opt.eps,
        b,
        kernels,
    )
}

/// The tokens of a padded batch `[batch, seq, ..]` as packed rows: which rows are tokens, and
/// where each sequence's tokens start in the packed rows. The training kernels run a block on
/// the tokens only; padding positions come back as zeros, which no output reads (attention
/// gives them no weight and pooling skips them), so the result is the same.
struct PackedTokens {
    /// Row of each token in the flattened `[batch · seq]` positions; `None` when every
    /// position is a token.
    rows: Option<Arc<Vec<usize>>>,
    /// Positions in the batch, padding included.
    total: usize,
    /// Each sequence's first packed row and token count.
    sequences: Vec<(usize, usize)>,
}

impl PackedTokens {
    /// The packing of `h` (`[batch, seq, hidden]`) under `mask` (`[batch, seq]`), or `None`
    /// when the batch holds no token at all.
    fn of(h: &Tensor, mask: &Tensor) -> Result<Option<Self>> {
        let (batch, seq, _) = h.dims3()?;
        let mask = mask.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut rows = Vec::with_capacity(mask.len());
        let mut sequences = Vec::with_capacity(batch);
        for b in 0..batch {
            let start = rows.len();
            rows.extend((b * seq..(b + 1) * seq).filter(|&i| mask[i] != 0.0));
            if rows.len() > start {
                sequences.push((start, rows.len() - start));
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let total = batch * seq;
        Ok(Some(Self {
            rows: (rows.len() < total).then(|| Arc::new(rows)),
            total,
            sequences,
        }))
    }

    /// The token rows of `h`, `[tokens, hidden]`.
    fn select(&self, h: &Tensor) -> Result<Tensor> {
        let flat = h.reshape((self.total, h.dim(D::Minus1)?))?;
        Ok(match &self.rows {
            None => flat,
            Some(rows) => flat.apply_op1(transformer_training::SelectRows {
                rows: rows.clone(),
                total: self.total,
            })?,
        })
    }

    /// Packed rows put back into the padded shape `dims`, zeros at padding positions.
    fn place(&self, packed: &Tensor, dims: &[usize]) -> Result<Tensor> {
        let full = match &self.rows {
            None => packed.clone(),
            Some(rows) => packed.apply_op1(transformer_training::PlaceRows {
                rows: rows.clone(),
                total: self.total,
            })?,
        };
        Ok(full.reshape(dims)?)
    }
}

/// Whether the first-order training kernels (`metalearn_kernels::transformer_training`) may
/// run on activations `h`: kernels on, f32 or f64 on the CPU. Callers add their own
/// conditions: no task dimension, and no second-order gradient wanted (the kernels' backward
/// passes are not differentiable).
fn training_kernels_apply(h: &Tensor) -> bool {
    crate::kernels::enabled() && h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64)
}

/// Masked multi-head attention of the projected `q`, `k`, `v` (`[.., batch, seq, hidden]`):
/// the context, `[.., batch, seq, hidden]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
    let q = split_heads(q, heads)?;
    let k = split_heads(k, heads)?;
    let v = split_heads(v, heads)?;
    let head_dim = q.dim(D::Minus1)?;
    let scores = stacked_matmul(&q, &k.transpose(D::Minus2, D::Minus1)?.contiguous()?)?
        .affine(1.0 / (head_dim as f64).sqrt(), 0.0)?;
    // mask [.., batch, seq] → additive bias [.., batch, 1, 1, seq]
    let bias = mask
        .affine(-MASKED_SCORE, MASKED_SCORE)?
        .unsqueeze(D::Minus2)?
        .unsqueeze(D::Minus2)?;
    let weights = ops::softmax(&scores.broadcast_add(&bias)?)?;
    merge_heads(&stacked_matmul(&weights, &v)?)
}

/// The block through the fused CPU kernel (`metalearn_kernels::transformer`), when it applies:
/// kernels on, f32 on the CPU, no task dimension, no adapters, and no gradient wanted through
/// any input (the kernel has no backward pass).
fn fused_block(
    h: &Tensor,
    mask: &Tensor,
    p: &ParamOf,
    opt: &BlockOptions,
) -> Result<Option<Tensor>> {
    if !crate::kernels::enabled()
        || opt.batched
        || opt.lora_rank > 0
        || !h.device().is_cpu()
        || h.dtype() != DType::F32
        || h.rank() != 3
        || h.track_op()
    {
        return Ok(None);
    }
    const NAMES: [&str; 16] = [
        "q_weight",
        "q_bias",
        "k_weight",
        "k_bias",
        "v_weight",
        "v_bias",
        "o_weight",
        "o_bias",
        "attn_norm_gamma",
        "attn_norm_beta",
        "ff1_weight",
        "ff1_bias",
        "ff2_weight",
        "ff2_bias",
        "ff_norm_gamma",
        "ff_norm_beta",
    ];
    let mut weights = Vec::with_capacity(NAMES.len());
    for name in NAMES {
        let w = p(name)?;
        if w.track_op() || w.dtype() != DType::F32 {
            return Ok(None);
        }
        weights.push(w);
    }
    let (batch, seq, hidden) = h.dims3()?;
    let shape = metalearn_kernels::transformer::BlockShape {
        batch,
        seq,
        hidden,
        heads: opt.heads,
        intermediate: p("ff1_weight")?.dim(1)?,
        eps: opt.eps,
    };
    let weights: [&Tensor; 16] = weights.try_into().expect("16 weights");
    Ok(Some(metalearn_kernels::transformer::encoder_block(
        h, mask, weights, shape,
    )?))
}

/// Pools `[.., batch, seq, hidden]` to `[.., batch, hidden]` over the positions where `mask`
/// is 1.
pub(crate) fn sequence_pool(h: &Tensor, mask: &Tensor, mode: Pooling) -> Result<Tensor> {
    let seq_dim = h.rank() - 2;
    let m = mask.unsqueeze(D::Minus1)?;
    Ok(match mode {
        Pooling::Mean => {
            let count = m.sum(seq_dim)?.affine(1.0, 0.0)?;
            // A sequence of padding only (not produced by the tokenizer) pools to zeros.
            let count = count.maximum(1e-9)?;
            h.broadcast_mul(&m)?.sum(seq_dim)?.broadcast_div(&count)?
        }
        Pooling::Cls => h.narrow(seq_dim, 0, 1)?.squeeze(seq_dim)?,
        Pooling::Max => {
            let bias = m.affine(-MASKED_SCORE, MASKED_SCORE)?;
            h.broadcast_add(&bias)?.max(seq_dim)?
        }
    })
}

/// `x W + b` over the last dimension of `x`; `W` is `[in, out]` (`[tasks, in, out]` batched).
/// With `kernels`, through the training kernel (one graph node, bias included).
fn linear(x: &Tensor, w: &Tensor, bias: &Tensor, batched: bool, kernels: bool) -> Result<Tensor> {
    if kernels {
        return Ok(x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &bias.contiguous()?,
            transformer_training::Linear,
        )?);
    }
    let y = matmul_last(x, w, batched)?;
    if batched {
        let tasks = bias.dim(0)?;
        let mut shape = vec![1usize; y.rank()];
        shape[0] = tasks;
        shape[y.rank() - 1] = bias.dim(1)?;
        Ok(y.broadcast_add(&bias.reshape(shape)?)?)
    } else {
        Ok(y.broadcast_add(bias)?)
    }
}

/// `x W` over the last dimension of `x`, as one matrix product over all leading positions.
/// A batch of matrix products over all leading dimensions. candle's CPU matmul takes at most
/// two batch dimensions, and the task-batched attention has three (tasks, batch, heads).
fn stacked_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = a.dims().to_vec();
    let rank = dims.len();
    if rank <= 4 {
        return Ok(a.matmul(b)?);
    }
    let lead: usize = dims[..rank - 2].iter().product();
    let (m, k, n) = (dims[rank - 2], dims[rank - 1], b.dim(D::Minus1)?);
    let product = a.reshape((lead, m, k))?.matmul(&b.reshape((lead, k, n))?)?;
    let mut shape = dims[..rank - 2].to_vec();
    shape.extend([m, n]);
    Ok(product.reshape(shape)?)
}

fn matmul_last(x: &Tensor, w: &Tensor, batched: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let input = dims[dims.len() - 1];
    let output = w.dim(D::Minus1)?;
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank ≥ 1") = output;
    let y = if batched {
        let tasks = dims[0];
        let rows = x.elem_count() / (tasks * input);
        x.reshape((tasks, rows, input))?.matmul(w)?
    } else {
        let rows = x.elem_count() / input;
        x.reshape((rows, input))?.matmul(w)?
    };
    Ok(y.reshape(out_dims)?)
}

/// `[.., seq, hidden]` → `[.., heads, seq, hidden / heads]`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let r = dims.len();
    let mut split = dims[..r - 1].to_vec();
    split.extend([heads, dims[r - 1] / heads]);
    Ok(x.reshape(split)?.transpose(r - 2, r - 1)?.contiguous()?)
}

/// `[.., heads, seq, head_dim]` → `[.., seq, heads · head_dim]`.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let r = dims.len();
    let x = x.transpose(r - 3, r - 2)?.contiguous()?;
    let mut merged = dims[..r - 3].to_vec();
    merged.extend([dims[r - 2], dims[r - 3] * dims[r - 1]]);
    Ok(x.reshape(merged)?)
}

/// Layer norm over the last dimension, with scale and shift; with `kernels`, through the
/// training kernel.
fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    batched: bool,
    kernels: bool,
) -> Result<Tensor> {
    if kernels {
        let op = transformer_training::LayerNorm { eps };
        return Ok(x.contiguous()?.apply_op3(gamma, beta, op)?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    let (gamma, beta) = if batched {
        let mut shape = vec![1usize; x.rank()];
        shape[0] = gamma.dim(0)?;
        shape[x.rank() - 1] = gamma.dim(1)?;
        (
            gamma.reshape(shape.as_slice())?,
            beta.reshape(shape.as_slice())?,
        )
    } else {
        (gamma.clone(), beta.clone())
    };
    Ok(normed.broadcast_mul(&gamma)?.broadcast_add(&beta)?)
}

/// The exact GELU, `x · Φ(x) = x/2 · (1 + erf(x / √2))`.
fn gelu(x: &Tensor) -> Result<Tensor> {
    let cdf = x
        .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?
        .erf()?
        .affine(0.5, 0.5)?;
    Ok(x.mul(&cdf)?)
}
