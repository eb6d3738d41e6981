//! Console output shared by the commands: result lines, notes, the final JSON object, and the
//! formatting of scores.

use std::collections::BTreeMap;

use metalearn::transfer::text::TextRunReport;
use serde_json::{json, Value};

/// The JSON fields a command reports (with `--json`, printed as the last line of stdout).
pub type Report = serde_json::Map<String, Value>;

/// Whether stderr is a terminal (progress bars are drawn only then).
pub fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Console output of one command: human-readable lines on stdout (unless `--json` or
/// `--quiet`), notes on stderr (unless `--quiet`), and with `--json` one JSON object as the last
/// line of stdout.
#[derive(Clone, Copy, Debug)]
pub struct Console {
    /// `--json` was given.
    pub json: bool,
    /// `--quiet` was given.
    pub quiet: bool,
}

impl Console {
    /// A console for the given flags.
    pub fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }
    /// Whether a progress bar may be drawn.
    pub fn progress(&self) -> bool {
        !self.json && !self.quiet && stderr_is_terminal()
    }
    /// A result line for people.
    pub fn line(&self, text: &str) {
        if !self.json && !self.quiet {
            println!("{text}");
        }
    }
    /// A note on stderr (which loss was chosen, warnings).
    pub fn note(&self, text: &str) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }
    /// Prints the final JSON object when `--json` is on.
    pub fn finish(&self, report: &Report) {
        if self.json {
            println!("{}", Value::Object(report.clone()));
        }
    }
}

/// Prints what a text-model run did (`train --encoder`, `finetune` of a text model): a line
/// for people, the validation scores, and the JSON report.
pub fn report_text_run(console: &Console, command: &str, report: &TextRunReport) {
    let mut summary = Report::new();
    summary.insert("command".into(), json!(command));
    if let Value::Object(fields) = serde_json::to_value(report).expect("report serialises") {
        summary.extend(fields);
    }
    let labels = match report.train.label_examples {
        0 => String::new(),
        n => format!(" and {n} labels"),
    };
    console.line(&format!(
        "trained a {}-class text classifier ({}) on {} rows{labels} in {:.1} s",
        report.train.classes, report.train.method, report.train.rows, report.seconds
    ));
    if let Some(val) = &report.validation {
        let mut line = format!(
            "validation: accuracy {:.4}, in-scope accuracy {:.4}",
            val.accuracy, val.in_scope_accuracy
        );
        if let Some(recall) = val.oos_recall {
            line.push_str(&format!(", out-of-scope recall {recall:.4}"));
        }
        console.line(&line);
    }
    console.line(&format!("saved {}", report.out));
    console.finish(&summary);
}

/// Formats the loss and metrics of a report for people: `loss 0.1234  accuracy 0.9500`.
pub fn format_scores(report: &Report, prefix: &str) -> String {
    let mut parts = Vec::new();
    let mut keys: Vec<&String> = report
        .keys()
        .filter(|k| match k.strip_prefix(prefix) {
            Some(rest) => !rest.starts_with("val_") && is_score(rest),
            None => false,
        })
        .collect();
    // The loss first, then the metrics alphabetically.
    keys.sort_by_key(|k| (k.as_str() != format!("{prefix}loss"), k.to_string()));
    for key in keys {
        if let Some(v) = report[key].as_f64() {
            parts.push(format!("{} {v:.4}", &key[prefix.len()..]));
        }
    }
    parts.join("  ")
}

fn is_score(key: &str) -> bool {
    matches!(key, "loss" | "accuracy" | "mse" | "mae")
}

/// Reads loss and metric values out of an `evaluate` map.
pub fn scores_to_report(scores: BTreeMap<String, f64>) -> Report {
    scores.into_iter().map(|(k, v)| (k, json!(v))).collect()
}
