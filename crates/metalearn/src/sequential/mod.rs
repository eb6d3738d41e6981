//! The Keras-style model: [`Sequential`] owns an architecture, its parameters and (after
//! `compile`) a training configuration, and offers `fit`, `evaluate`, `predict`, `save` and
//! `load`, plus the transfer-learning operations (freeze, replace the head, linear probe).

pub mod fit;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, Provenance};
use crate::error::{Error, Result};
use crate::nn::architecture::{Activation, Architecture, Layer};
use crate::nn::network::{ForwardCtx, Network};
use crate::nn::params::ParamSet;
use crate::train::loss::Loss;
use crate::train::metrics::Metric;
use crate::train::optim::{Optimizer, OptimizerConfig};

/// The keyword for the model type in user code: `Model::load(path)`.
pub type Model = Sequential;

/// What `compile` fixes: optimiser, loss and metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompileConfig {
    /// The optimiser and its hyper-parameters.
    pub optimizer: OptimizerConfig,
    /// The training loss.
    pub loss: Loss,
    /// Metrics reported by `fit` and `evaluate`.
    pub metrics: Vec<Metric>,
}

/// A layer chosen by position or by name (for freezing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerRef {
    /// 0-based position in the architecture.
    Index(usize),
    /// The layer's name.
    Name(String),
}

impl From<usize> for LayerRef {
    fn from(i: usize) -> Self {
        LayerRef::Index(i)
    }
}
impl From<&str> for LayerRef {
    fn from(s: &str) -> Self {
        match s.parse::<usize>() {
            Ok(i) => LayerRef::Index(i),
            Err(_) => LayerRef::Name(s.to_string()),
        }
    }
}

/// Builds a [`Sequential`] layer by layer.
#[derive(Debug)]
pub struct SequentialBuilder {
    arch: Architecture,
    error: Option<Error>,
}

impl SequentialBuilder {
    /// Appends a layer with a default name.
    // Named after Keras' `Sequential.add`, which users know; it is not arithmetic addition.
    #[allow(clippy::should_implement_trait)]
    pub fn add(mut self, layer: Layer) -> Self {
        self.arch.push(layer);
        self
    }
    /// Appends a layer with an explicit name.
    pub fn add_named(mut self, name: &str, layer: Layer) -> Self {
        if let Err(e) = self.arch.push_named(name, layer) {
            self.error.get_or_insert(e);
        }
        self
    }
    /// Appends a dense layer.
    pub fn dense(self, units: usize) -> Self {
        self.add(Layer::dense(units))
    }
    /// Appends an activation layer.
    pub fn activation(self, activation: Activation) -> Self {
        self.add(Layer::activation(activation))
    }
    /// Builds the model with parameters drawn from `seed` (f32, CPU).
    pub fn build(self, seed: u64) -> Result<Sequential> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Sequential::from_architecture(self.arch, seed)
    }
    /// The architecture built so far.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }
}

/// A sequential network with its parameters and training configuration.
pub struct Sequential {
    pub(crate) network: Network,
    pub(crate) names: Vec<String>,
    pub(crate) vars: Vec<Var>,
    pub(crate) buffers: ParamSet,
    pub(crate) frozen: BTreeSet<String>,
    pub(crate) compiled: Option<CompileConfig>,
    pub(crate) optimizer: Option<Optimizer>,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    pub(crate) provenance: Provenance,
    pub(crate) epochs_trained: usize,
}

impl Sequential {
    /// Starts a model for examples of `input_shape` (without the batch dimension).
    pub fn builder(input_shape: &[usize]) -> SequentialBuilder {
        SequentialBuilder {
            arch: Architecture::new(input_shape),
            error: None,
        }
    }

    /// A model of `arch` with parameters drawn from `seed` (f32 on the CPU).
    pub fn from_architecture(arch: Architecture, seed: u64) -> Result<Self> {
        Self::from_architecture_on(arch, seed, &Device::Cpu, DType::F32)
    }

