//! Behaviour of `fit`, `evaluate` and `predict`: learning, reproducibility, validation, early
//! stopping, best checkpoints, the NaN guard, optimisers, batch-norm running statistics, and the
//! supervised contrastive loss against a plain reference and finite differences.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use metalearn::{
    Callback, Control, EpochLog, Error, FitOptions, ForwardCtx, History, Layer, Loss, Metric,
    Optimizer, OptimizerConfig, ParamSet, Sequential,
};

fn xor() -> Result<(Tensor, Tensor)> {
    let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &Device::Cpu)?;
    let y = Tensor::new(&[0f32, 1., 1., 0.], &Device::Cpu)?;
    Ok((x, y))
}

/// The documented XOR model: 2-8-1, ReLU hidden layer, sigmoid output.
fn xor_model(seed: u64) -> Result<Sequential> {
    let mut model = Sequential::builder(&[2])
        .add(Layer::dense(8))
        .add(Layer::relu())
        .add(Layer::dense(1))
        .add(Layer::sigmoid())
        .build(seed)?;
    model.compile(
        OptimizerConfig::adam(0.05),
        Loss::BinaryCrossEntropy,
        &[Metric::Accuracy],
    )?;
    Ok(model)
}

/// `n` rows of `features` standard-normal values (f32) and a smooth scalar target
/// `y = sin(x·a) + 0.5 (x·b)` (`[n, 1]`).
fn regression(n: usize, features: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = common::rng(seed);
    let x = common::normal(&mut rng, &[n, features]);
    let a = common::uniform(&mut rng, &[features, 1], -0.5, 0.5);
    let b = common::uniform(&mut rng, &[features, 1], -0.5, 0.5);
    let y = x.matmul(&a)?.sin()?.add(&x.matmul(&b)?.affine(0.5, 0.0)?)?;
    Ok((x.to_dtype(DType::F32)?, y.to_dtype(DType::F32)?))
}

fn regression_model(features: usize, hidden: usize, seed: u64) -> Result<Sequential> {
    Ok(Sequential::builder(&[features])
        .add(Layer::dense(hidden))
        .add(Layer::tanh())
        .add(Layer::dense(1))
        .build(seed)?)
}

/// Three Gaussian blobs in 2-D, `per_class` points each, labels 0, 1, 2 (class ids as f32).
fn blobs(per_class: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = common::rng(seed);
    let centres = [[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]];
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in 0..per_class * 3 {
        let c = i % 3;
        xs.push(centres[c][0] + rng.gen_range(-0.6f32..0.6));
        xs.push(centres[c][1] + rng.gen_range(-0.6f32..0.6));
        ys.push(c as f32);
    }
    let n = ys.len();
    Ok((
        Tensor::from_vec(xs, (n, 2), &Device::Cpu)?,
        Tensor::from_vec(ys, n, &Device::Cpu)?,
    ))
}

fn loss_of(model: &Sequential, x: &Tensor, y: &Tensor) -> Result<f64> {
    Ok(model.evaluate(x, y, 1024)?["loss"])
}

/// Loss, metrics and validation figures of every epoch (everything but wall-clock time).
fn figures(history: &History) -> Vec<Vec<u64>> {
    history
        .epochs
        .iter()
        .map(|e| {
            let mut out = vec![e.epoch as u64, e.loss.to_bits()];
            out.extend(e.metrics.values().map(|v| v.to_bits()));
            out.extend(e.val_loss.map(f64::to_bits));
            out.extend(e.val_metrics.values().map(|v| v.to_bits()));
            out
        })
        .collect()
}

fn all_finite(set: &ParamSet) -> bool {
    set.to_f64_vec()
        .map(|v| v.iter().all(|x| x.is_finite()))
        .unwrap_or(false)
}

// ---- learning --------------------------------------------------------------------------------

#[test]
fn xor_learns_to_full_accuracy_for_several_seeds() -> Result<()> {
    let (x, y) = xor()?;
    for seed in 0..5 {
        let mut model = xor_model(seed)?;
        let before = loss_of(&model, &x, &y)?;
        let history = model.fit(
            &x,
            &y,
            FitOptions::new().epochs(300).batch_size(4).seed(seed),
        )?;
        ensure!(history.epochs.len() == 300);
        let scores = model.evaluate(&x, &y, 4)?;
        ensure!(
            scores["accuracy"] == 1.0,
            "seed {seed}: accuracy {} after 300 epochs (loss {} → {})",
            scores["accuracy"],
            before,
            scores["loss"]
        );
        ensure!(
            scores["loss"] < 0.5 * before,
            "seed {seed}: {before} → {}",
            scores["loss"]
        );
        ensure!(history.last().unwrap().metrics["accuracy"] == 1.0);
        let p = common::values(&model.predict(&x, 4)?);
        ensure!(
            p[0] < 0.5 && p[1] > 0.5 && p[2] > 0.5 && p[3] < 0.5,
            "seed {seed}: {p:?}"
        );
    }
    Ok(())
}

