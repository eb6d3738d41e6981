//! Process-wide settings of the tensor engine.

use std::sync::{Once, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::Tensor;

static INIT: Once = Once::new();

/// Threads on which candle detaches gradients during backprop (see [`backward`]); `None` when
/// the user set `CANDLE_GRAD_DO_NOT_DETACH` or the pool could not be built.
static DETACHING_POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// Enables gradients of gradients (second-order MAML) in candle, and pins candle's thread count.
///
/// candle detaches every gradient during backprop unless `CANDLE_GRAD_DO_NOT_DETACH` is set; the
/// variable is read once per thread at that thread's first backward pass, so it is set here,
/// before any network exists. Before it is set, a small pool of threads runs one backward pass
/// each, so that those threads keep detaching: [`backward`] runs there.
///
/// When `RAYON_NUM_THREADS` is unset, it is set to the number of available cores: with it
/// unset, candle 0.11 ran sinusoid MAML 2.7x slower on a 2-core machine (6.8 ms against 2.5 ms
/// per meta-iteration), and small-MLP training 2-4x slower. A value set by the user is kept.
///
/// When `CANDLE_NUM_THREADS` is unset, it is set to 1, so that candle runs its element-wise
/// operations on the calling thread. Otherwise candle 0.11 runs them on its own pool of spinning
/// threads, which one caller at a time may use: the meta-batch's task chunks, each on a rayon
/// thread, then waited on each other, and the spinning took cores from them. Second-order MAML
/// on Conv-4 (`metalearn bench --workload maml-conv4`, 2 cores) went from 2,063 to 1,703 ms per
/// meta-batch (medians of 5 alternating runs); the ProtoNet, first-order MAML, adaptation and
/// sinusoid workloads did not change beyond the machine's noise. A value set by the user is
/// kept.
pub fn init() {
    INIT.call_once(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
        }
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(cores);
        if std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_none() {
            let _ = DETACHING_POOL.set(detaching_pool(threads));
            std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
        } else {
            let _ = DETACHING_POOL.set(None);
        }
    });
}

/// A pool whose every thread has already run a backward pass with gradients detached.
fn detaching_pool(threads: usize) -> Option<rayon::ThreadPool> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("metalearn-backward-{i}"))
        .build()
        .ok()?;
    let latched = pool.broadcast(|_| {
        let v = candle_core::Var::new(&[1f32], &candle_core::Device::Cpu)?;
        v.as_tensor().sqr()?.sum_all()?.backward().map(|_| ())
    });
    latched.iter().all(|r| r.is_ok()).then_some(pool)
}

/// Backpropagates `loss` for gradients that are used as values only (an optimiser step, the
/// outer step of meta-learning), not differentiated again.
///
/// candle's `backward` keeps every gradient's own graph when second-order gradients are on
/// (see [`init`]); each weight's gradient then holds every intermediate gradient of the pass
/// alive until it is dropped. Run on the detaching threads, the same pass frees them as it goes:
/// second-order MAML on Conv-4 (`metalearn bench --workload maml-conv4`) peaked at 6.7 GB
/// without this. The values are the same either way.
///
/// Only CPU passes move to those threads; a GPU pass stays on the calling thread, as before
/// (CUDA makes its context current per thread, and the move has not been tried on a GPU).
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    init();
    match DETACHING_POOL.get() {
        Some(Some(pool)) if loss.device().is_cpu() => pool.install(|| loss.backward()),
        _ => loss.backward(),
    }
}

/// Threads of the pool that runs CPU backward passes (see [`backward`]); `None` before [`init`]
/// and when backward passes run on the calling thread.
pub fn backward_threads() -> Option<usize> {
    DETACHING_POOL
        .get()
        .and_then(Option::as_ref)
        .map(rayon::ThreadPool::current_num_threads)
}

/// Peak resident memory of this process so far, in MiB (`VmHWM` from `/proc/self/status`);
/// `None` where that file does not exist (non-Linux systems).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// `Σ (2x)²` and its gradient `8x` from `backward` and from candle's own pass. The last
    /// step of the pass (through the linear `2x`) only scales the incoming gradient, so the
    /// result tracks a graph exactly when the incoming gradient kept its own.
    fn square_of_double_gradients() -> (Tensor, Tensor) {
        super::init();
        let x = Var::new(&[1.5f64, -2.0], &Device::Cpu).unwrap();
        let loss = x
            .as_tensor()
            .affine(2.0, 0.0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let detached = super::backward(&loss).unwrap();
        let kept = loss.backward().unwrap();
        (
            detached.get(x.as_tensor()).unwrap().clone(),
            kept.get(x.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn backward_gives_candles_values_without_their_graph() {
        let (detached, kept) = square_of_double_gradients();
        assert_eq!(
            detached.to_vec1::<f64>().unwrap(),
            kept.to_vec1::<f64>().unwrap()
        );
        assert_eq!(detached.to_vec1::<f64>().unwrap(), vec![12.0, -16.0]);
        // Second order stays on for candle's own pass: its gradient can be differentiated.
        assert!(
            kept.track_op(),
            "candle's backward lost the gradient's graph"
        );
        assert!(
            !detached.track_op(),
            "runtime::backward kept the gradient's graph"
        );
    }
}
