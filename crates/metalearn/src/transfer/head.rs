//! Choosing the output head and loss from the target: whether it holds classes (how many) or
//! numbers, and the loss, metrics and output meaning that follow.

use candle_core::DType;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::nn::architecture::{Architecture, Layer};
use crate::train::loss::Loss;
use crate::train::metrics::Metric;
use crate::transfer::{OutputKind, TargetKind};

/// Distinct values of the target, checked to be finite.
pub(crate) fn target_values(ds: &Dataset) -> Result<Vec<f64>> {
    let values = ds.y.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Data(format!(
            "{}: target `{}` of example {} is not a finite number",
            ds.source,
            ds.target_name,
            bad + 1
        )));
    }
    Ok(values)
}

/// The largest integer-coded target with this many distinct values that is still read as classes.
const MAX_INTEGER_CLASSES: usize = 100;

/// Decides what the target is, and says why.
pub fn detect_target(ds: &Dataset) -> Result<(TargetKind, usize, String)> {
    if let Some(names) = &ds.class_names {
        let k = names.len();
        return Ok(match k {
            0 | 1 => {
                return Err(Error::Data(format!(
                    "{}: target `{}` has {} class(es); classification needs at least 2",
                    ds.source, ds.target_name, k
                )))
            }
            2 => (
                TargetKind::Binary,
                2,
                format!("target `{}` has 2 classes {:?}", ds.target_name, names),
            ),
            _ => (
                TargetKind::Multiclass,
                k,
                format!("target `{}` has {k} classes", ds.target_name),
            ),
        });
    }
    let values = target_values(ds)?;
    let all_integers = values.iter().all(|v| v.fract() == 0.0 && *v >= 0.0);
    let mut distinct: Vec<i64> = values.iter().map(|v| *v as i64).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if all_integers && distinct.iter().all(|v| *v == 0 || *v == 1) {
        return Ok((
            TargetKind::Binary,
            2,
            format!("target `{}` holds only 0 and 1", ds.target_name),
        ));
    }
    let max = distinct.last().copied().unwrap_or(0) as usize;
    // Integer codes 0..k with repeats look like classes; anything else is a quantity.
    if all_integers
        && max < MAX_INTEGER_CLASSES
        && distinct.len() > 2
        && distinct.len() * 2 <= values.len()
    {
        return Ok((
            TargetKind::Multiclass,
            max + 1,
            format!(
                "target `{}` holds integer class ids 0..{max}",
                ds.target_name
            ),
        ));
    }
    Ok((
        TargetKind::Regression,
        0,
        format!("target `{}` holds numbers", ds.target_name),
    ))
}

/// The output head and training loss for a target, honouring an explicit `--loss`.
#[derive(Clone, Debug)]
pub struct HeadPlan {
    /// What the target is.
    pub target_kind: TargetKind,
    /// Output units.
    pub units: usize,
    /// Whether a sigmoid follows the head.
    pub sigmoid: bool,
    /// Loss.
    pub loss: Loss,
    /// Metrics.
    pub metrics: Vec<Metric>,
    /// What the output means.
    pub output: OutputKind,
    /// Classes, for classification.
    pub num_classes: Option<usize>,
}

/// Plans the head for `ds`: the loss is `requested` or the default for the detected target.
/// Returns the plan and a sentence saying which loss was chosen and why.
pub fn plan_head(ds: &Dataset, requested: Option<Loss>) -> Result<(HeadPlan, String)> {
    let (kind, classes, why) = detect_target(ds)?;
    let loss = match requested {
        Some(loss) => loss,
        None => match kind {
            TargetKind::Multiclass => Loss::CategoricalCrossEntropy,
            TargetKind::Binary => Loss::BinaryCrossEntropy,
            TargetKind::Regression => Loss::Mse,
        },
    };
    let classification = [Metric::Accuracy].to_vec();
    let plan = match loss {
        Loss::CategoricalCrossEntropy => {
            if kind == TargetKind::Regression {
                return Err(Error::Config(format!(
                    "--loss cross_entropy needs class labels, but {why} (not integer class ids \
                     0..k); use --loss mse"
                )));
            }
            HeadPlan {
                target_kind: if classes > 2 {
                    TargetKind::Multiclass
                } else {
                    TargetKind::Binary
                },
                units: classes,
                sigmoid: false,
                loss,
                metrics: classification,
                output: OutputKind::ClassLogits,
                num_classes: Some(classes),
            }
        }
        Loss::BinaryCrossEntropy | Loss::BinaryCrossEntropyWithLogits => {
            if kind != TargetKind::Binary {
                return Err(Error::Config(format!(
                    "--loss {} needs a two-class (0/1) target, but {why}; use --loss {}",
                    loss.name(),
                    if kind == TargetKind::Multiclass {
                        "cross_entropy"
                    } else {
                        "mse"
                    }
                )));
            }
            let sigmoid = loss == Loss::BinaryCrossEntropy;
            HeadPlan {
                target_kind: TargetKind::Binary,
                units: 1,
                sigmoid,
                loss,
                metrics: classification,
                output: if sigmoid {
                    OutputKind::Probability
                } else {
                    OutputKind::BinaryLogit
                },
                num_classes: Some(2),
            }
        }
        Loss::Mse => HeadPlan {
            target_kind: TargetKind::Regression,
            units: 1,
            sigmoid: false,
            loss,
            metrics: vec![Metric::Mae],
            output: OutputKind::Value,
            num_classes: None,
        },
    };
    let how = if requested.is_some() {
        "as requested"
    } else {
        "chosen because"
    };
    let sentence = if requested.is_some() {
        format!("loss: {} ({how}; {why})", loss.name())
    } else {
        format!("loss: {} ({how} {why})", loss.name())
    };
    Ok((plan, sentence))
}

/// Appends the head of `plan` (dense layer named `head`, plus a sigmoid when needed).
pub fn push_head(arch: &mut Architecture, plan: &HeadPlan) -> Result<()> {
    arch.push_named("head", Layer::dense(plan.units))?;
    if plan.sigmoid {
        arch.push_named("head_sigmoid", Layer::sigmoid())?;
    }
    Ok(())
}

/// Parses a comma-separated list of hidden-layer sizes (`""` or `none` for no hidden layer).
pub fn parse_hidden(text: &str) -> Result<Vec<usize>> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            match part.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(Error::Config(format!(
                    "--hidden: `{part}` is not a layer size; give positive whole numbers separated \
                     by commas, e.g. 64,32"
                ))),
            }
        })
        .collect()
}
