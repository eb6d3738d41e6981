//! The MAML meta-gradient of small multilayer perceptrons (dense layers, ReLU or linear
//! activations) under mean squared error, in plain loops: the sinusoid-regression workload.
//!
//! For such models a meta-iteration is a few MFLOP, and the cost of a tensor library is its
//! per-op bookkeeping (graph nodes, gradient stores, allocations), not the arithmetic. This
//! kernel computes exactly what the reference path computes, task by task:
//!
//! - the inner loop `θ_{k+1} = θ_k − α ∇L_s(θ_k)` on the support set;
//! - the query gradient `v = ∇L_q(θ_N)` and loss;
//! - second order: the backward recursion `v ← v − α H_s(θ_k) v` for `k = N−1, …, 0`, with
//!   exact Hessian-vector products by Pearlmutter's R-operator (forward-mode derivative of the
//!   backward pass). ReLU's second derivative is zero almost everywhere, as the reference path's
//!   masks assume too.
//!
//! The meta-gradient is the mean of the tasks' `v`. Tasks run in parallel on rayon's pool and
//! are summed in task order, so the result does not depend on the thread count.

use candle_core::{DType, Device, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::Result;
use crate::meta::algorithm::{MetaParams, MetaStep};
use crate::nn::architecture::{Activation, Layer};
use crate::nn::network::Network;
use crate::tasks::{Task, TaskKind};

/// One dense layer of the flattened parameter vector.
#[derive(Clone, Debug)]
struct Dense {
    inputs: usize,
    units: usize,
    relu: bool,
    /// Offsets of the weight `[inputs, units]` and bias `[units]` in the flat vector.
    weight: usize,
    bias: usize,
}

/// The network as a chain of dense layers over one flat parameter vector.
#[derive(Clone, Debug)]
struct Mlp {
    layers: Vec<Dense>,
    /// Per meta-parameter (in `MetaParams::tensors` order): offset, length and shape.
    params: Vec<(usize, usize, Vec<usize>)>,
    len: usize,
}

impl Mlp {
    /// The chain behind `net`, or `None` when it has other layers or activations.
    fn of(net: &Network, meta: &MetaParams) -> Option<Self> {
        let names = meta.weights.names();
        let tensors = meta.weights.tensors();
        let mut offsets = std::collections::HashMap::new();
        let mut params = Vec::with_capacity(names.len());
        let mut len = 0;
        for (name, t) in names.iter().zip(tensors) {
            offsets.insert(name.as_str(), (len, t.dims().to_vec()));
            params.push((len, t.elem_count(), t.dims().to_vec()));
            len += t.elem_count();
        }
        let mut layers: Vec<Dense> = Vec::new();
        let mut activated = true;
        for named in &net.architecture().layers {
            match &named.layer {
                Layer::Dense { units } => {
                    let (weight, dims) = offsets.get(format!("{}.weight", named.name).as_str())?;
                    let (bias, _) = offsets.get(format!("{}.bias", named.name).as_str())?;
                    let [inputs, out] = dims[..] else { return None };
                    if out != *units || layers.last().is_some_and(|l| l.units != inputs) {
                        return None;
                    }
                    layers.push(Dense {
                        inputs,
                        units: out,
                        relu: false,
                        weight: *weight,
                        bias: *bias,
                    });
                    activated = false;
                }
                Layer::Activation {
                    activation: Activation::Linear,
                } => {}
                Layer::Activation {
                    activation: Activation::Relu,
                } if !activated => {
                    layers.last_mut()?.relu = true;
                    activated = true;
                }
                _ => return None,
            }
        }
        // Every parameter must belong to a dense layer.
        let used = layers.len() * 2;
        (used == params.len() && !layers.is_empty()).then_some(Self {
            layers,
            params,
            len,
        })
    }

    fn outputs(&self) -> usize {
        self.layers.last().map_or(0, |l| l.units)
    }

    /// Layer outputs after activation for `rows` examples: `acts[0]` is the input, `acts[l + 1]`
    /// the output of layer `l`.
    #[inline(always)]
    fn forward<T: Real>(&self, theta: &[T], x: &[T], rows: usize) -> Vec<Vec<T>> {
        let mut acts = Vec::with_capacity(self.layers.len() + 1);
        acts.push(x.to_vec());
        for layer in &self.layers {
            let input = acts.last().expect("input pushed first");
            let mut out = layer.bias_rows(theta, rows);
            multiply_accumulate(
                [rows, layer.units, layer.inputs],
                (input, layer.inputs, 1),
                layer.weights(theta),
                &mut out,
            );
            if layer.relu {
                for v in out.iter_mut() {
                    if *v <= T::zero() {
                        *v = T::zero();
                    }
                }
            }
            acts.push(out);
        }
        acts
    }

    /// Mean squared error of the prediction and its gradient with respect to the prediction.
    fn loss<T: WithDType>(pred: &[T], y: &[T]) -> (f64, Vec<T>) {
        let n = pred.len().max(1) as f64;
        let scale = T::from_f64(2.0 / n);
        let mut loss = 0.0;
        let grad = pred
            .iter()
            .zip(y)
            .map(|(&p, &t)| {
                let e = p - t;
                loss += (e * e).to_f64();
                e * scale
            })
            .collect();
        (loss / n, grad)
    }

    /// Gradient of the loss whose derivative with respect to the prediction is `d_out`.
    #[inline(always)]
    fn backward<T: Real>(
        &self,
        transposes: &[Vec<T>],
        acts: &[Vec<T>],
        d_out: Vec<T>,
        rows: usize,
    ) -> Vec<T> {
        let mut grad = vec![T::zero(); self.len];
        let mut d = d_out;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            if layer.relu {
                mask_inactive(&mut d, &acts[l + 1]);
            }
            layer.accumulate_grad(&mut grad, &acts[l], &d, rows);
            if l > 0 {
                let mut next = vec![T::zero(); rows * layer.inputs];
                layer.back_through(&transposes[l], &d, rows, &mut next);
                d = next;
            }
        }
        grad
    }

    /// `H v`, the Hessian of the support loss at `theta` times `v` (R-operator).
    #[inline(always)]
    fn hessian_vector<T: Real>(
        &self,
        point: &PathPoint<T>,
        v: &[T],
        y: &[T],
        rows: usize,
    ) -> Vec<T> {
        let PathPoint {
            theta,
            transposes,
            acts,
        } = point;
        // R-forward: directional derivatives of every layer's output along v.
        let mut r_acts: Vec<Vec<T>> = Vec::with_capacity(self.layers.len() + 1);
        r_acts.push(Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let mut out = layer.bias_rows(v, rows);
            let shape = [rows, layer.units, layer.inputs];
            multiply_accumulate(
                shape,
                (&acts[l], layer.inputs, 1),
                layer.weights(v),
                &mut out,
            );
            // R{a} of the input is zero.
            if l > 0 {
                multiply_accumulate(
                    shape,
                    (&r_acts[l], layer.inputs, 1),
                    layer.weights(theta),
                    &mut out,
                );
            }
            if layer.relu {
                mask_inactive(&mut out, &acts[l + 1]);
            }
            r_acts.push(out);
        }
        let pred = acts.last().expect("output");
        let (_, mut d) = Self::loss(pred, y);
        let scale = T::from_f64(2.0 / pred.len().max(1) as f64);
        let mut r_d: Vec<T> = r_acts
            .last()
            .expect("output")
            .iter()
            .map(|&r| r * scale)
            .collect();
        // R-backward: the derivative of the backward pass along v.
        let mut hv = vec![T::zero(); self.len];
        for (l, layer) in self.layers.iter().enumerate().rev() {
            if layer.relu {
                mask_inactive(&mut d, &acts[l + 1]);
                mask_inactive(&mut r_d, &acts[l + 1]);
            }
            layer.accumulate_grad(&mut hv, &acts[l], &r_d, rows);
            if l > 0 {
                // The weight gradient's other term, R{a}ᵀ d.
                multiply_accumulate(
                    [layer.inputs, layer.units, rows],
                    (&r_acts[l], 1, layer.inputs),
                    &d,
                    layer.weights_mut(&mut hv),
                );
                let theta_t = &transposes[l];
                let mut next_r = vec![T::zero(); rows * layer.inputs];
                layer.back_through(theta_t, &r_d, rows, &mut next_r);
                layer.back_through(&layer.transposed(v), &d, rows, &mut next_r);
                let mut next_d = vec![T::zero(); rows * layer.inputs];
                layer.back_through(theta_t, &d, rows, &mut next_d);
                r_d = next_r;
                d = next_d;
            }
        }
        hv
    }

    /// The weights `theta`, their transposes and the layer outputs on `x`.
    fn path_point<T: Real>(&self, theta: Vec<T>, x: &[T], rows: usize) -> PathPoint<T> {
        let acts = self.forward(&theta, x, rows);
        PathPoint {
            transposes: self.transposes(&theta),
            theta,
            acts,
        }
    }

    /// Every layer's weight matrix transposed (empty for the first layer, whose input gradient
    /// is never needed).
    fn transposes<T: Real>(&self, theta: &[T]) -> Vec<Vec<T>> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                if l == 0 {
                    Vec::new()
                } else {
                    layer.transposed(theta)
                }
            })
            .collect()
    }

    /// One task's query loss and gradient of the query loss with respect to `theta` (through
    /// the inner loop when `second_order`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn task_meta_gradient<T: Real>(
        &self,
        theta: &[T],
        support: (&[T], &[T], usize),
        query: (&[T], &[T], usize),
        lr: T,
        steps: usize,
        second_order: bool,
    ) -> (f64, Vec<T>) {
        let (sx, sy, s_rows) = support;
        let (qx, qy, q_rows) = query;
        let mut path: Vec<PathPoint<T>> = Vec::with_capacity(steps);
        let mut current = theta.to_vec();
        for _ in 0..steps {
            let point = self.path_point(current, sx, s_rows);
            let (_, d) = Self::loss(point.acts.last().expect("output"), sy);
            let grad = self.backward(&point.transposes, &point.acts, d, s_rows);
            current = point
                .theta
                .iter()
                .zip(&grad)
                .map(|(&p, &g)| p - lr * g)
                .collect();
            path.push(point);
        }
        let fast = self.path_point(current, qx, q_rows);
        let (loss, d) = Self::loss(fast.acts.last().expect("output"), qy);
        let mut v = self.backward(&fast.transposes, &fast.acts, d, q_rows);
        if second_order {
            for point in path.iter().rev() {
                let hv = self.hessian_vector(point, &v, sy, s_rows);
                for (vi, h) in v.iter_mut().zip(&hv) {
                    *vi -= lr * *h;
                }
            }
        }
        (loss, v)
    }
}

