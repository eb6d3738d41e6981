//! `metalearn inspect`: what a checkpoint holds, without running it: the layers with their
//! output shapes and parameter counts, trainable and frozen parameters, the algorithm and its
//! hyper-parameters (meta-trained models), how far training got, the optimiser, where the data
//! came from, the format version and the file size.

use std::path::PathBuf;

use clap::Args;
use serde_json::{Map, Value};

use metalearn::error::Result;
use metalearn::experiment::resolve_model_path;
use metalearn::inspect::describe;

/// Arguments of `inspect`.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A checkpoint (.safetensors) from train, finetune or meta-train, or a meta-train output
    /// folder (its best checkpoint is shown).
    #[arg(value_name = "CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Print one JSON object with the description as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let path = resolve_model_path(&args.checkpoint)?;
    let report = describe(&path)?;
    if args.json {
        println!("{}", Value::Object(report));
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// A whole number with thousands separators: `1234567` → `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A file size for people: bytes, KiB or MiB.
fn file_size(bytes: u64) -> String {
    match bytes {
        b if b < 1024 => format!("{b} bytes"),
        b if b < 1024 * 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    }
}

/// A JSON value on one line: objects as `type: key=value, ...` (the `type`, `name` or `kind`
/// entry first), strings without quotes.
fn compact(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Object(map) => {
            let head = ["type", "name", "kind"]
                .iter()
                .find_map(|k| map.get(*k).and_then(Value::as_str).map(|v| (*k, v)));
            let rest: Vec<String> = map
                .iter()
                .filter(|(k, _)| head.is_none_or(|(h, _)| h != k.as_str()))
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("{k}={}", compact(v)))
                .collect();
            match head {
                Some((_, name)) if rest.is_empty() => name.to_string(),
                Some((_, name)) => format!("{name}: {}", rest.join(", ")),
                None => rest.join(", "),
            }
        }
        other => other.to_string(),
    }
}

