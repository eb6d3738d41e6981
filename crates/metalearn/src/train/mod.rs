//! Training: losses, metrics, optimisers, `fit` and its history.

pub mod history;
pub mod loss;
pub mod metrics;
pub mod optim;
