//! Cold-start recommendation tasks: every user of a partition is one regression task, their
//! ratings split into a support set (to adapt on) and a query set (to score), by the seeded
//! protocol of [`crate::data::ratings::split_user`] (MeLU's: users with 13–100 ratings, 10
//! random query ratings, the rest as support). Support sets differ in size from user to user;
//! the algorithms pad them into one task-batched computation ([`crate::tasks::TaskBatch::pad`]).
//!
//! Meta-training draws warm users; evaluation scores every user of a cold partition.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::seq::index::sample;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::ratings::{split_user, RatingsConfig, RatingsData, PARTITIONS};
use crate::error::{Error, Result};
use crate::tasks::{Split, Task, TaskKind, TaskSource};

/// One user's task: positions into [`RatingsData::ratings`].
#[derive(Clone, Debug)]
pub struct UserTask {
    /// The user's id.
    pub user: String,
    /// Support ratings.
    pub support: Vec<usize>,
    /// Query ratings, in the protocol's order (it breaks ties when ranking).
    pub query: Vec<usize>,
}

/// Users skipped in one partition for having too few or too many ratings.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Skipped {
    /// Users with fewer than `min_ratings`.
    pub too_few: usize,
    /// Users with more than `max_ratings`.
    pub too_many: usize,
}

/// The users of every partition as tasks, for one seed of the support/query draw.
#[derive(Clone, Debug)]
pub struct RecommendationTasks {
    /// The data.
    pub data: Arc<RatingsData>,
    /// Tasks by partition (index of [`PARTITIONS`]).
    pub partitions: Vec<Vec<UserTask>>,
    /// Users skipped by partition.
    pub skipped: Vec<Skipped>,
    /// Seed of the support/query draw.
    pub seed: u64,
}

/// The number the protocol's generator takes for a user id: the id itself when it is an
/// integer below 2^24, else a stable hash of it (FNV-1a) folded to 24 bits.
fn protocol_user_number(user: &str) -> u64 {
    match user.parse::<u64>() {
        Ok(n) if n < 1 << 24 => n,
        _ => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in user.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
            h & ((1 << 24) - 1)
        }
    }
}

impl RecommendationTasks {
    /// Splits every user of every partition with `seed` (`seed < 2^31`).
    pub fn new(data: Arc<RatingsData>, config: &RatingsConfig, seed: u64) -> Result<Self> {
        if seed >= 1 << 31 {
            return Err(Error::Config(format!(
                "the support/query seed must be below 2^31, got {seed}"
            )));
        }
        let mut by_user: Vec<std::collections::BTreeMap<u64, (String, Vec<usize>)>> =
            vec![Default::default(); PARTITIONS.len()];
        for (i, r) in data.ratings.iter().enumerate() {
            let key = protocol_user_number(&r.user);
            by_user[r.partition]
                .entry(key)
                .or_insert_with(|| (r.user.clone(), Vec::new()))
                .1
                .push(i);
        }
        let mut partitions = Vec::new();
        let mut skipped = Vec::new();
        for (p, users) in by_user.into_iter().enumerate() {
            let mut tasks = Vec::new();
            let mut skip = Skipped::default();
            for (number, (user, rows)) in users {
                let n = rows.len();
                if n < config.min_ratings {
                    skip.too_few += 1;
                    continue;
                }
                if n > config.max_ratings {
                    skip.too_many += 1;
                    continue;
                }
                let (s, q) = split_user(n, seed, p, number, config.query);
                tasks.push(UserTask {
                    user,
                    support: s.into_iter().map(|k| rows[k]).collect(),
                    query: q.into_iter().map(|k| rows[k]).collect(),
                });
            }
            partitions.push(tasks);
            skipped.push(skip);
        }
        Ok(Self {
            data,
            partitions,
            skipped,
            seed,
        })
    }

    /// The tasks of partition `name`.
    pub fn partition(&self, name: &str) -> Option<&[UserTask]> {
        PARTITIONS
            .iter()
            .position(|&p| p == name)
            .map(|p| self.partitions[p].as_slice())
    }

    /// Inputs `[n, slots]` and targets `[n, 1]` of the given ratings.
    pub fn tensors(&self, rows: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let slots = self.data.slots();
        let mut x = Vec::with_capacity(rows.len() * slots);
        let mut y = Vec::with_capacity(rows.len());
        for &i in rows {
            let r = &self.data.ratings[i];
            self.data.encode(&r.user, &r.item, &mut x);
            y.push(r.rating);
        }
        Ok((
            Tensor::from_vec(x, (rows.len(), slots), device)?,
            Tensor::from_vec(y, (rows.len(), 1), device)?,
        ))
    }

    /// A user's task as tensors.
    pub fn task(&self, user: &UserTask) -> Result<Task> {
        let device = Device::Cpu;
        Ok(Task {
            support: self.tensors(&user.support, &device)?,
            query: self.tensors(&user.query, &device)?,
        })
    }
}

impl TaskSource for RecommendationTasks {
    fn sample(&self, split: Split, rng: &mut ChaCha8Rng) -> Result<Task> {
        self.check_split(split)?;
        let warm = &self.partitions[0];
        self.task(&warm[rng.gen_range(0..warm.len())])
    }

    /// `count` different warm users (all of them, repeated, if there are fewer).
    fn sample_batch(&self, split: Split, count: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Task>> {
        self.check_split(split)?;
        let warm = &self.partitions[0];
        let picks = sample(rng, warm.len(), count.min(warm.len()));
        picks
            .into_vec()
            .into_iter()
            .cycle()
            .take(count)
            .map(|i| self.task(&warm[i]))
            .collect()
    }

    fn kind(&self) -> TaskKind {
        TaskKind::Regression
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.data.slots()]
    }

    fn check_split(&self, split: Split) -> Result<()> {
        match split {
            Split::Train if self.partitions[0].is_empty() => Err(Error::Data(format!(
                "no warm user has between task.ratings.min_ratings and max_ratings ratings to \
                 meta-train on ({} have too few, {} too many)",
                self.skipped[0].too_few, self.skipped[0].too_many
            ))),
            Split::Train => Ok(()),
            _ => Err(Error::Config(
                "recommendation tasks have no validation or test episodes: they are scored on \
                 every user of the cold partitions by `meta-eval` (set training.validate_every = 0)"
                    .into(),
            )),
        }
    }

    /// All ratings of `tasks` random warm users, for the plain (non-meta) training baseline.
    fn joint_batch(&self, tasks: usize, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor, usize)> {
        self.check_split(Split::Train)?;
        let warm = &self.partitions[0];
        let mut rows = Vec::new();
        for i in sample(rng, warm.len(), tasks.min(warm.len())).iter() {
            rows.extend_from_slice(&warm[i].support);
            rows.extend_from_slice(&warm[i].query);
        }
        let (x, y) = self.tensors(&rows, &Device::Cpu)?;
        Ok((x, y, 0))
    }
}