#[test]
fn categorical_cross_entropy_learns_three_classes() -> Result<()> {
    let (x, y) = blobs(40, 3)?;
    let mut model = Sequential::builder(&[2])
        .add(Layer::dense(16))
        .add(Layer::relu())
        .add(Layer::dense(3))
        .build(5)?;
    model.compile(
        OptimizerConfig::adam(0.02),
        Loss::CategoricalCrossEntropy,
        &[Metric::Accuracy],
    )?;
    let before = model.evaluate(&x, &y, 64)?;
    model.fit(&x, &y, FitOptions::new().epochs(40).batch_size(16).seed(2))?;
    let after = model.evaluate(&x, &y, 64)?;
    ensure!(
        after["loss"] < 0.25 * before["loss"],
        "{before:?} → {after:?}"
    );
    ensure!(after["accuracy"] >= 0.95, "{after:?}");
    // Predictions are one row of 3 logits per example; the arg-max gives the class.
    let pred = model.predict(&x, 50)?;
    ensure!(pred.dims() == [120, 3]);
    let classes = common::values(&pred.argmax(1)?.to_dtype(DType::F64)?);
    let truth = common::values(&y);
    let correct = classes.iter().zip(&truth).filter(|(a, b)| a == b).count();
    ensure!(correct as f64 / 120.0 == after["accuracy"]);
    Ok(())
}

#[test]
fn mlp_regression_on_10000_rows_learns_in_two_epochs() -> Result<()> {
    let (x, y) = regression(10_000, 20, 11)?;
    let mut model = Sequential::builder(&[20])
        .add(Layer::dense(64))
        .add(Layer::relu())
        .add(Layer::dense(1))
        .build(1)?;
    model.compile(OptimizerConfig::adam(3e-3), Loss::Mse, &[Metric::Mae])?;
    let before = loss_of(&model, &x, &y)?;
    let history = model.fit(&x, &y, FitOptions::new().epochs(2).batch_size(64).seed(1))?;
    let after = loss_of(&model, &x, &y)?;
    ensure!(after < 0.3 * before, "loss {before} → {after}");
    let losses = history.series("loss");
    ensure!(losses.len() == 2 && losses[1] < losses[0], "{losses:?}");
    Ok(())
}

// ---- reproducibility -------------------------------------------------------------------------

fn train_small(model_seed: u64, fit_seed: u64) -> Result<(ParamSet, History)> {
    let (x, y) = regression(48, 3, 4)?;
    let mut model = Sequential::builder(&[3])
        .add(Layer::dense(8))
        .add(Layer::dropout(0.2))
        .add(Layer::tanh())
        .add(Layer::dense(1))
        .build(model_seed)?;
    model.compile(OptimizerConfig::adam(0.01), Loss::Mse, &[Metric::Mae])?;
    let history = model.fit(
        &x,
        &y,
        FitOptions::new()
            .epochs(5)
            .batch_size(8)
            .seed(fit_seed)
            .validation_split(0.25),
    )?;
    Ok((common::snapshot(&model.params()), history))
}

#[test]
fn same_seed_gives_bit_identical_parameters_and_history() -> Result<()> {
    let (p1, h1) = train_small(3, 9)?;
    let (p2, h2) = train_small(3, 9)?;
    ensure!(
        common::bit_identical(&p1, &p2),
        "same seeds, different parameters"
    );
    ensure!(
        figures(&h1) == figures(&h2),
        "same seeds, different histories"
    );
    ensure!(h1.best_epoch == h2.best_epoch && h1.stopped_early == h2.stopped_early);
    Ok(())
}

#[test]
fn different_seeds_give_different_results() -> Result<()> {
    let (p, h) = train_small(3, 9)?;
    // Other initial weights.
    let (p_init, h_init) = train_small(4, 9)?;
    ensure!(!common::bit_identical(&p, &p_init));
    ensure!(figures(&h) != figures(&h_init));
    // Same initial weights, other shuffling and dropout masks.
    let (p_fit, h_fit) = train_small(3, 10)?;
    ensure!(!common::bit_identical(&p, &p_fit));
    ensure!(figures(&h) != figures(&h_fit));
    Ok(())
}

// ---- validation, early stopping, best checkpoint ---------------------------------------------

