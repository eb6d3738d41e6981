//! Transfer learning: load a pre-trained checkpoint, freeze layers (by index and by name), replace
//! the head, train a linear probe, fine-tune with another learning rate, and keep all of it across
//! save and load.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use metalearn::{
    FitOptions, ForwardCtx, Layer, LayerRef, Loss, Metric, OptimizerConfig, ParamSet, Sequential,
};

/// 4 standard-normal features (f32), `n` rows.
fn features(n: usize, seed: u64) -> Tensor {
    let mut rng = common::rng(seed);
    common::normal(&mut rng, &[n, 4])
        .to_dtype(DType::F32)
        .expect("f32")
}

/// Pre-training labels: 1 when x0 + x1 > 0.
fn binary_labels(x: &Tensor) -> Result<Tensor> {
    let v = common::values(x);
    let labels: Vec<f32> = v
        .chunks(4)
        .map(|r| if r[0] + r[1] > 0.0 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(labels, x.dim(0)?, &Device::Cpu)?)
}

/// Fine-tuning labels: three classes by the sign pattern of x0 + x1 and x2.
fn three_class_labels(x: &Tensor) -> Result<Tensor> {
    let v = common::values(x);
    let labels: Vec<f32> = v
        .chunks(4)
        .map(|r| {
            if r[0] + r[1] <= 0.0 {
                0.0
            } else if r[2] > 0.0 {
                1.0
            } else {
                2.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(labels, x.dim(0)?, &Device::Cpu)?)
}

/// body1 (dense 16) → bn → relu → body2 (dense 8) → tanh → head (dense 1, logits).
fn base_model(seed: u64) -> Result<Sequential> {
    Ok(Sequential::builder(&[4])
        .add_named("body1", Layer::dense(16))
        .add_named("bn", Layer::batch_norm())
        .add(Layer::relu())
        .add_named("body2", Layer::dense(8))
        .add(Layer::tanh())
        .add_named("head", Layer::dense(1))
        .build(seed)?)
}

const LAYER_NAMES: [&str; 6] = ["body1", "bn", "relu_1", "body2", "tanh_1", "head"];

/// Pre-trains the base model on the binary task and saves it under `dir`.
fn pretrained_checkpoint(dir: &Path) -> Result<PathBuf> {
    let x = features(128, 1);
    let y = binary_labels(&x)?;
    let mut model = base_model(7)?;
    model.compile(
        OptimizerConfig::adam(0.02),
        Loss::BinaryCrossEntropyWithLogits,
        &[Metric::Accuracy],
    )?;
    model.fit(&x, &y, FitOptions::new().epochs(30).batch_size(32).seed(1))?;
    ensure!(model.evaluate(&x, &y, 128)?["accuracy"] > 0.9);
    let path = dir.join("pretrained.safetensors");
    model.save(&path)?;
    Ok(path)
}

fn fine_tune_data() -> Result<(Tensor, Tensor)> {
    let x = features(96, 2);
    let y = binary_labels(&x)?.affine(-1.0, 1.0)?;
    Ok((x, y))
}

/// Names of the parameters of the given layers, sorted like [`Sequential::frozen`].
fn params_of(model: &Sequential, layers: &[&str]) -> BTreeSet<String> {
    model
        .params()
        .names()
        .iter()
        .filter(|n| layers.iter().any(|l| n.starts_with(&format!("{l}."))))
        .cloned()
        .collect()
}

/// For each parameter: whether it changed between two snapshots.
fn changed(before: &ParamSet, after: &ParamSet) -> Vec<(String, bool)> {
    before
        .names()
        .iter()
        .map(|name| {
            let a = before.filter(|n| n == name);
            let b = after.filter(|n| n == name);
            (name.clone(), !common::bit_identical(&a, &b))
        })
        .collect()
}

/// Asserts that exactly the parameters of `frozen_layers` stayed bit-identical.
fn ensure_only_frozen_unchanged(
    before: &ParamSet,
    after: &ParamSet,
    frozen_layers: &[&str],
) -> Result<()> {
    for (name, moved) in changed(before, after) {
        let frozen = frozen_layers
            .iter()
            .any(|l| name.starts_with(&format!("{l}.")));
        ensure!(
            moved != frozen,
            "`{name}` {} although it is {}",
            if moved { "changed" } else { "did not change" },
            if frozen { "frozen" } else { "trainable" }
        );
    }
    Ok(())
}

fn compile_fine_tune(model: &mut Sequential, lr: f64) -> Result<()> {
    model.compile(
        OptimizerConfig::adam(lr),
        Loss::BinaryCrossEntropyWithLogits,
        &[Metric::Accuracy],
    )?;
    Ok(())
}

#[test]
fn loading_a_pretrained_checkpoint_restores_the_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pretrained_checkpoint(dir.path())?;
    let a = Sequential::load(&path)?;
    let b = Sequential::load(&path)?;
    ensure!(common::bit_identical(&a.params(), &b.params()));
    let names: Vec<&str> = a
        .architecture()
        .layers
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    ensure!(names == LAYER_NAMES, "{names:?}");
    // The pre-training left traces: trained weights, running statistics, compile settings.
    let fresh = base_model(7)?;
    ensure!(!common::bit_identical(&a.params(), &fresh.params()));
    ensure!(!common::bit_identical(a.buffers(), fresh.buffers()));
    let cfg = a.compile_config().expect("compile settings are stored");
    ensure!(cfg.loss == Loss::BinaryCrossEntropyWithLogits && cfg.optimizer.lr() == 0.02);
    ensure!(a.epochs_trained() == 30);
    // It still solves the task it was trained on.
    let x = features(128, 1);
    ensure!(a.evaluate(&x, &binary_labels(&x)?, 128)?["accuracy"] > 0.9);
    // load_weights into a fresh model of the same architecture gives the same predictions.
    let mut same = base_model(99)?;
    same.load_weights(&path)?;
    let diff = same
        .predict(&x, 64)?
        .sub(&a.predict(&x, 64)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(diff == 0.0, "predictions differ by {diff}");
    Ok(())
}

#[test]
fn frozen_layers_by_index_and_by_name_stay_bit_identical() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pretrained_checkpoint(dir.path())?;
    let (x, y) = fine_tune_data()?;
    for refs in [
        vec![LayerRef::Index(0), LayerRef::Index(3)],
        vec![
            LayerRef::Name("body1".into()),
            LayerRef::Name("body2".into()),
        ],
        vec![LayerRef::from("0"), LayerRef::from("body2")],
    ] {
        let mut model = Sequential::load(&path)?;
        model.freeze(&refs)?;
        let frozen = model.frozen();
        ensure!(
            *frozen == params_of(&model, &["body1", "body2"]),
            "{refs:?} froze {frozen:?}"
        );
        compile_fine_tune(&mut model, 0.02)?;
        let before = common::snapshot(&model.params());
        let stats_before = common::snapshot(model.buffers());
        model.fit(&x, &y, FitOptions::new().epochs(5).batch_size(16))?;
        ensure_only_frozen_unchanged(&before, &model.params(), &["body1", "body2"])?;
        // The batch-norm layer is trainable: its running statistics moved.
        ensure!(!common::bit_identical(&stats_before, model.buffers()));
    }
    Ok(())
}

#[test]
fn a_frozen_batch_norm_keeps_its_running_statistics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pretrained_checkpoint(dir.path())?;
    let (x, y) = fine_tune_data()?;
    let mut model = Sequential::load(&path)?;
    model.freeze(&["bn".into()])?;
    ensure!(model.is_frozen("bn.gamma") && model.is_frozen("bn.beta"));
    compile_fine_tune(&mut model, 0.02)?;
    let before = common::snapshot(&model.params());
    let stats_before = common::snapshot(model.buffers());
    model.fit(&x, &y, FitOptions::new().epochs(3).batch_size(16))?;
    ensure_only_frozen_unchanged(&before, &model.params(), &["bn"])?;
    ensure!(common::bit_identical(&stats_before, model.buffers()));
    // Unfreezing makes every parameter trainable again.
    model.unfreeze_all();
    ensure!(model.frozen().is_empty());
    let before = common::snapshot(&model.params());
    model.fit(&x, &y, FitOptions::new().epochs(1).batch_size(16))?;
    ensure_only_frozen_unchanged(&before, &model.params(), &[])?;
    Ok(())
}

