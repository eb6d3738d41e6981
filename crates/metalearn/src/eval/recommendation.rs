//! Scoring cold-start recommendation: every user of a partition adapts on their support
//! ratings and predicts their query ratings; per user MAE, RMSE and nDCG@k (ranking the query
//! items by predicted rating), then the mean over users with its 95% interval. Beside the model,
//! the baselines a practitioner tries first, scored on the same query sets: the global mean,
//! each item's mean, and the user's own support mean.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::error::Result;
use crate::eval::{summarize, Summary};
use crate::meta::learner::MetaLearner;
use crate::tasks::recommendation::{RecommendationTasks, UserTask};

/// nDCG cut-offs reported with the gain `2^r − 1`.
pub const NDCG_AT: [usize; 3] = [1, 3, 5];
/// nDCG cut-offs reported with the linear gain `r` (the MeLU paper's figures match it).
pub const NDCG_LINEAR_AT: [usize; 2] = [1, 3];

/// One partition's figures: each metric's mean over users and 95% interval.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionScores {
    /// Users scored.
    pub users: usize,
    /// Metric name (`mae`, `rmse`, `ndcg@1`, ..., `ndcg_linear@3`) to its summary over users.
    pub metrics: BTreeMap<String, Summary>,
}

impl PartitionScores {
    /// The JSON object of the `meta-eval --json` report: each metric's mean, with its interval
    /// under `<metric>_ci95`, and `users`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, s) in &self.metrics {
            out.insert(name.clone(), s.mean.into());
            out.insert(format!("{name}_ci95"), s.ci95.into());
        }
        out.insert("users".into(), self.users.into());
        serde_json::Value::Object(out)
    }

    /// The mean of `metric` (NaN when absent).
    pub fn mean(&self, metric: &str) -> f64 {
        self.metrics.get(metric).map_or(f64::NAN, |s| s.mean)
    }
}

/// nDCG@k of `predicted` against `truth`: the items sorted by prediction, descending and
/// stable (ties keep query order), gain `2^r − 1` or `r` (`linear`), discount `1/log2(rank+1)`.
pub fn ndcg_at(predicted: &[f64], truth: &[f64], k: usize, linear: bool) -> f64 {
    let gain = |r: f64| if linear { r } else { r.exp2() - 1.0 };
    let mut order: Vec<usize> = (0..predicted.len()).collect();
    order.sort_by(|&a, &b| predicted[b].total_cmp(&predicted[a]));
    let mut ideal: Vec<f64> = truth.iter().map(|&r| gain(r)).collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let discount = |rank: usize| 1.0 / ((rank + 2) as f64).log2();
    let dcg: f64 = order
        .iter()
        .take(k)
        .enumerate()
        .map(|(rank, &i)| gain(truth[i]) * discount(rank))
        .sum();
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(rank, &g)| g * discount(rank))
        .sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

/// Every metric of one user's query predictions.
pub fn user_metrics(predicted: &[f64], truth: &[f64]) -> Vec<(String, f64)> {
    let n = truth.len().max(1) as f64;
    let mae = predicted
        .iter()
        .zip(truth)
        .map(|(p, t)| (p - t).abs())
        .sum::<f64>()
        / n;
    let mse = predicted
        .iter()
        .zip(truth)
        .map(|(p, t)| (p - t).powi(2))
        .sum::<f64>()
        / n;
    let mut out = vec![("mae".to_string(), mae), ("rmse".to_string(), mse.sqrt())];
    for k in NDCG_AT {
        out.push((format!("ndcg@{k}"), ndcg_at(predicted, truth, k, false)));
    }
    for k in NDCG_LINEAR_AT {
        out.push((
            format!("ndcg_linear@{k}"),
            ndcg_at(predicted, truth, k, true),
        ));
    }
    out
}

