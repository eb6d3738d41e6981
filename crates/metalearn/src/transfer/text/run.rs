//! A whole `train --encoder` run: read the encoder and the CSV, draw the few-shot examples,
//! train by the chosen method, choose the out-of-scope threshold on the validation data, and
//! save the self-contained checkpoint.

use std::path::PathBuf;

use candle_core::DType;
use serde::Serialize;

use crate::data::text::{draw_shots, load_labelled_texts};
use crate::error::{Error, Result};
use crate::text::TextEncoder;
use crate::text::UnknownRule;
use crate::transfer::text::score::{choose_threshold, score_texts, TextScores};
use crate::transfer::text::train::{train_text_classifier, TextTrainPlan, TextTrainReport};

/// Everything a text training run needs.
#[derive(Clone, Debug)]
pub struct TextRunSettings {
    /// The encoder folder.
    pub encoder: PathBuf,
    /// Training CSV.
    pub data: PathBuf,
    /// Its text column.
    pub text_column: String,
    /// Its label column.
    pub label_column: String,
    /// Draw this many examples per class (the few-shot protocol); all rows when `None`.
    pub shots_per_class: Option<usize>,
    /// The label of out-of-scope rows: not a class; a rejection threshold is chosen on the
    /// validation data.
    pub unknown_label: Option<String>,
    /// Validation CSV (same columns).
    pub validation: Option<PathBuf>,
    /// The method and its settings (its seed also seeds the draw).
    pub plan: TextTrainPlan,
    /// Where to save the model.
    pub out: PathBuf,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct TextRunReport {
    /// The training itself.
    pub train: TextTrainReport,
    /// Rows drawn per class (`None`: every row).
    pub shots_per_class: Option<usize>,
    /// The drawn rows: 0-based indices of data rows of the training file, in draw order
    /// (`None`: every row), so that other tools can train on the same draw.
    pub drawn_rows: Option<Vec<usize>>,
    /// The chosen rejection threshold.
    pub threshold: Option<f64>,
    /// Scores on the validation data (with the threshold).
    pub validation: Option<TextScores>,
    /// Wall time of the whole run (loading, training, threshold, saving), seconds.
    pub seconds: f64,
    /// Where the model is.
    pub out: String,
}

/// Runs it.
pub fn train_text_and_save(
    settings: &TextRunSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<TextRunReport> {
    let started = std::time::Instant::now();
    if settings.unknown_label.is_some() && settings.validation.is_none() {
        return Err(Error::Config(
            "--unknown-label needs --validation-data FILE: the rejection threshold is chosen \
             on validation rows that include out-of-scope ones"
                .into(),
        ));
    }
    let encoder = TextEncoder::load(&settings.encoder, DType::F32)?;
    let mut train = load_labelled_texts(
        &settings.data,
        &settings.text_column,
        Some(&settings.label_column),
    )?;
    let unknown = settings.unknown_label.as_deref();
    let mut drawn_rows = None;
    if let Some(k) = settings.shots_per_class {
        let rows = draw_shots(&train, k, settings.plan.seed, unknown)?;
        train = train.select(&rows);
        drawn_rows = Some(rows);
        progress(&format!(
            "drew {k} examples per class with seed {}: {} rows",
            settings.plan.seed,
            train.len()
        ));
    }
    let (mut model, report) = train_text_classifier(
        &encoder,
        &train,
        unknown,
        &settings.plan,
        &settings.text_column,
        &settings.label_column,
        progress,
    )?;
    let mut threshold = None;
    let mut validation = None;
    if let Some(path) = &settings.validation {
        let val = load_labelled_texts(path, &settings.text_column, Some(&settings.label_column))?;
        if let Some(label) = unknown {
            model.set_unknown(Some(UnknownRule {
                label: label.to_string(),
                threshold: f64::NEG_INFINITY,
            }));
            // Probabilities lie in [0, 1]: the infinite ends of the search are stored as 0
            // (reject nothing) and 2 (reject everything), which JSON can hold.
            let t = choose_threshold(&model, &val, 64)?.clamp(0.0, 2.0);
            progress(&format!(
                "rejection threshold {t:.4} (top class probability), chosen on {}",
                path.display()
            ));
            model.set_unknown(Some(UnknownRule {
                label: label.to_string(),
                threshold: t,
            }));
            threshold = Some(t);
        }
        validation = Some(score_texts(&model, &val, 64)?);
    }
    model.save(&settings.out)?;
    Ok(TextRunReport {
        train: report,
        shots_per_class: settings.shots_per_class,
        drawn_rows,
        threshold,
        validation,
        seconds: started.elapsed().as_secs_f64(),
        out: settings.out.display().to_string(),
    })
}