#[test]
fn replace_head_keeps_the_body_and_trains_a_new_head() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pretrained_checkpoint(dir.path())?;
    let mut model = Sequential::load(&path)?;
    model.freeze(&["body1".into()])?;
    let body_before = common::snapshot(&model.params().filter(|n| !n.starts_with("head.")));
    let stats_before = common::snapshot(model.buffers());
    let old_head = common::snapshot(&model.params().filter(|n| n.starts_with("head.")));
    model.replace_head(3, 11)?;
    // Body untouched (values and frozen flags), head new with the new shape.
    let params = model.params();
    ensure!(common::bit_identical(
        &body_before,
        &params.filter(|n| !n.starts_with("head."))
    ));
    ensure!(common::bit_identical(&stats_before, model.buffers()));
    ensure!(params.get("head.weight")?.dims() == [8, 3]);
    ensure!(params.get("head.bias")?.dims() == [3]);
    ensure!(old_head.get("head.weight")?.dims() == [8, 1]);
    ensure!(model.network().output_shape() == [3]);
    ensure!(model.is_frozen("body1.weight") && !model.is_frozen("head.weight"));
    let layer_names: Vec<&str> = model
        .architecture()
        .layers
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    ensure!(layer_names == LAYER_NAMES);
    // The old compile settings are gone: the loss of a 1-output head may not fit.
    let x = features(150, 3);
    let y = three_class_labels(&x)?;
    let err = model
        .fit(&x, &y, FitOptions::new())
        .expect_err("fit needs compile after replace_head");
    ensure!(err.to_string().contains("compile"), "{err}");
    model.compile(
        OptimizerConfig::adam(0.02),
        Loss::CategoricalCrossEntropy,
        &[Metric::Accuracy],
    )?;
    let before = model.evaluate(&x, &y, 150)?;
    let snapshot = common::snapshot(&model.params());
    model.fit(&x, &y, FitOptions::new().epochs(40).batch_size(32).seed(2))?;
    let after = model.evaluate(&x, &y, 150)?;
    ensure!(
        after["loss"] < 0.5 * before["loss"],
        "{before:?} → {after:?}"
    );
    ensure!(after["accuracy"] > 0.85, "{after:?}");
    ensure!(model.predict(&x, 64)?.dims() == [150, 3]);
    ensure_only_frozen_unchanged(&snapshot, &model.params(), &["body1"])?;
    // A bad head size is an error and leaves the model as it was.
    ensure!(model.replace_head(0, 1).is_err());
    ensure!(model.network().output_shape() == [3]);
    Ok(())
}

