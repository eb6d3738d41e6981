//! Gradients of every layer and loss, in f64, against central finite differences.
//!
//! Each case is a small network around the layer under test, with parameters on both sides of it
//! where that makes the check stronger. Two checks run per case:
//!
//! - first order: candle's gradient of the loss with respect to every parameter *and* the input;
//! - second order (what second-order MAML relies on): with `v` a fixed random direction over
//!   (parameters, input), `s = ⟨∇loss, v⟩` is built from candle's differentiable gradient and
//!   differentiated again; the result, the Hessian-vector product `H v`, is compared with central
//!   differences of `s`.
//!
//! Test points avoid the places where ReLU and max are not differentiable (checked explicitly).

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;

use common::{check_gradient, check_hessian_vector_product, Point};
use metalearn::nn::ops;
use metalearn::{Architecture, ForwardCtx, Layer, Loss, Network, ParamSet};

/// How the forward pass runs in a case.
#[derive(Clone)]
enum RunMode {
    /// Training mode: batch statistics, no dropout.
    Train,
    /// Training mode with dropout masks drawn from a generator seeded with this value at every
    /// forward pass, so that every evaluation (and finite difference) sees the same mask.
    TrainWithDropout(u64),
    /// Inference mode with these batch-norm running statistics.
    Eval(ParamSet),
}

fn forward(net: &Network, params: &ParamSet, x: &Tensor, mode: &RunMode) -> Tensor {
    let out = match mode {
        RunMode::Train => net.forward(params, x, &mut ForwardCtx::train()),
        RunMode::TrainWithDropout(seed) => {
            let mut rng: ChaCha8Rng = common::rng(*seed);
            let mut ctx = ForwardCtx::train();
            ctx.rng = Some(&mut rng);
            net.forward(params, x, &mut ctx)
        }
        RunMode::Eval(stats) => net.forward(params, x, &mut ForwardCtx::eval(Some(stats))),
    };
    out.expect("forward pass runs")
}

/// One gradient-check case: a network, its (generic) parameters, an input batch, a loss and
/// its targets.
struct Case {
    label: String,
    net: Network,
    params: ParamSet,
    x: Tensor,
    loss: Loss,
    target: Tensor,
    mode: RunMode,
}

impl Case {
    /// A case whose input is `[batch, input_shape...]` standard-normal values and whose target
    /// suits `loss` (`outputs` values per example for MSE, 0/1 for BCE, class ids for CCE).
    fn new(label: &str, arch: Architecture, batch: usize, loss: Loss, seed: u64) -> Self {
        let net = Network::build(&arch).expect("valid architecture");
        let params = common::generic_params(&net, seed);
        let mut rng = common::rng(seed + 1000);
        let mut shape = vec![batch];
        shape.extend(&arch.input_shape);
        let x = common::normal(&mut rng, &shape);
        let outputs: usize = net.output_shape().iter().product();
        let target = match loss {
            Loss::Mse => common::uniform(&mut rng, &[batch, outputs], -1.0, 1.0),
            Loss::BinaryCrossEntropy | Loss::BinaryCrossEntropyWithLogits => {
                common::class_ids(&mut rng, batch * outputs, 2)
                    .reshape((batch, outputs))
                    .expect("reshape")
            }
            Loss::CategoricalCrossEntropy => common::class_ids(&mut rng, batch, outputs),
        };
        Self {
            label: label.to_string(),
            net,
            params,
            x,
            loss,
            target,
            mode: RunMode::Train,
        }
    }

    fn with_mode(mut self, mode: RunMode) -> Self {
        self.mode = mode;
        self
    }

    /// The activation after the first `layers` layers at the case's point.
    fn activation_after(&self, layers: usize) -> Tensor {
        let mut ctx = ForwardCtx::train();
        self.net
            .forward_layers(&self.params, &self.x, &mut ctx, layers)
            .expect("forward")
    }

    fn objective(&self) -> impl Fn(&ParamSet, &Tensor) -> metalearn::Result<Tensor> + '_ {
        move |params, x| {
            let out = forward(&self.net, params, x, &self.mode);
            self.loss.compute(&out, &self.target)
        }
    }

    /// First- and second-order checks; returns the two worst relative errors.
    fn check(&self) -> Result<(f64, f64)> {
        metalearn::runtime::init();
        let f = self.objective();
        let point = Point::new(&self.params, &self.x);
        let first = check_gradient(&self.label, &f, &point)?;
        let second = check_hessian_vector_product(&self.label, &f, &point, 99)?;
        Ok((first, second))
    }
}

fn arch(input: &[usize], layers: &[Layer]) -> Architecture {
    let mut arch = Architecture::new(input);
    for layer in layers {
        arch.push(layer.clone());
    }
    arch
}

