//! Episodic evaluation: mean and 95% confidence interval over new tasks, and the plain
//! transfer-learning baseline that meta-learning is compared against.

pub mod baseline;
pub mod recommendation;
pub mod runs;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::distributed::Collective;
use crate::error::{Error, Result};
use crate::meta::learner::MetaLearner;
use crate::tasks::{Split, TaskSource};

/// Mean, spread and 95% confidence interval of per-task scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Mean score.
    pub mean: f64,
    /// Half-width of the 95% confidence interval of the mean: 1.96 · std / √n.
    pub ci95: f64,
    /// Sample standard deviation.
    pub std: f64,
    /// Number of tasks.
    pub n: usize,
}

/// Summarises scores (sample standard deviation, normal-approximation 95% CI).
pub fn summarize(scores: &[f64]) -> Summary {
    let n = scores.len();
    if n == 0 {
        return Summary {
            mean: f64::NAN,
            ci95: f64::NAN,
            std: f64::NAN,
            n,
        };
    }
    let mean = scores.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let std = var.sqrt();
    Summary {
        mean,
        ci95: 1.96 * std / (n as f64).sqrt(),
        std,
        n,
    }
}

/// Adapts to `episodes` new tasks of `split` (drawn with `seed`) with `steps` inner steps
/// (default: the configured evaluation steps) and summarises the task metric.
pub fn meta_evaluate(
    learner: &MetaLearner,
    source: &dyn TaskSource,
    split: Split,
    episodes: usize,
    steps: Option<usize>,
    seed: u64,
) -> Result<Summary> {
    let steps_used = steps.unwrap_or(learner.algorithm_config().eval_inner_steps);
    score_episodes(source, split, episodes, seed, steps_used, |task| {
        learner.evaluate_task(task, steps)
    })
}

/// Draws `episodes` tasks of `split` with `seed`, scores each with `score` (which adapts with
/// `steps` steps) and summarises; the same tasks for every model given the same seed. The
/// episodes are split across the ranks of [`crate::distributed::world`].
pub fn score_episodes(
    source: &dyn TaskSource,
    split: Split,
    episodes: usize,
    seed: u64,
    steps: usize,
    mut score: impl FnMut(&crate::tasks::Task) -> Result<f64>,
) -> Result<Summary> {
    let world = crate::distributed::world();
    let scores = scores_across_ranks(world.as_ref(), source, split, episodes, seed, &mut score)?;
    finite_summary(&scores, steps)
}

/// The scores of `episodes` tasks of `split` drawn with `seed`, split across the ranks of
/// `world`: every rank draws every task (keeping the generator in step) and scores its share,
/// and a sum in which each rank fills its own places gathers them.
pub fn scores_across_ranks(
    world: &dyn Collective,
    source: &dyn TaskSource,
    split: Split,
    episodes: usize,
    seed: u64,
    mut score: impl FnMut(&crate::tasks::Task) -> Result<f64>,
) -> Result<Vec<f64>> {
    let mine = world.share(episodes);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut scores = vec![0.0; episodes];
    for (i, slot) in scores.iter_mut().enumerate() {
        let task = source.sample(split, &mut rng)?;
        if mine.contains(&i) {
            *slot = score(&task)?;
        }
    }
    world.sum_in_place(&mut scores)?;
    Ok(scores)
}

/// Summarises scores, refusing non-finite ones (adaptation that diverged) with advice.
pub fn finite_summary(scores: &[f64], steps: usize) -> Result<Summary> {
    let bad = scores.iter().filter(|s| !s.is_finite()).count();
    if bad > 0 {
        return Err(Error::NonFinite(format!(
            "adaptation diverged on {bad} of {} tasks ({steps} steps gave a non-finite score): \
             use fewer steps or a lower inner learning rate",
            scores.len()
        )));
    }
    Ok(summarize(scores))
}