/// Summarises per-user predictions (each `(predicted, truth)`) into a partition's scores.
pub fn score_users(per_user: &[(Vec<f64>, Vec<f64>)]) -> PartitionScores {
    let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (p, t) in per_user {
        for (name, v) in user_metrics(p, t) {
            columns.entry(name).or_default().push(v);
        }
    }
    PartitionScores {
        users: per_user.len(),
        metrics: columns
            .into_iter()
            .map(|(k, v)| (k, summarize(&v)))
            .collect(),
    }
}

fn truth(tasks: &RecommendationTasks, user: &UserTask) -> Vec<f64> {
    user.query
        .iter()
        .map(|&i| tasks.data.ratings[i].rating as f64)
        .collect()
}

/// The model's scores on `users`: each adapts with `steps` inner steps (default: the
/// configured evaluation steps) on its support set and predicts its query set.
pub fn evaluate_model(
    learner: &MetaLearner,
    tasks: &RecommendationTasks,
    users: &[UserTask],
    steps: Option<usize>,
) -> Result<PartitionScores> {
    score_tensor_predictions(tasks, users, |task| {
        let adapted = learner.adapt((&task.support.0, &task.support.1), steps)?;
        learner.predict(&adapted, &task.query.0)
    })
}

/// The transfer baseline's scores on `users`: the same network trained without meta-learning
/// on warm users' ratings ([`crate::eval::baseline::train_transfer_baseline`]), fine-tuned on
/// each user's support with `steps` steps.
pub fn evaluate_transfer(
    baseline: &crate::eval::baseline::TransferBaseline,
    tasks: &RecommendationTasks,
    users: &[UserTask],
    steps: usize,
) -> Result<PartitionScores> {
    score_tensor_predictions(tasks, users, |task| {
        baseline.adapt_and_predict(&task.support, &task.query.0, steps)
    })
}

/// Scores a network-based method: `predict` turns a user's task (support and query tensors)
/// into predictions for the query set.
fn score_tensor_predictions(
    tasks: &RecommendationTasks,
    users: &[UserTask],
    mut predict: impl FnMut(&crate::tasks::Task) -> Result<candle_core::Tensor>,
) -> Result<PartitionScores> {
    let mut per_user = Vec::with_capacity(users.len());
    for user in users {
        let predicted = predict(&tasks.task(user)?)?
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        per_user.push((predicted, truth(tasks, user)));
    }
    Ok(score_users(&per_user))
}

/// Means of the warm ratings: the global mean and each item's mean.
#[derive(Clone, Debug)]
pub struct WarmMeans {
    /// Mean of every warm rating.
    pub global: f64,
    /// Mean warm rating of each item rated in warm.
    pub items: HashMap<String, f64>,
}

impl WarmMeans {
    /// From every warm rating of `tasks`' data (all warm users, also those outside the task
    /// size range, as the protocol says).
    pub fn new(tasks: &RecommendationTasks) -> Self {
        let mut sums: HashMap<&str, (f64, usize)> = HashMap::new();
        for r in tasks.data.ratings.iter().filter(|r| r.partition == 0) {
            let e = sums.entry(r.item.as_str()).or_default();
            e.0 += r.rating as f64;
            e.1 += 1;
        }
        Self {
            global: tasks.data.warm_mean(),
            items: sums
                .into_iter()
                .map(|(k, (s, n))| (k.to_string(), s / n as f64))
                .collect(),
        }
    }
}

/// The three constant-style baselines on `users`, by name: `global_mean`, `item_mean` (the
/// global mean for items never rated in warm) and `user_support_mean`.
pub fn evaluate_baselines(
    tasks: &RecommendationTasks,
    users: &[UserTask],
    means: &WarmMeans,
) -> BTreeMap<String, PartitionScores> {
    let ratings = &tasks.data.ratings;
    let mut global = Vec::new();
    let mut item = Vec::new();
    let mut support = Vec::new();
    for user in users {
        let t = truth(tasks, user);
        global.push((vec![means.global; t.len()], t.clone()));
        let item_means = user
            .query
            .iter()
            .map(|&i| *means.items.get(&ratings[i].item).unwrap_or(&means.global))
            .collect();
        item.push((item_means, t.clone()));
        let s = &user.support;
        let mean = s.iter().map(|&i| ratings[i].rating as f64).sum::<f64>() / s.len().max(1) as f64;
        support.push((vec![mean; t.len()], t));
    }
    BTreeMap::from([
        ("global_mean".to_string(), score_users(&global)),
        ("item_mean".to_string(), score_users(&item)),
        ("user_support_mean".to_string(), score_users(&support)),
    ])
}

