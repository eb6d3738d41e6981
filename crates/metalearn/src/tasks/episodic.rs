//! N-way K-shot Q-query episodes over any labelled data set, with class-disjoint splits.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::augment::{Augment, Supersampled};
use crate::data::classes::{split_classes, ClassPool, SplitSpec};
use crate::error::{Error, Result};
use crate::tasks::{Split, Task, TaskKind, TaskSource};

/// Episode shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpisodeSpec {
    /// Classes per task (N).
    pub ways: usize,
    /// Support examples per class (K).
    pub shots: usize,
    /// Query examples per class (Q).
    pub queries: usize,
    /// Draw all classes of a task from one group (e.g. one alphabet).
    #[serde(default)]
    pub same_group: bool,
}

/// Draws N-way K-shot Q-query classification tasks from class-disjoint splits.
#[derive(Clone, Debug)]
pub struct EpisodicSampler {
    pool: ClassPool,
    episode: EpisodeSpec,
    splits: [Vec<usize>; 3],
    augment: Option<Augment>,
    supersampled: Option<std::sync::Arc<Supersampled>>,
}

impl EpisodicSampler {
    /// Splits the pool's classes and checks that every split can serve the episode shape.
    pub fn new(pool: ClassPool, episode: EpisodeSpec, split: &SplitSpec) -> Result<Self> {
        let splits = split_classes(&pool, split)?;
        Self::with_splits(pool, episode, splits)
    }

    /// Uses explicit class lists for train, validation and test (they must be disjoint).
    pub fn with_splits(
        pool: ClassPool,
        episode: EpisodeSpec,
        splits: [Vec<usize>; 3],
    ) -> Result<Self> {
        if episode.ways < 2 {
            return Err(Error::Config(format!(
                "ways must be >= 2, got {}",
                episode.ways
            )));
        }
        if episode.shots == 0 || episode.queries == 0 {
            return Err(Error::Config("shots and queries must each be >= 1".into()));
        }
        let mut seen = vec![false; pool.num_classes()];
        for list in &splits {
            for &c in list {
                if c >= seen.len() || seen[c] {
                    return Err(Error::Config(format!(
                        "class {c} is out of range or appears in two splits"
                    )));
                }
                seen[c] = true;
            }
        }
        let need = episode.shots + episode.queries;
        for list in &splits {
            for &c in list {
                let have = pool.examples(c).len();
                if have < need {
                    return Err(Error::Data(format!(
                        "class `{}` has {have} examples but each task needs shots + queries = {need}; \
                         lower shots or queries",
                        pool.class_names()[c]
                    )));
                }
            }
        }
        Ok(Self {
            pool,
            episode,
            splits,
            augment: None,
            supersampled: None,
        })
    }

    /// Augments from `fine`, the pool's images at a finer resolution (see [`Supersampled`]);
    /// it must cover every example of the pool at the pool's image size.
    pub fn with_supersampled(mut self, fine: Supersampled) -> Result<Self> {
        let pool_size = self.image_shape().map(|[c, h, w]| (c, [h, w]));
        let examples = self.pool.inputs().dims().first().copied().unwrap_or(0);
        if pool_size != Some((1, fine.image_size())) || fine.len() != examples {
            return Err(Error::Data(format!(
                "supersampled images ({} of {:?}) do not match the pool ({examples} of {:?})",
                fine.len(),
                fine.image_size(),
                self.input_shape()
            )));
        }
        self.supersampled = Some(std::sync::Arc::new(fine));
        Ok(self)
    }

    /// Perturbs the images of meta-training episodes (never validation or test ones) with
    /// `augment`. Needs image inputs `[channels, height, width]`.
    pub fn with_augment(mut self, augment: Augment) -> Result<Self> {
        augment.validate()?;
        if augment.is_active() && self.image_shape().is_none() {
            return Err(Error::Config(format!(
                "task.augment perturbs images, but the inputs have shape {:?}; \
                 remove task.augment or use image data",
                self.input_shape()
            )));
        }
        self.augment = augment.is_active().then_some(augment);
        Ok(self)
    }

    /// The augmentation of meta-training episodes, if any.
    pub fn augment(&self) -> Option<&Augment> {
        self.augment.as_ref()
    }

    fn image_shape(&self) -> Option<[usize; 3]> {
        match self.pool.inputs().dims() {
            [_, c, h, w] => Some([*c, *h, *w]),
            _ => None,
        }
    }

