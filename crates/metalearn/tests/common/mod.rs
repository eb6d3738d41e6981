//! Utilities shared by the integration tests: seeded random tensors, f64 finite differences of a
//! scalar objective over (parameters, input), and bitwise comparison of parameter sets.
//!
//! Not every test binary uses every utility.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use metalearn::{Network, ParamSet};

pub mod http;
pub mod hub_server;
pub mod text_model;

/// A seeded random generator.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// An f64 tensor of `shape` with values uniform in `[lo, hi)`.
pub fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("shape matches values")
}

/// An f64 tensor of `shape` with standard normal values.
pub fn normal(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("shape matches values")
}

/// Class ids `0..classes` as an f64 tensor `[n]`, drawn at random.
pub fn class_ids(rng: &mut ChaCha8Rng, n: usize, classes: usize) -> Tensor {
    let values: Vec<f64> = (0..n).map(|_| rng.gen_range(0..classes) as f64).collect();
    Tensor::from_vec(values, n, &Device::Cpu).expect("1-D")
}

/// The network's initial f64 parameters plus a uniform offset in ±0.2, so that no bias is
/// exactly zero and no batch-norm scale exactly one (special points hide errors).
pub fn generic_params(net: &Network, seed: u64) -> ParamSet {
    let mut rng = rng(seed ^ 0x5eed);
    net.init_params(seed, &Device::Cpu, DType::F64)
        .expect("init")
        .map(|_, t| {
            let noise = uniform(&mut rng, t.dims(), -0.2, 0.2);
            Ok(t.add(&noise)?)
        })
        .expect("same shapes")
}

/// Every value of a tensor as f64, in row-major order.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .expect("readable tensor")
}

/// Whether two parameter sets hold the same names and bit-identical values.
pub fn bit_identical(a: &ParamSet, b: &ParamSet) -> bool {
    a.names() == b.names()
        && a.iter().all(|(name, t)| {
            let u = b.get(name).expect("same names");
            t.dims() == u.dims()
                && values(t)
                    .iter()
                    .zip(values(u))
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        })
}

/// A deep copy of a parameter set (fresh storage, detached), immune to later in-place updates
/// of the variables it was read from.
pub fn snapshot(set: &ParamSet) -> ParamSet {
    set.map(|_, t| Ok(t.detach().copy()?)).expect("copy")
}

// ---------------------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------------------

/// A scalar function of (parameters, input), differentiated with respect to both.
pub type Objective<'a> = dyn Fn(&ParamSet, &Tensor) -> metalearn::Result<Tensor> + 'a;

/// The point at which an objective is differentiated: named tensors, the parameters first and
/// the input (named `input`) last.
#[derive(Clone)]
pub struct Point {
    names: Vec<String>,
    tensors: Vec<Tensor>,
}

impl Point {
    /// Parameters and input, all converted to f64.
    pub fn new(params: &ParamSet, input: &Tensor) -> Self {
        let mut names: Vec<String> = params.names().to_vec();
        let mut tensors: Vec<Tensor> = params
            .tensors()
            .iter()
            .map(|t| t.to_dtype(DType::F64).expect("f64"))
            .collect();
        names.push("input".into());
        tensors.push(input.to_dtype(DType::F64).expect("f64"));
        Self { names, tensors }
    }

    /// Number of scalar values.
    pub fn len(&self) -> usize {
        self.tensors.iter().map(|t| t.elem_count()).sum()
    }

    /// All values, flattened in order.
    pub fn flat(&self) -> Vec<f64> {
        self.tensors.iter().flat_map(values).collect()
    }

    /// Which tensor (and offset inside it) the flat index `i` belongs to.
    pub fn locate(&self, mut i: usize) -> (String, usize) {
        for (name, t) in self.names.iter().zip(&self.tensors) {
            if i < t.elem_count() {
                return (name.clone(), i);
            }
            i -= t.elem_count();
        }
        ("<out of range>".into(), i)
    }

    /// The same names and shapes holding `flat` values.
    pub fn with_values(&self, flat: &[f64]) -> Self {
        let mut offset = 0;
        let tensors = self
            .tensors
            .iter()
            .map(|t| {
                let n = t.elem_count();
                let part = flat[offset..offset + n].to_vec();
                offset += n;
                Tensor::from_vec(part, t.dims(), &Device::Cpu).expect("same shape")
            })
            .collect();
        Self {
            names: self.names.clone(),
            tensors,
        }
    }

