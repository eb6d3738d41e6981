//! [`MetaLearner`]: a network, its meta-parameters, an algorithm and the outer optimiser, with
//! checkpointing. This is the object the meta-training loop, evaluation and the CLI work with.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::distributed::Collective;
use crate::error::{Error, Result};
use crate::meta::algorithm::{
    Adapted, AlgorithmConfig, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams,
};
use crate::meta::build_algorithm;
use crate::nn::architecture::Architecture;
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::tasks::{Task, TaskKind};
use crate::train::metrics::Metric;
use crate::train::optim::{Optimizer, OptimizerConfig};

/// A meta-learning model: network + meta-parameters + algorithm + outer optimiser.
pub struct MetaLearner {
    network: Network,
    algorithm_config: AlgorithmConfig,
    algorithm: Box<dyn MetaAlgorithm>,
    task_kind: TaskKind,
    names: Vec<String>,
    vars: Vec<Var>,
    lr_vars: Option<Vec<Var>>,
    buffers: ParamSet,
    optimizer: Optimizer,
    iteration: u64,
    threads: usize,
    test_time_shifts: bool,
    collective: Arc<dyn Collective>,
}

/// Worker threads for splitting a meta-batch of convolutional tasks: one per core.
pub fn default_task_threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

impl MetaLearner {
    /// A fresh learner: weights drawn from `seed`, Meta-SGD rates set to the inner learning rate.
    pub fn new(
        arch: &Architecture,
        algorithm: AlgorithmConfig,
        task_kind: TaskKind,
        outer: OptimizerConfig,
        seed: u64,
        dtype: DType,
    ) -> Result<Self> {
        Self::new_on(arch, algorithm, task_kind, outer, seed, dtype, &Device::Cpu)
    }

    /// [`MetaLearner::new`] with the weights on `device` (CPU, or a GPU with the `cuda` feature).
    pub fn new_on(
        arch: &Architecture,
        algorithm: AlgorithmConfig,
        task_kind: TaskKind,
        outer: OptimizerConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let network = Network::build(arch)?;
        let device = device.clone();
        let weights = network.init_params(seed, &device, dtype)?;
        let buffers = network.init_buffers(&device, dtype)?;
        let lrs = if algorithm.name == AlgorithmKind::MetaSgd {
            Some(weights.map(|_, t| Ok(t.ones_like()?.affine(algorithm.inner_lr, 0.0)?))?)
        } else {
            None
        };
        Self::from_parts(network, algorithm, task_kind, outer, weights, lrs, buffers)
    }

