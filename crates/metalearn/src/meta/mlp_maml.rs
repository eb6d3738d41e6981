//! The MAML meta-gradient of small multilayer perceptrons (dense layers, ReLU or linear
//! activations) under mean squared error, in plain loops: the sinusoid-regression workload, and
//! the adapted decision layers of a recommender over candle-computed features (MeLU,
//! [`meta_step_on_features`]).
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
//!
//! Over features, the kernel also returns the meta-loss's gradient with respect to every
//! feature row (through the inner updates for the support rows), which candle carries into the
//! layers below; when the features are wider than a task has rows, the first adapted layer runs
//! through the Gram matrices of its inputs ([`FirstLayerForm`]).

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
        self.forward_rest(theta, acts, rows)
    }

    /// [`Self::forward`] from the first layer's pre-activation `z0` (the caller formed the
    /// product with the input): `acts[0]` is left empty.
    #[inline(always)]
    fn forward_above<T: Real>(&self, theta: &[T], mut z0: Vec<T>, rows: usize) -> Vec<Vec<T>> {
        if self.layers[0].relu {
            relu_in_place(&mut z0);
        }
        let mut acts = Vec::with_capacity(self.layers.len() + 1);
        acts.push(Vec::new());
        acts.push(z0);
        self.forward_rest(theta, acts, rows)
    }

    /// Runs the layers after those whose outputs `acts` holds.
    #[inline(always)]
    fn forward_rest<T: Real>(
        &self,
        theta: &[T],
        mut acts: Vec<Vec<T>>,
        rows: usize,
    ) -> Vec<Vec<T>> {
        for layer in &self.layers[acts.len() - 1..] {
            let input = acts.last().expect("input pushed first");
            let mut out = layer.bias_rows(theta, rows);
            multiply_accumulate(
                [rows, layer.units, layer.inputs],
                (input, layer.inputs, 1),
                layer.weights(theta),
                &mut out,
            );
            if layer.relu {
                relu_in_place(&mut out);
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

    /// Gradient of the loss whose derivative with respect to the prediction is `d_out`, and
    /// every layer's delta (the gradient with respect to its output, inactive ReLU units
    /// masked). Without `first_weight` the first layer's weight gradient is left out (the
    /// caller forms it from `deltas[0]`).
    #[inline(always)]
    fn backward<T: Real>(
        &self,
        transposes: &[Vec<T>],
        acts: &[Vec<T>],
        d_out: Vec<T>,
        rows: usize,
        first_weight: bool,
    ) -> (Vec<T>, Vec<Vec<T>>) {
        let mut grad = vec![T::zero(); self.len];
        let mut deltas = vec![Vec::new(); self.layers.len()];
        let mut d = d_out;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            if layer.relu {
                mask_inactive(&mut d, &acts[l + 1]);
            }
            if l > 0 || first_weight {
                layer.accumulate_grad(&mut grad, &acts[l], &d, rows);
            } else {
                layer.accumulate_bias_grad(&mut grad, &d);
            }
            let mut next = Vec::new();
            if l > 0 {
                next = vec![T::zero(); rows * layer.inputs];
                layer.back_through(&transposes[l], &d, rows, &mut next);
            }
            deltas[l] = std::mem::replace(&mut d, next);
        }
        (grad, deltas)
    }

    /// `H v`, the Hessian of the support loss at `point` times `v` (R-operator: the derivative
    /// of the backward pass along `v`), and `R{deltas[0]}`, the derivative of the first layer's
    /// delta along `v`. With `r_z0` (the derivative of the first layer's pre-activation, formed
    /// by the caller), the first layer's weight part of `H v` is left out, as in
    /// [`Self::backward`].
    #[inline(always)]
    fn hessian_vector<T: Real>(
        &self,
        point: &PathPoint<T>,
        v: &[T],
        rows: usize,
        r_z0: Option<&[T]>,
    ) -> (Vec<T>, Vec<T>) {
        let PathPoint {
            theta,
            transposes,
            acts,
            deltas,
        } = point;
        // R-forward: directional derivatives of every layer's output along v.
        let mut r_acts: Vec<Vec<T>> = Vec::with_capacity(self.layers.len() + 1);
        r_acts.push(Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let mut out = match r_z0 {
                Some(r) if l == 0 => r.to_vec(),
                _ => {
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
                    out
                }
            };
            if layer.relu {
                mask_inactive(&mut out, &acts[l + 1]);
            }
            r_acts.push(out);
        }
        let pred = acts.last().expect("output");
        let scale = T::from_f64(2.0 / pred.len().max(1) as f64);
        let mut r_d: Vec<T> = r_acts
            .last()
            .expect("output")
            .iter()
            .map(|&r| r * scale)
            .collect();
        // R-backward, with the deltas of the backward pass at this point (already masked).
        let mut hv = vec![T::zero(); self.len];
        for (l, layer) in self.layers.iter().enumerate().rev() {
            if layer.relu {
                mask_inactive(&mut r_d, &acts[l + 1]);
            }
            let d = &deltas[l];
            if l > 0 || r_z0.is_none() {
                layer.accumulate_grad(&mut hv, &acts[l], &r_d, rows);
            } else {
                layer.accumulate_bias_grad(&mut hv, &r_d);
            }
            if l > 0 {
                // The weight gradient's other term, R{a}ᵀ d.
                multiply_accumulate(
                    [layer.inputs, layer.units, rows],
                    (&r_acts[l], 1, layer.inputs),
                    d,
                    layer.weights_mut(&mut hv),
                );
                let mut next_r = vec![T::zero(); rows * layer.inputs];
                layer.back_through(&transposes[l], &r_d, rows, &mut next_r);
                layer.back_through(&layer.transposed(v), d, rows, &mut next_r);
                r_d = next_r;
            }
        }
        (hv, r_d)
    }

    /// Every layer's weight matrix transposed, but the first layer's (empty): only input
    /// gradients need that one, and they make it themselves.
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

    /// A point of the inner loop from its layer outputs: the support loss's gradient there
    /// (first layer's weight part only with `first_weight`) and the point itself.
    fn path_point<T: Real>(
        &self,
        theta: Vec<T>,
        acts: Vec<Vec<T>>,
        y: &[T],
        rows: usize,
        first_weight: bool,
    ) -> (f64, Vec<T>, PathPoint<T>) {
        let transposes = self.transposes(&theta);
        let (loss, d) = Self::loss(acts.last().expect("output"), y);
        let (grad, deltas) = self.backward(&transposes, &acts, d, rows, first_weight);
        let point = PathPoint {
            theta,
            transposes,
            acts,
            deltas,
        };
        (loss, grad, point)
    }

    /// One task's query loss and gradient of the query loss with respect to `theta` (through
    /// the inner loop when `second_order`); with `input_grads`, also its gradients with respect
    /// to the support and query inputs.
    ///
    /// The support inputs reach the query loss through every inner gradient
    /// `g_k = ∇_θ L_s(θ_k, x_s)`, so their gradient is `−α Σ_k (∂_x g_k)ᵀ λ_{k+1}`, where
    /// `λ_{k+1}` is the gradient with respect to `θ_{k+1}`: exactly the `v` that the backward
    /// recursion holds when it reaches point `k`, and `(∂_x g_k)ᵀ v = R_v{∇ₓL_s(θ_k)}`, the
    /// derivative of the input gradient `d₀ W₀ᵀ` along `v`: `R{d₀} W₀ᵀ + d₀ V₀ᵀ`, from the same
    /// R-operator pass as `H_k v`. First order detaches the `g_k`: zero.
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
        let first = &self.layers[0];
        let mut path: Vec<PathPoint<T>> = Vec::with_capacity(steps);
        let mut current = theta.to_vec();
        for _ in 0..steps {
            let acts = self.forward(&current, sx, s_rows);
            let (_, grad, point) = self.path_point(current, acts, sy, s_rows, true);
            current = point
                .theta
                .iter()
                .zip(&grad)
                .map(|(&p, &g)| p - lr * g)
                .collect();
            path.push(point);
        }
        let acts = self.forward(&current, qx, q_rows);
        let (loss, mut v, fast) = self.path_point(current, acts, qy, q_rows, true);
        let input_len = |rows: usize| if input_grads { rows * first.inputs } else { 0 };
        let mut query_x = vec![T::zero(); input_len(q_rows)];
        if input_grads {
            let w_t = first.transposed(&fast.theta);
            first.back_through(&w_t, &fast.deltas[0], q_rows, &mut query_x);
        }
        let mut support_x = vec![T::zero(); input_len(s_rows)];
        if second_order {
            for point in path.iter().rev() {
                let (hv, r_d0) = self.hessian_vector(point, &v, s_rows, None);
                if input_grads {
                    let w_t = first.transposed(&point.theta);
                    first.back_through(&w_t, &r_d0, s_rows, &mut support_x);
                    let v_t = first.transposed(&v);
                    first.back_through(&v_t, &point.deltas[0], s_rows, &mut support_x);
                }
                for (vi, h) in v.iter_mut().zip(&hv) {
                    *vi -= lr * *h;
                }
            }
            // The sum above holds Σ_k R{∇ₓL_s(θ_k)}; every term enters with −α.
            scale_in_place(&mut support_x, T::zero() - lr);
        }
        TaskGradient {
            loss,
            theta: v,
            support_x,
            query_x,
        }
    }

    /// The chain with the first layer's weight matrix left out of the flat vector (the Gram
    /// form keeps it implicit), and the segments `(offset here, offset there, length)` that
    /// map this chain's vector onto the new one.
    fn without_first_weight(&self) -> (Mlp, Vec<(usize, usize, usize)>) {
        let mut blocks: Vec<(usize, usize)> = Vec::with_capacity(2 * self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            if l > 0 {
                blocks.push((layer.weight, layer.inputs * layer.units));
            }
            blocks.push((layer.bias, layer.units));
        }
        blocks.sort_unstable();
        let mut segments = Vec::with_capacity(blocks.len());
        let mut len = 0;
        for (offset, size) in blocks {
            segments.push((offset, len, size));
            len += size;
        }
        let moved = |offset: usize| {
            segments
                .iter()
                .find(|s| s.0 == offset)
                .map_or(usize::MAX, |s| s.1)
        };
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| Dense {
                // Never read: usize::MAX makes any use fail loudly.
                weight: if l == 0 {
                    usize::MAX
                } else {
                    moved(layer.weight)
                },
                bias: moved(layer.bias),
                ..layer.clone()
            })
            .collect();
        let upper = Mlp {
            layers,
            params: Vec::new(),
            len,
        };
        (upper, segments)
    }

    /// Whether [`Self::task_meta_gradient_gram`] costs fewer multiply-adds than
    /// [`Self::task_meta_gradient`] with input gradients: when the first layer's inputs are
    /// wider than a task has rows (MeLU: 256 features, 3 to 90 support ratings).
    fn prefers_gram(&self, s: usize, q: usize, steps: usize, second_order: bool) -> bool {
        let (n, h) = (self.layers[0].inputs, self.layers[0].units);
        let (passes, gram_passes) = if second_order { (6, 4) } else { (2, 1) };
        let plain = steps * passes * s * n * h + 3 * q * n * h;
        let mut gram = (s + q) * n * h + (s + q) * s * n + 2 * q * n * h + q * s * n;
        gram += steps * gram_passes * s * s * h;
        if second_order {
            gram += s * n * h + s * n * (h + s + q);
        }
        gram < plain
    }

    /// [`Self::task_meta_gradient`] with input gradients, with the first layer in kernel form;
    /// `w0_t` is the first weight matrix of `theta` transposed (the same for every task).
    ///
    /// The support inputs `X_s` stay fixed through the inner loop, so every update of the
    /// first weight matrix lies in their row space: `W_k = W₀ − α X_sᵀ S_k` with
    /// `S_k = Σ_{j<k} D_j`, the sum of the first layer's deltas. Its products with the inputs
    /// then need only the Gram matrices `K_ss = X_s X_sᵀ` and `K_qs = X_q X_sᵀ`
    /// (`X_s W_k = X_s W₀ − α K_ss S_k`), and the direction `v` of the backward recursion keeps
    /// the form `V₀ = X_qᵀ A + X_sᵀ B` (`A = D_q`, the query's first delta; `B` gathers
    /// `−α R{D_k}`). The input gradients collect coefficients of `W₀ᵀ`, `X_s` and `X_q`, each
    /// multiplied out once at the end: per inner step the first layer costs `O(s² h)` instead
    /// of `O(s n h)` (`s` rows, `n` inputs, `h` units).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn task_meta_gradient_gram<T: Real>(
        &self,
        theta: &[T],
        w0_t: &[T],
        support: (&[T], &[T], usize),
        query: (&[T], &[T], usize),
        lr: T,
        steps: usize,
        second_order: bool,
    ) -> TaskGradient<T> {
        let (sx, sy, s) = support;
        let (qx, qy, q) = query;
        // Everything but W₀ runs in the compact layout `upper`: per-step vector work then
        // skips the n × h entries that stay put.
        let (upper, segments) = self.without_first_weight();
        let first = &upper.layers[0];
        let (n, h) = (first.inputs, first.units);
        let w0 = self.layers[0].weights(theta);
        // Once per task: X_s W₀, X_q W₀, K_ss and K_qs.
        let sx_t = transpose(sx, s, n);
        let mut zs = vec![T::zero(); s * h];
        multiply_accumulate([s, h, n], (sx, n, 1), w0, &mut zs);
        let mut zq = vec![T::zero(); q * h];
        multiply_accumulate([q, h, n], (qx, n, 1), w0, &mut zq);
        let mut kss = vec![T::zero(); s * s];
        multiply_accumulate([s, s, n], (sx, n, 1), &sx_t, &mut kss);
        let mut kqs = vec![T::zero(); q * s];
        multiply_accumulate([q, s, n], (qx, n, 1), &sx_t, &mut kqs);
        // The inner loop; `zs` holds X_s W_k, `sums` S_k, and each point keeps its S_k.
        let mut path: Vec<(PathPoint<T>, Vec<T>)> = Vec::with_capacity(steps);
        let mut sums = vec![T::zero(); s * h];
        let mut current = vec![T::zero(); upper.len];
        for &(from, to, len) in &segments {
            current[to..to + len].copy_from_slice(&theta[from..from + len]);
        }
        for _ in 0..steps {
            let z0 = add_rows(&zs, first.bias(&current));
            let acts = upper.forward_above(&current, z0, s);
            let (_, grad, point) = upper.path_point(current, acts, sy, s, false);
            let d0 = &point.deltas[0];
            let mut kd = vec![T::zero(); s * h];
            multiply_accumulate([s, h, s], (&kss, s, 1), d0, &mut kd);
            axpy(&mut zs, T::zero() - lr, &kd);
            current = point
                .theta
                .iter()
                .zip(&grad)
                .map(|(&p, &g)| p - lr * g)
                .collect();
            let next_sums = sums.iter().zip(d0).map(|(&a, &b)| a + b).collect();
            path.push((point, std::mem::replace(&mut sums, next_sums)));
        }
        // The query at the fast weights: X_q W_N = X_q W₀ − α K_qs S_N.
        let mut ks = vec![T::zero(); q * h];
        multiply_accumulate([q, h, s], (&kqs, s, 1), &sums, &mut ks);
        axpy(&mut zq, T::zero() - lr, &ks);
        let z0 = add_rows(&zq, first.bias(&current));
        let acts = upper.forward_above(&current, z0, q);
        let (loss, mut v, fast) = upper.path_point(current, acts, qy, q, false);
        let dq = &fast.deltas[0];
        // ∂L/∂X_q = D_q W_Nᵀ = D_q W₀ᵀ − α (D_q S_Nᵀ) X_s.
        let mut query_x = vec![T::zero(); q * n];
        multiply_accumulate([q, n, h], (dq, h, 1), w0_t, &mut query_x);
        let mut cqs = vec![T::zero(); q * s];
        multiply_accumulate([q, s, h], (dq, h, 1), &transpose(&sums, s, h), &mut cqs);
        scale_in_place(&mut cqs, T::zero() - lr);
        multiply_accumulate([q, n, s], (&cqs, s, 1), sx, &mut query_x);
        let mut b = vec![T::zero(); s * h];
        let mut support_x = vec![T::zero(); s * n];
        if second_order && steps > 0 {
            // X_s X_qᵀ A, the part of X_s V₀ that does not change.
            let mut ka = vec![T::zero(); s * h];
            multiply_accumulate([s, h, q], (&kqs, 1, s), dq, &mut ka);
            // Σ_k R{∂L_s/∂X_s} = C_w W₀ᵀ + C_s X_s + (Σ_k D_k) D_qᵀ X_q, where W_kᵀ and V₀ᵀ
            // expand as above.
            let mut c_w = vec![T::zero(); s * h];
            let mut c_s = vec![T::zero(); s * s];
            let mut d_sum = vec![T::zero(); s * h];
            for (point, sums_k) in path.iter().rev() {
                // R{z₀} = X_s V₀ + v_b = K_qsᵀ A + K_ss B + v_b.
                let mut r_z0 = add_rows(&ka, first.bias(&v));
                multiply_accumulate([s, h, s], (&kss, s, 1), &b, &mut r_z0);
                let (hv, r_d0) = upper.hessian_vector(point, &v, s, Some(&r_z0));
                let d0 = &point.deltas[0];
                // R{D} W_kᵀ = R{D} W₀ᵀ − α (R{D} S_kᵀ) X_s, and D V₀ᵀ = (D Aᵀ) X_q + (D Bᵀ) X_s.
                axpy(&mut c_w, T::one(), &r_d0);
                axpy(&mut d_sum, T::one(), d0);
                let mut sums_t = transpose(sums_k, s, h);
                scale_in_place(&mut sums_t, T::zero() - lr);
                multiply_accumulate([s, s, h], (&r_d0, h, 1), &sums_t, &mut c_s);
                multiply_accumulate([s, s, h], (d0, h, 1), &transpose(&b, s, h), &mut c_s);
                // v ← v − α H v; B ← B − α R{D}: H v's first weight part is X_sᵀ R{D}.
                axpy(&mut v, T::zero() - lr, &hv);
                axpy(&mut b, T::zero() - lr, &r_d0);
            }
            multiply_accumulate([s, n, h], (&c_w, h, 1), w0_t, &mut support_x);
            multiply_accumulate([s, n, s], (&c_s, s, 1), sx, &mut support_x);
            let mut c_q = vec![T::zero(); s * q];
            multiply_accumulate([s, q, h], (&d_sum, h, 1), &transpose(dq, q, h), &mut c_q);
            multiply_accumulate([s, n, q], (&c_q, q, 1), qx, &mut support_x);
            scale_in_place(&mut support_x, T::zero() - lr);
        }
        // Back to the full layout, with the first weight's gradient V₀ = X_qᵀ A + X_sᵀ B.
        let mut grad = vec![T::zero(); self.len];
        for &(to, from, len) in &segments {
            grad[to..to + len].copy_from_slice(&v[from..from + len]);
        }
        let w_grad = self.layers[0].weights_mut(&mut grad);
        multiply_accumulate([n, h, q], (qx, 1, n), dq, w_grad);
        if second_order {
            multiply_accumulate([n, h, s], (sx, 1, n), &b, w_grad);
        }
        TaskGradient {
            loss,
            theta: grad,
            support_x,
            query_x,
        }
    }

    /// [`Self::task_meta_gradient`] with input gradients, in the first layer's `form`; `w0_t`
    /// as for [`Self::task_meta_gradient_gram`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn task_gradient_with_inputs<T: Real>(
        &self,
        theta: &[T],
        w0_t: &[T],
        support: (&[T], &[T], usize),
        query: (&[T], &[T], usize),
        (lr, steps, second_order): (T, usize, bool),
        form: FirstLayerForm,
    ) -> TaskGradient<T> {
        let gram = match form {
            FirstLayerForm::Cheaper => self.prefers_gram(support.2, query.2, steps, second_order),
            FirstLayerForm::Plain => false,
            FirstLayerForm::Gram => true,
        };
        if gram {
            self.task_meta_gradient_gram(theta, w0_t, support, query, lr, steps, second_order)
        } else {
            self.task_meta_gradient(theta, support, query, lr, steps, second_order, true)
        }
    }
}

