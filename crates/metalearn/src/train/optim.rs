//! Optimisers over candle variables: SGD with momentum, Adam and AdamW.
//!
//! candle-nn ships AdamW and a momentum-less SGD whose state cannot be saved; these keep their
//! state as named tensors so that a checkpoint can hold it and training can resume exactly.

use candle_core::{DType, Tensor, Var};
use metalearn_kernels::adam::{adam_update, AdamStep};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::params::ParamSet;

/// Which optimiser, with its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// Stochastic gradient descent with (optionally Nesterov) momentum and L2 weight decay.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum factor (0 for plain SGD).
        #[serde(default)]
        momentum: f64,
        /// Use Nesterov momentum.
        #[serde(default)]
        nesterov: bool,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
    /// Adam (Kingma & Ba) with L2 weight decay added to the gradient.
    Adam {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        #[serde(default = "beta1")]
        beta1: f64,
        /// Second-moment decay.
        #[serde(default = "beta2")]
        beta2: f64,
        /// Denominator epsilon.
        #[serde(default = "adam_eps")]
        eps: f64,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
    /// AdamW (Loshchilov & Hutter): Adam with decoupled weight decay.
    AdamW {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        #[serde(default = "beta1")]
        beta1: f64,
        /// Second-moment decay.
        #[serde(default = "beta2")]
        beta2: f64,
        /// Denominator epsilon.
        #[serde(default = "adam_eps")]
        eps: f64,
        /// Decoupled weight decay.
        #[serde(default = "adamw_decay")]
        weight_decay: f64,
    },
}

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn adam_eps() -> f64 {
    1e-8
}
fn adamw_decay() -> f64 {
    0.01
}

impl OptimizerConfig {
    /// SGD with the given learning rate and momentum.
    pub fn sgd(lr: f64, momentum: f64) -> Self {
        Self::Sgd {
            lr,
            momentum,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
    /// Adam with default betas and epsilon.
    pub fn adam(lr: f64) -> Self {
        Self::Adam {
            lr,
            beta1: beta1(),
            beta2: beta2(),
            eps: adam_eps(),
            weight_decay: 0.0,
        }
    }
    /// AdamW with default betas, epsilon and the given decoupled weight decay.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        Self::AdamW {
            lr,
            beta1: beta1(),
            beta2: beta2(),
            eps: adam_eps(),
            weight_decay,
        }
    }
    /// Parses `sgd`, `adam` or `adamw` with a learning rate and weight decay.
    pub fn from_name(name: &str, lr: f64, weight_decay: f64, momentum: f64) -> Result<Self> {
        let mut cfg = match name.to_ascii_lowercase().as_str() {
            "sgd" => Self::sgd(lr, momentum),
            "adam" => Self::adam(lr),
            "adamw" => Self::adamw(lr, weight_decay),
            other => {
                return Err(Error::Config(format!(
                    "unknown optimizer `{other}`: use sgd, adam or adamw"
                )))
            }
        };
        cfg.set_weight_decay(weight_decay);
        cfg.validate()?;
        Ok(cfg)
    }
    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Sgd { lr, .. } | Self::Adam { lr, .. } | Self::AdamW { lr, .. } => *lr,
        }
    }
    /// Sets the learning rate.
    pub fn set_lr(&mut self, new: f64) {
        match self {
            Self::Sgd { lr, .. } | Self::Adam { lr, .. } | Self::AdamW { lr, .. } => *lr = new,
        }
    }
    fn set_weight_decay(&mut self, new: f64) {
        match self {
            Self::Sgd { weight_decay, .. }
            | Self::Adam { weight_decay, .. }
            | Self::AdamW { weight_decay, .. } => *weight_decay = new,
        }
    }
    /// Checks every hyper-parameter's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(format!("optimizer: {what}")));
        let lr = self.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            return bad(&format!("learning rate must be > 0, got {lr}"));
        }
        match self {
            Self::Sgd {
                momentum,
                weight_decay,
                ..
            } => {
                if !(0.0..1.0).contains(momentum) {
                    return bad(&format!("momentum must be in [0, 1), got {momentum}"));
                }
                if *weight_decay < 0.0 {
                    return bad("weight_decay must be >= 0");
                }
            }
            Self::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            }
            | Self::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                if !(0.0..1.0).contains(beta1) || !(0.0..1.0).contains(beta2) {
                    return bad("beta1 and beta2 must be in [0, 1)");
                }
                if eps.is_nan() || *eps <= 0.0 || *weight_decay < 0.0 {
                    return bad("eps must be > 0 and weight_decay >= 0");
                }
            }
        }
        Ok(())
    }
}

/// An optimiser with its per-variable state.
///
/// On the CPU, Adam's moments are updated in place (`metalearn_kernels::adam`), so the state
/// is never shared: [`Optimizer::state`] and [`Optimizer::load_state`] copy it, and an
/// optimiser is not `Clone`.
#[derive(Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    step: u64,
    /// Momentum (SGD) or first moment (Adam), per variable.
    first: Vec<Option<Tensor>>,
    /// Second moment (Adam), per variable.
    second: Vec<Option<Tensor>>,
}

impl Optimizer {
    /// A fresh optimiser for `count` variables.
    pub fn new(config: OptimizerConfig, count: usize) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            first: vec![None; count],
            second: vec![None; count],
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Number of updates made so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Changes the learning rate (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.set_lr(lr)
    }