#[test]
fn validation_split_holds_out_the_last_rows() -> Result<()> {
    // The last quarter has targets far from the rest: training on them would show in the loss.
    let (x, y) = regression(8, 3, 5)?;
    let far = Tensor::new(&[[100f32], [-100.]], &Device::Cpu)?;
    let y = Tensor::cat(&[&y.narrow(0, 0, 6)?, &far], 0)?;
    let mut model = regression_model(3, 4, 0)?;
    model.compile(OptimizerConfig::sgd(1e-9, 0.0), Loss::Mse, &[])?;
    let (x_train, y_train) = (x.narrow(0, 0, 6)?, y.narrow(0, 0, 6)?);
    let (x_val, y_val) = (x.narrow(0, 6, 2)?, y.narrow(0, 6, 2)?);
    let train_before = loss_of(&model, &x_train, &y_train)?;
    let history = model.fit(
        &x,
        &y,
        FitOptions::new()
            .epochs(1)
            .batch_size(6)
            .validation_split(0.25),
    )?;
    let log = history.last().unwrap();
    // One batch of the 6 training rows, evaluated before the (negligible) update.
    ensure!(
        (log.loss - train_before).abs() <= 1e-4 * train_before,
        "training loss {} is not the loss of the first 6 rows ({train_before})",
        log.loss
    );
    let val = log.val_loss.expect("validation loss");
    ensure!(
        val > 1000.0,
        "validation loss {val} does not come from the last 2 rows"
    );
    ensure!((val - loss_of(&model, &x_val, &y_val)?).abs() <= 1e-6 * val);
    // Bad splits are errors, not panics.
    for bad in [0.0, 1.0, -0.5, 0.01] {
        ensure!(model
            .fit(&x, &y, FitOptions::new().validation_split(bad))
            .is_err());
    }
    Ok(())
}

/// Training and validation data that disagree: the validation targets are the negated training
/// targets, so the validation loss rises once the model fits the training data.
fn conflicting_data() -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (x, y) = regression(32, 3, 6)?;
    Ok((x.clone(), y.clone(), x, y.neg()?))
}

#[test]
fn early_stopping_stops_and_restores_the_best_weights() -> Result<()> {
    let (x, y, vx, vy) = conflicting_data()?;
    let mut model = regression_model(3, 8, 2)?;
    model.compile(OptimizerConfig::adam(0.02), Loss::Mse, &[])?;
    let history = model.fit(
        &x,
        &y,
        FitOptions::new()
            .epochs(200)
            .batch_size(8)
            .validation_data(vx.clone(), vy.clone())
            .early_stopping(3),
    )?;
    ensure!(history.stopped_early, "did not stop early");
    let val = history.series("val_loss");
    ensure!(val.len() < 200 && val.len() >= 4);
    let (best_i, best) =
        val.iter().enumerate().fold(
            (0, f64::INFINITY),
            |acc, (i, &v)| if v < acc.1 { (i, v) } else { acc },
        );
    // Stopped exactly `patience` epochs after the best one.
    ensure!(
        val.len() == best_i + 1 + 3,
        "best epoch {} of {}",
        best_i + 1,
        val.len()
    );
    ensure!(history.best_epoch == Some(best_i + 1));
    // The model holds the best epoch's weights, not the last epoch's.
    let now = loss_of(&model, &vx, &vy)?;
    ensure!(
        (now - best).abs() <= 1e-6 * best,
        "validation loss now {now}, best {best}, last {}",
        val.last().unwrap()
    );
    ensure!(*val.last().unwrap() > best);
    Ok(())
}

#[test]
fn early_stopping_without_restoring_keeps_the_last_weights() -> Result<()> {
    // Patience set through the public field, without `restore_best`: training still stops, and
    // the model keeps the last epoch's weights.
    let (x, y, vx, vy) = conflicting_data()?;
    let mut model = regression_model(3, 8, 2)?;
    model.compile(OptimizerConfig::adam(0.02), Loss::Mse, &[])?;
    let mut options = FitOptions::new()
        .epochs(200)
        .batch_size(8)
        .validation_data(vx.clone(), vy.clone());
    options.early_stopping_patience = Some(2);
    let history = model.fit(&x, &y, options)?;
    ensure!(history.stopped_early && history.epochs.len() < 200);
    let val = history.series("val_loss");
    let now = loss_of(&model, &vx, &vy)?;
    ensure!((now - val.last().unwrap()).abs() <= 1e-6 * now);
    ensure!(history.best_epoch == Some(val.len()));
    // A large min_delta counts small improvements as none: training stops sooner.
    let mut model = regression_model(3, 8, 2)?;
    model.compile(OptimizerConfig::adam(0.02), Loss::Mse, &[])?;
    let mut options = FitOptions::new()
        .epochs(200)
        .batch_size(8)
        .early_stopping(2);
    options.min_delta = 1e6;
    let history = model.fit(&x, &y, options)?;
    ensure!(history.epochs.len() == 3 && history.best_epoch == Some(1));
    Ok(())
}