/// How [`meta_step_on_features`] multiplies the first adapted layer with its inputs. Both forms
/// compute the same numbers up to rounding; tests run each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FirstLayerForm {
    /// Per task, whichever form costs fewer multiply-adds at its sizes.
    #[default]
    Cheaper,
    /// The weight matrix times the inputs at every inner step.
    Plain,
    /// Through the Gram matrices of the inputs (each update of the weights lies in the support
    /// inputs' row space): cheaper when the inputs are wider than a task has rows.
    Gram,
}

thread_local! {
    static FORM: std::cell::Cell<FirstLayerForm> = const {
        std::cell::Cell::new(FirstLayerForm::Cheaper)
    };
}

/// Runs `f` with the first layer's form of [`meta_step_on_features`] set to `form` for the
/// meta-steps this thread starts.
pub fn with_first_layer_form<R>(form: FirstLayerForm, f: impl FnOnce() -> R) -> R {
    let before = FORM.with(|c| c.replace(form));
    let out = f();
    FORM.with(|c| c.set(before));
    out
}

/// A point of the inner loop: weights, their transposes, the layer outputs on the support set
/// there and the deltas of the support loss's backward pass (reused by the Hessian-vector
/// product at that point).
struct PathPoint<T> {
    theta: Vec<T>,
    transposes: Vec<Vec<T>>,
    acts: Vec<Vec<T>>,
    deltas: Vec<Vec<T>>,
}

