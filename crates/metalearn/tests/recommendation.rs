//! Recommendation pieces through the public API: the feature-embedding layer's gradients
//! (first and second order) against f64 finite differences, padded task batches against the
//! task-by-task computation, and MAML's meta-gradient on users with different numbers of
//! ratings against finite differences: the padded, task-batched path (tanh decision layers)
//! and the plain-loop kernel over candle's features (ReLU decision layers), which is also
//! checked against the candle path directly.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;

use common::{check_gradient, check_hessian_vector_product, Point};
use metalearn::meta::inner::{first_adapted_layer, gradient_meta_step, InnerLoop, InnerLr};
use metalearn::meta::maml::Maml;
use metalearn::meta::mlp_maml::{with_first_layer_form, FirstLayerForm};
use metalearn::meta::{MetaAlgorithm, MetaParams, MetaStep};
use metalearn::nn::architecture::{FeatureField, FeatureKind};
use metalearn::tasks::{Task, TaskBatch, TaskKind};
use metalearn::{Architecture, ForwardCtx, Layer, Loss, Network, ParamSet};

fn fields() -> Vec<FeatureField> {
    let field = |name: &str, kind, vocab, dim, slots| FeatureField {
        name: name.into(),
        kind,
        vocab,
        dim,
        slots,
        zero_init: false,
    };
    vec![
        field("item_rate", FeatureKind::Categorical, 4, 2, 1),
        field("item_genres", FeatureKind::MultiValued, 5, 2, 3),
        field("user_group", FeatureKind::Categorical, 3, 2, 1),
        field("user_age", FeatureKind::Numeric, 0, 1, 1),
    ]
}

/// 6 slots → 7 features → dense 3 → tanh → dense 1.
fn arch() -> Architecture {
    let mut arch = Architecture::new(&[6]);
    arch.push_named("embeddings", Layer::FeatureEmbedding { fields: fields() })
        .expect("layer");
    arch.push_named("fc1", Layer::dense(3)).expect("layer");
    arch.push_named("act1", Layer::tanh()).expect("layer");
    arch.push_named("head", Layer::dense(1)).expect("layer");
    arch
}

/// MeLU's shape in small: 6 slots → 7 features → dense 4 → ReLU → dense 3 → ReLU → dense 1
/// (the decision layers are all dense and ReLU: the plain-loop kernel runs them).
fn relu_arch() -> Architecture {
    let mut arch = Architecture::new(&[6]);
    arch.push_named("embeddings", Layer::FeatureEmbedding { fields: fields() })
        .expect("layer");
    arch.push_named("fc1", Layer::dense(4)).expect("layer");
    arch.push_named("act1", Layer::relu()).expect("layer");
    arch.push_named("fc2", Layer::dense(3)).expect("layer");
    arch.push_named("act2", Layer::relu()).expect("layer");
    arch.push_named("head", Layer::dense(1)).expect("layer");
    arch
}

/// `n` random rows: a rate id, up to 3 genre ids (padded with -1, sometimes none), a group
/// id (sometimes 0, the unknown row) and a number.
fn rows(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Tensor {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(rng.gen_range(0..4) as f64);
        let genres = rng.gen_range(0..=3);
        let mut ids: Vec<f64> = (0..5).map(f64::from).collect();
        for k in 0..3 {
            v.push(if k < genres {
                ids.remove(rng.gen_range(0..ids.len()))
            } else {
                -1.0
            });
        }
        v.push(rng.gen_range(0..3) as f64);
        v.push(rng.gen_range(-1.0..1.0));
    }
    Tensor::from_vec(v, (n, 6), &Device::Cpu).expect("rows")
}

fn targets(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Tensor {
    common::uniform(rng, &[n, 1], 1.0, 5.0)
}

#[test]
fn feature_embedding_gradients_match_finite_differences() -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(&arch())?;
    let params = common::generic_params(&net, 5);
    let mut rng = common::rng(6);
    let x = rows(&mut rng, 7);
    let y = targets(&mut rng, 7);
    // The ids are not differentiable: the objective reads fixed rows.
    let f = |p: &ParamSet, _x: &Tensor| {
        let out = net.forward(p, &x, &mut ForwardCtx::train())?;
        Loss::Mse.compute(&out, &y)
    };
    let dummy = Tensor::zeros(1, DType::F64, &Device::Cpu)?;
    let point = Point::new(&params, &dummy);
    let first = check_gradient("feature embedding", &f, &point)?;
    let second = check_hessian_vector_product("feature embedding", &f, &point, 3)?;
    eprintln!("feature embedding: worst relative error {first:.1e} (first), {second:.1e} (second)");
    Ok(())
}