/// A point of the inner loop: weights, their transposes, and the layer outputs on the support
/// set there (reused by the Hessian-vector product at that point).
struct PathPoint<T> {
    theta: Vec<T>,
    transposes: Vec<Vec<T>>,
    acts: Vec<Vec<T>>,
}

/// Floating-point types the kernel runs in, each with its small-matrix product.
pub trait Real: WithDType {
    /// `C += A · B` (see the free function `multiply_accumulate`).
    fn multiply_accumulate(
        shape: [usize; 3],
        a: (&[Self], usize, usize),
        b: &[Self],
        c: &mut [Self],
    ) {
        multiply_accumulate_plain(shape, a, b, c)
    }
}

impl Real for f64 {}

impl Real for f32 {
    fn multiply_accumulate(shape: [usize; 3], a: (&[f32], usize, usize), b: &[f32], c: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: both features were just detected on this CPU.
            return unsafe { avx2::multiply_accumulate(shape, a, b, c) };
        }
        multiply_accumulate_plain(shape, a, b, c)
    }
}

/// Zeroes `d` where the ReLU output `act` is zero (the unit was inactive).
#[inline(always)]
fn mask_inactive<T: Real>(d: &mut [T], act: &[T]) {
    for (g, &a) in d.iter_mut().zip(act) {
        if a <= T::zero() {
            *g = T::zero();
        }
    }
}