#[test]
fn best_checkpoint_holds_the_best_epoch_and_loads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("best.safetensors");
    let (x, y, vx, vy) = conflicting_data()?;
    let mut model = regression_model(3, 8, 2)?;
    model.compile(OptimizerConfig::adam(0.02), Loss::Mse, &[Metric::Mae])?;
    let history = model.fit(
        &x,
        &y,
        FitOptions::new()
            .epochs(15)
            .batch_size(8)
            .validation_data(vx.clone(), vy.clone())
            .best_checkpoint(&path),
    )?;
    ensure!(path.exists(), "no best checkpoint written");
    // No temporary file is left next to it.
    ensure!(std::fs::read_dir(dir.path())?.count() == 1);
    let val = history.series("val_loss");
    let best = val.iter().cloned().fold(f64::INFINITY, f64::min);
    ensure!(
        *val.last().unwrap() > best,
        "the last epoch should not be the best: {val:?}"
    );
    let loaded = Sequential::load(&path)?;
    let loaded_val = loss_of(&loaded, &vx, &vy)?;
    ensure!(
        (loaded_val - best).abs() <= 1e-6 * best,
        "checkpoint's validation loss {loaded_val}, best in history {best}"
    );
    // Without restore_best, the model itself keeps its last weights.
    let last = loss_of(&model, &vx, &vy)?;
    ensure!((last - val.last().unwrap()).abs() <= 1e-6 * last);
    ensure!(loaded.compile_config() == model.compile_config());
    ensure!(loaded.architecture() == model.architecture());
    Ok(())
}

struct StopAfter {
    epoch: usize,
    seen: Rc<RefCell<Vec<usize>>>,
}

impl Callback for StopAfter {
    fn on_epoch_end(&mut self, log: &EpochLog, _model: &Sequential) -> metalearn::Result<Control> {
        self.seen.borrow_mut().push(log.epoch);
        Ok(if log.epoch >= self.epoch {
            Control::Stop
        } else {
            Control::Continue
        })
    }
}

#[test]
fn callbacks_see_every_epoch_and_can_stop() -> Result<()> {
    let (x, y) = regression(16, 3, 7)?;
    let mut model = regression_model(3, 4, 0)?;
    model.compile(OptimizerConfig::adam(0.01), Loss::Mse, &[])?;
    let seen = Rc::new(RefCell::new(Vec::new()));
    let history = model.fit(
        &x,
        &y,
        FitOptions::new().epochs(10).callback(StopAfter {
            epoch: 4,
            seen: seen.clone(),
        }),
    )?;
    ensure!(*seen.borrow() == vec![1, 2, 3, 4]);
    ensure!(history.epochs.len() == 4 && model.epochs_trained() == 4);
    Ok(())
}

// ---- NaN guard -------------------------------------------------------------------------------

#[test]
fn infinite_input_stops_with_non_finite_and_keeps_the_weights() -> Result<()> {
    let (x, y) = regression(16, 3, 8)?;
    let mut values = common::values(&x);
    values[5 * 3 + 1] = f64::INFINITY;
    let x = Tensor::from_vec(values, (16, 3), &Device::Cpu)?.to_dtype(DType::F32)?;
    let mut model = regression_model(3, 4, 0)?;
    model.compile(OptimizerConfig::adam(0.01), Loss::Mse, &[])?;
    let before = common::snapshot(&model.params());
    let err = model
        .fit(&x, &y, FitOptions::new().epochs(3).batch_size(4))
        .expect_err("training on an infinite input must fail");
    ensure!(matches!(err, Error::NonFinite(_)), "wrong error: {err}");
    ensure!(err.to_string().contains("learning rate"), "{err}");
    // The first epoch fails: the weights are the initial ones, even if some batches of that
    // epoch had already been applied.
    ensure!(common::bit_identical(
        &before,
        &common::snapshot(&model.params())
    ));
    Ok(())
}