    /// A model of `arch` with parameters drawn from `seed`, on `device` with `dtype`.
    pub fn from_architecture_on(
        arch: Architecture,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let network = Network::build(&arch)?;
        let params = network.init_params(seed, device, dtype)?;
        let buffers = network.init_buffers(device, dtype)?;
        Self::from_parts(network, params, buffers)
    }

    pub(crate) fn from_parts(
        network: Network,
        params: ParamSet,
        buffers: ParamSet,
    ) -> Result<Self> {
        let device = params
            .tensors()
            .first()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let dtype = params
            .tensors()
            .first()
            .map(|t| t.dtype())
            .unwrap_or(DType::F32);
        Ok(Self {
            names: params.names().to_vec(),
            vars: params.to_vars()?,
            network,
            buffers,
            frozen: BTreeSet::new(),
            compiled: None,
            optimizer: None,
            device,
            dtype,
            provenance: Provenance::now(),
            epochs_trained: 0,
        })
    }

    /// The built network (architecture, shapes, parameter descriptions).
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The architecture.
    pub fn architecture(&self) -> &Architecture {
        self.network.architecture()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters' floating-point type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A snapshot of the trainable parameters (sharing storage with the model's variables).
    pub fn params(&self) -> ParamSet {
        ParamSet::from_vars(&self.names, &self.vars).expect("names are unique")
    }

    /// Batch-norm running statistics.
    pub fn buffers(&self) -> &ParamSet {
        &self.buffers
    }

