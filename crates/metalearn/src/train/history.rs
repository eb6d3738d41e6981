//! Per-epoch training records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Metrics of one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub loss: f64,
    /// Training metrics measured on the epoch's batches (mean over batches).
    pub metrics: BTreeMap<String, f64>,
    /// Validation loss, when validation data is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Validation metrics.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub val_metrics: BTreeMap<String, f64>,
    /// Wall-clock seconds spent on the epoch.
    pub seconds: f64,
}

impl EpochLog {
    /// A flat map of every figure: `loss`, metric names, `val_loss`, `val_<metric>`.
    pub fn flat(&self) -> BTreeMap<String, f64> {
        let mut out = self.metrics.clone();
        out.insert("loss".into(), self.loss);
        if let Some(v) = self.val_loss {
            out.insert("val_loss".into(), v);
        }
        for (k, v) in &self.val_metrics {
            out.insert(format!("val_{k}"), *v);
        }
        out
    }
}

/// What `fit` returns: one record per completed epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Records in order.
    pub epochs: Vec<EpochLog>,
    /// Epoch whose weights the model holds at the end (differs from the last epoch when the best
    /// weights were restored).
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
}

impl History {
    /// The last epoch's record.
    pub fn last(&self) -> Option<&EpochLog> {
        self.epochs.last()
    }

    /// The series of one figure (`loss`, `accuracy`, `val_loss`, ...), one value per epoch.
    pub fn series(&self, key: &str) -> Vec<f64> {
        self.epochs
            .iter()
            .filter_map(|e| e.flat().get(key).copied())
            .collect()
    }
}
