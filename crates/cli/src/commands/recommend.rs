//! `metalearn recommend`: adapt a meta-trained recommender to one new user's few ratings and
//! print the items they have not rated with the highest predicted ratings.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use metalearn::data::ratings::{read_user_features, read_user_ratings};
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
    let ratings = read_user_ratings(&args.ratings, &config.ratings_config())?;
    let features = match &args.user_features {
        Some(path) => read_user_features(path)?,
        None => HashMap::new(),
    };
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
