//! Recommendations for one new user: adapt a meta-trained recommender to the few ratings they
//! gave, then score every item they have not rated (items enter through their features, so a
//! film nobody rated is scored too) and keep the best.

use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::experiment::ExperimentConfig;
use crate::meta::learner::MetaLearner;

/// One recommended item.
#[derive(Clone, Debug, Serialize)]
pub struct Recommendation {
    /// Item id.
    pub item: String,
    /// Predicted rating.
    pub predicted: f64,
}

/// Adapts `learner` to `ratings` (item id, rating) of one user described by `user_features`
/// (column → value; empty: the unknown user) and returns the `top` unrated items by predicted
/// rating, best first, with `steps` adaptation steps (default: the configured ones). An item
/// of `ratings` without a row in the item file is an error naming it.
pub fn recommend(
    learner: &MetaLearner,
    config: &ExperimentConfig,
    ratings: &[(String, f32)],
    user_features: &HashMap<String, String>,
    top: usize,
    steps: Option<usize>,
) -> Result<Vec<Recommendation>> {
    let data = config.ratings_data()?;
    if ratings.is_empty() {
        return Err(Error::Data(
            "the ratings file has no ratings: give the user's few ratings (item,rating rows)"
                .into(),
        ));
    }
    let unknown: Vec<&str> = ratings
        .iter()
        .map(|(i, _)| i.as_str())
        .filter(|i| data.items.row(i).is_none())
        .collect();
    if !unknown.is_empty() {
        return Err(Error::Data(format!(
            "{} rated item(s) are unknown to the model and have no features in the item file \
             (e.g. {}); add their rows to the item file the model was trained with, or remove \
             them",
            unknown.len(),
            unknown
                .iter()
                .take(5)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let user = data.encode_user(user_features)?;
    let slots = data.slots();
    let row = |item: &str, out: &mut Vec<f32>| {
        out.extend_from_slice(data.items.row(item).expect("checked above"));
        out.extend_from_slice(&user);
    };
    let mut x = Vec::with_capacity(ratings.len() * slots);
    for (item, _) in ratings {
        row(item, &mut x);
    }
    let device = Device::Cpu;
    let support_x = Tensor::from_vec(x, (ratings.len(), slots), &device)?;
    let support_y = Tensor::from_vec(
        ratings.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        (ratings.len(), 1),
        &device,
    )?;
    let adapted = learner.adapt((&support_x, &support_y), steps)?;
    let rated: HashSet<&str> = ratings.iter().map(|(i, _)| i.as_str()).collect();
    let candidates: Vec<&String> = data
        .items
        .ids
        .iter()
        .filter(|i| !rated.contains(i.as_str()))
        .collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let mut x = Vec::with_capacity(candidates.len() * slots);
    for item in &candidates {
        row(item, &mut x);
    }
    let query = Tensor::from_vec(x, (candidates.len(), slots), &device)?;
    let predicted = learner
        .predict(&adapted, &query)?
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| predicted[b].total_cmp(&predicted[a]));
    Ok(order
        .into_iter()
        .take(top)
        .map(|i| Recommendation {
            item: candidates[i].clone(),
            predicted: predicted[i],
        })
        .collect())
}