    /// Gathers the examples `idx`, augmented when they feed meta-training.
    fn gather(&self, idx: &[u32], split: Split, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let idx_t = Tensor::from_slice(idx, idx.len(), &Device::Cpu)?;
        let x = self.pool.inputs().index_select(&idx_t, 0)?;
        if let (Some(augment), Some(fine), Split::Train) =
            (&self.augment, &self.supersampled, split)
        {
            let values = augment.apply_supersampled(fine, idx, rng);
            return Ok(Tensor::from_vec(values, x.dims(), &Device::Cpu)?.to_dtype(x.dtype())?);
        }
        match (&self.augment, self.image_shape()) {
            (Some(augment), Some(shape)) if split == Split::Train => {
                let dtype = x.dtype();
                let dims = x.dims().to_vec();
                let mut values = x
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                augment.apply(&mut values, shape, rng);
                Ok(Tensor::from_vec(values, dims, &Device::Cpu)?.to_dtype(dtype)?)
            }
            _ => Ok(x),
        }
    }

    /// Classes of a split.
    pub fn classes(&self, split: Split) -> &[usize] {
        &self.splits[split_index(split)]
    }

    /// The episode shape.
    pub fn episode(&self) -> &EpisodeSpec {
        &self.episode
    }

    /// The underlying pool.
    pub fn pool(&self) -> &ClassPool {
        &self.pool
    }

    fn candidate_groups(&self, split: Split) -> Result<Vec<Vec<usize>>> {
        let classes = self.classes(split);
        let ways = self.episode.ways;
        if !self.episode.same_group {
            if classes.len() < ways {
                return Err(Error::Config(format!(
                    "{ways}-way tasks need {ways} classes but the {split:?} split has {}; \
                     lower ways or change the split fractions",
                    classes.len()
                )));
            }
            return Ok(vec![classes.to_vec()]);
        }
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for &c in classes {
            groups.entry(self.pool.groups()[c]).or_default().push(c);
        }
        let eligible: Vec<Vec<usize>> = groups
            .into_values()
            .filter(|members| members.len() >= ways)
            .collect();
        if eligible.is_empty() {
            return Err(Error::Config(format!(
                "no group in the {split:?} split has {ways} classes for same-group tasks; \
                 lower ways or turn same_group off"
            )));
        }
        Ok(eligible)
    }
}

impl TaskSource for EpisodicSampler {
    fn check_split(&self, split: Split) -> Result<()> {
        self.candidate_groups(split).map(|_| ())
    }

    fn joint_batch(&self, tasks: usize, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor, usize)> {
        use rand::Rng;
        let classes = self.classes(Split::Train);
        if classes.is_empty() {
            return Err(Error::Config("the training split has no classes".into()));
        }
        let per_task = self.episode.ways * (self.episode.shots + self.episode.queries);
        let n = (tasks.max(1) * per_task).max(1);
        let (mut idx, mut labels) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let global = rng.gen_range(0..classes.len());
            let examples = self.pool.examples(classes[global]);
            idx.push(examples[rng.gen_range(0..examples.len())]);
            labels.push(global as f32);
        }
        Ok((
            self.gather(&idx, Split::Train, rng)?,
            Tensor::from_vec(labels, n, &Device::Cpu)?,
            classes.len(),
        ))
    }

    fn sample(&self, split: Split, rng: &mut ChaCha8Rng) -> Result<Task> {
        let groups = self.candidate_groups(split)?;
        let group = groups.choose(rng).expect("checked non-empty");
        let EpisodeSpec {
            ways,
            shots,
            queries,
            ..
        } = self.episode;
        let chosen: Vec<usize> = group.choose_multiple(rng, ways).copied().collect();
        let (mut s_idx, mut q_idx) = (Vec::new(), Vec::new());
        let (mut s_y, mut q_y) = (Vec::new(), Vec::new());
        for (label, &class) in chosen.iter().enumerate() {
            let picks: Vec<u32> = self
                .pool
                .examples(class)
                .choose_multiple(rng, shots + queries)
                .copied()
                .collect();
            s_idx.extend_from_slice(&picks[..shots]);
            q_idx.extend_from_slice(&picks[shots..]);
            s_y.extend(std::iter::repeat_n(label as f32, shots));
            q_y.extend(std::iter::repeat_n(label as f32, queries));
        }
        Ok(Task {
            support: (
                self.gather(&s_idx, split, rng)?,
                Tensor::from_vec(s_y, s_idx.len(), &Device::Cpu)?,
            ),
            query: (
                self.gather(&q_idx, split, rng)?,
                Tensor::from_vec(q_y, q_idx.len(), &Device::Cpu)?,
            ),
        })
    }

    fn kind(&self) -> TaskKind {
        TaskKind::Classification {
            ways: self.episode.ways,
        }
    }

    fn input_shape(&self) -> Vec<usize> {
        self.pool.inputs().dims()[1..].to_vec()
    }
}

fn split_index(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Validation => 1,
        Split::Test => 2,
    }
}
