//! Few-shot tasks: a support set to adapt on and a query set to score the adaptation.
//!
//! Task sources: [`sinusoid::SinusoidTasks`] (regression, MAML paper) and
//! [`episodic::EpisodicSampler`] (N-way K-shot classification over any labelled data set).

pub mod episodic;
pub mod recommendation;
pub mod sinusoid;

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One few-shot task.
#[derive(Clone, Debug)]
pub struct Task {
    /// Examples to adapt on: inputs `[k, ...]` and targets `[k]` (class ids) or `[k, outputs]`.
    pub support: (Tensor, Tensor),
    /// Examples to score the adapted model on.
    pub query: (Tensor, Tensor),
}

impl Task {
    /// The task with every tensor passed through `convert` (a change of device or precision).
    pub fn map(&self, convert: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Task> {
        Ok(Task {
            support: (convert(&self.support.0)?, convert(&self.support.1)?),
            query: (convert(&self.query.0)?, convert(&self.query.1)?),
        })
    }

    /// The task with its tensors on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Task> {
        self.map(|t| Ok(t.to_device(device)?))
    }
}

/// Whether tasks are regression or N-way classification problems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum TaskKind {
    /// Real-valued targets, scored by mean squared error.
    Regression,
    /// Class ids `0..ways`, scored by accuracy.
    Classification {
        /// Classes per task.
        ways: usize,
    },
}

/// Which split of a meta-data set to draw tasks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Meta-training classes.
    Train,
    /// Held-out classes for model selection.
    Validation,
    /// Held-out classes for final evaluation.
    Test,
}

/// Anything that draws tasks.
pub trait TaskSource: Send + Sync {
    /// Draws one task of `split` using `rng` (seeded: the same RNG state gives the same task).
    fn sample(&self, split: Split, rng: &mut ChaCha8Rng) -> Result<Task>;
    /// Regression or classification.
    fn kind(&self) -> TaskKind;
    /// Shape of one input example.
    fn input_shape(&self) -> Vec<usize>;
    /// Checks that `split` can serve tasks; the error says what to change.
    fn check_split(&self, _split: Split) -> Result<()> {
        Ok(())
    }
    /// Examples for the joint-training transfer baseline: roughly `tasks` tasks' worth of
    /// meta-training examples with *global* targets (all meta-training classes, for
    /// classification), plus the number of such classes (0 for regression).
    fn joint_batch(&self, tasks: usize, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor, usize)>;
    /// Draws `count` tasks.
    fn sample_batch(&self, split: Split, count: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Task>> {
        (0..count).map(|_| self.sample(split, rng)).collect()
    }
}

/// A meta-batch stacked along a new leading task dimension: support inputs `[T, k, ...]`, etc.
#[derive(Clone, Debug)]
pub struct TaskBatch {
    /// Support inputs `[T, k, ...]`.
    pub support_x: Tensor,
    /// Support targets `[T, k, ...]`.
    pub support_y: Tensor,
    /// Query inputs `[T, q, ...]`.
    pub query_x: Tensor,
    /// Query targets `[T, q, ...]`.
    pub query_y: Tensor,
    /// Per-example loss weights `[T, k]` of a padded batch ([`TaskBatch::pad`]): `1 / n_t` for
    /// each of task `t`'s `n_t` real examples and 0 for padding, so that the weighted sum of
    /// squared errors is the sum of the tasks' mean losses. `None`: every task has `k` examples.
    pub support_weight: Option<Tensor>,
    /// Per-example loss weights `[T, q]` of the query sets, as `support_weight`.
    pub query_weight: Option<Tensor>,
}

impl TaskBatch {
    /// Stacks tasks whose support and query sets have the same sizes; `None` when they differ.
    pub fn stack(tasks: &[Task]) -> Result<Option<Self>> {
        let Some(first) = tasks.first() else {
            return Err(Error::Data("empty meta-batch".into()));
        };
        let same = tasks.iter().all(|t| {
            t.support.0.dims() == first.support.0.dims()
                && t.query.0.dims() == first.query.0.dims()
                && t.support.1.dims() == first.support.1.dims()
                && t.query.1.dims() == first.query.1.dims()
        });
        if !same {
            return Ok(None);
        }
        let stack = |f: &dyn Fn(&Task) -> &Tensor| -> Result<Tensor> {
            Ok(Tensor::stack(&tasks.iter().map(f).collect::<Vec<_>>(), 0)?)
        };
        Ok(Some(Self {
            support_x: stack(&|t| &t.support.0)?,
            support_y: stack(&|t| &t.support.1)?,
            query_x: stack(&|t| &t.query.0)?,
            query_y: stack(&|t| &t.query.1)?,
            support_weight: None,
            query_weight: None,
        }))
    }