    /// Total number of trainable values (frozen ones included).
    pub fn param_count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Replaces every parameter's values (names and shapes must match).
    pub fn set_params(&mut self, params: &ParamSet) -> Result<()> {
        for (name, var) in self.names.iter().zip(&self.vars) {
            let new = params.get(name)?;
            if new.dims() != var.dims() {
                return Err(Error::Shape(format!(
                    "parameter `{name}`: have {:?}, got {:?}",
                    var.dims(),
                    new.dims()
                )));
            }
            var.set(&new.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Replaces the batch-norm running statistics.
    pub fn set_buffers(&mut self, buffers: ParamSet) {
        self.buffers = buffers;
    }

    /// Fixes the optimiser, loss and metrics used by `fit` and `evaluate`. Compiling again (for
    /// example to fine-tune with another learning rate) starts a fresh optimiser state.
    pub fn compile(
        &mut self,
        optimizer: OptimizerConfig,
        loss: Loss,
        metrics: &[Metric],
    ) -> Result<()> {
        self.optimizer = Some(Optimizer::new(optimizer.clone(), self.vars.len())?);
        self.compiled = Some(CompileConfig {
            optimizer,
            loss,
            metrics: metrics.to_vec(),
        });
        Ok(())
    }

    /// The compile configuration, if compiled.
    pub fn compile_config(&self) -> Option<&CompileConfig> {
        self.compiled.as_ref()
    }

    /// Output for `x` in inference mode (running batch-norm statistics, no dropout), computed in
    /// batches of `batch_size`.
    pub fn predict(&self, x: &Tensor, batch_size: usize) -> Result<Tensor> {
        let params = self.params().detach();
        let n = x.dim(0)?;
        let batch_size = batch_size.max(1);
        let mut outs = Vec::new();
        let mut start = 0;
        while start < n {
            let len = batch_size.min(n - start);
            let xb = x.narrow(0, start, len)?.to_dtype(self.dtype)?;
            let mut ctx = ForwardCtx::eval(Some(&self.buffers));
            outs.push(self.network.forward(&params, &xb, &mut ctx)?);
            start += len;
        }
        if outs.is_empty() {
            return Err(Error::Data("predict got no examples".into()));
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Loss and metrics on `(x, y)` in inference mode. Needs `compile` first.
    pub fn evaluate(
        &self,
        x: &Tensor,
        y: &Tensor,
        batch_size: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let cfg = self.compiled.as_ref().ok_or_else(not_compiled)?;
        let pred = self.predict(x, batch_size)?;
        let mut out = BTreeMap::new();
        out.insert(
            "loss".to_string(),
            cfg.loss
                .compute(&pred, &y.to_dtype(self.dtype)?)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
        );
        for m in &cfg.metrics {
            out.insert(
                m.name().to_string(),
                m.compute(&pred, y, self.decision_threshold())?,
            );
        }
        Ok(out)
    }

    /// Threshold that turns a single output into a 0/1 class: 0 for logits, 0.5 otherwise.
    pub(crate) fn decision_threshold(&self) -> f64 {
        match self.compiled.as_ref().map(|c| c.loss) {
            Some(Loss::BinaryCrossEntropyWithLogits) => 0.0,
            _ => 0.5,
        }
    }

    // ---- transfer learning -------------------------------------------------------------

    fn resolve(&self, layer: &LayerRef) -> Result<usize> {
        let arch = self.architecture();
        match layer {
            LayerRef::Index(i) if *i < arch.layers.len() => Ok(*i),
            LayerRef::Index(i) => Err(Error::Config(format!(
                "layer index {i} is out of range: the model has {} layers (0..{})",
                arch.layers.len(),
                arch.layers.len().saturating_sub(1)
            ))),
            LayerRef::Name(n) => arch.layer_index(n),
        }
    }

    /// Freezes the given layers: their parameters receive no updates (and batch-norm layers stop
    /// updating their running statistics).
    pub fn freeze(&mut self, layers: &[LayerRef]) -> Result<()> {
        // Resolve every reference first, so that a bad one freezes nothing.
        let indices = layers
            .iter()
            .map(|l| self.resolve(l))
            .collect::<Result<Vec<_>>>()?;
        for i in indices {
            for spec in self.network.param_specs().iter().filter(|s| s.layer == i) {
                self.frozen.insert(spec.name.clone());
            }
        }
        Ok(())
    }

    /// Freezes every layer except the head (the last layer with parameters): a linear probe.
    pub fn freeze_all_but_head(&mut self) -> Result<()> {
        let head = self
            .architecture()
            .head_index()
            .ok_or_else(|| Error::Config("the model has no layer with parameters".into()))?;
        let others: Vec<LayerRef> = (0..head).map(LayerRef::Index).collect();
        self.freeze(&others)
    }

    /// Makes every parameter trainable again.
    pub fn unfreeze_all(&mut self) {
        self.frozen.clear();
    }

    /// Names of frozen parameters.
    pub fn frozen(&self) -> &BTreeSet<String> {
        &self.frozen
    }

    /// Whether a parameter is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen.contains(name)
    }

    /// Replaces the head (the last dense layer) by a fresh one with `units` outputs drawn from
    /// `seed`; all other parameters are kept. The model must be compiled again before `fit`.
    pub fn replace_head(&mut self, units: usize, seed: u64) -> Result<()> {
        let mut arch = self.architecture().clone();
        let head = arch
            .layers
            .iter()
            .rposition(|l| matches!(l.layer, Layer::Dense { .. }))
            .ok_or_else(|| Error::Config("the model has no dense layer to replace".into()))?;
        arch.layers[head].layer = Layer::Dense { units };
        let network = Network::build(&arch)?;
        let fresh = network.init_params(seed, &self.device, self.dtype)?;
        let old = self.params();
        let head_name = &arch.layers[head].name;
        let params = fresh.map(|name, t| {
            let is_head = name.starts_with(&format!("{head_name}."));
            Ok(if is_head {
                t.clone()
            } else {
                old.get(name)?.detach().copy()?
            })
        })?;
        self.frozen
            .retain(|n| !n.starts_with(&format!("{head_name}.")));
        self.names = params.names().to_vec();
        self.vars = params.to_vars()?;
        self.network = network;
        self.compiled = None;
        self.optimizer = None;
        Ok(())
    }

    // ---- checkpoints ---------------------------------------------------------------------

    /// The model as a checkpoint (architecture, weights, training configuration, provenance).
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let mut ckpt = Checkpoint::new(
            self.architecture().clone(),
            self.params().detach(),
            self.buffers.clone(),
        );
        ckpt.provenance = self.provenance.clone();
        ckpt.provenance.metalearn_version = env!("CARGO_PKG_VERSION").to_string();
        let mut training = serde_json::json!({ "epochs_trained": self.epochs_trained });
        if let Some(cfg) = &self.compiled {
            training["compile"] = serde_json::to_value(cfg).expect("config serialises");
        }
        training["frozen"] = serde_json::to_value(&self.frozen).expect("names serialise");
        ckpt.sections.insert("training".into(), training);
        Ok(ckpt)
    }

    /// Saves the model to one checkpoint file, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.to_checkpoint()?.save(path)
    }

    /// Rebuilds a model from a checkpoint file alone (architecture, weights, running statistics,
    /// compile configuration and frozen layers), on the CPU in the file's dtype.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let ckpt = Checkpoint::load(path.as_ref(), &Device::Cpu)?;
        Self::from_checkpoint(&ckpt)
    }

    /// Rebuilds a model from a loaded checkpoint.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let network = Network::build(&ckpt.architecture)?;
        let mut model = Self::from_parts(network, ckpt.params.clone(), ckpt.buffers.clone())?;
        model.provenance = ckpt.provenance.clone();
        if let Some(training) = ckpt.section("training") {
            model.epochs_trained = training["epochs_trained"].as_u64().unwrap_or(0) as usize;
            let bad = |key: &str, e: serde_json::Error| {
                Error::Checkpoint(format!(
                    "the checkpoint's `training.{key}` metadata is invalid ({e}); save the model again"
                ))
            };
            // Absent entries (a model saved before compiling) are fine; unreadable ones are not.
            if let Some(compile) = training.get("compile").filter(|v| !v.is_null()) {
                let cfg: CompileConfig =
                    serde_json::from_value(compile.clone()).map_err(|e| bad("compile", e))?;
                model.compile(cfg.optimizer, cfg.loss, &cfg.metrics)?;
            }
            if let Some(frozen) = training.get("frozen").filter(|v| !v.is_null()) {
                let frozen: BTreeSet<String> =
                    serde_json::from_value(frozen.clone()).map_err(|e| bad("frozen", e))?;
                if let Some(unknown) = frozen.iter().find(|n| !model.names.contains(n)) {
                    return Err(Error::Checkpoint(format!(
                        "the checkpoint marks `{unknown}` as frozen, but the model has no such \
                         parameter; save the model again"
                    )));
                }
                model.frozen = frozen;
            }
        }
        Ok(model)
    }