/// A date and time in UTC from seconds since the Unix epoch (proleptic Gregorian calendar).
fn utc_time(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The human-readable form of a [`describe`] report.
fn render(report: &Map<String, Value>) -> String {
    let get = |key: &str| report.get(key).unwrap_or(&Value::Null);
    let num = |value: &Value| value.as_u64().unwrap_or(0);
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        out.push_str(&format!("{label:<13}{text}\n"));
    };
    line("checkpoint", compact(get("path")));
    let provenance = get("provenance");
    let mut written = format!(
        "{}, format {} version {}",
        file_size(num(get("file_bytes"))),
        compact(get("format")),
        num(get("format_version"))
    );
    if let Some(version) = provenance["metalearn_version"]
        .as_str()
        .filter(|v| !v.is_empty())
    {
        written.push_str(&format!(", written by metalearn {version}"));
    }
    if let Some(created) = provenance["created_unix"].as_u64().filter(|t| *t > 0) {
        written.push_str(&format!(" on {}", utc_time(created)));
    }
    line("file", written);
    line(
        "kind",
        match get("kind").as_str() {
            Some("meta-learning") => "meta-learned model (meta-train)".into(),
            Some("supervised") => "supervised model (train / finetune)".into(),
            _ => "model (saved from the library)".into(),
        },
    );
    if !get("algorithm").is_null() || !get("hyper_parameters").is_null() {
        let params = get("hyper_parameters");
        let label = get("algorithm").as_str().unwrap_or("unknown").to_string();
        let rest: Vec<String> = params
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.as_str() != "name")
                    .map(|(k, v)| format!("{k}={}", compact(v)))
                    .collect()
            })
            .unwrap_or_default();
        line("algorithm", format!("{label} ({})", rest.join(", ")));
        line("task", compact(get("task_kind")));
    }
    if !get("loss").is_null() {
        line("loss", compact(get("loss")));
        let metrics: Vec<String> = get("metrics")
            .as_array()
            .map(|a| a.iter().map(compact).collect())
            .unwrap_or_default();
        if !metrics.is_empty() {
            line("metrics", metrics.join(", "));
        }
    }
    if !get("optimizer").is_null() {
        line("optimiser", compact(get("optimizer")));
    }
    if let Some(progress) = get("progress").as_object().filter(|p| !p.is_empty()) {
        let mut parts = Vec::new();
        if let Some(epochs) = progress.get("epochs").and_then(Value::as_u64) {
            parts.push(format!("{epochs} epochs trained"));
        }
        if let Some(iteration) = progress.get("iteration").and_then(Value::as_u64) {
            parts.push(format!("meta-iteration {iteration}"));
        }
        if let Some(steps) = progress.get("optimizer_steps").and_then(Value::as_u64) {
            parts.push(format!("{steps} optimiser steps"));
        }
        if let Some(best) = progress.get("best_validation").and_then(Value::as_array) {
            if let (Some(at), Some(value)) = (
                best.first().and_then(Value::as_u64),
                best.get(1).and_then(Value::as_f64),
            ) {
                parts.push(format!("best validation {value:.4} at iteration {at}"));
            }
        }
        line("progress", parts.join(", "));
    }

    let arch = get("architecture");
    line(
        "architecture",
        format!(
            "input {} → output {}",
            arch["input_shape"], arch["output_shape"]
        ),
    );
    let layers = arch["layers"].as_array().cloned().unwrap_or_default();
    let name_width = layers
        .iter()
        .filter_map(|l| l["name"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(4)
        .max(5);
    let description_width = layers
        .iter()
        .filter_map(|l| l["description"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(4)
        .max(5);
    let mut table = format!(
        "  {:<name_width$}  {:<description_width$}  {:<16}  parameters\n",
        "layer", "type", "output shape"
    );
    for layer in &layers {
        let params = num(&layer["parameters"]);
        let frozen = num(&layer["frozen_parameters"]);
        let note = match frozen {
            0 => String::new(),
            f if f == params => " (frozen)".into(),
            f => format!(" ({} frozen)", grouped(f)),
        };
        table.push_str(&format!(
            "  {:<name_width$}  {:<description_width$}  {:<16}  {}{note}\n",
            layer["name"].as_str().unwrap_or(""),
            layer["description"].as_str().unwrap_or(""),
            layer["output_shape"].to_string(),
            grouped(params),
        ));
    }
    out.push_str(&table);

    let params = get("parameters");
    let mut line = |label: &str, text: String| {
        out.push_str(&format!("{label:<13}{text}\n"));
    };
    line(
        "parameters",
        format!(
            "{} total: {} trainable, {} frozen ({} tensors)",
            grouped(num(&params["total"])),
            grouped(num(&params["trainable"])),
            grouped(num(&params["frozen"])),
            num(&params["tensors"])
        ),
    );
    if num(&params["in_base_model"]) > 0 {
        line(
            "base model",
            format!(
                "{} more values are read from the base encoder (the file holds adapters and \
                 head only)",
                grouped(num(&params["in_base_model"]))
            ),
        );
    }
    let buffers = get("buffers");
    if num(&buffers["tensors"]) > 0 {
        line(
            "buffers",
            format!(
                "{} values in {} tensors (batch-norm running statistics, not trained)",
                grouped(num(&buffers["values"])),
                num(&buffers["tensors"])
            ),
        );
    }
    if let Some(state) = get("state").as_object().filter(|s| !s.is_empty()) {
        let parts: Vec<String> = state
            .iter()
            .map(|(group, counts)| {
                let what = match group.as_str() {
                    "optim" => "optimiser moments",
                    "inner_lr" => "learned inner learning rates",
                    other => other,
                };
                format!(
                    "{what}: {} values in {} tensors",
                    grouped(num(&counts["values"])),
                    num(&counts["tensors"])
                )
            })
            .collect();
        line("state", parts.join("; "));
    }

    if let Some(data) = get("data").as_object() {
        let mut parts = Vec::new();
        if let Some(source) = data
            .get("source")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            parts.push(source.to_string());
        }
        if let Some(target) = data.get("target_name").and_then(Value::as_str) {
            parts.push(format!("target `{target}`"));
        }
        if let Some(kind) = data.get("target_kind").and_then(Value::as_str) {
            parts.push(kind.to_string());
        }
        if let Some(classes) = data.get("num_classes").and_then(Value::as_u64) {
            parts.push(format!("{classes} classes"));
        }
        if let Some(features) = data
            .get("feature_names")
            .and_then(Value::as_array)
            .filter(|f| !f.is_empty())
        {
            parts.push(format!("{} features", features.len()));
        }
        line("data", parts.join(", "));
    }
    if !get("task").is_null() {
        line("tasks", compact(get("task")));
    }
    for (key, label) in [
        ("data", "trained on"),
        ("parent", "fine-tuned from"),
        ("notes", "notes"),
    ] {
        if let Some(text) = provenance[key].as_str().filter(|s| !s.is_empty()) {
            line(label, text.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_dates_are_formatted_for_people() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400 + 3_661), "2000-02-29 01:01:01 UTC");
        assert_eq!(file_size(2048), "2.0 KiB");
    }

    #[test]
    fn compact_puts_the_type_first() {
        let value = json!({"lr": 0.5, "type": "sgd", "momentum": 0.0});
        assert_eq!(compact(&value), "sgd: lr=0.5, momentum=0.0");
    }
}