#[test]
fn a_multi_valued_cell_is_the_mean_of_its_values_and_an_empty_cell_is_zero() -> Result<()> {
    let mut arch = Architecture::new(&[3]);
    arch.push_named(
        "e",
        Layer::FeatureEmbedding {
            fields: vec![FeatureField {
                name: "g".into(),
                kind: FeatureKind::MultiValued,
                vocab: 3,
                dim: 1,
                slots: 3,
                zero_init: false,
            }],
        },
    )?;
    let net = Network::build(&arch)?;
    let mut params = ParamSet::new();
    params.insert("e.g", Tensor::new(&[[1f32], [10.], [100.]], &Device::Cpu)?)?;
    let x = Tensor::new(
        &[[1f32, 2., -1.], [-1., -1., -1.], [0., -1., -1.]],
        &Device::Cpu,
    )?;
    let out = net.forward(&params, &x, &mut ForwardCtx::train())?;
    assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, vec![55.0, 0.0, 1.0]);
    let bad = Tensor::new(&[[3f32, -1., -1.]], &Device::Cpu)?;
    let err = net
        .forward(&params, &bad, &mut ForwardCtx::train())
        .expect_err("id 3 is outside a vocabulary of 3")
        .to_string();
    assert!(err.contains("`g` holds 3"), "{err}");
    Ok(())
}

/// Users with different numbers of ratings.
fn user_tasks(seed: u64, sizes: &[(usize, usize)]) -> Vec<Task> {
    let mut rng = common::rng(seed);
    sizes
        .iter()
        .map(|&(s, q)| Task {
            support: (rows(&mut rng, s), targets(&mut rng, s)),
            query: (rows(&mut rng, q), targets(&mut rng, q)),
        })
        .collect()
}

#[test]
fn padded_batches_weigh_each_task_by_its_own_size() -> Result<()> {
    let tasks = user_tasks(1, &[(2, 3), (5, 1), (3, 2)]);
    let batch = TaskBatch::pad(&tasks)?.expect("same example shapes");
    assert_eq!(batch.support_x.dims(), &[3, 5, 6]);
    assert_eq!(batch.query_x.dims(), &[3, 3, 6]);
    let w = batch
        .support_weight
        .expect("padded")
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    assert_eq!(w[0], vec![0.5, 0.5, 0.0, 0.0, 0.0]);
    assert_eq!(w[1], vec![0.2; 5]);
    ensure!(
        TaskBatch::stack(&tasks)?.is_none(),
        "sizes differ: stack refuses"
    );
    Ok(())
}

/// A step's gradients as one flat vector in the order of `weights` (zeros where none).
fn flat_grads(step: &metalearn::meta::MetaStep, weights: &ParamSet) -> Vec<f64> {
    step.grads
        .iter()
        .zip(weights.tensors())
        .flat_map(|(g, t)| match g {
            Some(g) => common::values(g),
            None => vec![0.0; t.elem_count()],
        })
        .collect()
}

fn flatten(set: &ParamSet) -> Vec<f64> {
    set.tensors().iter().flat_map(common::values).collect()
}

fn unflatten(like: &ParamSet, values: &[f64]) -> ParamSet {
    let mut offset = 0;
    like.map(|_, t| {
        let n = t.elem_count();
        let out = Tensor::from_vec(values[offset..offset + n].to_vec(), t.shape(), t.device())?;
        offset += n;
        Ok(out)
    })
    .expect("unflatten")
}

