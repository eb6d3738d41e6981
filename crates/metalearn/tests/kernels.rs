//! The fast CPU kernels against candle's reference operations, in f64: forward values, batch
//! statistics, first-order gradients (of parameters and inputs), second-order gradients
//! (Hessian-vector products), in plain and task-batched mode, on odd shapes; plus finite
//! differences of the fused first-order kernels, and the kernels' own algebra.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

use common::{autodiff_gradient, check_gradient, hessian_vector_product, values, Point};
use metalearn::kernels::with_kernels;
use metalearn::nn::ops;
use metalearn::{Architecture, ForwardCtx, Layer, Loss, Network, ParamSet};
use metalearn_kernels::conv::{im2col_rows, ConvGeometry, PatchOrderWeight};
use metalearn_kernels::fused::{ConvRows, InferenceBlock};
use metalearn_kernels::norm::channel_moments;
use metalearn_kernels::pool::{max_pool_rows, PoolGeometry};

/// One network shape around the convolutional block.
#[derive(Clone, Copy, Debug)]
struct Shape {
    channels: usize,
    size: usize,
    filters: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    pool: usize,
    batch: usize,
}

/// Odd sizes, several channels, strides, paddings and pooling windows that leave rows over.
const SHAPES: [Shape; 7] = [
    Shape {
        channels: 1,
        size: 7,
        filters: 3,
        kernel: 3,
        stride: 1,
        padding: 1,
        pool: 2,
        batch: 3,
    },
    Shape {
        channels: 2,
        size: 9,
        filters: 4,
        kernel: 3,
        stride: 2,
        padding: 1,
        pool: 2,
        batch: 2,
    },
    Shape {
        channels: 3,
        size: 8,
        filters: 2,
        kernel: 2,
        stride: 1,
        padding: 0,
        pool: 3,
        batch: 2,
    },
    Shape {
        channels: 1,
        size: 6,
        filters: 5,
        kernel: 1,
        stride: 1,
        padding: 0,
        pool: 2,
        batch: 4,
    },
    Shape {
        channels: 2,
        size: 5,
        filters: 3,
        kernel: 3,
        stride: 1,
        padding: 0,
        pool: 2,
        batch: 3,
    },
    Shape {
        channels: 2,
        size: 11,
        filters: 3,
        kernel: 5,
        stride: 2,
        padding: 2,
        pool: 2,
        batch: 2,
    },
    // Whole vectors of filters (three of f64) for the first block's window-by-window kernel.
    Shape {
        channels: 2,
        size: 9,
        filters: 12,
        kernel: 3,
        stride: 1,
        padding: 1,
        pool: 2,
        batch: 2,
    },
];

/// conv → batch-norm → ReLU → max-pool, twice when the image allows, → flatten → dense.
fn network(s: &Shape) -> Network {
    let mut arch = Architecture::new(&[s.channels, s.size, s.size]);
    let conv = Layer::Conv2d {
        filters: s.filters,
        kernel_size: s.kernel,
        stride: s.stride,
        padding: s.padding,
        groups: 1,
        bias: true,
        same_padding: false,
    };
    let block = |arch: &mut Architecture| {
        arch.push(conv.clone());
        arch.push(Layer::batch_norm());
        arch.push(Layer::relu());
        arch.push(Layer::max_pool2d(s.pool));
    };
    block(&mut arch);
    let mut net = Network::build(&arch).expect("first block fits");
    let mut twice = arch.clone();
    block(&mut twice);
    if let Ok(n) = Network::build(&twice) {
        arch = twice;
        net = n;
    }
    let _ = net;
    arch.push(Layer::Flatten);
    arch.push(Layer::dense(3));
    Network::build(&arch).expect("valid architecture")
}

fn input(s: &Shape, lead: &[usize], seed: u64) -> Tensor {
    let mut shape = lead.to_vec();
    shape.extend([s.channels, s.size, s.size]);
    common::normal(&mut common::rng(seed), &shape)
}

/// Which path a forward pass takes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Reference,
    /// Fast kernels, differentiable composition.
    Composed,
    /// Fast kernels, fused first-order kernels.
    Fused,
}

fn forward_on(
    path: Path,
    net: &Network,
    params: &ParamSet,
    x: &Tensor,
    running: Option<&ParamSet>,
    stats: Option<&mut Vec<(String, Tensor)>>,
) -> metalearn::Result<Tensor> {
    let mut ctx = match running {
        Some(r) => ForwardCtx::eval(Some(r)),
        None => ForwardCtx::train(),
    };
    ctx.batch_stats = stats;
    if path == Path::Fused {
        ctx = ctx.first_order();
    }
    with_kernels(path != Path::Reference, || net.forward(params, x, &mut ctx))
}