/// `C += A · B` for small matrices: `C` is `[m, n]` and `B` `[k, n]`, both row-major, and
/// element `(i, p)` of `A` is `a[i · row_stride + p · col_stride]` (so `A` may be a transpose).
fn multiply_accumulate<T: Real>(shape: [usize; 3], a: (&[T], usize, usize), b: &[T], c: &mut [T]) {
    let [m, n, k] = shape;
    let (a_values, row_stride, col_stride) = a;
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // The vector kernel reads without bounds checks: check every extreme index once here.
    assert!(
        (m - 1) * row_stride + (k - 1) * col_stride < a_values.len()
            && b.len() >= k * n
            && c.len() >= m * n,
        "multiply_accumulate: operands smaller than the shape {shape:?}"
    );
    T::multiply_accumulate(shape, a, b, c)
}

/// The portable product: each row of `C` gathers rows of `B` scaled by `A`'s entries.
fn multiply_accumulate_plain<T: WithDType>(
    [m, n, k]: [usize; 3],
    (a, row_stride, col_stride): (&[T], usize, usize),
    b: &[T],
    c: &mut [T],
) {
    for i in 0..m {
        let c_row = &mut c[i * n..(i + 1) * n];
        for p in 0..k {
            let scale = a[i * row_stride + p * col_stride];
            for (out, &value) in c_row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *out += scale * value;
            }
        }
    }
}