#[test]
fn exploding_learning_rate_stops_with_non_finite_and_finite_weights() -> Result<()> {
    let (x, y) = regression(16, 3, 9)?;
    // With one batch per epoch, an update can overflow the weights themselves at the end of an
    // epoch (lr·g beyond f32's range), not only the next loss.
    let cases = [
        (OptimizerConfig::sgd(1e30, 0.0), 4),
        (OptimizerConfig::sgd(1e30, 0.0), 16),
        (OptimizerConfig::sgd(1e38, 0.0), 16),
        (OptimizerConfig::sgd(3e38, 0.9), 8),
        (OptimizerConfig::adam(1e38), 16),
        (OptimizerConfig::adam(1e38), 4),
    ];
    // Large targets give large gradients: lr·g overflows f32 in the first update.
    let y_large = y.affine(1000.0, 0.0)?;
    for (opt, batch) in cases {
        for y in [&y, &y_large] {
            let lr = opt.lr();
            let mut model = regression_model(3, 4, 0)?;
            model.compile(opt.clone(), Loss::Mse, &[])?;
            let result = model.fit(&x, y, FitOptions::new().epochs(20).batch_size(batch));
            let Err(err) = result else {
                anyhow::bail!("lr {lr}, batch {batch}: training should have blown up")
            };
            ensure!(
                matches!(err, Error::NonFinite(_)),
                "lr {lr}: wrong error: {err}"
            );
            ensure!(
                all_finite(&model.params()),
                "lr {lr}, batch {batch}: the model was left with non-finite weights"
            );
            ensure!(all_finite(model.buffers()));
        }
    }
    Ok(())
}

// ---- evaluate and predict --------------------------------------------------------------------

#[test]
fn evaluate_and_predict_shapes() -> Result<()> {
    let (x, y) = regression(10, 3, 10)?;
    let mut model = Sequential::builder(&[3])
        .add(Layer::dense(5))
        .add(Layer::relu())
        .add(Layer::dense(2))
        .build(0)?;
    // Batches that do not divide the data, a batch larger than the data, and a batch of one.
    let whole = model.predict(&x, 10)?;
    ensure!(whole.dims() == [10, 2]);
    for batch in [1, 3, 4, 64] {
        let p = model.predict(&x, batch)?;
        ensure!(p.dims() == [10, 2]);
        let diff = p.sub(&whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        ensure!(diff < 1e-6, "batch {batch}: predictions differ by {diff}");
    }
    ensure!(
        model.evaluate(&x, &y, 4).is_err(),
        "evaluate before compile must fail"
    );
    model.compile(
        OptimizerConfig::adam(0.01),
        Loss::Mse,
        &[Metric::Mse, Metric::Mae],
    )?;
    let targets = Tensor::cat(&[&y, &y], 1)?;
    let scores = model.evaluate(&x, &targets, 3)?;
    let keys: Vec<&str> = scores.keys().map(String::as_str).collect();
    ensure!(keys == ["loss", "mae", "mse"], "{keys:?}");
    ensure!((scores["loss"] - scores["mse"]).abs() < 1e-6);
    // Wrong input width and wrong target count are errors.
    ensure!(model
        .predict(&Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?, 4)
        .is_err());
    ensure!(model.evaluate(&x, &y.narrow(0, 0, 5)?, 4).is_err());
    ensure!(model
        .fit(&x, &y.narrow(0, 0, 5)?, FitOptions::new())
        .is_err());
    // f64 input to an f32 model is converted.
    let p64 = model.predict(&x.to_dtype(DType::F64)?, 4)?;
    ensure!(p64.dims() == [10, 2]);
    Ok(())
}

// ---- optimisers ------------------------------------------------------------------------------

#[test]
fn every_optimizer_reduces_a_regression_loss() -> Result<()> {
    let (x, y) = regression(64, 3, 12)?;
    let optimizers = [
        OptimizerConfig::sgd(0.05, 0.9),
        OptimizerConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
        },
        OptimizerConfig::adam(0.01),
        OptimizerConfig::adamw(0.01, 0.01),
    ];
    for opt in optimizers {
        let mut model = regression_model(3, 16, 3)?;
        model.compile(opt.clone(), Loss::Mse, &[])?;
        let before = loss_of(&model, &x, &y)?;
        model.fit(&x, &y, FitOptions::new().epochs(30).batch_size(16).seed(1))?;
        let after = loss_of(&model, &x, &y)?;
        ensure!(after < 0.5 * before, "{opt:?}: loss {before} → {after}");
    }
    Ok(())
}

#[test]
fn sgd_momentum_follows_its_update_rule() -> Result<()> {
    // v ← μ v + g; θ ← θ − lr v, with constant gradient g: θ_t = θ_0 − lr g (1 + (1+μ) + ...).
    let theta = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu)?)?;
    let g = Tensor::new(&[0.5f64, 0.25], &Device::Cpu)?;
    let mut opt = Optimizer::new(OptimizerConfig::sgd(0.1, 0.5), 1)?;
    let mut velocity = [0.0f64; 2];
    let mut want = [1.0f64, -2.0];
    for _ in 0..3 {
        opt.step(std::slice::from_ref(&theta), &[Some(g.clone())])?;
        for i in 0..2 {
            velocity[i] = 0.5 * velocity[i] + [0.5, 0.25][i];
            want[i] -= 0.1 * velocity[i];
        }
    }
    let got = common::values(theta.as_tensor());
    ensure!(
        got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{got:?} vs {want:?}"
    );
    Ok(())
}