    /// Loads weights from a checkpoint whose architecture has the same parameter names and
    /// shapes as this model's.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let ckpt = Checkpoint::load(path.as_ref(), &self.device)?;
        for spec in self.network.param_specs() {
            let t = ckpt.params.try_get(&spec.name).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: has no parameter `{}` needed by this model",
                    path.as_ref().display(),
                    spec.name
                ))
            })?;
            if t.dims() != spec.shape.as_slice() {
                return Err(Error::Checkpoint(format!(
                    "{}: parameter `{}` has shape {:?}, this model needs {:?}",
                    path.as_ref().display(),
                    spec.name,
                    t.dims(),
                    spec.shape
                )));
            }
        }
        self.set_params(&ckpt.params)?;
        if ckpt.buffers.names() == self.buffers.names() {
            self.buffers = ckpt.buffers.to_dtype(self.dtype)?;
        }
        self.provenance.parent = Some(path.as_ref().display().to_string());
        Ok(())
    }

    /// Records where the training data came from (stored in checkpoints).
    pub fn set_data_provenance(&mut self, data: impl Into<String>) {
        self.provenance.data = Some(data.into());
    }

    /// Records the checkpoint this model was fine-tuned from.
    pub fn set_parent(&mut self, parent: impl Into<String>) {
        self.provenance.parent = Some(parent.into());
    }

    /// The provenance that `save` will write.
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }

    /// Epochs of `fit` run on this model so far (carried across save/load).
    pub fn epochs_trained(&self) -> usize {
        self.epochs_trained
    }
}

pub(crate) fn not_compiled() -> Error {
    Error::Config("the model is not compiled: call compile(optimizer, loss, metrics) first".into())
}
