//! `metalearn plot`: training and validation curves from a JSONL training log, one chart per
//! metric, stacked in one PNG.
//!
//! Reads the logs that `train` / `finetune` write beside their checkpoint (`<out>.log.jsonl`, one
//! line per epoch: `epoch`, `loss`, metrics, `val_loss`, `val_<metric>`) and the `log.jsonl` of a
//! `meta-train` folder (one line per validation: `iteration`, `meta_loss`, `val_<metric>`,
//! `val_<metric>_ci95`). A metric and its `val_` twin share a chart; a `_ci95` field is drawn as
//! dotted bounds around its value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Value};

use metalearn::error::{Error, Result};
use metalearn::plot::{draw_panels, Panel, Series};

/// Width and height in pixels of one chart; the image stacks one chart per metric.
pub const PANEL_SIZE: (u32, u32) = (800, 300);

/// Fields that are bookkeeping, not curves: drawn only when asked for with `--metrics`.
const NOT_PLOTTED_BY_DEFAULT: [&str; 2] = ["seconds", "lr"];

/// Fields used as the horizontal axis, in order of preference.
const X_FIELDS: [&str; 2] = ["epoch", "iteration"];

/// Suffix of a 95% confidence half-width field (`val_accuracy_ci95`).
const CI_SUFFIX: &str = "_ci95";

/// Arguments of `plot`.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// The JSONL log: `<checkpoint>.log.jsonl` from train/finetune, or log.jsonl in a
    /// meta-train folder (the folder itself works too).
    #[arg(value_name = "LOG")]
    pub log: PathBuf,
    /// Output image (PNG); default: the log's path with the extension .png.
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    /// Comma-separated metrics to draw, e.g. loss,accuracy (default: every metric in the log).
    #[arg(long, value_name = "LIST")]
    pub metrics: Option<String>,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// The numeric content of a training log.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingLog {
    /// The file it was read from.
    pub path: PathBuf,
    /// The horizontal-axis field (`epoch` or `iteration`), or `None` when the records are
    /// numbered by position.
    pub x_field: Option<String>,
    /// Numeric fields of each record, in file order (null values are left out).
    pub records: Vec<BTreeMap<String, f64>>,
    /// Every numeric field name, in order of first appearance.
    pub fields: Vec<String>,
}

impl TrainingLog {
    /// Reads a JSONL log: one JSON object per line; blank lines are skipped. Errors name the file
    /// and line of a malformed record.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut records = Vec::new();
        let mut fields: Vec<String> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line).map_err(|e| {
                Error::Data(format!(
                    "{}:{}: not valid JSON ({e}); every line of a training log is one JSON \
                     object, as train, finetune and meta-train write them",
                    path.display(),
                    index + 1
                ))
            })?;
            let Value::Object(object) = value else {
                return Err(Error::Data(format!(
                    "{}:{}: expected a JSON object such as {{\"epoch\": 1, \"loss\": 0.5}}, found \
                     `{}`",
                    path.display(),
                    index + 1,
                    shorten(line)
                )));
            };
            let mut record = BTreeMap::new();
            for (key, value) in object {
                // Strings and flags are labels, not curves; null is how JSON spells NaN.
                if let Some(number) = value.as_f64() {
                    if !fields.contains(&key) {
                        fields.push(key.clone());
                    }
                    record.insert(key, number);
                }
            }
            records.push(record);
        }
        if records.is_empty() {
            return Err(Error::Data(format!(
                "{}: the log is empty; it fills while training runs (train and finetune write \
                 one line per epoch, meta-train one per validation)",
                path.display()
            )));
        }
        let x_field = X_FIELDS
            .iter()
            .find(|field| records.iter().all(|r| r.contains_key(**field)))
            .map(|field| field.to_string());
        Ok(Self {
            path: path.to_path_buf(),
            x_field,
            records,
            fields,
        })
    }

    /// The metrics that can be charted: each numeric field other than the x axis, bookkeeping
    /// and confidence intervals, with `val_<name>` folded into `<name>`; losses first.
    pub fn metrics(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for field in &self.fields {
            if Some(field) == self.x_field.as_ref()
                || X_FIELDS.contains(&field.as_str())
                || NOT_PLOTTED_BY_DEFAULT.contains(&field.as_str())
                || field.ends_with(CI_SUFFIX)
            {
                continue;
            }
            let name = metric_of(field).to_string();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.sort_by_key(|name| (!name.contains("loss"), name.clone()));
        names
    }

    /// The `(x, value)` points of one field, in file order.
    pub fn points(&self, field: &str) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .enumerate()
            .filter_map(|(i, record)| {
                let x = match &self.x_field {
                    Some(x_field) => record.get(x_field).copied()?,
                    None => (i + 1) as f64,
                };
                record.get(field).map(|y| (x, *y))
            })
            .collect()
    }

    /// The label of the horizontal axis.
    pub fn x_label(&self) -> &str {
        self.x_field.as_deref().unwrap_or("record")
    }

    /// The chart of one metric: its training series, its validation series and the validation
    /// series' 95% confidence bounds, whichever the log has.
    pub fn panel(&self, metric: &str) -> Option<Panel> {
        let mut series = Vec::new();
        let train = self.points(metric);
        if !train.is_empty() {
            series.push(Series::line("training", train));
        }
        let val_field = format!("val_{metric}");
        let val = self.points(&val_field);
        if !val.is_empty() {
            let ci = self.points(&format!("{val_field}{CI_SUFFIX}"));
            series.push(Series::line("validation", val.clone()));
            if !ci.is_empty() {
                let half_widths: BTreeMap<u64, f64> =
                    ci.iter().map(|(x, h)| (x.to_bits(), *h)).collect();
                let bounds: Vec<(f64, f64)> = val
                    .iter()
                    .filter_map(|(x, y)| half_widths.get(&x.to_bits()).map(|h| (*x, *y, *h)))
                    .flat_map(|(x, y, h)| [(x, y - h), (x, y + h)])
                    .collect();
                series.push(Series::dotted("validation ± 95% CI", bounds));
            }
        }
        if series.is_empty() {
            return None;
        }
        Some(Panel {
            title: metric.to_string(),
            x_label: self.x_label().to_string(),
            y_label: metric.to_string(),
            series,
        })
    }
}

