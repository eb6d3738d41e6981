//! `metalearn recommend`: adapt a meta-trained recommender to one new user's few ratings and
//! print the items they have not rated with the highest predicted ratings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use metalearn::error::{Error, Result};
use metalearn::experiment::load_meta_model;
use metalearn::experiment::recommend::recommend;

/// Arguments of `recommend`.
#[derive(Args, Debug, Clone)]
pub struct RecommendArgs {
    /// A meta-trained recommendation model (checkpoint or meta-train output folder).
    #[arg(long)]
    pub model: PathBuf,
    /// The user's ratings: a CSV file with the model's item and rating columns (e.g.
    /// `item,rating`).
    #[arg(long)]
    pub ratings: PathBuf,
    /// The user's features: a CSV file with a header and one row (e.g. `gender,age,occupation,zip`);
    /// without it the user's features are unknown.
    #[arg(long)]
    pub user_features: Option<PathBuf>,
    /// How many items to recommend.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Adaptation steps (default: algorithm.eval_inner_steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// The folder with the item and user files (default: the one the model was trained on).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

fn read_table(path: &Path) -> Result<(Vec<String>, Vec<csv::StringRecord>)> {
    let fail = |e: csv::Error| Error::Data(format!("{}: {e}", path.display()));
    let mut reader = csv::Reader::from_path(path).map_err(fail)?;
    let header = reader
        .headers()
        .map_err(fail)?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let rows = reader
        .records()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(fail)?;
    Ok((header, rows))
}

/// Runs `recommend`.
pub fn run(args: &RecommendArgs) -> Result<()> {
    let device = candle_core::Device::Cpu;
    let (learner, mut config, _) = load_meta_model(&args.model, &device)?;
    if config.task.kind != "recommendation" {
        return Err(Error::Config(format!(
            "{} is a {} model; `recommend` needs a model meta-trained on recommendation tasks",
            args.model.display(),
            config.task.kind
        )));
    }
    if let Some(data) = &args.data {
        config.task.data = Some(data.clone());
    }
    let columns = config.ratings_config();
    let (header, rows) = read_table(&args.ratings)?;
    let column = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            Error::Data(format!(
                "{}: no column `{name}`; its columns are {}",
                args.ratings.display(),
                header.join(", ")
            ))
        })
    };
    let (item_col, rating_col) = (
        column(&columns.item_column)?,
        column(&columns.rating_column)?,
    );
    let [lo, hi] = columns.scale;
    let mut ratings = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let line = row.position().map_or(i as u64 + 2, |p| p.line());
        let item = row.get(item_col).unwrap_or("").trim().to_string();
        let text = row.get(rating_col).unwrap_or("").trim();
        let rating: f32 = text
            .parse()
            .ok()
            .filter(|r: &f32| (lo as f32..=hi as f32).contains(r))
            .ok_or_else(|| {
                Error::Data(format!(
                    "{}:{line}: column `{}`: `{text}` is not a rating in [{lo}, {hi}]",
                    args.ratings.display(),
                    columns.rating_column
                ))
            })?;
        if item.is_empty() {
            return Err(Error::Data(format!(
                "{}:{line}: empty item id",
                args.ratings.display()
            )));
        }
        ratings.push((item, rating));
    }
    let mut features = HashMap::new();
    if let Some(path) = &args.user_features {
        let (header, rows) = read_table(path)?;
        let [row] = &rows[..] else {
            return Err(Error::Data(format!(
                "{}: needs exactly one row of user features, has {}",
                path.display(),
                rows.len()
            )));
        };
        for (h, v) in header.iter().zip(row.iter()) {
            features.insert(h.clone(), v.to_string());
        }
    }
    // Loading the data is not part of the time a recommendation takes.
    config.ratings_data()?;
    let started = std::time::Instant::now();
    let top = recommend(&learner, &config, &ratings, &features, args.top, args.steps)?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({
                "recommendations": top,
                "ratings_given": ratings.len(),
                "seconds_after_loading": seconds,
            })
        );
    } else {
        println!("{:>4}  {:<12} {:>9}", "rank", "item", "predicted");
        for (rank, r) in top.iter().enumerate() {
            println!("{:>4}  {:<12} {:>9.3}", rank + 1, r.item, r.predicted);
        }
    }
    Ok(())
}
