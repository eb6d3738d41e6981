//! Labelled examples grouped by class, optionally with a group (an alphabet, a domain) per class,
//! and class-disjoint splits of them into meta-training, validation and test classes.

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Labelled examples grouped by class, optionally with a group (e.g. alphabet) per class.
#[derive(Clone, Debug)]
pub struct ClassPool {
    x: Tensor,
    by_class: Vec<Vec<u32>>,
    class_names: Vec<String>,
    groups: Vec<usize>,
}

impl ClassPool {
    /// Builds a pool from inputs `x` (`[n, ...]`), one class id per example, the class names
    /// (indexed by id) and optionally a group id per class.
    pub fn new(
        x: Tensor,
        labels: &[usize],
        class_names: Vec<String>,
        groups: Option<Vec<usize>>,
    ) -> Result<Self> {
        let n = x.dim(0)?;
        if labels.len() != n {
            return Err(Error::Data(format!(
                "{n} examples but {} labels",
                labels.len()
            )));
        }
        let classes = class_names.len();
        let mut by_class = vec![Vec::new(); classes];
        for (i, &c) in labels.iter().enumerate() {
            let slot = by_class.get_mut(c).ok_or_else(|| {
                Error::Data(format!(
                    "example {i} has class id {c} but only {classes} class names were given"
                ))
            })?;
            slot.push(i as u32);
        }
        let groups = groups.unwrap_or_else(|| vec![0; classes]);
        if groups.len() != classes {
            return Err(Error::Data(format!(
                "{} group ids for {classes} classes",
                groups.len()
            )));
        }
        Ok(Self {
            x,
            by_class,
            class_names,
            groups,
        })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.by_class.len()
    }

    /// Class names by id.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Group id of each class.
    pub fn groups(&self) -> &[usize] {
        &self.groups
    }

    /// Examples of a class.
    pub fn examples(&self, class: usize) -> &[u32] {
        &self.by_class[class]
    }

    /// All inputs.
    pub fn inputs(&self) -> &Tensor {
        &self.x
    }
}

/// How classes are divided between meta-training, validation and test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// Fractions of classes (or of groups, with `by_group`) for train, validation and test.
    #[serde(default = "default_fractions")]
    pub fractions: [f64; 3],
    /// Split whole groups (e.g. alphabets) instead of single classes.
    #[serde(default)]
    pub by_group: bool,
    /// Seed of the split's shuffle (independent of the training seed, so that the split stays
    /// fixed while training seeds vary).
    #[serde(default)]
    pub seed: u64,
}

fn default_fractions() -> [f64; 3] {
    [0.6, 0.2, 0.2]
}

impl Default for SplitSpec {
    fn default() -> Self {
        Self {
            fractions: default_fractions(),
            by_group: false,
            seed: 0,
        }
    }
}

/// Divides classes (or whole groups) into three disjoint lists by the spec's fractions.
pub fn split_classes(pool: &ClassPool, spec: &SplitSpec) -> Result<[Vec<usize>; 3]> {
    let [a, b, c] = spec.fractions;
    if [a, b, c].iter().any(|f| !(0.0..=1.0).contains(f)) || (a + b + c - 1.0).abs() > 1e-6 {
        return Err(Error::Config(format!(
            "split fractions must be in [0, 1] and sum to 1, got {:?}",
            spec.fractions
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    // Units are classes, or groups of classes.
    let mut units: Vec<Vec<usize>> = if spec.by_group {
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for class in 0..pool.num_classes() {
            groups.entry(pool.groups[class]).or_default().push(class);
        }
        groups.into_values().collect()
    } else {
        (0..pool.num_classes()).map(|c| vec![c]).collect()
    };
    units.shuffle(&mut rng);
    let n = units.len();
    let n_train = (a * n as f64).round() as usize;
    let n_val = ((b * n as f64).round() as usize).min(n - n_train.min(n));
    let mut out: [Vec<usize>; 3] = Default::default();
    for (i, unit) in units.into_iter().enumerate() {
        let s = if i < n_train {
            0
        } else if i < n_train + n_val {
            1
        } else {
            2
        };
        out[s].extend(unit);
    }
    for list in out.iter_mut() {
        list.sort_unstable();
    }
    Ok(out)
}