fn conv(filters: usize, kernel_size: usize, stride: usize, padding: usize) -> Layer {
    Layer::Conv2d {
        filters,
        kernel_size,
        stride,
        padding,
        groups: 1,
        bias: true,
        same_padding: false,
    }
}

/// A bias-free convolution with TensorFlow's SAME padding and `groups` channel groups.
fn same_conv(filters: usize, kernel_size: usize, stride: usize, groups: usize) -> Layer {
    Layer::Conv2d {
        filters,
        kernel_size,
        stride,
        padding: 0,
        groups,
        bias: false,
        same_padding: true,
    }
}

/// Smallest |value| of a tensor: how far a ReLU input is from the kink at 0.
fn min_abs(t: &Tensor) -> f64 {
    common::values(t)
        .into_iter()
        .map(f64::abs)
        .fold(f64::INFINITY, f64::min)
}

/// Smallest gap between the largest and the second-largest value of any `size` x `size`
/// max-pool window of a `[n, c, h, w]` tensor: how far the point is from a tie. Windows whose
/// maximum is exactly 0 are skipped: after a ReLU they are all zeros and get no gradient
/// either way.
fn min_pool_gap(t: &Tensor, size: usize) -> f64 {
    let (n, c, h, w) = t.dims4().expect("4-D");
    let v = common::values(t);
    let mut gap = f64::INFINITY;
    for plane in 0..n * c {
        for oy in 0..h / size {
            for ox in 0..w / size {
                let mut window: Vec<f64> = (0..size * size)
                    .map(|k| {
                        let (y, x) = (oy * size + k / size, ox * size + k % size);
                        v[plane * h * w + y * w + x]
                    })
                    .collect();
                window.sort_by(|a, b| b.total_cmp(a));
                if window[0] != 0.0 {
                    gap = gap.min(window[0] - window[1]);
                }
            }
        }
    }
    gap
}

fn run(case: Case) -> Result<()> {
    let (first, second) = case.check()?;
    eprintln!(
        "{}: worst relative error {first:.1e} (first order), {second:.1e} (second order)",
        case.label
    );
    Ok(())
}

// ---- dense and losses ------------------------------------------------------------------------

#[test]
fn dense_with_mse() -> Result<()> {
    run(Case::new(
        "dense → dense, mse",
        arch(&[3], &[Layer::dense(4), Layer::dense(2)]),
        5,
        Loss::Mse,
        1,
    ))
}

#[test]
fn binary_cross_entropy_after_sigmoid() -> Result<()> {
    let case = Case::new(
        "dense → tanh → dense → sigmoid, bce",
        arch(
            &[3],
            &[
                Layer::dense(4),
                Layer::tanh(),
                Layer::dense(1),
                Layer::sigmoid(),
            ],
        ),
        6,
        Loss::BinaryCrossEntropy,
        2,
    );
    // The loss clips probabilities to [1e-7, 1 - 1e-7]: the point must be inside.
    let p = common::values(&case.activation_after(4));
    ensure!(p.iter().all(|&p| p > 1e-3 && p < 1.0 - 1e-3), "{p:?}");
    run(case)
}

#[test]
fn binary_cross_entropy_with_logits() -> Result<()> {
    run(Case::new(
        "dense → tanh → dense, bce with logits",
        arch(&[3], &[Layer::dense(4), Layer::tanh(), Layer::dense(2)]),
        6,
        Loss::BinaryCrossEntropyWithLogits,
        3,
    ))
}

#[test]
fn categorical_cross_entropy_log_softmax() -> Result<()> {
    run(Case::new(
        "dense → tanh → dense, categorical cross-entropy",
        arch(&[3], &[Layer::dense(5), Layer::tanh(), Layer::dense(4)]),
        7,
        Loss::CategoricalCrossEntropy,
        4,
    ))
}

#[test]
fn log_softmax_matches_its_definition_for_large_logits() -> Result<()> {
    // The max shift must keep large logits finite and leave the value unchanged.
    let x = Tensor::new(&[[1000f64, 999.0, 990.0], [-3.0, 0.5, 2.0]], &Device::Cpu)?;
    let got = common::values(&ops::log_softmax(&x)?);
    let rows = [[1000f64, 999.0, 990.0], [-3.0, 0.5, 2.0]];
    for (r, row) in rows.iter().enumerate() {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        for (c, v) in row.iter().enumerate() {
            let want = v - lse;
            ensure!(
                (got[r * 3 + c] - want).abs() < 1e-12,
                "log_softmax[{r}][{c}] = {}, want {want}",
                got[r * 3 + c]
            );
        }
    }
    Ok(())
}

// ---- activations -----------------------------------------------------------------------------

#[test]
fn relu() -> Result<()> {
    let case = Case::new(
        "dense → relu → dense, mse",
        arch(&[3], &[Layer::dense(6), Layer::relu(), Layer::dense(2)]),
        5,
        Loss::Mse,
        5,
    );
    let margin = min_abs(&case.activation_after(1));
    ensure!(margin > 1e-3, "a ReLU input is {margin} from the kink");
    run(case)
}

