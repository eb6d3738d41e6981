//! Meta-learning algorithms behind one trait.
//!
//! Every algorithm sees the same pieces: a [`Network`](crate::nn::network::Network), the meta-parameters
//! ([`MetaParams`]: the network's weights and, for Meta-SGD, learned per-parameter inner learning
//! rates) and a batch of [`Task`](crate::tasks::Task)s. `meta_train_step` returns the meta-loss and the
//! meta-gradient; the [`MetaLearner`](learner::MetaLearner) applies the outer optimiser.
//!
//! | algorithm | inner loop | meta-gradient |
//! |---|---|---|
//! | MAML | SGD on all weights | through the inner loop (second order), or at the fast weights (`first_order`) |
//! | Meta-SGD | SGD with learned per-parameter rates | through the inner loop, also w.r.t. the rates |
//! | ANIL | SGD on the head only | through the inner loop |
//! | Reptile | SGD on the task's data | `θ − mean(φ_task)` (the Reptile direction) |
//! | ProtoNet | none (class means of embeddings) | of the query cross-entropy over negative squared distances |

mod algorithm;
pub mod anil;
pub mod inner;
pub mod learner;
pub mod maml;
pub mod metasgd;
pub mod mlp_maml;
pub mod protonet;
pub mod reptile;

pub use algorithm::{
    task_loss, Adapted, AlgorithmConfig, AlgorithmKind, EvalState, MetaAlgorithm, MetaParams,
    MetaStep,
};

use crate::error::Result;

/// Builds the algorithm described by `config`.
pub fn build_algorithm(config: &AlgorithmConfig) -> Result<Box<dyn MetaAlgorithm>> {
    config.validate()?;
    Ok(match config.name {
        AlgorithmKind::Maml => Box::new(maml::Maml {
            inner_lr: config.inner_lr,
            inner_steps: config.inner_steps,
            first_order: config.first_order,
            adapt_from: config.adapt_from.clone(),
        }),
        AlgorithmKind::MetaSgd => Box::new(metasgd::MetaSgd {
            inner_steps: config.inner_steps,
            first_order: config.first_order,
            adapt_from: config.adapt_from.clone(),
        }),
        AlgorithmKind::Anil => Box::new(anil::Anil {
            inner_lr: config.inner_lr,
            inner_steps: config.inner_steps,
            first_order: config.first_order,
        }),
        AlgorithmKind::Reptile => Box::new(reptile::Reptile {
            inner_lr: config.inner_lr,
            inner_steps: config.inner_steps,
            adapt_from: config.adapt_from.clone(),
        }),
        AlgorithmKind::Protonet => Box::new(protonet::ProtoNet {
            distance_scale: config.distance_scale,
        }),
    })
}
