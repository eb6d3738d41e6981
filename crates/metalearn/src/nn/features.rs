//! The reference forward pass of [`Layer::FeatureEmbedding`](crate::nn::architecture::Layer):
//! tabular features (categorical, multi-valued, numeric) to one concatenated vector.
//!
//! The ids arrive as numbers in the input tensor. They are read on the host once per call,
//! checked, and turned into one gather (`index_select`) per field of the filled slots' rows,
//! each weighted (1 for a categorical value, `1 / count` for each value of a multi-valued cell)
//! and added into its example's output row (`index_add`; empty slots add nothing), so a
//! multi-valued cell's output is the mean of its values' embeddings. Gather, weighting and
//! adding are ordinary differentiable candle ops: gradients reach the tables, to any order.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::nn::architecture::{FeatureField, FeatureKind};
use crate::nn::params::ParamSet;

/// Checks the fields of a feature-embedding layer; returns the input slots they read.
pub(crate) fn check_fields(fields: &[FeatureField]) -> std::result::Result<usize, String> {
    if fields.is_empty() {
        return Err("feature embedding needs at least one field".into());
    }
    let mut names = std::collections::HashSet::new();
    let mut slots = 0;
    for f in fields {
        if !names.insert(f.name.as_str()) {
            return Err(format!("two feature fields are named `{}`", f.name));
        }
        if f.name.is_empty() || f.name.contains('.') {
            return Err(format!(
                "feature field name `{}` must be non-empty and have no `.`",
                f.name
            ));
        }
        let ok = match f.kind {
            FeatureKind::Categorical => f.slots == 1 && f.vocab > 0 && f.dim > 0,
            FeatureKind::MultiValued => f.slots > 0 && f.vocab > 0 && f.dim > 0,
            FeatureKind::Numeric => f.slots == 1 && f.dim == 1,
        };
        if !ok {
            return Err(format!(
                "feature field `{}` ({:?}): categorical needs slots = 1, vocab > 0, dim > 0; \
                 multi-valued slots > 0, vocab > 0, dim > 0; numeric slots = 1, dim = 1; got \
                 slots {}, vocab {}, dim {}",
                f.name, f.kind, f.slots, f.vocab, f.dim
            ));
        }
        slots += f.slots;
    }
    Ok(slots)
}

/// Embeds `h` (`[batch, slots]`, or `[tasks, batch, slots]` when `batched`) with the tables
/// `<layer>.<field>` of `params`. In batched mode a table may carry a task dimension (per-task
/// fast weights) or be the meta-parameter broadcast over tasks (read once).
pub(crate) fn embed(
    h: &Tensor,
    fields: &[FeatureField],
    layer: &str,
    params: &ParamSet,
    batched: bool,
) -> Result<Tensor> {
    let dims = h.dims().to_vec();
    let slots: usize = fields.iter().map(|f| f.slots).sum();
    let lead = &dims[..dims.len().saturating_sub(1)];
    if dims.last() != Some(&slots) || lead.len() != if batched { 2 } else { 1 } {
        return Err(Error::Shape(format!(
            "feature embedding `{layer}` reads {slots} slots per example, got input {dims:?}"
        )));
    }
    let rows: usize = lead.iter().product();
    let tasks = if batched { lead[0] } else { 1 };
    let per_task = rows / tasks.max(1);
    let values: Vec<f64> = h.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let device = h.device();
    let mut parts = Vec::with_capacity(fields.len());
    let mut offset = 0;
    for field in fields {
        let column = |r: usize, s: usize| values[r * slots + offset + s];
        if field.kind == FeatureKind::Numeric {
            parts.push(
                h.reshape((rows, slots))?
                    .narrow(1, offset, 1)?
                    .to_dtype(h.dtype())?,
            );
            offset += 1;
            continue;
        }
        let table = params.get(&format!("{layer}.{}", field.name))?;
        // A table with a task dimension: one vocabulary per task, or one shared (a broadcast).
        let (table, per_task_tables) = match table.rank() {
            2 => (table.clone(), false),
            3 if table.stride()[0] == 0 => (table.get(0)?, false),
            3 => (
                table.reshape((table.dim(0)? * table.dim(1)?, table.dim(2)?))?,
                true,
            ),
            _ => {
                return Err(Error::Shape(format!(
                    "feature table `{layer}.{}` has shape {:?}",
                    field.name,
                    table.dims()
                )))
            }
        };
        // One entry per filled slot: (row, id, weight). Empty slots add nothing, and a row's
        // output is the weighted sum of its entries' table rows.
        let mut ids = Vec::with_capacity(rows * field.slots);
        let mut weights = Vec::with_capacity(rows * field.slots);
        let mut entry_rows = Vec::with_capacity(rows * field.slots);
        for r in 0..rows {
            let present = (0..field.slots)
                .filter(|&s| column(r, s) >= 0.0)
                .count()
                .max(1);
            for s in 0..field.slots {
                let v = column(r, s);
                if v < 0.0 {
                    continue;
                }
                if v.fract() != 0.0 || v >= field.vocab as f64 {
                    return Err(Error::Data(format!(
                        "feature embedding `{layer}`: field `{}` holds {v}, not an id in \
                         0..{} (or -1 for an empty slot); encode the input with the model's \
                         vocabularies",
                        field.name, field.vocab
                    )));
                }
                let base = if per_task_tables {
                    (r / per_task) * field.vocab
                } else {
                    0
                };
                ids.push((base + v as usize) as u32);
                weights.push(1.0 / present as f64);
                entry_rows.push(r as u32);
            }
        }
        if rows == 0 {
            parts.push(Tensor::zeros((0, field.dim), table.dtype(), device)?);
            offset += field.slots;
            continue;
        }
        if ids.is_empty() {
            // Every slot empty: one entry of weight 0 keeps the table in the graph (a zero
            // gradient, not none), as for any batch with some empty slots.
            ids.push(0);
            weights.push(0.0);
            entry_rows.push(0);
        }
        let entries = ids.len();
        let gathered = table.index_select(&Tensor::from_vec(ids, entries, device)?, 0)?;
        let single = entries == rows && weights.iter().all(|&w| w == 1.0);
        parts.push(if single {
            // One value in every row (a categorical field without empty cells): the gathered
            // rows are the output.
            gathered
        } else {
            // A sum over a middle dimension is slow in candle; adding the weighted rows into
            // their output rows is one pass.
            let weights =
                Tensor::from_vec(weights, (entries, 1), device)?.to_dtype(table.dtype())?;
            let entry_rows = Tensor::from_vec(entry_rows, entries, device)?;
            Tensor::zeros((rows, field.dim), table.dtype(), device)?.index_add(
                &entry_rows,
                &gathered.broadcast_mul(&weights)?,
                0,
            )?
        });
        offset += field.slots;
    }
    let out = Tensor::cat(&parts, 1)?;
    let width = out.dim(1)?;
    let mut shape = lead.to_vec();
    shape.push(width);
    Ok(out.reshape(shape)?)
}