#[test]
fn sigmoid() -> Result<()> {
    run(Case::new(
        "dense → sigmoid → dense, mse",
        arch(&[3], &[Layer::dense(5), Layer::sigmoid(), Layer::dense(2)]),
        5,
        Loss::Mse,
        6,
    ))
}

#[test]
fn tanh() -> Result<()> {
    run(Case::new(
        "dense → tanh → dense, mse",
        arch(&[3], &[Layer::dense(5), Layer::tanh(), Layer::dense(2)]),
        5,
        Loss::Mse,
        7,
    ))
}

#[test]
fn softmax() -> Result<()> {
    run(Case::new(
        "dense → softmax → dense, mse",
        arch(&[3], &[Layer::dense(4), Layer::softmax(), Layer::dense(2)]),
        5,
        Loss::Mse,
        8,
    ))
}

#[test]
fn softmax_output_with_mse() -> Result<()> {
    run(Case::new(
        "dense → softmax, mse",
        arch(&[3], &[Layer::dense(4), Layer::softmax()]),
        5,
        Loss::Mse,
        9,
    ))
}

#[test]
fn sigmoid_is_stable_and_exact() -> Result<()> {
    let x = Tensor::new(&[-800f64, -20.0, -1.0, 0.0, 0.5, 20.0, 800.0], &Device::Cpu)?;
    let got = common::values(&ops::sigmoid(&x)?);
    for (v, g) in common::values(&x).iter().zip(got) {
        let want = 1.0 / (1.0 + (-v).exp());
        ensure!(
            g.is_finite() && (g - want).abs() < 1e-15,
            "sigmoid({v}) = {g}, want {want}"
        );
    }
    Ok(())
}

// ---- convolution -----------------------------------------------------------------------------

fn conv_case(kernel: usize, stride: usize, padding: usize, seed: u64) -> Case {
    Case::new(
        &format!("conv k{kernel} s{stride} p{padding} on 7x7 → tanh → flatten → dense, mse"),
        arch(
            &[2, 7, 7],
            &[
                conv(3, kernel, stride, padding),
                Layer::tanh(),
                Layer::Flatten,
                Layer::dense(2),
            ],
        ),
        2,
        Loss::Mse,
        seed,
    )
}

#[test]
fn conv2d_padding_0_stride_1() -> Result<()> {
    run(conv_case(3, 1, 0, 10))
}

#[test]
fn conv2d_padding_1_stride_1() -> Result<()> {
    run(conv_case(3, 1, 1, 11))
}

#[test]
fn conv2d_padding_0_stride_2() -> Result<()> {
    run(conv_case(3, 2, 0, 12))
}

#[test]
fn conv2d_padding_1_stride_2() -> Result<()> {
    run(conv_case(3, 2, 1, 13))
}

#[test]
fn conv2d_even_kernel_stride_2_leaves_a_row_unused() -> Result<()> {
    // (7 - 2) / 2 + 1 = 3 outputs cover rows 0..6: row 6 gets no gradient.
    run(conv_case(2, 2, 0, 14))
}

#[test]
fn conv2d_directly_into_loss() -> Result<()> {
    run(Case::new(
        "conv k3 s1 p1 → flatten, mse",
        arch(&[1, 5, 5], &[conv(2, 3, 1, 1), Layer::Flatten]),
        2,
        Loss::Mse,
        15,
    ))
}

#[test]
fn depthwise_conv_with_asymmetric_same_padding() -> Result<()> {
    // 7x7 with a 3x3 kernel at stride 2: 4x4 out, padding 1 before and 1 after; on 8x8 the
    // padding is 0 before and 1 after (the asymmetric case of EfficientNet's stride-2 blocks).
    for (size, seed) in [(7, 16), (8, 17)] {
        run(Case::new(
            &format!("depthwise conv k3 s2 SAME on {size}x{size} → tanh → flatten → dense, mse"),
            arch(
                &[3, size, size],
                &[
                    same_conv(3, 3, 2, 3),
                    Layer::tanh(),
                    Layer::Flatten,
                    Layer::dense(2),
                ],
            ),
            2,
            Loss::Mse,
            seed,
        ))?;
    }
    Ok(())
}

#[test]
fn grouped_conv_without_bias() -> Result<()> {
    run(Case::new(
        "conv k3 s1 SAME, 2 groups, no bias → tanh → flatten → dense, mse",
        arch(
            &[4, 5, 5],
            &[
                same_conv(6, 3, 1, 2),
                Layer::tanh(),
                Layer::Flatten,
                Layer::dense(2),
            ],
        ),
        2,
        Loss::Mse,
        18,
    ))
}