/// MAML's meta-gradient on a batch of users of different sizes against central differences
/// of the mean of the users' own (one-by-one) meta-losses.
fn check_padded_maml(
    label: &str,
    arch: &Architecture,
    adapt_from: Option<&str>,
    first_order: bool,
) -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(arch)?;
    let weights = common::generic_params(&net, 11);
    // Gradients are kept for variables only.
    let vars = weights.to_vars()?;
    let meta = MetaParams {
        weights: ParamSet::from_vars(weights.names(), &vars)?,
        inner_lrs: None,
    };
    let maml = Maml {
        inner_lr: 0.3,
        inner_steps: 2,
        first_order,
        adapt_from: adapt_from.map(String::from),
    };
    let tasks = user_tasks(12, &[(2, 3), (4, 2), (3, 4)]);
    let kind = TaskKind::Regression;
    let step = maml.meta_train_step(&net, &meta, &tasks, kind)?;
    let one_by_one = |w: &ParamSet| -> Result<f64> {
        let meta = MetaParams {
            weights: w.clone(),
            inner_lrs: None,
        };
        let mut total = 0.0;
        for task in &tasks {
            total += maml
                .meta_train_step(&net, &meta, std::slice::from_ref(task), kind)?
                .loss;
        }
        Ok(total / tasks.len() as f64)
    };
    let at = flatten(&weights);
    let reference = one_by_one(&weights)?;
    ensure!(
        (step.loss - reference).abs() < 1e-10 * reference.abs().max(1.0),
        "{label}: padded meta-loss {} but one by one {reference}",
        step.loss
    );
    let analytic = flat_grads(&step, &weights);
    if first_order {
        // First order: the gradient at the fast weights, not the objective's gradient; check
        // it against the one-by-one first-order steps instead.
        let mut mean = vec![0.0; at.len()];
        for task in &tasks {
            let s = maml.meta_train_step(&net, &meta, std::slice::from_ref(task), kind)?;
            let g = flat_grads(&s, &weights);
            for (m, v) in mean.iter_mut().zip(g) {
                *m += v / tasks.len() as f64;
            }
        }
        let worst = analytic
            .iter()
            .zip(&mean)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0.0, f64::max);
        ensure!(
            worst < 1e-9,
            "{label}: padded first-order gradient off by {worst:e}"
        );
        return Ok(());
    }
    let eps = 1e-5;
    let mut worst = 0.0f64;
    for i in 0..at.len() {
        let mut plus = at.clone();
        plus[i] += eps;
        let mut minus = at.clone();
        minus[i] -= eps;
        let numeric = (one_by_one(&unflatten(&weights, &plus))?
            - one_by_one(&unflatten(&weights, &minus))?)
            / (2.0 * eps);
        let err = (analytic[i] - numeric).abs() / numeric.abs().max(1e-3);
        worst = worst.max(err);
    }
    eprintln!(
        "{label}: {} coordinates, worst relative error {worst:.1e}",
        at.len()
    );
    ensure!(
        worst < 1e-5,
        "{label}: meta-gradient off by relative error {worst:e}"
    );
    Ok(())
}

#[test]
fn padded_second_order_maml_adapting_the_decision_layers_matches_finite_differences() -> Result<()>
{
    check_padded_maml(
        "MeLU-style MAML (fc1 on), padded",
        &arch(),
        Some("fc1"),
        false,
    )
}

#[test]
fn padded_second_order_maml_adapting_the_embeddings_too_matches_finite_differences() -> Result<()> {
    check_padded_maml("MAML (every layer), padded", &arch(), None, false)
}

#[test]
fn padded_first_order_maml_equals_the_task_by_task_step() -> Result<()> {
    check_padded_maml(
        "first-order MAML (fc1 on), padded",
        &arch(),
        Some("fc1"),
        true,
    )
}

/// Whether `Maml::meta_train_step` takes the plain-loop kernel for these users.
fn kernel_applies(net: &Network, meta: &MetaParams, tasks: &[Task], first_order: bool) -> bool {
    let from_layer = first_adapted_layer(net, Some("fc1")).expect("fc1");
    metalearn::meta::mlp_maml::meta_step_on_features(
        net,
        meta,
        tasks,
        TaskKind::Regression,
        from_layer,
        0.1,
        1,
        !first_order,
    )
    .expect("kernel step")
    .is_some()
}