/// `x` (`[rows, cols]`, row-major) transposed.
fn transpose<T: Real>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
    assert_eq!(
        x.len(),
        rows * cols,
        "transpose: {rows} × {cols} values expected"
    );
    let mut out = vec![T::zero(); rows * cols];
    // Blocks of 8 × 8 keep both the rows read and the rows written in cache.
    const BLOCK: usize = 8;
    for i0 in (0..rows).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(rows);
        for j0 in (0..cols).step_by(BLOCK) {
            for j in j0..(j0 + BLOCK).min(cols) {
                for i in i0..i1 {
                    // SAFETY: i < rows and j < cols, and both buffers hold rows × cols values
                    // (asserted above); bounds checks here cost as much as the copy.
                    unsafe {
                        *out.get_unchecked_mut(j * rows + i) = *x.get_unchecked(i * cols + j)
                    };
                }
            }
        }
    }
    out
}

/// `y += a x`.
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `x *= a`.
fn scale_in_place<T: Real>(x: &mut [T], a: T) {
    for v in x.iter_mut() {
        *v *= a;
    }
}

/// Every row of `x` (rows of `row.len()`) plus `row`.
fn add_rows<T: Real>(x: &[T], row: &[T]) -> Vec<T> {
    let mut out = x.to_vec();
    for chunk in out.chunks_exact_mut(row.len()) {
        for (o, &r) in chunk.iter_mut().zip(row) {
            *o += r;
        }
    }
    out
}