/// The f32 product with AVX2 and FMA intrinsics: blocks of 4 rows by 8 columns of `C` stay in
/// registers while `p` runs, so every loaded vector of `B` feeds 4 fused multiply-adds.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Lane masks for the last, partial block of 8 columns.
    fn tail_mask(width: usize) -> __m256i {
        let lanes: [i32; 8] = std::array::from_fn(|lane| if lane < width { -1 } else { 0 });
        // SAFETY: reading 8 i32 from an array of 8.
        unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA, and the operands must cover `shape` (checked by the
    /// caller).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn multiply_accumulate(
        [m, n, k]: [usize; 3],
        (a, row_stride, col_stride): (&[f32], usize, usize),
        b: &[f32],
        c: &mut [f32],
    ) {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        for j in (0..n).step_by(8) {
            let width = 8.min(n - j);
            let mask = tail_mask(width);
            let load = |ptr: *const f32| {
                if width == 8 {
                    _mm256_loadu_ps(ptr)
                } else {
                    _mm256_maskload_ps(ptr, mask)
                }
            };
            for i in (0..m).step_by(4) {
                let height = 4.min(m - i);
                // Rows past the end repeat the last row; their sums are discarded.
                let row = |r: usize| a.add((i + r).min(m - 1) * row_stride);
                let rows = [row(0), row(1), row(2), row(3)];
                let mut acc = [_mm256_setzero_ps(); 4];
                for p in 0..k {
                    let b_vec = load(b.add(p * n + j));
                    let offset = p * col_stride;
                    for (sum, &a_row) in acc.iter_mut().zip(&rows) {
                        let a_vec = _mm256_broadcast_ss(&*a_row.add(offset));
                        *sum = _mm256_fmadd_ps(a_vec, b_vec, *sum);
                    }
                }
                for (r, sum) in acc.iter().enumerate().take(height) {
                    let out = c.add((i + r) * n + j);
                    let total = _mm256_add_ps(load(out), *sum);
                    if width == 8 {
                        _mm256_storeu_ps(out, total);
                    } else {
                        _mm256_maskstore_ps(out, mask, total);
                    }
                }
            }
        }
    }
}

impl Dense {
    fn weights<'a, T>(&self, theta: &'a [T]) -> &'a [T] {
        &theta[self.weight..self.weight + self.inputs * self.units]
    }

    fn weights_mut<'a, T>(&self, theta: &'a mut [T]) -> &'a mut [T] {
        &mut theta[self.weight..self.weight + self.inputs * self.units]
    }

    /// The bias repeated for `rows` rows: the starting point of the layer's output.
    fn bias_rows<T: Real>(&self, theta: &[T], rows: usize) -> Vec<T> {
        theta[self.bias..self.bias + self.units].repeat(rows)
    }

    /// The weight matrix transposed to `[units, inputs]`.
    fn transposed<T: Real>(&self, theta: &[T]) -> Vec<T> {
        let w = self.weights(theta);
        let mut out = Vec::with_capacity(w.len());
        for j in 0..self.units {
            out.extend(w[j..].iter().step_by(self.units));
        }
        out
    }

    /// Adds `inputᵀ d` to the weight gradient and the column sums of `d` to the bias gradient.
    #[inline(always)]
    fn accumulate_grad<T: Real>(&self, grad: &mut [T], input: &[T], d: &[T], rows: usize) {
        multiply_accumulate(
            [self.inputs, self.units, rows],
            (input, 1, self.inputs),
            d,
            self.weights_mut(grad),
        );
        let bias = &mut grad[self.bias..self.bias + self.units];
        for d_row in d.chunks_exact(self.units) {
            for (b, &g) in bias.iter_mut().zip(d_row) {
                *b += g;
            }
        }
    }

    /// Adds `d Wᵀ` (the gradient with respect to the layer's input) to `out`, given `Wᵀ`.
    #[inline(always)]
    fn back_through<T: Real>(&self, weights_t: &[T], d: &[T], rows: usize, out: &mut [T]) {
        multiply_accumulate(
            [rows, self.inputs, self.units],
            (d, self.units, 1),
            weights_t,
            out,
        );
    }
}