#[test]
fn same_padding_matches_tensorflow() {
    // (side, kernel, stride) -> (before, after), from TensorFlow's definition.
    let cases = [
        ((224, 3, 2), (0, 1)),
        ((112, 5, 2), (1, 2)),
        ((7, 3, 2), (1, 1)),
        ((14, 5, 1), (2, 2)),
        ((1, 3, 2), (1, 1)),
    ];
    for ((side, kernel, stride), want) in cases {
        assert_eq!(
            ops::same_padding(side, kernel, stride),
            want,
            "side {side}, kernel {kernel}, stride {stride}"
        );
    }
}

#[test]
fn depthwise_conv_equals_candle_conv2d_with_groups() -> Result<()> {
    let device = Device::Cpu;
    let mut rng = common::rng(19);
    let x = common::normal(&mut rng, &[2, 6, 9, 9]);
    for (groups, out) in [(6, 6), (3, 6), (2, 4), (6, 12)] {
        let w = common::normal(&mut rng, &[out, 6 / groups, 3, 3]);
        for stride in [1, 2] {
            let ours = ops::conv2d_grouped(&x, &w, stride, [1; 4], groups)?;
            let theirs = x.conv2d(&w, 1, stride, 1, groups)?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            ensure!(
                diff < 1e-12,
                "groups {groups}, stride {stride}: differs by {diff}"
            );
        }
    }
    let _ = device;
    Ok(())
}

// ---- activations of mobile networks, pooling and skip connections ---------------------------