/// Adam with default betas and epsilon and L2 weight decay `wd` added to the gradient.
fn adam_with_l2(lr: f64, wd: f64) -> OptimizerConfig {
    OptimizerConfig::Adam {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
    }
}

#[test]
fn adamw_decay_is_decoupled_unlike_adam_l2() -> Result<()> {
    // With a zero loss gradient, Adam's L2 term becomes the whole gradient and Adam normalises it
    // to a step of about lr·sign(θ); AdamW shrinks θ by the factor (1 − lr·wd) only.
    let (lr, wd) = (0.1, 0.5);
    let start = [2.0f64, -4.0];
    let zero = Tensor::zeros(2, DType::F64, &Device::Cpu)?;
    let adam_theta = Var::from_tensor(&Tensor::new(&start, &Device::Cpu)?)?;
    let mut adam = Optimizer::new(adam_with_l2(lr, wd), 1)?;
    adam.step(std::slice::from_ref(&adam_theta), &[Some(zero.clone())])?;
    let adamw_theta = Var::from_tensor(&Tensor::new(&start, &Device::Cpu)?)?;
    let mut adamw = Optimizer::new(OptimizerConfig::adamw(lr, wd), 1)?;
    adamw.step(std::slice::from_ref(&adamw_theta), &[Some(zero)])?;
    let a = common::values(adam_theta.as_tensor());
    let w = common::values(adamw_theta.as_tensor());
    for i in 0..2 {
        let s = start[i];
        ensure!((a[i] - (s - lr * s.signum())).abs() < 1e-6, "adam: {a:?}");
        ensure!((w[i] - s * (1.0 - lr * wd)).abs() < 1e-12, "adamw: {w:?}");
    }
    // The same difference shows in training: same data, same seeds, different weights.
    let (x, y) = regression(32, 3, 13)?;
    let mut trained = Vec::new();
    for opt in [adam_with_l2(0.01, 0.1), OptimizerConfig::adamw(0.01, 0.1)] {
        let mut model = regression_model(3, 8, 1)?;
        model.compile(opt, Loss::Mse, &[])?;
        model.fit(&x, &y, FitOptions::new().epochs(5).batch_size(8).seed(3))?;
        trained.push(common::snapshot(&model.params()));
    }
    ensure!(!common::bit_identical(&trained[0], &trained[1]));
    Ok(())
}

#[test]
fn frozen_or_missing_gradients_leave_variables_unchanged() -> Result<()> {
    let a = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &Device::Cpu)?)?;
    let b = Var::from_tensor(&Tensor::new(&[3.0f64], &Device::Cpu)?)?;
    for cfg in [
        OptimizerConfig::sgd(0.1, 0.9),
        OptimizerConfig::adam(0.1),
        OptimizerConfig::adamw(0.1, 0.5),
    ] {
        let mut opt = Optimizer::new(cfg.clone(), 2)?;
        let g = Tensor::new(&[1.0f64], &Device::Cpu)?;
        opt.step(&[a.clone(), b.clone()], &[None, Some(g)])?;
        ensure!(
            common::values(a.as_tensor()) == [1.0, 2.0],
            "{cfg:?} moved a frozen variable"
        );
        ensure!(
            common::values(b.as_tensor())[0] < 3.0,
            "{cfg:?} did not move"
        );
        b.set(&Tensor::new(&[3.0f64], &Device::Cpu)?)?;
        // A mismatched gradient list is an error, not a panic.
        ensure!(opt.step(std::slice::from_ref(&a), &[None]).is_err());
    }
    Ok(())
}

// ---- batch normalisation ---------------------------------------------------------------------