/// Biased matrix factorisation, `μ + b_u + b_i + p_u · q_i`, trained by SGD on every warm
/// rating; a new user's `b_u` and `p_u` are fitted on their support ratings by ridge
/// regression with the items' `b_i` and `q_i` held fixed (an item never rated in warm has
/// `b_i = 0`, `q_i = 0`). The settings are fixed, not tuned: 16 factors, 20 epochs, learning
/// rate 0.01, L2 0.05 in training and 1.0 in the per-user fit.
pub struct Factorization {
    mean: f64,
    item_bias: HashMap<String, f64>,
    item_factors: HashMap<String, Vec<f64>>,
    factors: usize,
}

impl Factorization {
    /// Trains on `tasks`' warm ratings with `seed`.
    pub fn train(tasks: &RecommendationTasks, seed: u64) -> Self {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let (factors, epochs, lr, l2) = (16, 20, 0.01, 0.05);
        let warm: Vec<&crate::data::ratings::Rating> = tasks
            .data
            .ratings
            .iter()
            .filter(|r| r.partition == 0)
            .collect();
        let mean = tasks.data.warm_mean();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut init =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.gen_range(-0.05..0.05)).collect() };
        let mut users: HashMap<&str, (f64, Vec<f64>)> = HashMap::new();
        let mut items: HashMap<&str, (f64, Vec<f64>)> = HashMap::new();
        for r in &warm {
            users.entry(&r.user).or_insert_with(|| (0.0, init(factors)));
            items.entry(&r.item).or_insert_with(|| (0.0, init(factors)));
        }
        let mut order: Vec<usize> = (0..warm.len()).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6d66);
        for _ in 0..epochs {
            order.shuffle(&mut rng);
            for &k in &order {
                let r = warm[k];
                let (bu, pu) = users.get(r.user.as_str()).cloned().expect("user seen");
                let (bi, qi) = items.get(r.item.as_str()).cloned().expect("item seen");
                let dot: f64 = pu.iter().zip(&qi).map(|(a, b)| a * b).sum();
                let e = r.rating as f64 - (mean + bu + bi + dot);
                let u = users.get_mut(r.user.as_str()).expect("user seen");
                u.0 += lr * (e - l2 * bu);
                for f in 0..factors {
                    u.1[f] += lr * (e * qi[f] - l2 * pu[f]);
                }
                let i = items.get_mut(r.item.as_str()).expect("item seen");
                i.0 += lr * (e - l2 * bi);
                for f in 0..factors {
                    i.1[f] += lr * (e * pu[f] - l2 * qi[f]);
                }
            }
        }
        Self {
            mean,
            item_bias: items.iter().map(|(k, v)| (k.to_string(), v.0)).collect(),
            item_factors: items
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.1))
                .collect(),
            factors,
        }
    }

    fn item(&self, item: &str) -> (f64, Vec<f64>) {
        (
            self.item_bias.get(item).copied().unwrap_or(0.0),
            self.item_factors
                .get(item)
                .cloned()
                .unwrap_or_else(|| vec![0.0; self.factors]),
        )
    }

    /// Fits the user on `support` (item, rating) and predicts `query` items.
    pub fn predict(&self, support: &[(&str, f64)], query: &[&str]) -> Vec<f64> {
        // Ridge regression of r − μ − b_i on [1, q_i]: (AᵀA + λI) w = Aᵀy.
        let k = self.factors + 1;
        let mut ata = vec![0.0; k * k];
        let mut aty = vec![0.0; k];
        for (item, rating) in support {
            let (bi, qi) = self.item(item);
            let row: Vec<f64> = std::iter::once(1.0).chain(qi).collect();
            let y = rating - self.mean - bi;
            for a in 0..k {
                aty[a] += row[a] * y;
                for b in 0..k {
                    ata[a * k + b] += row[a] * row[b];
                }
            }
        }
        for a in 0..k {
            ata[a * k + a] += 1.0;
        }
        let w = solve(ata, aty, k);
        query
            .iter()
            .map(|item| {
                let (bi, qi) = self.item(item);
                self.mean + bi + w[0] + qi.iter().zip(&w[1..]).map(|(a, b)| a * b).sum::<f64>()
            })
            .collect()
    }
}

