//! Scores of a text classifier on labelled texts, with out-of-scope queries: the threshold on
//! the top class probability that maximises accuracy with "unknown" as one more class, and the
//! metrics of Larson et al. (2019): in-scope accuracy (correct *and* not rejected), out-of-scope
//! recall and precision.

use candle_core::D;
use serde::Serialize;

use crate::data::text::LabelledTexts;
use crate::error::{Error, Result};
use crate::transfer::text::model::TextClassifier;

/// Scores on one labelled set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextScores {
    /// Rows scored.
    pub rows: usize,
    /// Accuracy over every row, the unknown label counting as one more class (equal to the
    /// closed-set accuracy when there is no unknown rule and no unknown rows).
    pub accuracy: f64,
    /// Accuracy over the known classes' rows, taking the best class and ignoring rejection.
    pub closed_accuracy: f64,
    /// Known-class rows answered with the right class and not rejected, over known-class rows.
    pub in_scope_accuracy: f64,
    /// Unknown rows rejected, over unknown rows (`None` without unknown rows).
    pub oos_recall: Option<f64>,
    /// Unknown rows among the rejected ones (`None` when nothing was rejected).
    pub oos_precision: Option<f64>,
    /// The threshold in force.
    pub threshold: Option<f64>,
}

/// Per-row facts the scores are computed from.
struct Rows {
    /// The row's class id, or `None` for an unknown row.
    truth: Vec<Option<usize>>,
    best: Vec<usize>,
    confidence: Vec<f64>,
}

fn score_rows(model: &TextClassifier, data: &LabelledTexts, batch_size: usize) -> Result<Rows> {
    if data.labels.is_empty() {
        return Err(Error::Data(format!(
            "{}: scoring needs the label column",
            data.file
        )));
    }
    let unknown = model.unknown().map(|r| r.label.as_str());
    let mut truth = Vec::with_capacity(data.len());
    for (label, line) in data.labels.iter().zip(&data.lines) {
        match model.classes().binary_search(label) {
            Ok(c) => truth.push(Some(c)),
            Err(_) if Some(label.as_str()) == unknown => truth.push(None),
            Err(_) => {
                return Err(Error::Data(format!(
                    "{}, line {line}: label `{label}` is not a class of the model{}",
                    data.file,
                    match unknown {
                        Some(u) => format!(" nor its unknown label `{u}`"),
                        None => String::new(),
                    }
                )))
            }
        }
    }
    let probabilities = model.probabilities(&data.text_refs(), batch_size)?;
    let best = probabilities
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|b| b as usize)
        .collect();
    let confidence = probabilities
        .max(D::Minus1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    Ok(Rows {
        truth,
        best,
        confidence,
    })
}

fn scores(rows: &Rows, threshold: Option<f64>) -> TextScores {
    let kept = |i: usize| threshold.is_none_or(|t| rows.confidence[i] >= t);
    let n = rows.truth.len();
    let (mut correct, mut known, mut closed, mut in_scope) = (0usize, 0usize, 0usize, 0usize);
    let (mut unknown, mut rejected, mut unknown_rejected) = (0usize, 0usize, 0usize);
    for i in 0..n {
        if !kept(i) {
            rejected += 1;
        }
        match rows.truth[i] {
            Some(c) => {
                known += 1;
                if rows.best[i] == c {
                    closed += 1;
                    if kept(i) {
                        in_scope += 1;
                        correct += 1;
                    }
                }
            }
            None => {
                unknown += 1;
                if !kept(i) {
                    unknown_rejected += 1;
                    correct += 1;
                }
            }
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    TextScores {
        rows: n,
        accuracy: ratio(correct, n),
        closed_accuracy: ratio(closed, known),
        in_scope_accuracy: ratio(in_scope, known),
        oos_recall: (unknown > 0).then(|| ratio(unknown_rejected, unknown)),
        oos_precision: (rejected > 0).then(|| ratio(unknown_rejected, rejected)),
        threshold,
    }
}

/// Scores `model` on `data` with its own threshold.
pub fn score_texts(
    model: &TextClassifier,
    data: &LabelledTexts,
    batch_size: usize,
) -> Result<TextScores> {
    let rows = score_rows(model, data, batch_size)?;
    Ok(scores(&rows, model.unknown().map(|r| r.threshold)))
}

/// The threshold that maximises `accuracy` (unknown as a class) on `data`, searched over
/// −∞, the midpoints between consecutive distinct confidences and +∞; ties go to the lowest.
/// `model` must already have its unknown label set (the threshold is not used here).
pub fn choose_threshold(
    model: &TextClassifier,
    data: &LabelledTexts,
    batch_size: usize,
) -> Result<f64> {
    let rows = score_rows(model, data, batch_size)?;
    let mut values = rows.confidence.clone();
    values.sort_by(f64::total_cmp);
    values.dedup();
    let mut candidates = vec![f64::NEG_INFINITY];
    candidates.extend(values.windows(2).map(|w| (w[0] + w[1]) / 2.0));
    candidates.push(f64::INFINITY);
    // Accuracy as a function of t changes only at the confidences: sweep in order.
    let mut order: Vec<usize> = (0..rows.truth.len()).collect();
    order.sort_by(|&a, &b| rows.confidence[a].total_cmp(&rows.confidence[b]));
    let mut correct: i64 = rows
        .truth
        .iter()
        .zip(&rows.best)
        .filter(|(t, b)| **t == Some(**b))
        .count() as i64;
    let (mut best_t, mut best_correct) = (f64::NEG_INFINITY, correct);
    let mut next = 0;
    for &t in &candidates[1..] {
        while next < order.len() && rows.confidence[order[next]] < t {
            let i = order[next];
            match rows.truth[i] {
                Some(c) if rows.best[i] == c => correct -= 1,
                None => correct += 1,
                _ => {}
            }
            next += 1;
        }
        if correct > best_correct {
            best_correct = correct;
            best_t = t;
        }
    }
    Ok(best_t)
}