/// A scalar loss of the network's output against a fixed random target.
fn objective<'a>(
    path: Path,
    net: &'a Network,
    target: &'a Tensor,
    running: Option<&'a ParamSet>,
) -> impl Fn(&ParamSet, &Tensor) -> metalearn::Result<Tensor> + 'a {
    move |params, x| {
        let out = forward_on(path, net, params, x, running, None)?;
        Loss::Mse.compute(&out, target)
    }
}

fn max_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "same number of values");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn scale_of(v: &[f64]) -> f64 {
    v.iter().fold(1e-3f64, |m, x| m.max(x.abs()))
}

/// Running statistics away from the batch's own, so that eval mode differs from train mode.
fn running_stats(net: &Network, seed: u64) -> ParamSet {
    let mut rng = common::rng(seed);
    net.init_buffers(&Device::Cpu, DType::F64)
        .expect("buffers")
        .map(|name, t| {
            let noise = common::uniform(&mut rng, t.dims(), 0.1, 0.5);
            Ok(if name.ends_with("running_var") {
                t.add(&noise)?
            } else {
                noise
            })
        })
        .expect("same shapes")
}

/// Checks that a path's outputs equal the reference's to rounding (f64).
fn same_outputs(label: &str, out: &[f64], reference: &[f64]) -> Result<()> {
    let diff = max_difference(out, reference);
    ensure!(
        diff < 1e-10 * scale_of(reference),
        "{label}: outputs differ by {diff:e}"
    );
    Ok(())
}

/// Checks that a path's batch statistics (running-statistic updates) have the reference's
/// names and values.
fn same_statistics(
    label: &str,
    stats: &[(String, Tensor)],
    reference: &[(String, Tensor)],
) -> Result<()> {
    ensure!(
        stats.len() == reference.len(),
        "{label}: {} batch statistics, reference {}",
        stats.len(),
        reference.len()
    );
    for ((name, a), (ref_name, b)) in stats.iter().zip(reference) {
        ensure!(
            name == ref_name,
            "{label}: statistic {name} where the reference has {ref_name}"
        );
        let (a, b) = (values(a), values(b));
        let diff = max_difference(&a, &b);
        ensure!(
            diff < 1e-10 * scale_of(&b),
            "{label}: {name} differs by {diff:e}"
        );
    }
    Ok(())
}