/// Solves the `k × k` system `a x = b` (symmetric positive definite here) by Gaussian
/// elimination with partial pivoting.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, k: usize) -> Vec<f64> {
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&i, &j| a[i * k + col].abs().total_cmp(&a[j * k + col].abs()))
            .unwrap_or(col);
        if pivot != col {
            for c in 0..k {
                a.swap(col * k + c, pivot * k + c);
            }
            b.swap(col, pivot);
        }
        let d = a[col * k + col];
        if d.abs() < 1e-12 {
            continue;
        }
        for row in col + 1..k {
            let f = a[row * k + col] / d;
            for c in col..k {
                a[row * k + c] -= f * a[col * k + c];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; k];
    for row in (0..k).rev() {
        let s: f64 = (row + 1..k).map(|c| a[row * k + c] * x[c]).sum();
        let d = a[row * k + row];
        x[row] = if d.abs() < 1e-12 {
            0.0
        } else {
            (b[row] - s) / d
        };
    }
    x
}

/// Matrix factorisation's scores on `users` (see [`Factorization`]).
pub fn evaluate_factorization(
    model: &Factorization,
    tasks: &RecommendationTasks,
    users: &[UserTask],
) -> PartitionScores {
    let ratings = &tasks.data.ratings;
    let per_user: Vec<(Vec<f64>, Vec<f64>)> = users
        .iter()
        .map(|user| {
            let support: Vec<(&str, f64)> = user
                .support
                .iter()
                .map(|&i| (ratings[i].item.as_str(), ratings[i].rating as f64))
                .collect();
            let query: Vec<&str> = user
                .query
                .iter()
                .map(|&i| ratings[i].item.as_str())
                .collect();
            (model.predict(&support, &query), truth(tasks, user))
        })
        .collect();
    score_users(&per_user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_of_a_perfect_ranking_is_one_and_ties_keep_query_order() {
        let truth = [5.0, 3.0, 4.0, 1.0];
        assert!((ndcg_at(&truth, &truth, 3, false) - 1.0).abs() < 1e-12);
        // A constant prediction keeps query order: 5, 3, 4.
        let constant = [1.0; 4];
        let d = |r: usize| 1.0 / ((r + 2) as f64).log2();
        let dcg = 31.0 * d(0) + 7.0 * d(1) + 15.0 * d(2);
        let idcg = 31.0 * d(0) + 15.0 * d(1) + 7.0 * d(2);
        assert!((ndcg_at(&constant, &truth, 3, false) - dcg / idcg).abs() < 1e-12);
        let lin = (5.0 * d(0) + 3.0 * d(1) + 4.0 * d(2)) / (5.0 * d(0) + 4.0 * d(1) + 3.0 * d(2));
        assert!((ndcg_at(&constant, &truth, 3, true) - lin).abs() < 1e-12);
    }

    #[test]
    fn the_ridge_solver_solves() {
        let x = solve(vec![4.0, 1.0, 1.0, 3.0], vec![1.0, 2.0], 2);
        assert!((4.0 * x[0] + x[1] - 1.0).abs() < 1e-12 && (x[0] + 3.0 * x[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn mae_and_rmse_per_user() {
        let m: BTreeMap<String, f64> = user_metrics(&[1.0, 3.0], &[2.0, 5.0]).into_iter().collect();
        assert!((m["mae"] - 1.5).abs() < 1e-12);
        assert!((m["rmse"] - 2.5f64.sqrt()).abs() < 1e-12);
    }
}