#[test]
fn second_order_maml_on_relu_decision_layers_matches_finite_differences() -> Result<()> {
    let net = Network::build(&relu_arch())?;
    let meta = MetaParams {
        weights: common::generic_params(&net, 11),
        inner_lrs: None,
    };
    let tasks = user_tasks(12, &[(2, 3), (4, 2), (3, 4)]);
    ensure!(
        kernel_applies(&net, &meta, &tasks, false),
        "the kernel declined"
    );
    for form in [FirstLayerForm::Plain, FirstLayerForm::Gram] {
        with_first_layer_form(form, || {
            check_padded_maml(
                &format!("MeLU-style MAML (fc1 on, ReLU), kernel, {form:?}"),
                &relu_arch(),
                Some("fc1"),
                false,
            )
        })?;
    }
    Ok(())
}

#[test]
fn first_order_maml_on_relu_decision_layers_equals_the_task_by_task_step() -> Result<()> {
    check_padded_maml(
        "first-order MAML (fc1 on, ReLU), kernel",
        &relu_arch(),
        Some("fc1"),
        true,
    )
}

/// Every gradient of a meta-step as f64 vectors (`None` kept), one per meta-parameter.
fn gradient_values(step: &MetaStep) -> Vec<Option<Vec<f64>>> {
    step.grads
        .iter()
        .map(|g| g.as_ref().map(common::values))
        .collect()
}

#[test]
fn the_kernel_over_features_matches_the_candle_path() -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(&relu_arch())?;
    let from_layer = first_adapted_layer(&net, Some("fc1"))?;
    // Users with 1 to 9 ratings, so tasks differ in both support and query sizes.
    let tasks = user_tasks(21, &[(3, 2), (9, 4), (1, 1), (6, 3), (4, 5)]);
    let mut worst_overall = 0.0f64;
    for seed in [31, 32] {
        let weights = common::generic_params(&net, seed);
        let vars = weights.to_vars()?;
        let meta = MetaParams {
            weights: ParamSet::from_vars(weights.names(), &vars)?,
            inner_lrs: None,
        };
        let cases = [(1, false), (3, false), (1, true), (3, true)];
        let forms = [FirstLayerForm::Plain, FirstLayerForm::Gram];
        for ((steps, first_order), form) in cases.into_iter().flat_map(|c| forms.map(|f| (c, f))) {
            let case = format!("seed {seed}, {steps} steps, first order {first_order}, {form:?}");
            let lr = 0.1;
            let kernel = with_first_layer_form(form, || {
                metalearn::meta::mlp_maml::meta_step_on_features(
                    &net,
                    &meta,
                    &tasks,
                    TaskKind::Regression,
                    from_layer,
                    lr,
                    steps,
                    !first_order,
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("{case}: the kernel declined"))?;
            let cfg = InnerLoop {
                loss: Loss::Mse,
                steps,
                lr: InnerLr::Scalar(lr),
                from_layer,
                second_order: !first_order,
            };
            let reference = gradient_meta_step(&net, &meta, &tasks, TaskKind::Regression, &cfg)?;
            ensure!(
                (kernel.loss - reference.loss).abs() <= 1e-12 * reference.loss.abs(),
                "{case}: loss {} vs candle {}",
                kernel.loss,
                reference.loss
            );
            let (a, b) = (gradient_values(&kernel), gradient_values(&reference));
            ensure!(a.len() == b.len(), "{case}: gradient counts differ");
            for ((name, a), b) in weights.names().iter().zip(&a).zip(&b) {
                let (Some(a), Some(b)) = (a, b) else {
                    ensure!(
                        a.is_none() && b.is_none(),
                        "{case}: `{name}` has a gradient on one path only"
                    );
                    continue;
                };
                let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                ensure!(scale > 0.0, "{case}: `{name}`'s gradient is zero");
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / scale)
                    .fold(0.0, f64::max);
                ensure!(
                    worst <= 1e-10,
                    "{case}: `{name}` differs by {worst:e} of its largest entry {scale:e}"
                );
                worst_overall = worst_overall.max(worst);
            }
        }
    }
    eprintln!("kernel over features vs candle: worst relative difference {worst_overall:.1e}");
    Ok(())
}
