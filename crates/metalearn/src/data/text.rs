//! Labelled text in a CSV file: a text column and a label column (any other columns are
//! ignored), and the few-shot draw of K examples per class.

use std::path::Path;

use crate::data::csv::load_text_columns;
use crate::error::Result;

/// Texts with their labels, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelledTexts {
    /// The text of each row.
    pub texts: Vec<String>,
    /// The label of each row (empty when the file was read without a label column).
    pub labels: Vec<String>,
    /// The line each row starts on, for messages.
    pub lines: Vec<u64>,
    /// The file, for messages.
    pub file: String,
}

impl LabelledTexts {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The texts as string slices.
    pub fn text_refs(&self) -> Vec<&str> {
        self.texts.iter().map(String::as_str).collect()
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        Self {
            texts: indices.iter().map(|&i| self.texts[i].clone()).collect(),
            labels: if self.labels.is_empty() {
                Vec::new()
            } else {
                indices.iter().map(|&i| self.labels[i].clone()).collect()
            },
            lines: indices.iter().map(|&i| self.lines[i]).collect(),
            file: self.file.clone(),
        }
    }

    /// Sorted distinct labels, leaving out `unknown` (the out-of-scope label) when given.
    pub fn classes(&self, unknown: Option<&str>) -> Vec<String> {
        let mut classes: Vec<String> = self
            .labels
            .iter()
            .filter(|l| Some(l.as_str()) != unknown)
            .cloned()
            .collect();
        classes.sort();
        classes.dedup();
        classes
    }
}

/// Reads a CSV file's `text_column` and, when given, its `label_column`.
pub fn load_labelled_texts(
    path: &Path,
    text_column: &str,
    label_column: Option<&str>,
) -> Result<LabelledTexts> {
    let mut columns = vec![(text_column, "text")];
    if let Some(label) = label_column {
        columns.push((label, "label"));
    }
    let rows = load_text_columns(path, &columns)?;
    let mut out = LabelledTexts {
        texts: Vec::with_capacity(rows.len()),
        labels: Vec::new(),
        lines: Vec::with_capacity(rows.len()),
        file: path.display().to_string(),
    };
    for (line, mut cells) in rows {
        if label_column.is_some() {
            out.labels.push(cells.pop().expect("two columns"));
        }
        out.texts.push(cells.pop().expect("text column"));
        out.lines.push(line);
    }
    Ok(out)
}

/// The few-shot draw: for each class (sorted by name, `unknown` left out), `shots` of its rows
/// chosen at random with `seed`, returned in class order. A class with fewer rows is an error
/// naming it. The draw of K shots is a prefix of the draw of more shots with the same seed.
pub fn draw_shots(
    data: &LabelledTexts,
    shots: usize,
    seed: u64,
    unknown: Option<&str>,
) -> Result<Vec<usize>> {
    crate::data::image_list::draw_per_class(&data.labels, shots, seed, unknown, &data.file)
}