    fn split(&self, tensors: &[Tensor]) -> (ParamSet, Tensor) {
        let n = tensors.len() - 1;
        let params = ParamSet::from_pairs(
            self.names[..n]
                .iter()
                .cloned()
                .zip(tensors[..n].iter().cloned()),
        )
        .expect("unique names");
        (params, tensors[n].clone())
    }

    fn vars(&self) -> Vec<Var> {
        self.tensors
            .iter()
            .map(|t| Var::from_tensor(t).expect("var"))
            .collect()
    }

    fn var_tensors(vars: &[Var]) -> Vec<Tensor> {
        vars.iter().map(|v| v.as_tensor().clone()).collect()
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .expect("objective returns a scalar")
}

/// The objective's value at `point`.
pub fn value(f: &Objective, point: &Point) -> f64 {
    let (params, input) = point.split(&point.tensors);
    scalar(&f(&params, &input).expect("objective runs"))
}

/// Gradients (kept differentiable, as `Tensor`s on the graph) of the objective with respect to
/// every tensor of the point, taken on fresh variables; `None` where a tensor does not reach the
/// objective.
fn gradients_on(f: &Objective, point: &Point, vars: &[Var]) -> Vec<Option<Tensor>> {
    let (params, input) = point.split(&Point::var_tensors(vars));
    let loss = f(&params, &input).expect("objective runs");
    let grads = loss.backward().expect("backward");
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).cloned())
        .collect()
}

fn flat_or_zeros(grads: &[Option<Tensor>], point: &Point) -> Vec<f64> {
    grads
        .iter()
        .zip(&point.tensors)
        .flat_map(|(g, t)| match g {
            Some(g) => values(g),
            None => vec![0.0; t.elem_count()],
        })
        .collect()
}

/// candle's gradient of the objective at `point`, flattened like [`Point::flat`].
pub fn autodiff_gradient(f: &Objective, point: &Point) -> Vec<f64> {
    let vars = point.vars();
    flat_or_zeros(&gradients_on(f, point, &vars), point)
}

/// `s = Σ ⟨∇f, v⟩` built from candle's (differentiable) gradient, and candle's gradient of `s`:
/// the Hessian-vector product `H v`. `direction` is flattened like [`Point::flat`].
pub fn hessian_vector_product(f: &Objective, point: &Point, direction: &[f64]) -> (f64, Vec<f64>) {
    let vars = point.vars();
    let grads = gradients_on(f, point, &vars);
    let v = point.with_values(direction);
    let mut s: Option<Tensor> = None;
    for (g, vt) in grads.iter().zip(&v.tensors) {
        if let Some(g) = g {
            let term = g.mul(vt).and_then(|t| t.sum_all()).expect("dot");
            s = Some(match s {
                Some(acc) => acc.add(&term).expect("add"),
                None => term,
            });
        }
    }
    let s = s.expect("the objective depends on the point");
    let s_value = scalar(&s);
    let hv = s.backward().expect("second backward");
    let hv: Vec<Option<Tensor>> = vars
        .iter()
        .map(|v| hv.get(v.as_tensor()).cloned())
        .collect();
    (s_value, flat_or_zeros(&hv, point))
}

/// `s(point) = Σ ⟨∇f(point), v⟩`, evaluated with candle's first-order gradient only.
pub fn directional_derivative(f: &Objective, point: &Point, direction: &[f64]) -> f64 {
    autodiff_gradient(f, point)
        .iter()
        .zip(direction)
        .map(|(g, v)| g * v)
        .sum()
}

/// Central finite differences of a scalar function of the flat point.
pub fn central_differences(point: &Point, eps: f64, g: impl Fn(&Point) -> f64) -> Vec<f64> {
    let base = point.flat();
    (0..base.len())
        .map(|i| {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            (g(&point.with_values(&plus)) - g(&point.with_values(&minus))) / (2.0 * eps)
        })
        .collect()
}