#[test]
fn batch_norm_running_statistics_update_and_are_used_by_predict() -> Result<()> {
    let (x, y) = regression(32, 3, 14)?;
    // Shift and scale the inputs so that the batch statistics are far from (0, 1).
    let x = x.affine(3.0, 2.0)?;
    let mut model = Sequential::builder(&[3])
        .add(Layer::dense(4))
        .add_named("bn", Layer::batch_norm())
        .add(Layer::tanh())
        .add(Layer::dense(1))
        .build(0)?;
    model.compile(OptimizerConfig::sgd(0.01, 0.0), Loss::Mse, &[])?;
    ensure!(common::values(model.buffers().get("bn.running_mean")?) == [0.0; 4]);
    ensure!(common::values(model.buffers().get("bn.running_var")?) == [1.0; 4]);
    // Batch mean and unbiased variance of the batch-norm input before the (single) step.
    let h = model
        .network()
        .forward_layers(&model.params(), &x, &mut ForwardCtx::train(), 1)?
        .to_dtype(DType::F64)?;
    let mean = h.mean(0)?;
    let var = h
        .broadcast_sub(&mean)?
        .sqr()?
        .sum(0)?
        .affine(1.0 / 31.0, 0.0)?;
    model.fit(
        &x,
        &y,
        FitOptions::new().epochs(1).batch_size(32).shuffle(false),
    )?;
    // PyTorch convention: running = (1 − momentum) running + momentum batch, momentum 0.1.
    let want_mean: Vec<f64> = common::values(&mean).iter().map(|m| 0.1 * m).collect();
    let want_var: Vec<f64> = common::values(&var).iter().map(|v| 0.9 + 0.1 * v).collect();
    let got_mean = common::values(model.buffers().get("bn.running_mean")?);
    let got_var = common::values(model.buffers().get("bn.running_var")?);
    for i in 0..4 {
        ensure!(
            (got_mean[i] - want_mean[i]).abs() < 1e-4,
            "{got_mean:?} vs {want_mean:?}"
        );
        ensure!(
            (got_var[i] - want_var[i]).abs() < 1e-3 * want_var[i],
            "{got_var:?} vs {want_var:?}"
        );
    }
    // predict uses the running statistics: one example alone gives the same output as in a
    // batch, and the output differs from normalising with the batch's own statistics.
    let params = model.params();
    let with_running =
        model
            .network()
            .forward(&params, &x, &mut ForwardCtx::eval(Some(model.buffers())))?;
    let with_batch = model
        .network()
        .forward(&params, &x, &mut ForwardCtx::eval(None))?;
    let predicted = model.predict(&x, 5)?;
    let d_running = predicted
        .sub(&with_running)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let d_batch = predicted
        .sub(&with_batch)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(
        d_running < 1e-5,
        "predict differs from the running-statistics forward by {d_running}"
    );
    ensure!(
        d_batch > 1e-3,
        "predict looks like it uses batch statistics"
    );
    let one = model.predict(&x.narrow(0, 7, 1)?, 1)?;
    let d_one = one
        .sub(&predicted.narrow(0, 7, 1)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(d_one < 1e-6);
    // Running statistics survive save and load.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bn.safetensors");
    model.save(&path)?;
    let loaded = Sequential::load(&path)?;
    ensure!(common::bit_identical(loaded.buffers(), model.buffers()));
    Ok(())
}

#[test]
fn fit_argument_errors() -> Result<()> {
    let (x, y) = regression(8, 3, 15)?;
    let mut model = regression_model(3, 4, 0)?;
    let err = model
        .fit(&x, &y, FitOptions::new())
        .expect_err("fit before compile fails");
    ensure!(err.to_string().contains("compile"), "{err}");
    model.compile(OptimizerConfig::adam(0.01), Loss::Mse, &[])?;
    ensure!(model.fit(&x, &y, FitOptions::new().epochs(0)).is_err());
    ensure!(model.fit(&x, &y, FitOptions::new().batch_size(0)).is_err());
    ensure!(model
        .compile(OptimizerConfig::adam(-1.0), Loss::Mse, &[])
        .is_err());
    Ok(())
}

#[test]
fn fused_adam_kernel_matches_the_reference_bit_for_bit() -> Result<()> {
    // The CPU kernel does the reference's arithmetic operation for operation: several steps of
    // Adam (with L2 decay) and AdamW (with and without decoupled decay), in f32 and f64, give
    // bit-identical weights and moments.
    use metalearn::kernels::with_kernels;
    for dtype in [DType::F32, DType::F64] {
        for cfg in [
            adam_with_l2(0.01, 0.1),
            OptimizerConfig::adamw(0.01, 0.1),
            OptimizerConfig::adamw(0.003, 0.0),
        ] {
            let run = |kernels: bool| -> Result<(Vec<f64>, Vec<f64>)> {
                with_kernels(kernels, || {
                    let mut rng = common::rng(9);
                    let theta = Var::from_tensor(
                        &common::uniform(&mut rng, &[3, 37], -1.0, 1.0).to_dtype(dtype)?,
                    )?;
                    let mut opt = Optimizer::new(cfg.clone(), 1)?;
                    for _ in 0..4 {
                        let g = common::uniform(&mut rng, &[3, 37], -2.0, 2.0).to_dtype(dtype)?;
                        opt.step(std::slice::from_ref(&theta), &[Some(g)])?;
                    }
                    let (state, steps) = opt.state()?;
                    ensure!(steps == 4);
                    // The state is a copy: a later step, which updates the moments in
                    // place, leaves it as it was.
                    let saved: Vec<f64> = state.tensors().iter().flat_map(common::values).collect();
                    let g = common::uniform(&mut rng, &[3, 37], -2.0, 2.0).to_dtype(dtype)?;
                    opt.step(std::slice::from_ref(&theta), &[Some(g)])?;
                    let after: Vec<f64> = state.tensors().iter().flat_map(common::values).collect();
                    ensure!(saved == after, "a step changed the saved optimiser state");
                    let moments: Vec<f64> =
                        state.tensors().iter().flat_map(common::values).collect();
                    Ok((common::values(theta.as_tensor()), moments))
                })
            };
            let (fused, reference) = (run(true)?, run(false)?);
            ensure!(
                fused
                    .0
                    .iter()
                    .zip(&reference.0)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{cfg:?} {dtype:?}: weights differ from the reference"
            );
            ensure!(
                fused.1 == reference.1 && !fused.1.is_empty(),
                "{cfg:?} {dtype:?}: moments differ from the reference"
            );
            ensure!(
                fused.0
                    != common::values(&common::uniform(&mut common::rng(9), &[3, 37], -1.0, 1.0)),
                "the weights did not move"
            );
        }
    }
    Ok(())
}

/// The supervised contrastive loss written out plainly, in f64 (see
/// `metalearn::train::loss::supervised_contrastive`).
fn reference_supervised_contrastive(rows: &[Vec<f64>], classes: &[u32], temperature: f64) -> f64 {
    let unit: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            r.iter().map(|v| v / norm).collect()
        })
        .collect();
    let cosine =
        |i: usize, j: usize| -> f64 { unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum() };
    let n = rows.len();
    let (mut total, mut anchors) = (0.0, 0.0);
    for i in 0..n {
        let others: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        let positives: Vec<usize> = others
            .iter()
            .copied()
            .filter(|&j| classes[j] == classes[i])
            .collect();
        if positives.is_empty() {
            continue;
        }
        let log_sum = others
            .iter()
            .map(|&j| (cosine(i, j) / temperature).exp())
            .sum::<f64>()
            .ln();
        let mean_log_p = positives
            .iter()
            .map(|&j| cosine(i, j) / temperature - log_sum)
            .sum::<f64>()
            / positives.len() as f64;
        total -= mean_log_p;
        anchors += 1.0;
    }
    total / anchors
}