/// Smallest distance of a tensor's values from 0 and 6, the kinks of ReLU6, and from -3 and 3,
/// those of hard-swish.
fn min_kink_distance(t: &Tensor, kinks: &[f64]) -> f64 {
    common::values(t)
        .into_iter()
        .flat_map(|v| kinks.iter().map(move |k| (v - k).abs()))
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn relu6_silu_and_hard_swish() -> Result<()> {
    for (layer, kinks, seed) in [
        (
            Layer::activation(metalearn::Activation::Relu6),
            vec![0.0, 6.0],
            20,
        ),
        (Layer::activation(metalearn::Activation::Silu), vec![], 21),
        (
            Layer::activation(metalearn::Activation::HardSwish),
            vec![-3.0, 3.0],
            22,
        ),
    ] {
        // The dense layer's scale puts inputs on both sides of every kink.
        let case = Case::new(
            &format!("dense → {} → dense, mse", layer.kind()),
            arch(&[3], &[Layer::dense(8), layer.clone(), Layer::dense(2)]),
            6,
            Loss::Mse,
            seed,
        );
        let mut params = case.params.clone();
        let w = params.get("dense_1.weight")?.affine(4.0, 0.0)?;
        params.replace("dense_1.weight", w)?;
        let case = Case { params, ..case };
        if !kinks.is_empty() {
            let margin = min_kink_distance(&case.activation_after(1), &kinks);
            ensure!(margin > 1e-3, "an input is {margin} from a kink");
        }
        run(case)?;
    }
    Ok(())
}

#[test]
fn relu6_values() -> Result<()> {
    let x = Tensor::new(&[-2.0f64, 0.5, 5.0, 7.0], &Device::Cpu)?;
    let y = ops::relu6(&x)?.to_vec1::<f64>()?;
    ensure!(y == vec![0.0, 0.5, 5.0, 6.0], "relu6 gave {y:?}");
    let h = ops::hard_swish(&x)?.to_vec1::<f64>()?;
    let want = [-2.0 * 1.0 / 6.0, 0.5 * 3.5 / 6.0, 5.0, 7.0];
    for (a, b) in h.iter().zip(want) {
        ensure!((a - b).abs() < 1e-12, "hard-swish gave {h:?}");
    }
    Ok(())
}

#[test]
fn global_average_pooling() -> Result<()> {
    run(Case::new(
        "conv k3 p1 → global average pool → dense, mse",
        arch(
            &[2, 5, 4],
            &[conv(3, 3, 1, 1), Layer::GlobalAvgPool, Layer::dense(2)],
        ),
        3,
        Loss::Mse,
        23,
    ))
}

/// An inverted-residual block (MobileNetV2, EfficientNet-Lite): expand 1x1 → batch norm →
/// ReLU6 → depthwise 3x3 → batch norm → ReLU6 → project 1x1 → batch norm → add the block's
/// input; then pooling and a dense head.
fn inverted_residual() -> Architecture {
    let mut arch = Architecture::new(&[4, 5, 5]);
    arch.push_named("stem", conv(4, 3, 1, 1)).expect("name");
    for layer in [
        same_conv(8, 1, 1, 1),
        Layer::batch_norm(),
        Layer::activation(metalearn::Activation::Relu6),
        same_conv(8, 3, 1, 8),
        Layer::batch_norm(),
        Layer::activation(metalearn::Activation::Relu6),
        same_conv(4, 1, 1, 1),
        Layer::batch_norm(),
        Layer::Add {
            from: "stem".into(),
        },
        Layer::GlobalAvgPool,
        Layer::dense(2),
    ] {
        arch.push(layer);
    }
    arch
}

#[test]
fn inverted_residual_block_with_skip_connection() -> Result<()> {
    let case = Case::new(
        "inverted residual block, mse",
        inverted_residual(),
        3,
        Loss::Mse,
        27,
    );
    let margin = min_kink_distance(&case.activation_after(3), &[0.0, 6.0])
        .min(min_kink_distance(&case.activation_after(6), &[0.0, 6.0]));
    ensure!(margin > 1e-3, "a ReLU6 input is {margin} from a kink");
    run(case)
}

#[test]
fn skip_connection_adds_the_named_output() -> Result<()> {
    // With the block's last batch norm scaled to zero, the block passes its input through.
    let net = Network::build(&inverted_residual())?;
    let mut params = common::generic_params(&net, 25);
    let bn = "batch_norm_3";
    params.replace(
        &format!("{bn}.gamma"),
        params.get(&format!("{bn}.gamma"))?.zeros_like()?,
    )?;
    params.replace(
        &format!("{bn}.beta"),
        params.get(&format!("{bn}.beta"))?.zeros_like()?,
    )?;
    let x = common::normal(&mut common::rng(26), &[2, 4, 5, 5]);
    let mut ctx = ForwardCtx::train();
    let stem = net.forward_layers(&params, &x, &mut ctx, 1)?;
    let after_add = net.forward_layers(&params, &x, &mut ctx, 10)?;
    let diff = (stem - after_add)?.abs()?.max_all()?.to_scalar::<f64>()?;
    ensure!(
        diff < 1e-12,
        "the skip connection changed its input by {diff}"
    );
    // A skip connection whose source lies before the range run is an error, not a wrong sum.
    let h = net.forward_layers(&params, &x, &mut ctx, 8)?;
    let err = net
        .forward_range(&params, &h, &mut ctx, 8, 10, false)
        .expect_err("source not computed");
    ensure!(err.to_string().contains("stem"), "{err}");
    Ok(())
}

#[test]
fn skip_connection_shapes_are_checked() {
    let mut arch = Architecture::new(&[2, 4, 4]);
    arch.push_named("a", conv(3, 3, 1, 1)).expect("name");
    arch.push(Layer::Add {
        from: "input".into(),
    });
    let err = Network::build(&arch).expect_err("shape mismatch");
    assert!(err.to_string().contains("[2, 4, 4]"), "{err}");
    let mut arch = Architecture::new(&[2, 4, 4]);
    arch.push(Layer::Add {
        from: "later".into(),
    });
    let err = Network::build(&arch).expect_err("unknown source");
    assert!(err.to_string().contains("later"), "{err}");
}

// ---- batch normalisation ---------------------------------------------------------------------

#[test]
fn batch_norm_over_features_train_mode() -> Result<()> {
    run(Case::new(
        "dense → batch-norm (features) → tanh → dense, mse",
        arch(
            &[4],
            &[
                Layer::dense(5),
                Layer::batch_norm(),
                Layer::tanh(),
                Layer::dense(2),
            ],
        ),
        6,
        Loss::Mse,
        20,
    ))
}

#[test]
fn batch_norm_over_channels_train_mode() -> Result<()> {
    run(Case::new(
        "conv → batch-norm (channels) → tanh → flatten → dense, mse",
        arch(
            &[2, 5, 5],
            &[
                conv(3, 3, 1, 1),
                Layer::batch_norm(),
                Layer::tanh(),
                Layer::Flatten,
                Layer::dense(2),
            ],
        ),
        3,
        Loss::Mse,
        21,
    ))
}

#[test]
fn batch_norm_first_layer_gradient_through_batch_statistics() -> Result<()> {
    // The input feeds the batch mean and variance directly: its gradient has the full
    // (non-diagonal) batch-norm Jacobian.
    run(Case::new(
        "batch-norm (features) → dense, mse",
        arch(&[3], &[Layer::batch_norm(), Layer::dense(2)]),
        5,
        Loss::Mse,
        22,
    ))
}

#[test]
fn batch_norm_eval_mode_uses_running_statistics() -> Result<()> {
    let arch = arch(
        &[2, 4, 4],
        &[
            conv(3, 3, 1, 1),
            Layer::batch_norm(),
            Layer::tanh(),
            Layer::Flatten,
            Layer::dense(2),
        ],
    );
    let net = Network::build(&arch)?;
    let mut rng = common::rng(23);
    let stats = ParamSet::from_pairs([
        (
            "batch_norm_1.running_mean".to_string(),
            common::uniform(&mut rng, &[3], -0.5, 0.5),
        ),
        (
            "batch_norm_1.running_var".to_string(),
            common::uniform(&mut rng, &[3], 0.5, 2.0),
        ),
    ])?;
    ensure!(
        stats.names()
            == net
                .buffer_specs()
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
    );
    let case = Case::new(
        "conv → batch-norm (eval) → tanh → dense, mse",
        arch,
        3,
        Loss::Mse,
        23,
    )
    .with_mode(RunMode::Eval(stats.clone()));
    // In eval mode the output of one example must not depend on the others.
    let full = forward(&case.net, &case.params, &case.x, &case.mode);
    let first = forward(
        &case.net,
        &case.params,
        &case.x.narrow(0, 0, 1)?,
        &case.mode,
    );
    let diff = full
        .narrow(0, 0, 1)?
        .sub(&first)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    ensure!(
        diff < 1e-12,
        "eval-mode output depends on the batch ({diff})"
    );
    run(case)
}

// ---- pooling, flatten, dropout ---------------------------------------------------------------

#[test]
fn max_pool_2_on_odd_input_floors() -> Result<()> {
    let case = Case::new(
        "conv → max-pool 2 on 7x7 (→ 3x3) → flatten → dense, mse",
        arch(
            &[2, 7, 7],
            &[
                conv(3, 3, 1, 1),
                Layer::max_pool2d(2),
                Layer::Flatten,
                Layer::dense(2),
            ],
        ),
        2,
        Loss::Mse,
        30,
    );
    ensure!(case.net.layer_shapes()[1] == vec![3, 3, 3]);
    let gap = min_pool_gap(&case.activation_after(1), 2);
    ensure!(
        gap > 1e-3,
        "two values of a pooling window are only {gap} apart"
    );
    run(case)
}

#[test]
fn max_pool_3_on_odd_input() -> Result<()> {
    let case = Case::new(
        "conv → tanh → max-pool 3 on 7x7 (→ 2x2) → flatten → dense, mse",
        arch(
            &[1, 7, 7],
            &[
                conv(2, 3, 1, 1),
                Layer::tanh(),
                Layer::max_pool2d(3),
                Layer::Flatten,
                Layer::dense(2),
            ],
        ),
        2,
        Loss::Mse,
        31,
    );
    ensure!(case.net.layer_shapes()[2] == vec![2, 2, 2]);
    let gap = min_pool_gap(&case.activation_after(2), 3);
    ensure!(
        gap > 1e-4,
        "two values of a pooling window are only {gap} apart"
    );
    run(case)
}

#[test]
fn max_pool_on_the_input() -> Result<()> {
    // Input gradient of the pooling itself: exactly one 1 per window, zeros elsewhere.
    let case = Case::new(
        "max-pool 2 on 5x5 → flatten → dense, mse",
        arch(
            &[1, 5, 5],
            &[Layer::max_pool2d(2), Layer::Flatten, Layer::dense(2)],
        ),
        2,
        Loss::Mse,
        32,
    );
    ensure!(min_pool_gap(&case.x, 2) > 1e-3);
    run(case)
}

#[test]
fn flatten() -> Result<()> {
    run(Case::new(
        "flatten → dense → tanh → dense, mse",
        arch(
            &[2, 3, 3],
            &[
                Layer::Flatten,
                Layer::dense(3),
                Layer::tanh(),
                Layer::dense(2),
            ],
        ),
        3,
        Loss::Mse,
        40,
    ))
}

#[test]
fn dropout_with_a_fixed_mask() -> Result<()> {
    let layers = [
        Layer::dense(8),
        Layer::dropout(0.5),
        Layer::tanh(),
        Layer::dense(2),
    ];
    let case = Case::new(
        "dense → dropout 0.5 → tanh → dense, mse",
        arch(&[3], &layers),
        4,
        Loss::Mse,
        50,
    )
    .with_mode(RunMode::TrainWithDropout(7));
    // The mask must actually drop some values and scale the others by 1 / (1 - rate).
    let before = common::values(&case.activation_after(1));
    let mut rng = common::rng(7);
    let mut ctx = ForwardCtx::train();
    ctx.rng = Some(&mut rng);
    let after = common::values(
        &case
            .net
            .forward_layers(&case.params, &case.x, &mut ctx, 2)?,
    );
    let dropped = after.iter().filter(|&&a| a == 0.0).count();
    ensure!(
        dropped > 0 && dropped < after.len(),
        "{dropped} of {} dropped",
        after.len()
    );
    for (b, a) in before.iter().zip(&after) {
        ensure!(
            *a == 0.0 || (a - 2.0 * b).abs() < 1e-12,
            "kept value {b} became {a}"
        );
    }
    run(case)
}

// ---- a whole few-shot backbone block ---------------------------------------------------------

#[test]
fn conv_block_with_cross_entropy() -> Result<()> {
    let case = Case::new(
        "conv → batch-norm → relu → max-pool → flatten → dense, categorical cross-entropy",
        arch(
            &[1, 6, 6],
            &[
                conv(2, 3, 1, 1),
                Layer::batch_norm(),
                Layer::relu(),
                Layer::max_pool2d(2),
                Layer::Flatten,
                Layer::dense(3),
            ],
        ),
        3,
        Loss::CategoricalCrossEntropy,
        60,
    );
    ensure!(
        min_abs(&case.activation_after(2)) > 1e-3,
        "a ReLU input is at the kink"
    );
    ensure!(
        min_pool_gap(&case.activation_after(3), 2) > 1e-4,
        "a pooling window has a tie"
    );
    run(case)
}

#[test]
fn f64_model_keeps_f64() -> Result<()> {
    let model = metalearn::Sequential::from_architecture_on(
        arch(&[3], &[Layer::dense(2)]),
        0,
        &Device::Cpu,
        DType::F64,
    )?;
    ensure!(model
        .params()
        .tensors()
        .iter()
        .all(|t| t.dtype() == DType::F64));
    let out = model.predict(&Tensor::zeros((2, 3), DType::F64, &Device::Cpu)?, 2)?;
    ensure!(out.dtype() == DType::F64);
    Ok(())
}

// ---- the checks have teeth -------------------------------------------------------------------

/// tanh as a custom op whose backward is right in value but computed outside the graph: the
/// failure mode of a fused kernel on a second-order path.
struct DetachedTanh;

impl candle_core::CustomOp1 for DetachedTanh {
    fn name(&self) -> &'static str {
        "detached-tanh"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F64(values) = storage else {
            candle_core::bail!("detached-tanh is only written for f64")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("detached-tanh needs a contiguous input")
        };
        let out: Vec<f64> = values[start..end].iter().map(|v| v.tanh()).collect();
        Ok((candle_core::CpuStorage::F64(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let slope = res.detach().sqr()?.affine(-1.0, 1.0)?;
        Ok(Some(grad_res.mul(&slope)?))
    }
}

#[test]
fn second_order_check_catches_a_backward_outside_the_graph() -> Result<()> {
    metalearn::runtime::init();
    let case = Case::new(
        "dense → tanh → dense, mse",
        arch(&[3], &[Layer::dense(5), Layer::tanh(), Layer::dense(2)]),
        4,
        Loss::Mse,
        71,
    );
    let detached = |params: &ParamSet, x: &Tensor| -> metalearn::Result<Tensor> {
        let mut ctx = ForwardCtx::train();
        let h = case.net.forward_layers(params, x, &mut ctx, 1)?;
        let h = h.contiguous()?.apply_op1(DetachedTanh)?;
        let out = case.net.forward_range(params, &h, &mut ctx, 2, 3, false)?;
        case.loss.compute(&out, &case.target)
    };
    let point = Point::new(&case.params, &case.x);
    let (a, b) = (
        common::value(&case.objective(), &point),
        common::value(&detached, &point),
    );
    ensure!((a - b).abs() < 1e-12, "{a} vs {b}");
    check_gradient("detached tanh", &detached, &point)?;
    ensure!(
        check_hessian_vector_product("detached tanh", &detached, &point, 5).is_err(),
        "a backward computed outside the graph passed the second-order check"
    );
    Ok(())
}

#[test]
fn gradient_check_catches_candles_max_pool2d_scaling() -> Result<()> {
    // candle 0.11.1's `max_pool2d` backward multiplies the gradient by the *fraction* of maxima
    // in each window (1/4 for a unique maximum of a 2x2 window) instead of dividing by their
    // count, so its gradient is k² times too small. The project pools with `ops::max_pool`.
    metalearn::runtime::init();
    let case = Case::new(
        "conv → max-pool 2 → flatten → dense, mse",
        arch(
            &[1, 6, 6],
            &[
                conv(2, 3, 1, 1),
                Layer::max_pool2d(2),
                Layer::Flatten,
                Layer::dense(2),
            ],
        ),
        2,
        Loss::Mse,
        70,
    );
    ensure!(min_pool_gap(&case.activation_after(1), 2) > 1e-4);
    let with_pool = |pool: fn(&Tensor) -> metalearn::Result<Tensor>| {
        let case = &case;
        move |params: &ParamSet, x: &Tensor| -> metalearn::Result<Tensor> {
            let mut ctx = ForwardCtx::train();
            let h = pool(&case.net.forward_layers(params, x, &mut ctx, 1)?)?;
            let out = case.net.forward_range(params, &h, &mut ctx, 2, 4, false)?;
            case.loss.compute(&out, &case.target)
        }
    };
    let ours = with_pool(|h| ops::max_pool(h, 2));
    let candles = with_pool(|h| Ok(h.max_pool2d(2)?));
    let point = Point::new(&case.params, &case.x);
    let (a, b) = (
        common::value(&ours, &point),
        common::value(&candles, &point),
    );
    ensure!((a - b).abs() < 1e-12, "same values expected: {a} vs {b}");
    check_gradient("ops::max_pool", &ours, &point)?;
    check_hessian_vector_product("ops::max_pool", &ours, &point, 5)?;
    ensure!(
        check_gradient("candle max_pool2d", &candles, &point).is_err(),
        "candle's max_pool2d gradient is now right: ops::max_pool could be reconsidered"
    );
    Ok(())
}

// ---- text encoder layers ----------------------------------------------------------------------

/// A tiny BERT-style encoder with one block.
fn encoder_arch(
    seq: usize,
    pooling: metalearn::nn::architecture::Pooling,
    lora_rank: usize,
) -> Architecture {
    common::tiny_encoder_arch(seq, 1, pooling, lora_rank)
}

/// Checks an encoder case. Token ids are not differentiable: the objective reads fixed ids
/// (with padding at the end of two rows) and ignores its input argument, so the input's
/// gradient is zero on both sides.
fn run_encoder(label: &str, arch: Architecture, seed: u64) -> Result<()> {
    metalearn::runtime::init();
    let net = Network::build(&arch)?;
    let params = common::generic_params(&net, seed);
    let ids = Tensor::from_vec(
        vec![
            2.0f64, 5.0, 7.0, 3.0, 0.0, 0.0, //
            4.0, 9.0, 10.0, 1.0, 6.0, 8.0, //
            3.0, 3.0, 0.0, 0.0, 0.0, 0.0,
        ],
        (3, 6),
        &Device::Cpu,
    )?;
    let target = Tensor::from_vec(vec![0.0f64, 2.0, 1.0], 3, &Device::Cpu)?;
    let f = |p: &ParamSet, _x: &Tensor| {
        let out = net.forward(p, &ids, &mut ForwardCtx::train())?;
        Loss::CategoricalCrossEntropy.compute(&out, &target)
    };
    let dummy = Tensor::zeros(1, DType::F64, &Device::Cpu)?;
    let point = Point::new(&params, &dummy);
    let first = check_gradient(label, &f, &point)?;
    let second = check_hessian_vector_product(label, &f, &point, 7)?;
    eprintln!(
        "{label}: worst relative error {first:.1e} (first order), {second:.1e} (second order)"
    );
    Ok(())
}

#[test]
fn token_embedding_transformer_block_mean_pooling() -> Result<()> {
    use metalearn::nn::architecture::Pooling;
    run_encoder(
        "encoder, mean pooling",
        encoder_arch(6, Pooling::Mean, 0),
        21,
    )
}

#[test]
fn transformer_block_with_lora_and_cls_pooling() -> Result<()> {
    use metalearn::nn::architecture::Pooling;
    run_encoder(
        "encoder with LoRA, CLS pooling",
        encoder_arch(6, Pooling::Cls, 2),
        22,
    )
}

#[test]
fn transformer_max_pooling() -> Result<()> {
    use metalearn::nn::architecture::Pooling;
    run_encoder("encoder, max pooling", encoder_arch(6, Pooling::Max, 0), 23)
}

#[test]
fn transformer_block_on_continuous_input() -> Result<()> {
    // Without a token embedding there is no padding: the block sees every position, and the
    // gradient with respect to the input is checked too.
    run(Case::new(
        "transformer block → mean pool → dense, mse",
        arch(
            &[3, 4],
            &[
                Layer::TransformerBlock {
                    heads: 2,
                    intermediate: 6,
                    eps: 1e-5,
                    lora_rank: 0,
                    lora_alpha: 16.0,
                },
                Layer::SequencePool {
                    mode: metalearn::nn::architecture::Pooling::Mean,
                },
                Layer::dense(2),
            ],
        ),
        2,
        Loss::Mse,
        24,
    ))
}

#[test]
fn padding_does_not_change_an_encoding() -> Result<()> {
    // The same tokens padded to two lengths give the same pooled output, and the fused GELU of
    // the first-order path agrees with the exact one.
    use metalearn::nn::architecture::Pooling;
    metalearn::runtime::init();
    let net = Network::build(&encoder_arch(7, Pooling::Mean, 0))?;
    let params = common::generic_params(&net, 5);
    let short = Tensor::from_vec(vec![2.0f64, 5.0, 7.0], (1, 3), &Device::Cpu)?;
    let long = Tensor::from_vec(
        vec![2.0f64, 5.0, 7.0, 0.0, 0.0, 0.0, 0.0],
        (1, 7),
        &Device::Cpu,
    )?;
    let a = common::values(&net.forward(&params, &short, &mut ForwardCtx::train())?);
    let b = common::values(&net.forward(&params, &long, &mut ForwardCtx::train())?);
    let c =
        common::values(&net.forward(&params, &long, &mut ForwardCtx::eval(None).first_order())?);
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        ensure!(
            (x - y).abs() < 1e-12,
            "padding changed the output: {x} vs {y}"
        );
        ensure!((x - z).abs() < 1e-9, "fused GELU differs: {x} vs {z}");
    }
    Ok(())
}
