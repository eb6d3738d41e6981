//! A Keras model made ready for `predict`, `evaluate` and `finetune`: the `data` section that
//! tells them what its output means, decided from its last layers.

use std::path::Path;

use crate::error::{Error, Result};
use crate::nn::architecture::{Activation, Layer};
use crate::sequential::Sequential;
use crate::train::loss::Loss;
use crate::train::metrics::Metric;
use crate::train::optim::OptimizerConfig;
use crate::transfer::{DataInfo, ImageShape, OutputKind, TargetKind};

/// Reads a Keras file (see [`crate::keras`]) and describes its output. A final softmax is left
/// off, so the checkpoint holds class logits as every metalearn classifier does: `predict`
/// applies the softmax and gives Keras' probabilities, and `evaluate` / `finetune` use the
/// cross-entropy of logits. Without stored feature names, CSV files are read column by column
/// in file order (all columns but the target).
pub fn import_keras(path: &Path, architecture: Option<&Path>) -> Result<(Sequential, DataInfo)> {
    let model = crate::keras::import(path, architecture)?;
    let arch = model.architecture().clone();
    let last = arch.layers.last().map(|l| l.layer.clone());
    let softmax = matches!(
        last,
        Some(Layer::Activation {
            activation: Activation::Softmax
        })
    );
    let model = if softmax {
        let mut trimmed = arch.clone();
        trimmed.layers.pop();
        let mut logits = Sequential::from_architecture(trimmed, 0)?;
        logits.set_params(&model.params())?;
        logits.set_buffers(model.buffers().clone());
        logits.set_parent(format!("keras:{}", path.display()));
        logits
    } else {
        model
    };
    let units: usize = model.network().output_shape().iter().product();
    let sigmoid = matches!(
        last,
        Some(Layer::Activation {
            activation: Activation::Sigmoid
        })
    );
    let (target_kind, output, num_classes) = match (units, &last, sigmoid) {
        (1, _, true) => (TargetKind::Binary, OutputKind::Probability, Some(2)),
        (1, _, false) => (TargetKind::Regression, OutputKind::Value, None),
        (n, _, false) => (TargetKind::Multiclass, OutputKind::ClassLogits, Some(n)),
        (n, _, true) => {
            return Err(Error::Config(format!(
                "{}: {n} sigmoid outputs (multi-label) are not a target metalearn trains; \
                 the model itself is still readable with metalearn::keras::import",
                path.display()
            )))
        }
    };
    let image = match arch.input_shape.as_slice() {
        [channels, height, width] => Some(ImageShape {
            height: *height,
            width: *width,
            channels: *channels,
        }),
        _ => None,
    };
    let info = DataInfo {
        target_kind,
        output,
        feature_names: Vec::new(),
        target_name: if image.is_some() {
            "class".into()
        } else {
            String::new()
        },
        class_names: None,
        num_classes,
        image,
        source: format!("keras:{}", path.display()),
        keras_softmax: (output == OutputKind::ClassLogits).then_some(softmax),
    };
    // Compile as the Keras file was, where metalearn has the optimiser and the loss fits the
    // output as stored here (classifiers as logits).
    let mut model = model;
    if let Some(compile) = crate::keras::compile_settings(path).ok().flatten() {
        let loss = match (info.output, compile.loss.as_str()) {
            (OutputKind::Probability, "binary_crossentropy") if !compile.from_logits => {
                Some(Loss::BinaryCrossEntropy)
            }
            (
                OutputKind::ClassLogits,
                "sparse_categorical_crossentropy" | "categorical_crossentropy",
            ) => Some(Loss::CategoricalCrossEntropy),
            (OutputKind::Value, "mse" | "mean_squared_error") => Some(Loss::Mse),
            _ => None,
        };
        if let Some(loss) = loss {
            let optimizer = OptimizerConfig::from_name(
                &compile.optimizer,
                compile.learning_rate,
                compile.weight_decay,
                compile.momentum,
            )?;
            let metrics = if loss == Loss::Mse {
                vec![Metric::Mae]
            } else {
                vec![Metric::Accuracy]
            };
            model.compile(optimizer, loss, &metrics)?;
        }
    }
    Ok((model, info))
}