#[test]
fn fast_paths_match_the_reference_in_values_statistics_and_gradients() -> Result<()> {
    metalearn::runtime::init();
    for (i, s) in SHAPES.iter().enumerate() {
        let seed = 100 + i as u64;
        let net = network(s);
        let params = common::generic_params(&net, seed);
        let x = input(s, &[s.batch], seed);
        let target = common::normal(&mut common::rng(seed + 1), &[s.batch, 3]);
        let running = running_stats(&net, seed + 2);
        for running in [None, Some(&running)] {
            let mut reference_stats = Vec::new();
            let reference = values(&forward_on(
                Path::Reference,
                &net,
                &params,
                &x,
                running,
                Some(&mut reference_stats),
            )?);
            let point = Point::new(&params, &x);
            let reference_grad =
                autodiff_gradient(&objective(Path::Reference, &net, &target, running), &point);
            for path in [Path::Composed, Path::Fused] {
                let label = format!("{s:?} {path:?} running={}", running.is_some());
                let mut stats = Vec::new();
                let out = values(&forward_on(
                    path,
                    &net,
                    &params,
                    &x,
                    running,
                    Some(&mut stats),
                )?);
                same_outputs(&label, &out, &reference)?;
                same_statistics(&label, &stats, &reference_stats)?;
                let grad = autodiff_gradient(&objective(path, &net, &target, running), &point);
                let diff = max_difference(&grad, &reference_grad);
                ensure!(
                    diff < 1e-9 * scale_of(&reference_grad),
                    "{label}: gradients differ by {diff:e} (largest {:e})",
                    scale_of(&reference_grad)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn composed_fast_path_matches_the_reference_to_second_order() -> Result<()> {
    metalearn::runtime::init();
    for (i, s) in SHAPES.iter().enumerate() {
        let seed = 200 + i as u64;
        let net = network(s);
        let params = common::generic_params(&net, seed);
        let x = input(s, &[s.batch], seed);
        let target = common::normal(&mut common::rng(seed + 1), &[s.batch, 3]);
        let point = Point::new(&params, &x);
        let mut rng = common::rng(seed + 2);
        let direction: Vec<f64> = (0..point.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (s_ref, hv_ref) = hessian_vector_product(
            &objective(Path::Reference, &net, &target, None),
            &point,
            &direction,
        );
        let (s_fast, hv_fast) = hessian_vector_product(
            &objective(Path::Composed, &net, &target, None),
            &point,
            &direction,
        );
        ensure!(
            (s_ref - s_fast).abs() < 1e-9 * s_ref.abs().max(1e-3),
            "{s:?}: directional derivatives {s_fast} vs {s_ref}"
        );
        let diff = max_difference(&hv_fast, &hv_ref);
        ensure!(
            diff < 1e-8 * scale_of(&hv_ref),
            "{s:?}: Hessian-vector products differ by {diff:e} (largest {:e})",
            scale_of(&hv_ref)
        );
    }
    Ok(())
}

/// Task-batched parameters: every parameter stacked for `tasks` tasks, each task's copy
/// perturbed differently.
fn task_params(params: &ParamSet, tasks: usize, seed: u64) -> ParamSet {
    let mut rng = common::rng(seed);
    params
        .map(|_, t| {
            let copies: Vec<Tensor> = (0..tasks)
                .map(|_| t.add(&common::uniform(&mut rng, t.dims(), -0.1, 0.1)))
                .collect::<candle_core::Result<_>>()?;
            Ok(Tensor::stack(&copies, 0)?)
        })
        .expect("stackable")
}

#[test]
fn task_batched_fast_paths_match_the_reference() -> Result<()> {
    metalearn::runtime::init();
    for (i, s) in SHAPES.iter().enumerate().take(4) {
        let seed = 300 + i as u64;
        let tasks = 2;
        let net = network(s);
        let params = task_params(&common::generic_params(&net, seed), tasks, seed + 5);
        let x = input(s, &[tasks, s.batch], seed);
        let target = common::normal(&mut common::rng(seed + 1), &[tasks, s.batch, 3]);
        let point = Point::new(&params, &x);
        let reference = values(&forward_on(Path::Reference, &net, &params, &x, None, None)?);
        let reference_grad =
            autodiff_gradient(&objective(Path::Reference, &net, &target, None), &point);
        for path in [Path::Composed, Path::Fused] {
            let out = values(&forward_on(path, &net, &params, &x, None, None)?);
            let diff = max_difference(&out, &reference);
            ensure!(
                diff < 1e-10 * scale_of(&reference),
                "{s:?} {path:?}: outputs differ by {diff:e}"
            );
            let grad = autodiff_gradient(&objective(path, &net, &target, None), &point);
            let diff = max_difference(&grad, &reference_grad);
            ensure!(
                diff < 1e-9 * scale_of(&reference_grad),
                "{s:?} {path:?}: gradients differ by {diff:e}"
            );
        }
        let mut rng = common::rng(seed + 2);
        let direction: Vec<f64> = (0..point.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (_, hv_ref) = hessian_vector_product(
            &objective(Path::Reference, &net, &target, None),
            &point,
            &direction,
        );
        let (_, hv_fast) = hessian_vector_product(
            &objective(Path::Composed, &net, &target, None),
            &point,
            &direction,
        );
        let diff = max_difference(&hv_fast, &hv_ref);
        ensure!(
            diff < 1e-8 * scale_of(&hv_ref),
            "{s:?}: batched Hessian-vector products differ by {diff:e}"
        );
    }
    Ok(())
}

#[test]
fn fused_first_order_gradients_match_finite_differences() -> Result<()> {
    metalearn::runtime::init();
    for (i, s) in SHAPES.iter().enumerate().take(3) {
        let seed = 400 + i as u64;
        let net = network(s);
        let params = common::generic_params(&net, seed);
        let x = input(s, &[s.batch], seed);
        let target = common::normal(&mut common::rng(seed + 1), &[s.batch, 3]);
        let point = Point::new(&params, &x);
        check_gradient(
            &format!("{s:?} fused"),
            &objective(Path::Fused, &net, &target, None),
            &point,
        )?;
        let running = running_stats(&net, seed + 2);
        check_gradient(
            &format!("{s:?} fused, running statistics"),
            &objective(Path::Fused, &net, &target, Some(&running)),
            &point,
        )?;
    }
    Ok(())
}

/// The objective on fixed images that get no gradient (the input of the point is ignored), so
/// that the fused path runs the first block as one kernel on them.
fn objective_on_images<'a>(
    path: Path,
    net: &'a Network,
    target: &'a Tensor,
    running: Option<&'a ParamSet>,
    images: &'a Tensor,
) -> impl Fn(&ParamSet, &Tensor) -> metalearn::Result<Tensor> + 'a {
    move |params, _| {
        let out = forward_on(path, net, params, images, running, None)?;
        Loss::Mse.compute(&out, target)
    }
}

/// The first block (convolution, batch-norm, ReLU, max-pool) on images without gradient runs
/// as one kernel on the fused path: values, batch statistics and parameter gradients against
/// the reference, with batch and running statistics, plain and task-batched; its gradients
/// against finite differences.
#[test]
fn first_block_kernel_matches_the_reference() -> Result<()> {
    metalearn::runtime::init();
    for (i, s) in SHAPES.iter().enumerate() {
        let seed = 450 + i as u64;
        let net = network(s);
        for tasks in [None, Some(2)] {
            let (params, lead) = match tasks {
                None => (common::generic_params(&net, seed), vec![s.batch]),
                Some(t) => (
                    task_params(&common::generic_params(&net, seed), t, seed + 5),
                    vec![t, s.batch],
                ),
            };
            // Images away from zero mean, as pixel data is.
            let x = input(s, &lead, seed).affine(0.5, 2.0)?;
            let mut target_shape = lead.clone();
            target_shape.push(3);
            let target = common::normal(&mut common::rng(seed + 1), &target_shape);
            let running = running_stats(&net, seed + 2);
            let runnings = if tasks.is_some() {
                vec![None]
            } else {
                vec![None, Some(&running)]
            };
            for running in runnings {
                let label = format!("{s:?} tasks={tasks:?} running={}", running.is_some());
                let (mut ref_stats, mut stats) = (Vec::new(), Vec::new());
                let reference = values(&forward_on(
                    Path::Reference,
                    &net,
                    &params,
                    &x,
                    running,
                    Some(&mut ref_stats),
                )?);
                let out = values(&forward_on(
                    Path::Fused,
                    &net,
                    &params,
                    &x,
                    running,
                    Some(&mut stats),
                )?);
                same_outputs(&label, &out, &reference)?;
                same_statistics(&label, &stats, &ref_stats)?;
                let point = Point::new(&params, &x);
                let reference_grad = autodiff_gradient(
                    &objective_on_images(Path::Reference, &net, &target, running, &x),
                    &point,
                );
                let fused = objective_on_images(Path::Fused, &net, &target, running, &x);
                let grad = autodiff_gradient(&fused, &point);
                let diff = max_difference(&grad, &reference_grad);
                ensure!(
                    diff < 1e-9 * scale_of(&reference_grad),
                    "{label}: gradients differ by {diff:e} (largest {:e})",
                    scale_of(&reference_grad)
                );
                if i < 3 && tasks.is_none() {
                    check_gradient(&label, &fused, &point)?;
                }
            }
        }
    }
    Ok(())
}

/// The fused convolution on the shapes that take Winograd's F(4×4, 3×3) (3×3 kernel, stride 1,
/// four or more channels; odd and non-square images, all paddings it takes, several tasks) and
/// on thinner ones beside them: values and gradients of input and weight against patch rows
/// times the weight, in f64 (to rounding) and in f32.
#[test]
fn fused_convolution_matches_patch_products_on_winograd_shapes() -> Result<()> {
    // (images per task, height, width, channels, filters, padding, tasks)
    let cases = [
        (2, 7, 9, 4, 5, 1, 1),
        (3, 5, 4, 6, 4, 0, 2),
        (1, 3, 3, 5, 7, 2, 3),
        (2, 8, 6, 9, 4, 1, 2),
        (2, 1, 2, 4, 4, 2, 1),
        (2, 6, 5, 3, 6, 1, 1),
    ];
    for (i, &(per_task, height, width, channels, filters, padding, tasks)) in
        cases.iter().enumerate()
    {
        let g = ConvGeometry {
            images: per_task * tasks,
            height,
            width,
            channels,
            kernel: 3,
            stride: 1,
            padding,
        };
        let pixels = g.out_height() * g.out_width();
        let mut rng = common::rng(900 + i as u64);
        let x = common::normal(&mut rng, &[tasks, per_task * height * width, channels]);
        let w = common::normal(&mut rng, &[tasks, g.patch_len(), filters]);
        let probe = common::normal(&mut rng, &[tasks, per_task * pixels, filters]);
        for dtype in [DType::F64, DType::F32] {
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
                let xv = candle_core::Var::from_tensor(&x.to_dtype(dtype)?)?;
                let wv = candle_core::Var::from_tensor(&w.to_dtype(dtype)?)?;
                let y = if fused {
                    xv.as_tensor().apply_op2(wv.as_tensor(), ConvRows(g))?
                } else {
                    im2col_rows(xv.as_tensor(), g)?.matmul(wv.as_tensor())?
                };
                let loss = y.mul(&probe.to_dtype(dtype)?)?.sum_all()?;
                let grads = loss.backward()?;
                let dx = grads.get(xv.as_tensor()).expect("input gradient");
                let dw = grads.get(wv.as_tensor()).expect("weight gradient");
                Ok(vec![values(&y), values(dx), values(dw)])
            };
            let (fused, reference) = (run(true)?, run(false)?);
            for (what, (a, b)) in ["output", "input gradient", "weight gradient"]
                .iter()
                .zip(fused.iter().zip(&reference))
            {
                let diff = max_difference(a, b);
                ensure!(
                    diff <= tolerance * scale_of(b),
                    "case {i} {g:?} {dtype:?}: {what} differs by {diff:e}"
                );
            }
        }
    }
    Ok(())
}

/// `ops::conv2d` (shifted slices and one matrix product, the reference and GPU path): values
/// against candle's `conv2d`, gradients of input and kernels and Hessian-vector products against
/// finite differences, on the odd shapes (non-square images too); task-batched, each task
/// against its own convolution.
#[test]
fn shifted_slice_convolution_matches_candle_conv2d() -> Result<()> {
    metalearn::runtime::init();
    // Not the last shape: its 18-value patches of unit-variance weights saturate the tanh
    // below, where finite differences lose the digits the check needs.
    for (i, s) in SHAPES.iter().enumerate().take(6) {
        let mut rng = common::rng(700 + i as u64);
        let (n, h, w) = (s.batch, s.size, s.size + 1);
        let x = common::normal(&mut rng, &[n, s.channels, h, w]);
        let kernels = common::normal(&mut rng, &[s.filters, s.channels, s.kernel, s.kernel]);
        let params = ParamSet::from_pairs([("w".to_string(), kernels.clone())])?;
        let (stride, padding) = (s.stride, s.padding);
        let expected = x.conv2d(&kernels, padding, stride, 1, 1)?;
        let got = ops::conv2d(&x, &kernels, stride, padding)?;
        ensure!(
            got.dims() == expected.dims(),
            "{s:?}: shape {:?} vs {:?}",
            got.dims(),
            expected.dims()
        );
        let diff = max_difference(&values(&got), &values(&expected));
        ensure!(
            diff < 1e-12 * scale_of(&values(&expected)),
            "{s:?}: values differ by {diff:e}"
        );
        // Gradients and Hessian-vector products against finite differences, not candle's
        // conv2d: its backward pass fails on strided shapes whose rows do not divide evenly
        // (shape mismatch in add, [2, 2, 9, 10] vs [2, 2, 9, 9] for the second shape here).
        let target = common::normal(&mut rng, expected.dims());
        let objective = move |p: &ParamSet, x: &Tensor| -> metalearn::Result<Tensor> {
            let y = ops::conv2d(x, p.get("w")?, stride, padding)?;
            // Nonlinear, so that the Hessian is not zero.
            Ok(y.tanh()?.sub(&target)?.sqr()?.sum_all()?)
        };
        let point = Point::new(&params, &x);
        check_gradient(&format!("{s:?}"), &objective, &point)?;
        common::check_hessian_vector_product(&format!("{s:?}"), &objective, &point, 40 + i as u64)?;
        // Task-batched: three tasks, each with its own images and kernels.
        let xs = common::normal(&mut rng, &[3, n, s.channels, h, w]);
        let ks = common::normal(&mut rng, &[3, s.filters, s.channels, s.kernel, s.kernel]);
        let batched = ops::conv2d(&xs, &ks, stride, padding)?;
        for t in 0..3 {
            let one = xs.get(t)?.conv2d(&ks.get(t)?, padding, stride, 1, 1)?;
            let diff = max_difference(&values(&batched.get(t)?), &values(&one));
            ensure!(
                diff < 1e-12 * scale_of(&values(&one)),
                "{s:?}: task {t} differs by {diff:e}"
            );
        }
    }
    // Shapes that cannot be convolved are errors, not panics.
    let x = Tensor::zeros((1, 2, 3, 3), DType::F64, &Device::Cpu)?;
    for (kernels, stride) in [((4, 3, 2, 2), 1), ((4, 2, 5, 5), 1), ((4, 2, 2, 2), 0)] {
        let k = Tensor::zeros(kernels, DType::F64, &Device::Cpu)?;
        ensure!(
            ops::conv2d(&x, &k, stride, 0).is_err(),
            "{kernels:?} stride {stride} accepted"
        );
    }
    Ok(())
}

#[test]
fn row_kernels_match_candle_operations() -> Result<()> {
    for (i, s) in SHAPES.iter().enumerate() {
        let mut rng = common::rng(600 + i as u64);
        let (n, h, w, c) = (s.batch, s.size, s.size + 2, s.channels + 1);
        let nchw = common::normal(&mut rng, &[n, c, h, w]);
        let rows = nchw
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((n * h * w, c))?;
        // Max-pooling.
        let g = PoolGeometry {
            images: n,
            height: h,
            width: w,
            channels: c,
            size: s.pool,
        };
        let pooled = max_pool_rows(&rows, g)?;
        let expected = ops::max_pool(&nchw, s.pool)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        ensure!(
            values(&pooled) == values(&expected),
            "{s:?}: max-pool values differ"
        );
        // Moments per channel.
        let (mean, var) = channel_moments(&rows)?;
        let expected_mean = rows.mean_keepdim(0)?;
        let expected_var = rows.broadcast_sub(&expected_mean)?.sqr()?.mean_keepdim(0)?;
        ensure!(
            max_difference(&values(&mean), &values(&expected_mean)) < 1e-12,
            "{s:?}: means differ"
        );
        ensure!(
            max_difference(&values(&var), &values(&expected_var)) < 1e-12,
            "{s:?}: variances differ"
        );
        // Grouped moments (a leading task dimension).
        let grouped = rows.reshape((n, h * w, c))?;
        let (gm, _) = channel_moments(&grouped)?;
        let expected = grouped.mean_keepdim(1)?;
        ensure!(
            max_difference(&values(&gm), &values(&expected)) < 1e-12,
            "{s:?}: grouped means differ"
        );
        let _ = D::Minus1;
    }
    Ok(())
}

#[test]
fn conv4_in_f32_matches_the_reference() -> Result<()> {
    metalearn::runtime::init();
    let arch = Architecture::conv4([1, 28, 28], 16, Some(5))?;
    let net = Network::build(&arch)?;
    let params = net.init_params(3, &Device::Cpu, DType::F32)?;
    let x = common::normal(&mut common::rng(7), &[10, 1, 28, 28]).to_dtype(DType::F32)?;
    let reference = values(&forward_on(Path::Reference, &net, &params, &x, None, None)?);
    for path in [Path::Composed, Path::Fused] {
        let out = values(&forward_on(path, &net, &params, &x, None, None)?);
        let diff = max_difference(&out, &reference);
        ensure!(
            diff < 1e-4 * scale_of(&reference),
            "{path:?}: f32 outputs differ by {diff:e}"
        );
    }
    Ok(())
}

/// The inference kernel (Winograd convolution, affine map, 2×2 max-pooling and ReLU in one
/// pass) against patch rows times the weight, then the same steps one at a time: odd and
/// non-square images whose pooling leaves a row or column over, tiles overhanging the output,
/// scales of both signs; f64 to rounding and f32.
#[test]
fn inference_block_matches_convolution_then_pooling() -> Result<()> {
    // (images, height, width, channels, filters, padding)
    let cases = [
        (2, 7, 9, 4, 5, 1),
        (3, 14, 14, 8, 16, 1),
        (1, 5, 4, 6, 3, 0),
        (2, 3, 3, 5, 8, 1),
        (2, 6, 5, 4, 7, 2),
    ];
    for (i, &(images, height, width, channels, filters, padding)) in cases.iter().enumerate() {
        let g = ConvGeometry {
            images,
            height,
            width,
            channels,
            kernel: 3,
            stride: 1,
            padding,
        };
        let mut rng = common::rng(950 + i as u64);
        let x = common::normal(&mut rng, &[images * height * width, channels]);
        let kernels = common::normal(&mut rng, &[filters, channels, 3, 3]);
        let w = kernels.apply_op1(PatchOrderWeight)?;
        let params = common::normal(&mut rng, &[2, filters]);
        let (oh, ow) = (g.out_height(), g.out_width());
        let (ph, pw) = (oh / 2, ow / 2);
        // The reference: convolution, then z = y·a + b, the window's maximum, ReLU.
        let y = values(&im2col_rows(&x, g)?.matmul(&w)?);
        let p = values(&params);
        let (a, b) = p.split_at(filters);
        let mut expected = vec![0.0; images * ph * pw * filters];
        for image in 0..images {
            for py in 0..ph {
                for px in 0..pw {
                    for f in 0..filters {
                        let z = |dy: usize, dx: usize| {
                            let at = ((image * oh + 2 * py + dy) * ow + 2 * px + dx) * filters + f;
                            y[at] * a[f] + b[f]
                        };
                        let best = z(0, 0).max(z(0, 1)).max(z(1, 0)).max(z(1, 1));
                        expected[((image * ph + py) * pw + px) * filters + f] = best.max(0.0);
                    }
                }
            }
        }
        for dtype in [DType::F64, DType::F32] {
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            let out = x.to_dtype(dtype)?.apply_op3(
                &kernels.to_dtype(dtype)?,
                &params.to_dtype(dtype)?,
                InferenceBlock(g),
            )?;
            ensure!(
                out.dims() == [images * ph * pw, filters],
                "case {i}: shape {:?}",
                out.dims()
            );
            let diff = max_difference(&values(&out), &expected);
            ensure!(
                diff <= tolerance * scale_of(&expected),
                "case {i} {g:?} {dtype:?}: pooled outputs differ by {diff:e}"
            );
        }
    }
    // Parameters that are not [a; b] for every filter are an error naming the kernel.
    let g = ConvGeometry {
        images: 1,
        height: 4,
        width: 4,
        channels: 4,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let x = Tensor::zeros((16, 4), DType::F64, &Device::Cpu)?;
    let w = Tensor::zeros((3, 4, 3, 3), DType::F64, &Device::Cpu)?;
    let params = Tensor::zeros((3, 3), DType::F64, &Device::Cpu)?;
    let err = x
        .apply_op3(&w, &params, InferenceBlock(g))
        .expect_err("three rows of parameters");
    ensure!(err.to_string().contains("inference_block"), "{err}");
    Ok(())
}

/// Conv-4 in inference (running statistics, parameters without gradient) takes the inference
/// kernel for its Winograd blocks; its embeddings equal the reference path's, in f64 and f32.
#[test]
fn conv4_inference_matches_the_reference() -> Result<()> {
    metalearn::runtime::init();
    for (size, width) in [(28, 16), (21, 12)] {
        let arch = Architecture::conv4([1, size, size], width, None)?;
        let net = Network::build(&arch)?;
        for dtype in [DType::F64, DType::F32] {
            let tolerance = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            let params = net.init_params(5, &Device::Cpu, dtype)?.detach();
            let running = running_stats(&net, 6).map(|_, t| Ok(t.to_dtype(dtype)?))?;
            let x = common::normal(&mut common::rng(8), &[6, 1, size, size]).to_dtype(dtype)?;
            let reference = values(&forward_on(
                Path::Reference,
                &net,
                &params,
                &x,
                Some(&running),
                None,
            )?);
            let out = values(&forward_on(
                Path::Fused,
                &net,
                &params,
                &x,
                Some(&running),
                None,
            )?);
            let diff = max_difference(&out, &reference);
            ensure!(
                diff < tolerance * scale_of(&reference),
                "{size}x{size} width {width} {dtype:?}: embeddings differ by {diff:e}"
            );
        }
    }
    Ok(())
}

// ---- transformer encoder, first-order training kernels ----------------------------------------

/// A tiny BERT-style encoder with two blocks (and LoRA adapters when `lora_rank > 0`).
fn text_encoder(
    seq: usize,
    lora_rank: usize,
    pooling: metalearn::nn::architecture::Pooling,
) -> Network {
    Network::build(&common::tiny_encoder_arch(seq, 2, pooling, lora_rank)).expect("valid encoder")
}

/// Token ids of four sentences padded to 7 (one of a single token, one without padding).
fn padded_ids(dtype: DType) -> Tensor {
    Tensor::from_vec(
        vec![
            2.0f64, 5.0, 7.0, 3.0, 0.0, 0.0, 0.0, //
            4.0, 9.0, 10.0, 1.0, 6.0, 8.0, 12.0, //
            3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, //
            11.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0,
        ],
        (4, 7),
        &Device::Cpu,
    )
    .and_then(|t| t.to_dtype(dtype))
    .expect("ids")
}

/// Cross-entropy of the encoder on [`padded_ids`]; the point's input is ignored (token ids
/// get no gradient). The fused path trains with first-order kernels.
fn text_objective<'a>(
    path: Path,
    net: &'a Network,
    ids: &'a Tensor,
) -> impl Fn(&ParamSet, &Tensor) -> metalearn::Result<Tensor> + 'a {
    move |params, _| {
        let target = Tensor::from_vec(vec![0u32, 2, 1, 2], 4, &Device::Cpu)?
            .to_dtype(params.tensors()[0].dtype())?;
        let out = forward_on(path, net, params, ids, None, None)?;
        Loss::CategoricalCrossEntropy.compute(&out, &target)
    }
}

/// Checks that two objectives have the same gradient at `point` to f64 rounding; returns the
/// first's.
fn same_gradients(
    label: &str,
    fused: &common::Objective,
    reference: &common::Objective,
    point: &Point,
) -> Result<Vec<f64>> {
    let (ga, gb) = (
        autodiff_gradient(fused, point),
        autodiff_gradient(reference, point),
    );
    let diff = max_difference(&ga, &gb);
    ensure!(
        diff < 1e-10 * scale_of(&gb),
        "{label}: gradients differ from the reference by {diff:e}"
    );
    Ok(ga)
}

/// The encoder's first-order training kernels (affine layers, attention, layer norm, GELU)
/// against the reference path in f64: the loss and every parameter's gradient, with padding,
/// LoRA adapters and each pooling; and against finite differences.
#[test]
fn transformer_training_kernels_match_the_reference_and_finite_differences() -> Result<()> {
    use metalearn::nn::architecture::Pooling;
    metalearn::runtime::init();
    let ids = padded_ids(DType::F64);
    let dummy = Tensor::zeros(1, DType::F64, &Device::Cpu)?;
    for (i, (lora, pooling)) in [(0, Pooling::Mean), (2, Pooling::Cls), (0, Pooling::Max)]
        .into_iter()
        .enumerate()
    {
        let label = format!("encoder, LoRA rank {lora}, {pooling:?} pooling");
        let net = text_encoder(7, lora, pooling);
        let params = common::generic_params(&net, 60 + i as u64);
        let point = Point::new(&params, &dummy);
        let fused = text_objective(Path::Fused, &net, &ids);
        let reference = text_objective(Path::Reference, &net, &ids);
        let (a, b) = (
            values(&fused(&params, &dummy)?),
            values(&reference(&params, &dummy)?),
        );
        same_outputs(&format!("{label}: loss"), &a, &b)?;
        let ga = same_gradients(&label, &fused, &reference, &point)?;
        ensure!(
            ga.iter().filter(|g| g.abs() > 1e-8).count() > ga.len() / 2,
            "{label}: most gradients are zero, the comparison would prove little"
        );
        check_gradient(&label, &fused, &point)?;
    }
    Ok(())
}

/// The same kernels on activations that need a gradient and have no padding (a block on
/// continuous input): the input's gradient too.
#[test]
fn transformer_training_kernels_give_the_input_gradient() -> Result<()> {
    metalearn::runtime::init();
    let mut a = Architecture::new(&[5, 8]);
    a.push(Layer::TransformerBlock {
        heads: 4,
        intermediate: 10,
        eps: 1e-5,
        lora_rank: 0,
        lora_alpha: 16.0,
    });
    a.push(Layer::SequencePool {
        mode: metalearn::nn::architecture::Pooling::Mean,
    });
    a.push(Layer::dense(3));
    let net = Network::build(&a)?;
    let params = common::generic_params(&net, 70);
    let x = common::normal(&mut common::rng(71), &[3, 5, 8]);
    let target = common::normal(&mut common::rng(72), &[3, 3]);
    let point = Point::new(&params, &x);
    let fused = objective(Path::Fused, &net, &target, None);
    let reference = objective(Path::Reference, &net, &target, None);
    same_gradients("block on continuous input", &fused, &reference, &point)?;
    check_gradient("block on continuous input, fused", &fused, &point)?;
    Ok(())
}

/// In f32 (the fast `exp` and `erf` of the kernels), loss and gradients stay within f32
/// rounding of the reference.
#[test]
fn transformer_training_kernels_in_f32_match_the_reference() -> Result<()> {
    use metalearn::nn::architecture::Pooling;
    metalearn::runtime::init();
    let net = text_encoder(7, 0, Pooling::Mean);
    let params = common::generic_params(&net, 80).map(|_, t| Ok(t.to_dtype(DType::F32)?))?;
    let ids = padded_ids(DType::F32);
    let dummy = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    let gradients = |path: Path| -> Result<(f64, Vec<f64>)> {
        let vars: Vec<candle_core::Var> = params
            .tensors()
            .iter()
            .map(candle_core::Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let live = ParamSet::from_vars(params.names(), &vars)?;
        let loss = text_objective(path, &net, &ids)(&live, &dummy)?;
        let grads = loss.backward()?;
        let mut flat = Vec::new();
        for v in &vars {
            flat.extend(values(
                grads.get(v).expect("every parameter has a gradient"),
            ));
        }
        Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, flat))
    };
    let (loss_a, ga) = gradients(Path::Fused)?;
    let (loss_b, gb) = gradients(Path::Reference)?;
    ensure!(
        (loss_a - loss_b).abs() < 1e-5,
        "f32 loss {loss_a} vs {loss_b}"
    );
    let diff = max_difference(&ga, &gb);
    ensure!(
        diff < 1e-4 * scale_of(&gb),
        "f32 gradients differ from the reference by {diff:e}"
    );
    Ok(())
}

/// The depthwise-convolution kernel (first-order forward passes on the CPU) against the
/// reference path's shifted slices: outputs and the gradients of parameters and input, with
/// symmetric and TensorFlow padding, strides 1 and 2, kernels 3 and 5; and its gradients
/// against finite differences.
#[test]
fn depthwise_kernel_matches_the_reference_and_finite_differences() -> Result<()> {
    metalearn::runtime::init();
    for (i, (size, kernel, stride, same)) in [
        (7, 3, 1, false),
        (8, 3, 2, true),
        (9, 5, 2, true),
        (6, 5, 1, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut arch = Architecture::new(&[4, size, size]);
        arch.push(Layer::Conv2d {
            filters: 4,
            kernel_size: kernel,
            stride,
            padding: if same { 0 } else { kernel / 2 },
            groups: 4,
            bias: true,
            same_padding: same,
        });
        arch.push(Layer::tanh());
        arch.push(Layer::Flatten);
        arch.push(Layer::dense(3));
        let net = Network::build(&arch)?;
        let seed = 900 + i as u64;
        let params = common::generic_params(&net, seed);
        let x = common::normal(&mut common::rng(seed + 1), &[2, 4, size, size]);
        let target = common::normal(&mut common::rng(seed + 2), &[2, 3]);
        let objective = |kernels: bool| {
            let net = &net;
            let target = &target;
            move |params: &ParamSet, x: &Tensor| {
                with_kernels(kernels, || {
                    let mut ctx = ForwardCtx::train().first_order();
                    let out = net.forward(params, x, &mut ctx)?;
                    Loss::Mse.compute(&out, target)
                })
            }
        };
        let point = Point::new(&params, &x);
        let fast = autodiff_gradient(&objective(true), &point);
        let reference = autodiff_gradient(&objective(false), &point);
        let label = format!("depthwise k{kernel} s{stride} on {size}x{size}, same {same}");
        let diff = max_difference(&fast, &reference);
        ensure!(
            diff <= 1e-10 * scale_of(&reference).max(1.0),
            "{label}: gradients differ by {diff}"
        );
        check_gradient(&label, &objective(true), &point)?;
    }
    Ok(())
}
