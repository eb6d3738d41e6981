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

use candle_core::{DType, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::Result;
use crate::meta::algorithm::{MetaParams, MetaStep};
use crate::nn::architecture::{Activation, Layer};
use crate::nn::network::{ForwardCtx, Network};
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

/// The adapted layers of a network as a chain of dense layers over one flat parameter vector.
#[derive(Clone, Debug)]
struct Mlp {
    layers: Vec<Dense>,
    /// Per meta-parameter (in `MetaParams::tensors` order): offset, length and shape in the flat
    /// vector; `None` for a weight of a layer below the adapted ones.
    params: Vec<Option<(usize, usize, Vec<usize>)>>,
    len: usize,
}

/// A task's loss and the gradients the kernel computed for it.
struct TaskGradient<T> {
    loss: f64,
    /// With respect to the flat parameter vector of the adapted layers.
    theta: Vec<T>,
    /// With respect to the support and query inputs (`[rows, inputs]`, row-major); empty
    /// unless asked for.
    support_x: Vec<T>,
    query_x: Vec<T>,
}

impl Mlp {
    /// The chain of layers `from_layer..` of `net`, or `None` when it has other layers or
    /// activations. The flat vector holds the weights of those layers only.
    fn of(net: &Network, meta: &MetaParams, from_layer: usize) -> Option<Self> {
        let names = meta.weights.names();
        let tensors = meta.weights.tensors();
        let specs = net.param_specs();
        let mut offsets = std::collections::HashMap::new();
        let mut params = Vec::with_capacity(names.len());
        let mut len = 0;
        for (name, t) in names.iter().zip(tensors) {
            let layer = specs.iter().find(|s| &s.name == name)?.layer;
            if layer < from_layer {
                params.push(None);
                continue;
            }
            offsets.insert(name.as_str(), (len, t.dims().to_vec()));
            params.push(Some((len, t.elem_count(), t.dims().to_vec())));
            len += t.elem_count();
        }
        let mut layers: Vec<Dense> = Vec::new();
        let mut activated = true;
        for named in net.architecture().layers.get(from_layer..)? {
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
        // Every adapted parameter must belong to a dense layer.
        let used = layers.len() * 2;
        (used == params.iter().flatten().count() && !layers.is_empty()).then_some(Self {
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

    /// Gradient of the loss whose derivative with respect to the prediction is `d_out`; with
    /// `input_grad`, also adds the gradient with respect to the input there (`transposes[0]`
    /// must then be present).
    #[inline(always)]
    fn backward<T: Real>(
        &self,
        transposes: &[Vec<T>],
        acts: &[Vec<T>],
        d_out: Vec<T>,
        rows: usize,
        input_grad: Option<&mut [T]>,
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
        if let Some(out) = input_grad {
            self.layers[0].back_through(&transposes[0], &d, rows, out);
        }
        grad
    }

    /// `H v`, the Hessian of the support loss at `theta` times `v` (R-operator). With
    /// `input_grad`, also adds `R_v{∇ₓL}`, the derivative of the input gradient along `v` (which
    /// equals `(∂_x ∇_θ L)ᵀ v`, the mixed second derivative applied to `v`).
    #[inline(always)]
    fn hessian_vector<T: Real>(
        &self,
        point: &PathPoint<T>,
        v: &[T],
        y: &[T],
        rows: usize,
        input_grad: Option<&mut [T]>,
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
        if let Some(out) = input_grad {
            // ∂L/∂x = d W₀ᵀ, so R{∂L/∂x} = R{d} W₀ᵀ + d V₀ᵀ (V₀: v's part for W₀).
            let first = &self.layers[0];
            first.back_through(&transposes[0], &r_d, rows, out);
            first.back_through(&first.transposed(v), &d, rows, out);
        }
        hv
    }

    /// The weights `theta`, their transposes and the layer outputs on `x`; the first layer's
    /// transpose only with `first` (input gradients wanted).
    fn path_point<T: Real>(
        &self,
        theta: Vec<T>,
        x: &[T],
        rows: usize,
        first: bool,
    ) -> PathPoint<T> {
        let acts = self.forward(&theta, x, rows);
        PathPoint {
            transposes: self.transposes(&theta, first),
            theta,
            acts,
        }
    }

    /// Every layer's weight matrix transposed; the first layer's is empty unless `first`, as
    /// only input gradients need it.
    fn transposes<T: Real>(&self, theta: &[T], first: bool) -> Vec<Vec<T>> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                if l == 0 && !first {
                    Vec::new()
                } else {
                    layer.transposed(theta)
                }
            })
            .collect()
    }

    /// One task's query loss and gradient of the query loss with respect to `theta` (through
    /// the inner loop when `second_order`); with `input_grads`, also its gradients with respect
    /// to the support and query inputs.
    ///
    /// The support inputs reach the query loss through every inner gradient
    /// `g_k = ∇_θ L_s(θ_k, x_s)`, so their gradient is `−α Σ_k (∂_x g_k)ᵀ λ_{k+1}`, where
    /// `λ_{k+1}` is the gradient with respect to `θ_{k+1}`: exactly the `v` that the backward
    /// recursion holds when it reaches point `k`, and `(∂_x g_k)ᵀ v = R_v{∇ₓL_s(θ_k)}` comes out
    /// of the same R-operator pass as `H_k v`. First order detaches the `g_k`: zero.
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
        input_grads: bool,
    ) -> TaskGradient<T> {
        let (sx, sy, s_rows) = support;
        let (qx, qy, q_rows) = query;
        let inputs = self.layers[0].inputs;
        let mut path: Vec<PathPoint<T>> = Vec::with_capacity(steps);
        let mut current = theta.to_vec();
        let support_first = input_grads && second_order;
        for _ in 0..steps {
            let point = self.path_point(current, sx, s_rows, support_first);
            let (_, d) = Self::loss(point.acts.last().expect("output"), sy);
            let grad = self.backward(&point.transposes, &point.acts, d, s_rows, None);
            current = point
                .theta
                .iter()
                .zip(&grad)
                .map(|(&p, &g)| p - lr * g)
                .collect();
            path.push(point);
        }
        let fast = self.path_point(current, qx, q_rows, input_grads);
        let (loss, d) = Self::loss(fast.acts.last().expect("output"), qy);
        let mut query_x = vec![T::zero(); if input_grads { q_rows * inputs } else { 0 }];
        let mut v = self.backward(
            &fast.transposes,
            &fast.acts,
            d,
            q_rows,
            input_grads.then_some(query_x.as_mut_slice()),
        );
        let mut support_x = vec![T::zero(); if input_grads { s_rows * inputs } else { 0 }];
        if second_order {
            for point in path.iter().rev() {
                let hv = self.hessian_vector(
                    point,
                    &v,
                    sy,
                    s_rows,
                    input_grads.then_some(support_x.as_mut_slice()),
                );
                for (vi, h) in v.iter_mut().zip(&hv) {
                    *vi -= lr * *h;
                }
            }
            // The sum above holds Σ_k R{∇ₓL_s(θ_k)}; every term enters with −α.
            for g in support_x.iter_mut() {
                *g = T::zero() - lr * *g;
            }
        }
        TaskGradient {
            loss,
            theta: v,
            support_x,
            query_x,
        }
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

/// The f32 product with AVX2 and FMA intrinsics: tiles of up to 6 rows by 16 columns of `C`
/// stay in 12 registers while `p` runs, so every broadcast entry of `A` feeds 2 fused
/// multiply-adds and every loaded vector of `B` 6. (A fused multiply-add takes several cycles
/// and two can start per cycle: fewer independent sums leave the units idle.)
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Lane masks for a partial vector of `width` (< 8) columns.
    fn tail_mask(width: usize) -> __m256i {
        let lanes: [i32; 8] = std::array::from_fn(|lane| if lane < width { -1 } else { 0 });
        // SAFETY: reading 8 i32 from an array of 8.
        unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
    }

    /// Column vectors of one tile: their masks, and which are full (8 columns).
    #[derive(Clone, Copy)]
    struct Columns {
        mask: [__m256i; 2],
        full: [bool; 2],
    }

    /// `C[0..R, 0..8V] += A[rows] · B` for one tile: `rows[r]` points at the tile's row `r` of
    /// `A` (entries `col_stride` apart), `b` at column 0 of the tile in `B` (rows `n` apart) and
    /// `c` at the tile's corner in `C` (rows `n` apart).
    ///
    /// # Safety
    /// AVX2 and FMA; every pointer valid for the entries the tile reads or writes (lanes masked
    /// off are not touched).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const V: usize>(
        k: usize,
        rows: [*const f32; R],
        col_stride: usize,
        b: *const f32,
        n: usize,
        columns: Columns,
        c: *mut f32,
    ) {
        let Columns { mask, full } = columns;
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for p in 0..k {
            let mut b_vec = [_mm256_setzero_ps(); V];
            for (v, slot) in b_vec.iter_mut().enumerate() {
                let ptr = b.add(p * n + 8 * v);
                *slot = if full[v] {
                    _mm256_loadu_ps(ptr)
                } else {
                    _mm256_maskload_ps(ptr, mask[v])
                };
            }
            let offset = p * col_stride;
            for (sums, row) in acc.iter_mut().zip(&rows) {
                let a_vec = _mm256_broadcast_ss(&*row.add(offset));
                for (sum, &b_v) in sums.iter_mut().zip(&b_vec) {
                    *sum = _mm256_fmadd_ps(a_vec, b_v, *sum);
                }
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            for (v, sum) in sums.iter().enumerate() {
                let out = c.add(r * n + 8 * v);
                if full[v] {
                    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), *sum));
                } else {
                    let total = _mm256_add_ps(_mm256_maskload_ps(out, mask[v]), *sum);
                    _mm256_maskstore_ps(out, mask[v], total);
                }
            }
        }
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
        for j in (0..n).step_by(16) {
            let width = 16.min(n - j);
            let columns = Columns {
                mask: [tail_mask(width.min(8)), tail_mask(width.saturating_sub(8))],
                full: [width >= 8, width >= 16],
            };
            let mut i = 0;
            while i < m {
                let height = 6.min(m - i);
                let (b_j, c_ij) = (b.add(j), c.add(i * n + j));
                macro_rules! run {
                    ($rows:literal) => {{
                        let rows: [*const f32; $rows] =
                            std::array::from_fn(|r| a.add((i + r) * row_stride));
                        if width > 8 {
                            tile::<$rows, 2>(k, rows, col_stride, b_j, n, columns, c_ij)
                        } else {
                            tile::<$rows, 1>(k, rows, col_stride, b_j, n, columns, c_ij)
                        }
                    }};
                }
                match height {
                    6 => run!(6),
                    5 => run!(5),
                    4 => run!(4),
                    3 => run!(3),
                    2 => run!(2),
                    _ => run!(1),
                }
                i += height;
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

/// The dtype the kernel would run in, or `None` when it cannot run at all: kernels switched
/// off, not regression, learned inner rates, weights not on the CPU, or no tasks.
fn eligible(meta: &MetaParams, tasks: &[Task], kind: TaskKind) -> Option<DType> {
    if !crate::kernels::enabled() || kind != TaskKind::Regression || meta.inner_lrs.is_some() {
        return None;
    }
    let first = meta.weights.tensors().first()?;
    (first.device().is_cpu() && !tasks.is_empty()).then_some(first.dtype())
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
    let Some(dtype) = eligible(meta, tasks, kind) else {
        return Ok(None);
    };
    let Some(mlp) = Mlp::of(net, meta, 0) else {
        return Ok(None);
    };
    match dtype {
        DType::F32 => run::<f32>(&mlp, meta, tasks, inner_lr, steps, second_order),
        DType::F64 => run::<f64>(&mlp, meta, tasks, inner_lr, steps, second_order),
        _ => Ok(None),
    }
}

/// The MAML (or first-order MAML) meta-step when the inner loop adapts only the layers from
/// `from_layer` on (MeLU: the decision layers above shared feature embeddings), or `None` when
/// this kernel does not apply: as [`meta_step`] for the adapted layers, and the layers below
/// must each work on one example at a time (feature embeddings, dense layers, activations,
/// flatten; no batch normalisation).
///
/// candle computes the features below `from_layer` once, for the support and query rows of
/// every task in one forward pass. The kernel runs each task's inner loop and meta-gradient on
/// them at the task's own sizes (no padding) and also returns the gradient of the meta-loss with
/// respect to every feature row; candle then carries that gradient into the weights below
/// through the backward pass of `Σ features ⊙ gradient`. With `from_layer = 0` this is
/// [`meta_step`].
#[allow(clippy::too_many_arguments)]
pub fn meta_step_on_features(
    net: &Network,
    meta: &MetaParams,
    tasks: &[Task],
    kind: TaskKind,
    from_layer: usize,
    inner_lr: f64,
    steps: usize,
    second_order: bool,
) -> Result<Option<MetaStep>> {
    if from_layer == 0 {
        return meta_step(net, meta, tasks, kind, inner_lr, steps, second_order);
    }
    let Some(dtype) = eligible(meta, tasks, kind) else {
        return Ok(None);
    };
    // Concatenating the tasks' rows into one forward pass changes nothing only for layers that
    // treat every example on its own (batch statistics would mix the tasks).
    let row_wise = net
        .architecture()
        .layers
        .get(..from_layer)
        .is_some_and(|below| {
            below.iter().all(|l| {
                matches!(
                    l.layer,
                    Layer::FeatureEmbedding { .. }
                        | Layer::Dense { .. }
                        | Layer::Activation { .. }
                        | Layer::Flatten
                        | Layer::Dropout { .. }
                )
            })
        });
    if !row_wise {
        return Ok(None);
    }
    let Some(mlp) = Mlp::of(net, meta, from_layer) else {
        return Ok(None);
    };
    let run = match dtype {
        DType::F32 => run_on_features::<f32>,
        DType::F64 => run_on_features::<f64>,
        _ => return Ok(None),
    };
    run(
        net,
        &mlp,
        meta,
        tasks,
        from_layer,
        (inner_lr, steps, second_order),
    )
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

/// The adapted weights as one flat vector, in the order of `mlp`'s offsets.
fn flat_theta<T: Real>(mlp: &Mlp, meta: &MetaParams) -> Result<Vec<T>> {
    let mut theta = Vec::with_capacity(mlp.len);
    for (slot, t) in mlp.params.iter().zip(meta.weights.tensors()) {
        if slot.is_some() {
            theta.extend(t.flatten_all()?.to_vec1::<T>()?);
        }
    }
    Ok(theta)
}

/// The meta-step of per-task results: the mean loss, the mean of the tasks' gradients (summed
/// in task order) for the adapted weights, and `below(weight)` for the others.
fn finish<T: Real>(
    mlp: &Mlp,
    meta: &MetaParams,
    per_task: &[TaskGradient<T>],
    below: impl Fn(&Tensor) -> Option<Tensor>,
) -> Result<MetaStep> {
    let count = per_task.len() as f64;
    let loss = per_task.iter().map(|t| t.loss).sum::<f64>() / count;
    if !loss.is_finite() {
        return Ok(MetaStep {
            loss,
            grads: vec![None; mlp.params.len()],
            batch_stats: Vec::new(),
        });
    }
    let mut sum = vec![0f64; mlp.len];
    for task in per_task {
        for (s, v) in sum.iter_mut().zip(&task.theta) {
            *s += v.to_f64();
        }
    }
    let grads = mlp
        .params
        .iter()
        .zip(meta.weights.tensors())
        .map(|(slot, t)| {
            let Some((offset, len, shape)) = slot else {
                return Ok(below(t));
            };
            let values: Vec<T> = sum[*offset..offset + len]
                .iter()
                .map(|&s| T::from_f64(s / count))
                .collect();
            Ok(Some(Tensor::from_vec(
                values,
                shape.as_slice(),
                t.device(),
            )?))
        })
        .collect::<Result<_>>()?;
    Ok(MetaStep {
        loss,
        grads,
        batch_stats: Vec::new(),
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
    let theta = flat_theta::<T>(mlp, meta)?;
    let mut data = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task_data::<T>(mlp, task)? {
            Some(d) => data.push(d),
            None => return Ok(None),
        }
    }
    let lr = T::from_f64(inner_lr);
    let per_task: Vec<TaskGradient<T>> = data
        .par_iter()
        .map(|((sx, sy, sr), (qx, qy, qr))| {
            mlp.task_meta_gradient(
                &theta,
                (sx, sy, *sr),
                (qx, qy, *qr),
                lr,
                steps,
                second_order,
                false,
            )
        })
        .collect();
    finish(mlp, meta, &per_task, |_| None).map(Some)
}

/// [`meta_step_on_features`] in `T`; `inner` is (learning rate, steps, second order).
fn run_on_features<T: Real>(
    net: &Network,
    mlp: &Mlp,
    meta: &MetaParams,
    tasks: &[Task],
    from_layer: usize,
    (inner_lr, steps, second_order): (f64, usize, bool),
) -> Result<Option<MetaStep>> {
    let inputs = mlp.layers[0].inputs;
    let outputs = mlp.outputs();
    let example = &net.architecture().input_shape;
    // Every task's support rows, then every task's query rows: one forward pass for all.
    let sets: Vec<&(Tensor, Tensor)> = tasks
        .iter()
        .map(|t| &t.support)
        .chain(tasks.iter().map(|t| &t.query))
        .collect();
    let mut starts = Vec::with_capacity(sets.len());
    let mut targets = Vec::with_capacity(sets.len());
    let mut total = 0;
    for (x, y) in &sets {
        let rows = x.dims().first().copied().unwrap_or(0);
        if rows == 0 || x.dims()[1..] != example[..] || y.elem_count() != rows * outputs {
            return Ok(None);
        }
        starts.push(total);
        total += rows;
        targets.push(y.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?);
    }
    starts.push(total);
    let xs: Vec<&Tensor> = sets.iter().map(|(x, _)| x).collect();
    let all = Tensor::cat(&xs, 0)?;
    // Only first-order gradients of the features are taken (through the surrogate below).
    let features = net.forward_layers(
        &meta.weights,
        &all,
        &mut ForwardCtx::train().first_order(),
        from_layer,
    )?;
    if features.dims() != [total, inputs] {
        return Ok(None);
    }
    let host = features
        .detach()
        .to_dtype(T::DTYPE)?
        .flatten_all()?
        .to_vec1::<T>()?;
    let set = |i: usize| {
        let (start, end) = (starts[i], starts[i + 1]);
        (
            &host[start * inputs..end * inputs],
            targets[i].as_slice(),
            end - start,
        )
    };
    let theta = flat_theta::<T>(mlp, meta)?;
    let lr = T::from_f64(inner_lr);
    let n = tasks.len();
    let per_task: Vec<TaskGradient<T>> = (0..n)
        .into_par_iter()
        .map(|t| mlp.task_meta_gradient(&theta, set(t), set(n + t), lr, steps, second_order, true))
        .collect();
    // The feature gradients in the row order of `features`, each task's scaled by 1 / n as
    // its loss enters the mean.
    let scale = 1.0 / n as f64;
    let grad_features: Vec<T> = per_task
        .iter()
        .map(|t| &t.support_x)
        .chain(per_task.iter().map(|t| &t.query_x))
        .flat_map(|g| g.iter().map(|&v| T::from_f64(v.to_f64() * scale)))
        .collect();
    let loss_finite = per_task.iter().all(|t| t.loss.is_finite());
    let store = if loss_finite {
        let grad_features = Tensor::from_vec(grad_features, features.shape(), features.device())?
            .to_dtype(features.dtype())?;
        // The gradient of Σ features ⊙ G with respect to the features is G: its backward pass
        // carries the kernel's feature gradients into the weights below `from_layer`.
        let surrogate = features.mul(&grad_features)?.sum_all()?;
        Some(crate::runtime::backward(&surrogate)?)
    } else {
        None
    };
    let below = |t: &Tensor| store.as_ref()?.get(t).map(Tensor::detach);
    finish(mlp, meta, &per_task, below).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 5 inputs → dense 4 → ReLU → dense 3 → ReLU → dense 1, over one flat vector.
    fn small_mlp() -> Mlp {
        let mut layers = Vec::new();
        let mut len = 0;
        for (inputs, units, relu) in [(5, 4, true), (4, 3, true), (3, 1, false)] {
            layers.push(Dense {
                inputs,
                units,
                relu,
                weight: len,
                bias: len + inputs * units,
            });
            len += inputs * units + units;
        }
        Mlp {
            layers,
            params: Vec::new(),
            len,
        }
    }

    /// Deterministic values in about ±1 (a fixed LCG: no random crate needed here).
    fn values(seed: u64, n: usize) -> Vec<f64> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// The vectorised f32 product against the plain one, for shapes with full and partial tiles
    /// (rows and columns) and for `A` read directly and transposed.
    #[test]
    fn vectorised_product_matches_the_plain_one() {
        for (m, n, k) in [
            (1, 1, 1),
            (6, 16, 3),
            (7, 17, 5),
            (13, 40, 9),
            (5, 8, 64),
            (12, 3, 2),
        ] {
            for transposed in [false, true] {
                let a: Vec<f32> = values(7, m * k).iter().map(|&v| v as f32).collect();
                let b: Vec<f32> = values(8, k * n).iter().map(|&v| v as f32).collect();
                let strides = if transposed { (1, m) } else { (k, 1) };
                let start: Vec<f32> = values(9, m * n).iter().map(|&v| v as f32).collect();
                let (mut fast, mut plain) = (start.clone(), start);
                multiply_accumulate([m, n, k], (&a, strides.0, strides.1), &b, &mut fast);
                multiply_accumulate_plain([m, n, k], (&a, strides.0, strides.1), &b, &mut plain);
                for (x, y) in fast.iter().zip(&plain) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{m}x{n}x{k}, transposed {transposed}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// The input gradients (and the weight gradient) of one task's meta-loss against central
    /// differences, first and second order: the mixed terms through the inner updates included.
    #[test]
    fn input_gradients_match_finite_differences() {
        let mlp = small_mlp();
        let theta = values(1, mlp.len);
        let (s_rows, q_rows) = (6, 4);
        let sx = values(2, s_rows * 5);
        let sy = values(3, s_rows);
        let qx = values(4, q_rows * 5);
        let qy = values(5, q_rows);
        let (lr, steps) = (0.2, 3);
        for second_order in [true, false] {
            let at = |theta: &[f64], sx: &[f64], qx: &[f64]| {
                mlp.task_meta_gradient(
                    theta,
                    (sx, &sy, s_rows),
                    (qx, &qy, q_rows),
                    lr,
                    steps,
                    second_order,
                    true,
                )
            };
            let g = at(&theta, &sx, &qx);
            let eps = 1e-6;
            let central = |point: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
                let (mut plus, mut minus) = (point.to_vec(), point.to_vec());
                plus[i] += eps;
                minus[i] -= eps;
                (f(&plus) - f(&minus)) / (2.0 * eps)
            };
            let mut worst = 0.0f64;
            let mut compare = |analytic: f64, numeric: f64| {
                worst = worst.max((analytic - numeric).abs() / numeric.abs().max(1e-3));
            };
            for i in 0..sx.len() {
                let numeric = central(&sx, i, &|x| at(&theta, x, &qx).loss);
                // First order detaches the inner gradients: the support rows get nothing.
                compare(g.support_x[i], if second_order { numeric } else { 0.0 });
            }
            for i in 0..qx.len() {
                compare(g.query_x[i], central(&qx, i, &|x| at(&theta, &sx, x).loss));
            }
            if second_order {
                for i in 0..theta.len() {
                    compare(g.theta[i], central(&theta, i, &|t| at(t, &sx, &qx).loss));
                }
                assert!(g.support_x.iter().any(|v| v.abs() > 1e-3));
            }
            assert!(
                worst < 1e-6,
                "second order {second_order}: worst relative error {worst:e}"
            );
        }
    }
}