/// `val_accuracy` → `accuracy`; other names unchanged.
fn metric_of(field: &str) -> &str {
    field.strip_prefix("val_").unwrap_or(field)
}

/// The first 60 characters of a line, for error messages.
fn shorten(line: &str) -> String {
    let mut short: String = line.chars().take(60).collect();
    if short.len() < line.len() {
        short.push_str("...");
    }
    short
}

/// Resolves `--metrics` against the log: each name must be a metric of the log (a `val_` name
/// selects its metric) or one of its numeric fields such as `lr`.
fn chosen_metrics(log: &TrainingLog, requested: Option<&str>) -> Result<Vec<String>> {
    let available = log.metrics();
    let Some(requested) = requested else {
        if available.is_empty() {
            return Err(Error::Data(format!(
                "{}: no numeric series to plot (numeric fields: {}); a training log has fields \
                 such as loss, accuracy or val_loss",
                log.path.display(),
                if log.fields.is_empty() {
                    "none".to_string()
                } else {
                    log.fields.join(", ")
                }
            )));
        }
        return Ok(available);
    };
    let mut chosen: Vec<String> = Vec::new();
    for name in requested
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let metric = if available.iter().any(|m| m == name) {
            name
        } else if available.iter().any(|m| m == metric_of(name)) {
            metric_of(name)
        } else if log.fields.iter().any(|f| f == name) {
            name
        } else {
            return Err(Error::Config(format!(
                "--metrics: {} has no metric `{name}`; it has: {}",
                log.path.display(),
                available
                    .iter()
                    .chain(
                        log.fields
                            .iter()
                            .filter(|f| { NOT_PLOTTED_BY_DEFAULT.contains(&f.as_str()) })
                    )
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if !chosen.iter().any(|m| m == metric) {
            chosen.push(metric.to_string());
        }
    }
    if chosen.is_empty() {
        return Err(Error::Config(
            "--metrics is empty: name at least one metric, e.g. --metrics loss,accuracy".into(),
        ));
    }
    Ok(chosen)
}

/// The log file of `path`: the file itself, or `log.jsonl` inside a meta-train folder.
fn resolve_log_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let inside = path.join(metalearn::meta_training::LOG_FILE);
        if inside.is_file() {
            return Ok(inside);
        }
        return Err(Error::Config(format!(
            "{} is a folder without {}: pass a training log (<checkpoint>.log.jsonl) or a \
             meta-train --out folder",
            path.display(),
            metalearn::meta_training::LOG_FILE
        )));
    }
    if !path.exists() {
        return Err(Error::Config(format!(
            "{}: no such log file; train writes <checkpoint>.log.jsonl, meta-train writes \
             <out>/{}",
            path.display(),
            metalearn::meta_training::LOG_FILE
        )));
    }
    Ok(path.to_path_buf())
}

/// Runs `plot`.
pub fn run(args: &PlotArgs) -> Result<()> {
    let log_path = resolve_log_path(&args.log)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| log_path.with_extension("png"));
    let is_png = out
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("png"));
    if !is_png {
        return Err(Error::Config(format!(
            "--out {}: the chart is a PNG image, so the file name must end in .png",
            out.display()
        )));
    }
    let log = TrainingLog::read(&log_path)?;
    let metrics = chosen_metrics(&log, args.metrics.as_deref())?;
    let mut panels = Vec::with_capacity(metrics.len());
    for metric in &metrics {
        let panel = log.panel(metric).ok_or_else(|| {
            Error::Data(format!(
                "{}: metric `{metric}` has no numeric values to plot",
                log_path.display()
            ))
        })?;
        panels.push(panel);
    }
    draw_panels(&out, &panels, PANEL_SIZE)?;
    let (width, height) = (PANEL_SIZE.0, PANEL_SIZE.1 * panels.len() as u32);
    if args.json {
        println!(
            "{}",
            json!({
                "command": "plot",
                "log": log_path.display().to_string(),
                "plot": out.display().to_string(),
                "metrics": metrics,
                "records": log.records.len(),
                "x": log.x_label(),
                "width": width,
                "height": height,
            })
        );
    } else {
        println!(
            "wrote {} ({} chart{}: {}; {} record{} by {})",
            out.display(),
            metrics.len(),
            if metrics.len() == 1 { "" } else { "s" },
            metrics.join(", "),
            log.records.len(),
            if log.records.len() == 1 { "" } else { "s" },
            log.x_label()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_from(text: &str) -> Result<TrainingLog> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, text).expect("write");
        TrainingLog::read(&path)
    }

    #[test]
    fn epoch_logs_pair_training_and_validation_curves() {
        let log = log_from(
            "{\"epoch\":1,\"loss\":0.9,\"accuracy\":0.5,\"val_loss\":1.0,\"val_accuracy\":0.4,\"seconds\":0.1}\n\
             {\"epoch\":2,\"loss\":0.7,\"accuracy\":0.6,\"val_loss\":0.8,\"val_accuracy\":0.5,\"seconds\":0.1}\n",
        )
        .expect("reads");
        assert_eq!(log.x_field.as_deref(), Some("epoch"));
        assert_eq!(log.metrics(), vec!["loss", "accuracy"]);
        let panel = log.panel("loss").expect("loss chart");
        let labels: Vec<&str> = panel.series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, vec!["training", "validation"]);
        assert_eq!(panel.series[1].points, vec![(1.0, 1.0), (2.0, 0.8)]);
    }

    #[test]
    fn meta_logs_draw_confidence_bounds() {
        let log = log_from(
            "{\"iteration\":10,\"meta_loss\":2.0,\"lr\":0.001,\"val_mse\":1.5,\"val_mse_ci95\":0.5,\"seconds\":1}\n",
        )
        .expect("reads");
        assert_eq!(log.x_field.as_deref(), Some("iteration"));
        assert_eq!(log.metrics(), vec!["meta_loss", "mse"]);
        let panel = log.panel("mse").expect("mse chart");
        assert_eq!(panel.series.len(), 2);
        assert_eq!(panel.series[1].points, vec![(10.0, 1.0), (10.0, 2.0)]);
    }

    #[test]
    fn malformed_lines_are_reported_by_number() {
        let err = log_from("{\"epoch\":1,\"loss\":1}\n\n{\"epoch\":2,\"loss\":\n")
            .expect_err("malformed");
        assert!(err.to_string().contains("log.jsonl:3"), "{err}");
        let err = log_from("{\"epoch\":1}\n[1, 2]\n").expect_err("not an object");
        assert!(err.to_string().contains("log.jsonl:2"), "{err}");
    }

    #[test]
    fn requested_metrics_must_exist() {
        let log = log_from("{\"epoch\":1,\"loss\":1,\"lr\":0.1}\n").expect("reads");
        assert_eq!(
            chosen_metrics(&log, Some("val_loss, lr")).expect("known"),
            vec!["loss", "lr"]
        );
        let err = chosen_metrics(&log, Some("accuracy")).expect_err("unknown");
        assert!(err.to_string().contains("accuracy"), "{err}");
        assert!(err.to_string().contains("loss"), "{err}");
    }
}