#[test]
fn linear_probe_changes_only_the_head() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pretrained_checkpoint(dir.path())?;
    let (x, y) = fine_tune_data()?;
    let mut model = Sequential::load(&path)?;
    model.freeze_all_but_head()?;
    let expected = params_of(&model, &["body1", "bn", "body2"]);
    ensure!(*model.frozen() == expected, "{:?}", model.frozen());
    compile_fine_tune(&mut model, 0.05)?;
    let before = common::snapshot(&model.params());
    let stats_before = common::snapshot(model.buffers());
    let loss_before = model.evaluate(&x, &y, 96)?["loss"];
    model.fit(&x, &y, FitOptions::new().epochs(20).batch_size(16))?;
    ensure_only_frozen_unchanged(&before, &model.params(), &["body1", "bn", "body2"])?;
    ensure!(common::bit_identical(&stats_before, model.buffers()));
    // The probe learns the new labels (they are a linear function of the old task's output).
    let after = model.evaluate(&x, &y, 96)?;
    ensure!(
        after["loss"] < 0.5 * loss_before,
        "{loss_before} → {after:?}"
    );
    Ok(())
}

#[test]
fn compiling_again_fine_tunes_with_its_own_learning_rate() -> Result<()> {
    // One full-batch SGD step must move every trainable parameter by exactly −lr · gradient,
    // with the gradient computed here independently from the pure forward pass.
    let dir = tempfile::tempdir()?;
    let path = pretrained_checkpoint(dir.path())?;
    let (x, y) = fine_tune_data()?;
    for lr in [1e-3, 4e-3] {
        let mut model = Sequential::load(&path)?;
        ensure!(model.compile_config().unwrap().optimizer.lr() == 0.02);
        model.freeze(&["body1".into()])?;
        model.compile(
            OptimizerConfig::sgd(lr, 0.0),
            Loss::BinaryCrossEntropyWithLogits,
            &[],
        )?;
        ensure!(model.compile_config().unwrap().optimizer == OptimizerConfig::sgd(lr, 0.0));
        let before = common::snapshot(&model.params());
        let vars = before.to_vars()?;
        let var_params = ParamSet::from_vars(before.names(), &vars)?;
        let out = model
            .network()
            .forward(&var_params, &x, &mut ForwardCtx::train())?;
        let grads = Loss::BinaryCrossEntropyWithLogits
            .compute(&out, &y)?
            .backward()?;
        model.fit(
            &x,
            &y,
            FitOptions::new().epochs(1).batch_size(96).shuffle(false),
        )?;
        let after = model.params();
        for (name, var) in before.names().iter().zip(&vars) {
            let old = common::values(before.get(name)?);
            let new = common::values(after.get(name)?);
            if name.starts_with("body1.") {
                ensure!(old == new, "frozen `{name}` moved");
                continue;
            }
            let g = common::values(grads.get(var.as_tensor()).expect("gradient"));
            for i in 0..old.len() {
                let want = old[i] - lr * g[i];
                ensure!(
                    (new[i] - want).abs() <= 1e-6 + 1e-4 * (lr * g[i]).abs(),
                    "lr {lr}: `{name}`[{i}] = {}, want {want} (old {}, grad {})",
                    new[i],
                    old[i],
                    g[i]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn save_and_load_keep_frozen_layers_and_compile_settings() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pretrained_checkpoint(dir.path())?;
    let (x, y) = fine_tune_data()?;
    let mut model = Sequential::load(&path)?;
    model.freeze(&["body1".into(), LayerRef::Index(1)])?;
    model.compile(
        OptimizerConfig::adamw(3e-3, 0.05),
        Loss::BinaryCrossEntropyWithLogits,
        &[Metric::Accuracy, Metric::Mae],
    )?;
    model.fit(&x, &y, FitOptions::new().epochs(2).batch_size(32))?;
    let tuned = dir.path().join("tuned.safetensors");
    model.save(&tuned)?;
    let mut loaded = Sequential::load(&tuned)?;
    ensure!(loaded.frozen() == model.frozen());
    ensure!(loaded.compile_config() == model.compile_config());
    ensure!(loaded.epochs_trained() == 32);
    ensure!(common::bit_identical(&loaded.params(), &model.params()));
    ensure!(common::bit_identical(loaded.buffers(), model.buffers()));
    // Training the loaded model respects the stored frozen set without calling freeze again.
    let before = common::snapshot(&loaded.params());
    loaded.fit(&x, &y, FitOptions::new().epochs(2).batch_size(32))?;
    ensure_only_frozen_unchanged(&before, &loaded.params(), &["body1", "bn"])?;
    Ok(())
}

#[test]
fn freeze_errors_name_the_valid_layers_and_range() -> Result<()> {
    let mut model = base_model(0)?;
    let err = model
        .freeze(&["nope".into()])
        .expect_err("unknown layer name");
    let text = err.to_string();
    ensure!(text.contains("nope"), "{text}");
    for name in LAYER_NAMES {
        ensure!(text.contains(name), "`{name}` missing from: {text}");
    }
    let err = model
        .freeze(&[LayerRef::Index(6)])
        .expect_err("index out of range");
    let text = err.to_string();
    ensure!(
        text.contains('6') && text.contains("0..5"),
        "no valid range in: {text}"
    );
    // A failing call freezes nothing, not even the valid layers listed before the bad one.
    ensure!(model.freeze(&[LayerRef::Index(0), "nope".into()]).is_err());
    ensure!(
        model.frozen().is_empty(),
        "partially frozen: {:?}",
        model.frozen()
    );
    // Loading weights of another architecture says which parameter does not fit.
    let dir = tempfile::tempdir()?;
    let mut other = base_model(0)?;
    other.replace_head(3, 0)?;
    let path = dir.path().join("three.safetensors");
    other.save(&path)?;
    let err = model.load_weights(&path).expect_err("shape mismatch");
    ensure!(err.to_string().contains("head.weight"), "{err}");
    Ok(())
}

#[test]
fn f64_models_round_trip_in_f64() -> Result<()> {
    let arch = base_model(0)?.architecture().clone();
    let mut model = Sequential::from_architecture_on(arch, 5, &Device::Cpu, DType::F64)?;
    compile_fine_tune(&mut model, 0.01)?;
    let (x, y) = fine_tune_data()?;
    model.fit(&x, &y, FitOptions::new().epochs(2).batch_size(32))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("f64.safetensors");
    model.save(&path)?;
    let loaded = Sequential::load(&path)?;
    ensure!(loaded.dtype() == DType::F64);
    ensure!(common::bit_identical(&loaded.params(), &model.params()));
    ensure!(common::bit_identical(loaded.buffers(), model.buffers()));
    ensure!(loaded.predict(&x, 32)?.dtype() == DType::F64);
    Ok(())
}