    /// Stacks tasks whose support (and query) sets differ in size only: each set is padded with
    /// zero rows to the longest one of the batch, and the weights say which rows are real (a
    /// user with 3 ratings and one with 90 in one computation). `None` when the example shapes
    /// differ; equal sizes give the same batch as [`TaskBatch::stack`].
    pub fn pad(tasks: &[Task]) -> Result<Option<Self>> {
        let Some(first) = tasks.first() else {
            return Err(Error::Data("empty meta-batch".into()));
        };
        if let Some(batch) = Self::stack(tasks)? {
            return Ok(Some(batch));
        }
        let tail = |t: &Tensor| t.dims().get(1..).map(|d| d.to_vec()).unwrap_or_default();
        let fits = |t: &Task| {
            tail(&t.support.0) == tail(&first.support.0)
                && tail(&t.query.0) == tail(&first.query.0)
                && tail(&t.support.1) == tail(&first.support.1)
                && tail(&t.query.1) == tail(&first.query.1)
                && t.support.0.dims().first() == t.support.1.dims().first()
                && t.query.0.dims().first() == t.query.1.dims().first()
        };
        if first.support.0.rank() == 0 || !tasks.iter().all(fits) {
            return Ok(None);
        }
        let padded = |f: &dyn Fn(&Task) -> &Tensor| -> Result<(Tensor, Tensor)> {
            let longest = tasks.iter().map(|t| f(t).dims()[0]).max().unwrap_or(0);
            let mut rows = Vec::with_capacity(tasks.len());
            let mut weights = Vec::with_capacity(tasks.len() * longest);
            for t in tasks {
                let x = f(t);
                let n = x.dims()[0];
                rows.push(if n < longest {
                    x.pad_with_zeros(0, 0, longest - n)?
                } else {
                    x.clone()
                });
                let w = 1.0 / n.max(1) as f64;
                weights.extend((0..longest).map(|i| if i < n { w } else { 0.0 }));
            }
            let weight = Tensor::from_vec(weights, (tasks.len(), longest), f(first).device())?
                .to_dtype(f(first).dtype())?;
            Ok((Tensor::stack(&rows, 0)?, weight))
        };
        let (support_x, support_weight) = padded(&|t| &t.support.0)?;
        let (support_y, _) = padded(&|t| &t.support.1)?;
        let (query_x, query_weight) = padded(&|t| &t.query.0)?;
        let (query_y, _) = padded(&|t| &t.query.1)?;
        Ok(Some(Self {
            support_x,
            support_y,
            query_x,
            query_y,
            support_weight: Some(support_weight.to_dtype(first.support.1.dtype())?),
            query_weight: Some(query_weight.to_dtype(first.query.1.dtype())?),
        }))
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.support_x.dims()[0]
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A task source whose validation tasks come from a second source (e.g. alphabets of another
/// archive), so that every class of the first can be meta-trained on.
pub struct WithValidation {
    tasks: Box<dyn TaskSource>,
    validation: Box<dyn TaskSource>,
}

impl WithValidation {
    /// Draws validation tasks from `validation` and every other split from `tasks`; both must
    /// produce tasks of the same kind and input shape.
    pub fn new(tasks: Box<dyn TaskSource>, validation: Box<dyn TaskSource>) -> Result<Self> {
        if tasks.kind() != validation.kind() || tasks.input_shape() != validation.input_shape() {
            return Err(Error::Config(format!(
                "the validation data gives {:?} tasks with inputs {:?}, but the training data \
                 gives {:?} tasks with inputs {:?}; use data of the same kind and image size",
                validation.kind(),
                validation.input_shape(),
                tasks.kind(),
                tasks.input_shape()
            )));
        }
        Ok(Self { tasks, validation })
    }

    fn for_split(&self, split: Split) -> &dyn TaskSource {
        match split {
            Split::Validation => self.validation.as_ref(),
            Split::Train | Split::Test => self.tasks.as_ref(),
        }
    }
}

impl TaskSource for WithValidation {
    fn sample(&self, split: Split, rng: &mut ChaCha8Rng) -> Result<Task> {
        self.for_split(split).sample(split, rng)
    }

    fn kind(&self) -> TaskKind {
        self.tasks.kind()
    }

    fn input_shape(&self) -> Vec<usize> {
        self.tasks.input_shape()
    }

    fn check_split(&self, split: Split) -> Result<()> {
        self.for_split(split).check_split(split)
    }

    fn joint_batch(&self, tasks: usize, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor, usize)> {
        self.tasks.joint_batch(tasks, rng)
    }
}