#[test]
fn supervised_contrastive_loss_matches_a_plain_reference_and_finite_differences() -> Result<()> {
    use metalearn::train::loss::supervised_contrastive;
    let mut rng = rand::thread_rng();
    // Classes 2 and 3 have one row each: candidates in the denominators, never anchors.
    let classes = [0u32, 0, 1, 1, 1, 2, 3];
    let (n, dim, temperature) = (classes.len(), 5, 0.1);
    let rows: Vec<Vec<f64>> = (0..n)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect())
        .collect();
    let flat: Vec<f64> = rows.concat();
    let x = Var::from_tensor(&Tensor::from_vec(flat.clone(), (n, dim), &Device::Cpu)?)?;
    let loss = supervised_contrastive(x.as_tensor(), &classes, temperature)?;
    let value = loss.to_scalar::<f64>()?;
    let want = reference_supervised_contrastive(&rows, &classes, temperature);
    ensure!(
        (value - want).abs() < 1e-12 * want.abs().max(1.0),
        "{value} vs {want}"
    );
    let grad = loss
        .backward()?
        .get(&x)
        .expect("a gradient")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let h = 1e-6;
    for k in 0..flat.len() {
        let at = |delta: f64| {
            let mut moved = flat.clone();
            moved[k] += delta;
            let rows: Vec<Vec<f64>> = moved.chunks(dim).map(<[f64]>::to_vec).collect();
            reference_supervised_contrastive(&rows, &classes, temperature)
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        ensure!(
            (grad[k] - numeric).abs() < 1e-6 * numeric.abs().max(1.0),
            "coordinate {k}: gradient {} vs finite difference {numeric}",
            grad[k]
        );
    }
    // No row with a positive: nothing to learn from.
    let alone = supervised_contrastive(x.as_tensor(), &[0, 1, 2, 3, 4, 5, 6], temperature)?;
    ensure!(alone.to_scalar::<f64>()? == 0.0);
    Ok(())
}