    /// Applies one update. `grads[i]` is the gradient of `vars[i]`; `None` leaves it unchanged
    /// (a frozen or unused variable).
    pub fn step(&mut self, vars: &[Var], grads: &[Option<Tensor>]) -> Result<()> {
        if vars.len() != self.first.len() || grads.len() != vars.len() {
            return Err(Error::Shape(format!(
                "optimizer holds state for {} variables, got {} variables and {} gradients",
                self.first.len(),
                vars.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let t = self.step as i32;
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let theta = var.as_tensor().detach();
            let mut g = grad.detach();
            let new = match &self.config {
                OptimizerConfig::Sgd {
                    lr,
                    momentum,
                    nesterov,
                    weight_decay,
                } => {
                    if *weight_decay > 0.0 {
                        g = g.add(&theta.affine(*weight_decay, 0.0)?)?;
                    }
                    let direction = if *momentum > 0.0 {
                        let buf = match &self.first[i] {
                            Some(b) => b.affine(*momentum, 0.0)?.add(&g)?,
                            None => g.clone(),
                        };
                        self.first[i] = Some(buf.clone());
                        if *nesterov {
                            g.add(&buf.affine(*momentum, 0.0)?)?
                        } else {
                            buf
                        }
                    } else {
                        g
                    };
                    theta.sub(&direction.affine(*lr, 0.0)?)?
                }
                OptimizerConfig::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                }
                | OptimizerConfig::AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let decoupled = matches!(self.config, OptimizerConfig::AdamW { .. });
                    if fused_update_applies(&theta, &g) {
                        let constants = AdamStep {
                            beta1: *beta1,
                            beta2: *beta2,
                            correction1: 1.0 / (1.0 - beta1.powi(t)),
                            correction2: 1.0 / (1.0 - beta2.powi(t)),
                            eps: *eps,
                            lr: *lr,
                            shrink: (decoupled && *weight_decay > 0.0)
                                .then(|| 1.0 - lr * weight_decay),
                            l2: if decoupled { 0.0 } else { *weight_decay },
                        };
                        // The moments start at zero and are updated in place from then on.
                        let zeros = || theta.zeros_like();
                        let m = match &self.first[i] {
                            Some(m) => m.clone(),
                            None => zeros()?,
                        };
                        let v = match &self.second[i] {
                            Some(v) => v.clone(),
                            None => zeros()?,
                        };
                        adam_update(var.as_tensor(), &g, &m, &v, &constants)?;
                        self.first[i] = Some(m);
                        self.second[i] = Some(v);
                        continue;
                    }
                    if !decoupled && *weight_decay > 0.0 {
                        g = g.add(&theta.affine(*weight_decay, 0.0)?)?;
                    }
                    let m = match &self.first[i] {
                        Some(m) => m.affine(*beta1, 0.0)?.add(&g.affine(1.0 - beta1, 0.0)?)?,
                        None => g.affine(1.0 - beta1, 0.0)?,
                    };
                    let v = match &self.second[i] {
                        Some(v) => v
                            .affine(*beta2, 0.0)?
                            .add(&g.sqr()?.affine(1.0 - beta2, 0.0)?)?,
                        None => g.sqr()?.affine(1.0 - beta2, 0.0)?,
                    };
                    let m_hat = m.affine(1.0 / (1.0 - beta1.powi(t)), 0.0)?;
                    let v_hat = v.affine(1.0 / (1.0 - beta2.powi(t)), 0.0)?;
                    let update = m_hat.div(&v_hat.sqrt()?.affine(1.0, *eps)?)?;
                    self.first[i] = Some(m);
                    self.second[i] = Some(v);
                    let theta = if decoupled && *weight_decay > 0.0 {
                        theta.affine(1.0 - lr * weight_decay, 0.0)?
                    } else {
                        theta
                    };
                    theta.sub(&update.affine(*lr, 0.0)?)?
                }
            };
            var.set(&new)?;
        }
        Ok(())
    }

    /// The optimiser's state as named tensors (`<i>.first`, `<i>.second`) plus its step count,
    /// for checkpoints: copies, which later steps leave unchanged.
    pub fn state(&self) -> Result<(ParamSet, u64)> {
        let mut set = ParamSet::new();
        for (i, (m, v)) in self.first.iter().zip(&self.second).enumerate() {
            if let Some(m) = m {
                set.insert(format!("{i}.first"), m.copy()?)?;
            }
            if let Some(v) = v {
                set.insert(format!("{i}.second"), v.copy()?)?;
            }
        }
        Ok((set, self.step))
    }

    /// Restores state saved by [`Optimizer::state`] (copying it).
    pub fn load_state(&mut self, state: &ParamSet, step: u64) -> Result<()> {
        for (name, tensor) in state.iter() {
            let (index, slot) = name
                .split_once('.')
                .and_then(|(i, s)| Some((i.parse::<usize>().ok()?, s)))
                .ok_or_else(|| Error::Checkpoint(format!("bad optimizer state entry `{name}`")))?;
            let target = match slot {
                "first" => self.first.get_mut(index),
                "second" => self.second.get_mut(index),
                _ => None,
            }
            .ok_or_else(|| {
                Error::Checkpoint(format!("optimizer state entry `{name}` does not fit"))
            })?;
            *target = Some(tensor.copy()?);
        }
        self.step = step;
        Ok(())
    }
}

/// Whether an Adam update of `theta` runs on the CPU kernel that updates the moments and the
/// weight in place (`metalearn_kernels::adam`, the same arithmetic): kernels on, f32 or f64 on
/// the CPU, a contiguous weight, a gradient of its shape and dtype.
fn fused_update_applies(theta: &Tensor, grad: &Tensor) -> bool {
    crate::kernels::enabled()
        && theta.device().is_cpu()
        && matches!(theta.dtype(), DType::F32 | DType::F64)
        && theta.is_contiguous()
        && grad.dtype() == theta.dtype()
        && grad.dims() == theta.dims()
}