/// ReLU in place.
fn relu_in_place<T: Real>(x: &mut [T]) {
    for v in x.iter_mut() {
        if *v <= T::zero() {
            *v = T::zero();
        }
    }
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

    /// The bias.
    fn bias<'a, T>(&self, theta: &'a [T]) -> &'a [T] {
        &theta[self.bias..self.bias + self.units]
    }

    /// The bias repeated for `rows` rows: the starting point of the layer's output.
    fn bias_rows<T: Real>(&self, theta: &[T], rows: usize) -> Vec<T> {
        theta[self.bias..self.bias + self.units].repeat(rows)
    }

    /// The weight matrix transposed to `[units, inputs]`.
    fn transposed<T: Real>(&self, theta: &[T]) -> Vec<T> {
        transpose(self.weights(theta), self.inputs, self.units)
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
        self.accumulate_bias_grad(grad, d);
    }

    /// Adds the column sums of `d` to the bias gradient.
    #[inline(always)]
    fn accumulate_bias_grad<T: Real>(&self, grad: &mut [T], d: &[T]) {
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
    // Read on this thread: the tasks run on rayon's.
    let form = FORM.with(std::cell::Cell::get);
    let w0_t = mlp.layers[0].transposed(&theta);
    let per_task: Vec<TaskGradient<T>> = (0..n)
        .into_par_iter()
        .map(|t| {
            let inner = (lr, steps, second_order);
            mlp.task_gradient_with_inputs(&theta, &w0_t, set(t), set(n + t), inner, form)
        })
        .collect();
    // The feature gradients in the row order of `features`, each task's scaled by 1 / n as
    // its loss enters the mean.
    let scale = T::from_f64(1.0 / n as f64);
    let mut grad_features: Vec<T> = Vec::with_capacity(host.len());
    for g in per_task
        .iter()
        .map(|t| &t.support_x)
        .chain(per_task.iter().map(|t| &t.query_x))
    {
        // Slice by slice (a flat_map's collect neither knows its length nor vectorises).
        grad_features.extend(g.iter().map(|&v| v * scale));
    }
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

    /// `inputs` → dense 4 → ReLU → dense 3 → ReLU → dense 1, over one flat vector.
    fn small_mlp(inputs: usize) -> Mlp {
        let mut layers = Vec::new();
        let mut len = 0;
        for (inputs, units, relu) in [(inputs, 4, true), (4, 3, true), (3, 1, false)] {
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
    /// differences, first and second order, in both forms (plain and with the first layer in
    /// kernel form): the mixed terms through the inner updates included.
    #[test]
    fn input_gradients_match_finite_differences() {
        for (inputs, s_rows, q_rows) in [(5, 6, 4), (9, 3, 2)] {
            let mlp = small_mlp(inputs);
            let theta = values(1, mlp.len);
            let sx = values(2, s_rows * inputs);
            let sy = values(3, s_rows);
            let qx = values(4, q_rows * inputs);
            let qy = values(5, q_rows);
            let (lr, steps) = (0.2, 3);
            for second_order in [true, false] {
                let at = |theta: &[f64], sx: &[f64], qx: &[f64], gram: bool| {
                    let (support, query) = ((sx, &sy[..], s_rows), (qx, &qy[..], q_rows));
                    if gram {
                        let w0_t = mlp.layers[0].transposed(theta);
                        mlp.task_meta_gradient_gram(
                            theta,
                            &w0_t,
                            support,
                            query,
                            lr,
                            steps,
                            second_order,
                        )
                    } else {
                        mlp.task_meta_gradient(theta, support, query, lr, steps, second_order, true)
                    }
                };
                let plain = at(&theta, &sx, &qx, false);
                for gram in [false, true] {
                    let case = format!(
                        "{inputs} inputs, {s_rows} + {q_rows} rows, second order \
                         {second_order}, kernel form {gram}"
                    );
                    let g = at(&theta, &sx, &qx, gram);
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
                        let numeric = central(&sx, i, &|x| at(&theta, x, &qx, gram).loss);
                        // First order detaches the inner gradients: the support rows get
                        // nothing.
                        compare(g.support_x[i], if second_order { numeric } else { 0.0 });
                    }
                    for i in 0..qx.len() {
                        let numeric = central(&qx, i, &|x| at(&theta, &sx, x, gram).loss);
                        compare(g.query_x[i], numeric);
                    }
                    if second_order {
                        for i in 0..theta.len() {
                            let numeric = central(&theta, i, &|t| at(t, &sx, &qx, gram).loss);
                            compare(g.theta[i], numeric);
                        }
                        assert!(g.support_x.iter().any(|v| v.abs() > 1e-3), "{case}");
                    }
                    assert!(worst < 1e-6, "{case}: worst relative error {worst:e}");
                    // Both forms compute the same numbers, up to rounding.
                    let pairs = [
                        (&g.theta, &plain.theta),
                        (&g.support_x, &plain.support_x),
                        (&g.query_x, &plain.query_x),
                    ];
                    for (a, b) in pairs {
                        for (x, y) in a.iter().zip(b) {
                            assert!(
                                (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                                "{case}: {x} vs {y}"
                            );
                        }
                    }
                    assert!((g.loss - plain.loss).abs() <= 1e-14, "{case}");
                }
            }
        }
    }
}