    fn from_parts(
        network: Network,
        algorithm_config: AlgorithmConfig,
        task_kind: TaskKind,
        outer: OptimizerConfig,
        weights: ParamSet,
        lrs: Option<ParamSet>,
        buffers: ParamSet,
    ) -> Result<Self> {
        if let (AlgorithmKind::Protonet, TaskKind::Regression) = (algorithm_config.name, task_kind)
        {
            return Err(Error::Config(
                "Prototypical Networks need classification tasks, not regression".into(),
            ));
        }
        let algorithm = build_algorithm(&algorithm_config)?;
        let vars = weights.to_vars()?;
        let lr_vars = lrs.as_ref().map(|l| l.to_vars()).transpose()?;
        let count = vars.len() + lr_vars.as_ref().map_or(0, |v| v.len());
        Ok(Self {
            names: weights.names().to_vec(),
            network,
            algorithm_config,
            algorithm,
            task_kind,
            vars,
            lr_vars,
            buffers,
            optimizer: Optimizer::new(outer, count)?,
            iteration: 0,
            // One batched graph by default: for small models, splitting the meta-batch across
            // threads costs more in allocator contention than it gains (measured on sinusoid MAML).
            threads: 1,
            test_time_shifts: false,
            collective: crate::distributed::world(),
        })
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The algorithm's configuration.
    pub fn algorithm_config(&self) -> &AlgorithmConfig {
        &self.algorithm_config
    }

    /// Regression or classification.
    pub fn task_kind(&self) -> TaskKind {
        self.task_kind
    }

    /// Meta-iterations done so far.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The outer optimiser.
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// The meta-parameters (sharing storage with the learner's variables).
    pub fn meta_params(&self) -> MetaParams {
        MetaParams {
            weights: ParamSet::from_vars(&self.names, &self.vars).expect("unique names"),
            inner_lrs: self
                .lr_vars
                .as_ref()
                .map(|v| ParamSet::from_vars(&self.names, v).expect("unique names")),
        }
    }

    /// Replaces the meta-parameters' values.
    pub fn set_meta_params(&mut self, meta: &MetaParams) -> Result<()> {
        for (name, var) in self.names.iter().zip(&self.vars) {
            var.set(meta.weights.get(name)?)?;
        }
        if let (Some(vars), Some(lrs)) = (&self.lr_vars, &meta.inner_lrs) {
            for (name, var) in self.names.iter().zip(vars) {
                var.set(lrs.get(name)?)?;
            }
        }
        Ok(())
    }

    /// Batch-norm running statistics.
    pub fn buffers(&self) -> &ParamSet {
        &self.buffers
    }

    /// One meta-training step on `tasks`: meta-gradient, then the outer optimiser. A non-finite
    /// meta-loss is an error and leaves the parameters unchanged.
    pub fn meta_train_step(&mut self, tasks: &[Task]) -> Result<f64> {
        let step = if self.collective.size() > 1 {
            self.distributed_meta_step(tasks)?
        } else {
            self.parallel_meta_step(tasks)?
        };
        if !step.loss.is_finite() {
            return Err(Error::NonFinite(format!(
                "meta-loss became {} at iteration {}; parameters left at their last finite values. \
                 Try a lower outer or inner learning rate",
                step.loss,
                self.iteration + 1
            )));
        }
        let all_vars = self.all_vars();
        self.optimizer.step(&all_vars, &step.grads)?;
        self.network
            .fold_batch_stats(&mut self.buffers, step.batch_stats, |_| false)?;
        self.iteration += 1;
        Ok(step.loss)
    }

    /// The ranks this learner's meta-steps are split across (the process's
    /// [`crate::distributed::world`] when it was made).
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// Splits later meta-steps across the ranks of `collective`.
    pub fn set_collective(&mut self, collective: Arc<dyn Collective>) {
        self.collective = collective;
    }

    /// Makes every rank's state rank 0's: weights, learned inner learning rates and batch-norm
    /// statistics (one broadcast of one flat buffer).
    pub fn broadcast_state(&mut self) -> Result<()> {
        if self.collective.size() < 2 {
            return Ok(());
        }
        let mut tensors: Vec<Tensor> = self
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let names = self.buffers.names().to_vec();
        for name in &names {
            tensors.push(self.buffers.get(name)?.clone());
        }
        let mut flat = Vec::new();
        for t in &tensors {
            flat.extend(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        }
        self.collective.broadcast_in_place(&mut flat)?;
        let mut at = 0;
        let vars = self.all_vars();
        for (i, t) in tensors.iter().enumerate() {
            let n = t.elem_count();
            let value = Tensor::from_vec(flat[at..at + n].to_vec(), t.shape(), t.device())?
                .to_dtype(t.dtype())?;
            at += n;
            match vars.get(i) {
                Some(var) => var.set(&value)?,
                None => self.buffers.replace(&names[i - vars.len()], value)?,
            }
        }
        Ok(())
    }

    /// Weights, then Meta-SGD's learning rates: the order of a meta-step's gradients.
    fn all_vars(&self) -> Vec<Var> {
        let mut all = self.vars.clone();
        if let Some(l) = &self.lr_vars {
            all.extend(l.iter().cloned());
        }
        all
    }

    /// The meta-step of a meta-batch split across the ranks: this rank's contiguous share of the
    /// tasks (itself split across threads), then one sum over ranks of one flat buffer holding
    /// the task-weighted loss and gradients, weighted as [`Self::parallel_meta_step`] weighs its
    /// chunks. N ranks of one thread thus compute what one process of N threads does, up to the
    /// order of the final sum. Batch-norm statistics, when the algorithm records any, are
    /// gathered in rank order (a second collective) and folded in that order, as one process
    /// folds its chunks'.
    fn distributed_meta_step(&self, tasks: &[Task]) -> Result<crate::meta::MetaStep> {
        let world = &self.collective;
        let ranks = world.size();
        if tasks.len() < ranks {
            return Err(Error::Config(format!(
                "a meta-batch of {} tasks cannot be split across {ranks} ranks: use \
                 training.meta_batch >= {ranks}, or fewer ranks",
                tasks.len()
            )));
        }
        let share = world.share(tasks.len());
        let weight = share.len() as f64 / tasks.len() as f64;
        let local = self.parallel_meta_step(&tasks[share])?;
        let vars = self.all_vars();
        // Batch statistics as (index of the buffer, values), to gather below.
        let names = self.buffers.names();
        let mut stats: Vec<f64> = Vec::new();
        let mut entries = 0usize;
        for (name, stat) in &local.batch_stats {
            let index = names.iter().position(|n| n == name).ok_or_else(|| {
                Error::Shape(format!("batch statistics for `{name}`, which is no buffer"))
            })?;
            stats.push(index as f64);
            stats.extend(stat.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
            entries += 1;
        }
        let mut flat = vec![weight * local.loss];
        flat.extend(local.grads.iter().map(|g| f64::from(u8::from(g.is_some()))));
        for (g, var) in local.grads.iter().zip(&vars) {
            match g {
                Some(g) => flat.extend(
                    g.affine(weight, 0.0)?
                        .to_dtype(DType::F64)?
                        .flatten_all()?
                        .to_vec1::<f64>()?,
                ),
                None => flat.extend(std::iter::repeat_n(0.0, var.elem_count())),
            }
        }
        // Each rank's count of statistics entries and values, in its own slot.
        let sizes_at = flat.len();
        flat.extend(std::iter::repeat_n(0.0, 2 * ranks));
        flat[sizes_at + 2 * world.rank()] = entries as f64;
        flat[sizes_at + 2 * world.rank() + 1] = stats.len() as f64;
        world.sum_in_place(&mut flat)?;
        let loss = flat[0];
        let mut at = 1 + vars.len();
        let mut grads = Vec::with_capacity(vars.len());
        for (i, var) in vars.iter().enumerate() {
            let n = var.elem_count();
            let values = flat[at..at + n].to_vec();
            at += n;
            grads.push(if flat[1 + i] > 0.0 {
                Some(Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)
            } else {
                None
            });
        }
        let sizes: Vec<(usize, usize)> = (0..ranks)
            .map(|r| {
                (
                    flat[sizes_at + 2 * r] as usize,
                    flat[sizes_at + 2 * r + 1] as usize,
                )
            })
            .collect();
        let slot = sizes.iter().map(|s| s.1).max().unwrap_or(0);
        let mut batch_stats = Vec::new();
        if slot > 0 {
            stats.resize(slot, 0.0);
            let all = crate::distributed::gather_all(world.as_ref(), &stats)?;
            for (r, &(count, _)) in sizes.iter().enumerate() {
                let mut at = r * slot;
                for _ in 0..count {
                    let name = &names[all[at] as usize];
                    let like = self.buffers.get(name)?;
                    let n = like.elem_count();
                    let values = all[at + 1..at + 1 + n].to_vec();
                    at += 1 + n;
                    batch_stats.push((
                        name.clone(),
                        Tensor::from_vec(values, like.shape(), like.device())?
                            .to_dtype(like.dtype())?,
                    ));
                }
            }
        }
        Ok(crate::meta::MetaStep {
            loss,
            grads,
            batch_stats,
        })
    }

    /// Splits the meta-batch into one chunk per worker thread, runs the algorithm's step on each
    /// chunk in parallel (each chunk is itself one task-batched computation) and combines the
    /// chunks' mean losses and gradients weighted by their task counts. The chunking depends only
    /// on the thread count, so results are reproducible for a given count.
    fn parallel_meta_step(&self, tasks: &[Task]) -> Result<crate::meta::MetaStep> {
        use rayon::prelude::*;
        if tasks.is_empty() {
            return Err(Error::Data("empty meta-batch".into()));
        }
        // Task sources produce f32 data on the CPU; a learner in another precision or on a GPU
        // converts it, as `adapt` and `predict` do.
        let converted: Vec<Task>;
        let tasks = if tasks.iter().all(|t| self.holds(&t.support.0)) {
            tasks
        } else {
            converted = tasks
                .iter()
                .map(|t| t.map(|x| self.bring(x)))
                .collect::<Result<_>>()?;
            &converted
        };
        let workers = self.threads.min(tasks.len()).max(1);
        let meta = self.meta_params();
        if workers == 1 {
            return self
                .algorithm
                .meta_train_step(&self.network, &meta, tasks, self.task_kind);
        }
        let chunk = tasks.len().div_ceil(workers);
        let step = |c: &[Task]| {
            self.algorithm
                .meta_train_step(&self.network, &meta, c, self.task_kind)
                .map(|s| (c.len(), s))
        };
        // A GPU runs each chunk's operations in parallel itself; there the chunks run one after
        // another, which bounds the memory of the gradient graph to one chunk's.
        let parts: Vec<(usize, crate::meta::MetaStep)> = if self.device().is_cpu() {
            tasks.par_chunks(chunk).map(step).collect::<Result<_>>()?
        } else {
            tasks.chunks(chunk).map(step).collect::<Result<_>>()?
        };
        let total = tasks.len() as f64;
        let mut loss = 0.0;
        let mut grads: Vec<Option<Tensor>> = vec![None; parts[0].1.grads.len()];
        let mut batch_stats = Vec::new();
        for (count, part) in parts {
            let w = count as f64 / total;
            loss += w * part.loss;
            for (acc, g) in grads.iter_mut().zip(part.grads) {
                if let Some(g) = g {
                    let g = g.affine(w, 0.0)?;
                    *acc = Some(match acc.take() {
                        Some(a) => a.add(&g)?,
                        None => g,
                    });
                }
            }
            batch_stats.extend(part.batch_stats);
        }
        Ok(crate::meta::MetaStep {
            loss,
            grads,
            batch_stats,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vars
            .first()
            .map_or(Device::Cpu, |v| v.as_tensor().device().clone())
    }

    fn dtype(&self) -> DType {
        self.vars.first().map_or(DType::F32, |v| v.dtype())
    }

    /// Whether `t` already has the weights' precision and device.
    fn holds(&self, t: &Tensor) -> bool {
        t.dtype() == self.dtype() && t.device().same_device(&self.device())
    }

    /// `t` in the weights' precision, on their device.
    fn bring(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_device(&self.device())?.to_dtype(self.dtype())?)
    }

    /// Switches test-time augmentation by one-pixel shifts on or off for `adapt` and `predict`
    /// (used by ProtoNet; other algorithms ignore it). Off by default.
    pub fn set_test_time_shifts(&mut self, on: bool) {
        self.test_time_shifts = on;
    }

    /// Sets into how many chunks the meta-batch is split (default 1). On the CPU the chunks run
    /// in parallel; on a GPU one after another, so that only one chunk's gradient graph is held
    /// in GPU memory at a time.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Adapts to a support set with `steps` inner steps (default: the configured evaluation
    /// steps).
    pub fn adapt(&self, support: (&Tensor, &Tensor), steps: Option<usize>) -> Result<Adapted> {
        let steps = steps.unwrap_or(self.algorithm_config.eval_inner_steps);
        let x = self.bring(support.0)?;
        let y = self.bring(support.1)?;
        self.algorithm.adapt(
            &self.network,
            &self.meta_params(),
            (&x, &y),
            steps,
            self.task_kind,
            &EvalState {
                running_stats: Some(&self.buffers),
                test_time_shifts: self.test_time_shifts,
            },
        )
    }

    /// Predictions (regression values or class logits) for `x` after adaptation.
    pub fn predict(&self, adapted: &Adapted, x: &Tensor) -> Result<Tensor> {
        self.algorithm.predict(
            &self.network,
            &self.meta_params(),
            adapted,
            &self.bring(x)?,
            &EvalState {
                running_stats: Some(&self.buffers),
                test_time_shifts: self.test_time_shifts,
            },
        )
    }

    /// The task metric: accuracy for classification, MSE for regression.
    pub fn metric(&self) -> Metric {
        match self.task_kind {
            TaskKind::Regression => Metric::Mse,
            TaskKind::Classification { .. } => Metric::Accuracy,
        }
    }

    /// Adapts to a task's support set and scores its query set with [`MetaLearner::metric`].
    pub fn evaluate_task(&self, task: &Task, steps: Option<usize>) -> Result<f64> {
        let adapted = self.adapt((&task.support.0, &task.support.1), steps)?;
        let pred = self.predict(&adapted, &task.query.0)?;
        self.metric()
            .compute(&pred, &self.bring(&task.query.1)?, 0.5)
    }

    /// The learner as a checkpoint: weights, running statistics, Meta-SGD rates and optimiser
    /// moments as tensors; algorithm, task kind, optimiser and iteration as metadata.
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let meta = self.meta_params();
        let mut ckpt = Checkpoint::new(
            self.network.architecture().clone(),
            meta.weights.detach(),
            self.buffers.clone(),
        );
        if let Some(lrs) = meta.inner_lrs {
            for (name, t) in lrs.iter() {
                ckpt.state.insert(format!("inner_lr.{name}"), t.detach())?;
            }
        }
        let (opt_state, opt_steps) = self.optimizer.state()?;
        for (name, t) in opt_state.iter() {
            ckpt.state.insert(format!("optim.{name}"), t.clone())?;
        }
        ckpt.sections.insert(
            "meta".into(),
            json!({
                "algorithm": self.algorithm_config,
                "task_kind": self.task_kind,
                "outer_optimizer": self.optimizer.config(),
                "optimizer_steps": opt_steps,
                "iteration": self.iteration,
            }),
        );
        Ok(ckpt)
    }

    /// Rebuilds a learner (with its optimiser state) from a checkpoint written by
    /// [`MetaLearner::to_checkpoint`].
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let meta = ckpt.section("meta").ok_or_else(|| {
            Error::Checkpoint(
                "this checkpoint holds no meta-learning model (no `meta` section); it was written \
                 by `train`/`finetune`, use `evaluate`/`predict` with it"
                    .into(),
            )
        })?;
        let field = |key: &str| {
            meta.get(key).cloned().ok_or_else(|| {
                Error::Checkpoint(format!("checkpoint `meta` section lacks `{key}`"))
            })
        };
        let parse = |key: &str, e: serde_json::Error| {
            Error::Checkpoint(format!("checkpoint `meta.{key}` is invalid: {e}"))
        };
        let algorithm: AlgorithmConfig =
            serde_json::from_value(field("algorithm")?).map_err(|e| parse("algorithm", e))?;
        let task_kind: TaskKind =
            serde_json::from_value(field("task_kind")?).map_err(|e| parse("task_kind", e))?;
        let outer: OptimizerConfig = serde_json::from_value(field("outer_optimizer")?)
            .map_err(|e| parse("outer_optimizer", e))?;
        let network = Network::build(&ckpt.architecture)?;
        let lrs = if algorithm.name == AlgorithmKind::MetaSgd {
            Some(ckpt.params.map(|name, _| {
                ckpt.state
                    .try_get(&format!("inner_lr.{name}"))
                    .cloned()
                    .ok_or_else(|| {
                        Error::Checkpoint(format!(
                            "Meta-SGD checkpoint lacks the learned rate `inner_lr.{name}`"
                        ))
                    })
            })?)
        } else {
            None
        };
        let mut learner = Self::from_parts(
            network,
            algorithm,
            task_kind,
            outer,
            ckpt.params.clone(),
            lrs,
            ckpt.buffers.clone(),
        )?;
        let opt_state =
            ParamSet::from_pairs(ckpt.state.iter().filter_map(|(n, t)| {
                n.strip_prefix("optim.").map(|s| (s.to_string(), t.clone()))
            }))?;
        let steps = meta
            .get("optimizer_steps")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        learner.optimizer.load_state(&opt_state, steps)?;
        learner.iteration = meta.get("iteration").and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(learner)
    }
}