/// Largest relative error between `analytic` and `numeric`, entry by entry, and where it occurs.
/// Entries smaller than `floor` times the largest numeric entry (and than `floor` itself) are
/// compared against that size instead of their own: central differences carry a rounding noise
/// of about 1e-16 |f| / eps that does not shrink with the entry.
pub fn worst_relative_error(
    point: &Point,
    analytic: &[f64],
    numeric: &[f64],
    floor: f64,
) -> (f64, String) {
    let largest = numeric.iter().fold(0.0f64, |m, n| m.max(n.abs()));
    let floor = floor.max(floor * largest);
    let mut worst = (0.0f64, String::new());
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs() / a.abs().max(n.abs()).max(floor);
        if err > worst.0 || !err.is_finite() {
            let (name, offset) = point.locate(i);
            worst = (
                err,
                format!("{name}[{offset}]: autodiff {a:e}, finite differences {n:e}"),
            );
        }
    }
    worst
}

/// Step of the central differences.
pub const FD_EPS: f64 = 1e-6;
/// Largest accepted relative error.
pub const FD_TOL: f64 = 1e-6;
/// Entries smaller than this fraction of the largest entry (and than this value) are compared
/// absolutely.
pub const FD_FLOOR: f64 = 1e-2;

/// Checks candle's first-order gradient of `f` at `point` against central differences.
pub fn check_gradient(label: &str, f: &Objective, point: &Point) -> Result<f64> {
    let analytic = autodiff_gradient(f, point);
    ensure!(
        analytic.iter().any(|g| g.abs() > 1e-6),
        "{label}: the gradient is identically zero, the check would prove nothing"
    );
    let numeric = central_differences(point, FD_EPS, |p| value(f, p));
    let (err, at) = worst_relative_error(point, &analytic, &numeric, FD_FLOOR);
    ensure!(
        err < FD_TOL,
        "{label}: first-order gradient off by relative error {err:e} at {at}"
    );
    Ok(err)
}

/// Checks candle's Hessian-vector product (backward through the backward pass) of `f` at
/// `point`, for a random direction, against central differences of the directional derivative.
pub fn check_hessian_vector_product(
    label: &str,
    f: &Objective,
    point: &Point,
    seed: u64,
) -> Result<f64> {
    let mut rng = rng(seed);
    let direction: Vec<f64> = (0..point.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let (s, analytic) = hessian_vector_product(f, point, &direction);
    let s_first_order = directional_derivative(f, point, &direction);
    ensure!(
        (s - s_first_order).abs() <= 1e-9 * s.abs().max(1.0),
        "{label}: the differentiable gradient ({s}) differs from the plain one ({s_first_order})"
    );
    ensure!(
        analytic.iter().any(|h| h.abs() > 1e-6),
        "{label}: the Hessian-vector product is identically zero, the check would prove nothing"
    );
    let numeric = central_differences(point, FD_EPS, |p| directional_derivative(f, p, &direction));
    let (err, at) = worst_relative_error(point, &analytic, &numeric, FD_FLOOR);
    ensure!(
        err < FD_TOL,
        "{label}: second-order (Hessian-vector product) off by relative error {err:e} at {at}"
    );
    Ok(err)
}

/// A tiny BERT-style classifier: token embedding (13 ids, width 8, 9 positions, pad id 0) →
/// `blocks` transformer blocks (2 heads, feed-forward 12, LoRA adapters of `lora_rank`) →
/// pooling → L2 normalisation → dense 3.
pub fn tiny_encoder_arch(
    seq: usize,
    blocks: usize,
    pooling: metalearn::nn::architecture::Pooling,
    lora_rank: usize,
) -> metalearn::Architecture {
    use metalearn::Layer;
    let mut a = metalearn::Architecture::new(&[seq]);
    a.push(Layer::TokenEmbedding {
        vocab_size: 13,
        hidden: 8,
        max_positions: 9,
        type_vocab_size: 2,
        pad_id: 0,
        eps: 1e-5,
    });
    for _ in 0..blocks {
        a.push(Layer::TransformerBlock {
            heads: 2,
            intermediate: 12,
            eps: 1e-5,
            lora_rank,
            lora_alpha: 4.0,
        });
    }
    a.push(Layer::SequencePool { mode: pooling });
    a.push(Layer::L2Normalize);
    a.push(Layer::dense(3));
    a
}