/// The MAML (or first-order MAML) meta-step on `tasks`, or `None` when this kernel does not
/// apply: kernels switched off, not on the CPU, not regression, learned inner rates, layers
/// other than dense ones with ReLU or linear activations, or shapes it does not expect.
pub fn meta_step(
    net: &Network,
    meta: &MetaParams,
    tasks: &[Task],
    kind: TaskKind,
    inner_lr: f64,
    steps: usize,
    second_order: bool,
) -> Result<Option<MetaStep>> {
    if !crate::kernels::enabled() || kind != TaskKind::Regression || meta.inner_lrs.is_some() {
        return Ok(None);
    }
    let Some(first) = meta.weights.tensors().first() else {
        return Ok(None);
    };
    if !first.device().is_cpu() || tasks.is_empty() {
        return Ok(None);
    }
    let Some(mlp) = Mlp::of(net, meta) else {
        return Ok(None);
    };
    match first.dtype() {
        DType::F32 => run::<f32>(&mlp, meta, tasks, inner_lr, steps, second_order),
        DType::F64 => run::<f64>(&mlp, meta, tasks, inner_lr, steps, second_order),
        _ => Ok(None),
    }
}

/// Inputs and targets of a support or query set as flat vectors, with the row count.
type FlatSet<T> = (Vec<T>, Vec<T>, usize);

/// A task's support and query sets.
type TaskData<T> = (FlatSet<T>, FlatSet<T>);

fn task_data<T: WithDType>(mlp: &Mlp, task: &Task) -> Result<Option<TaskData<T>>> {
    let inputs = mlp.layers[0].inputs;
    let outputs = mlp.outputs();
    let flat = |(x, y): &(Tensor, Tensor)| -> Result<Option<FlatSet<T>>> {
        let rows = x.dims().first().copied().unwrap_or(0);
        if x.rank() != 2 || x.dim(1)? != inputs || y.elem_count() != rows * outputs {
            return Ok(None);
        }
        let x = x.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
        let y = y.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
        Ok(Some((x, y, rows)))
    };
    Ok(match (flat(&task.support)?, flat(&task.query)?) {
        (Some(s), Some(q)) if s.2 > 0 && q.2 > 0 => Some((s, q)),
        _ => None,
    })
}

fn run<T: Real>(
    mlp: &Mlp,
    meta: &MetaParams,
    tasks: &[Task],
    inner_lr: f64,
    steps: usize,
    second_order: bool,
) -> Result<Option<MetaStep>> {
    let mut theta = Vec::with_capacity(mlp.len);
    for t in meta.weights.tensors() {
        theta.extend(t.flatten_all()?.to_vec1::<T>()?);
    }
    let mut data = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task_data::<T>(mlp, task)? {
            Some(d) => data.push(d),
            None => return Ok(None),
        }
    }
    let lr = T::from_f64(inner_lr);
    let per_task: Vec<(f64, Vec<T>)> = data
        .par_iter()
        .map(|((sx, sy, sr), (qx, qy, qr))| {
            mlp.task_meta_gradient(
                &theta,
                (sx, sy, *sr),
                (qx, qy, *qr),
                lr,
                steps,
                second_order,
            )
        })
        .collect();
    let count = tasks.len() as f64;
    let loss = per_task.iter().map(|(l, _)| l).sum::<f64>() / count;
    if !loss.is_finite() {
        return Ok(Some(MetaStep {
            loss,
            grads: vec![None; mlp.params.len()],
            batch_stats: Vec::new(),
        }));
    }
    let mut sum = vec![0f64; mlp.len];
    for (_, g) in &per_task {
        for (s, v) in sum.iter_mut().zip(g) {
            *s += v.to_f64();
        }
    }
    let grads = mlp
        .params
        .iter()
        .map(|(offset, len, shape)| {
            let values: Vec<T> = sum[*offset..offset + len]
                .iter()
                .map(|&s| T::from_f64(s / count))
                .collect();
            Ok(Some(Tensor::from_vec(
                values,
                shape.as_slice(),
                &Device::Cpu,
            )?))
        })
        .collect::<Result<_>>()?;
    Ok(Some(MetaStep {
        loss,
        grads,
        batch_stats: Vec::new(),
    }))
}
