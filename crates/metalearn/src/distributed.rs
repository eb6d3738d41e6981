//! Data-parallel runs across processes: the ranks of a job and the two collectives that
//! data-parallel meta-training needs, a sum over ranks and a broadcast from rank 0.
//!
//! Every rank runs the same loop with the same seed, so every rank draws the same meta-batch; each
//! takes its contiguous share of the tasks ([`Collective::share`]), and the meta-gradients of the
//! shares are summed, weighted by their task counts, in one flat buffer per step. The result is
//! the single-process one up to the order of that final sum. [`SingleProcess`] is the default
//! (one rank, no communication); with the `mpi` cargo feature, `metalearn::distributed::mpi`
//! runs on MPI.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::error::Result;

/// The process-wide job: set once at start-up by a program that runs under MPI.
static WORLD: Mutex<Option<Arc<dyn Collective>>> = Mutex::new(None);

/// The job this process belongs to: what [`set_world`] installed, else [`SingleProcess`]. New
/// meta-learners and episodic evaluations use it.
pub fn world() -> Arc<dyn Collective> {
    WORLD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| Arc::new(SingleProcess))
}

/// Installs the job of this process (call once, before building learners).
pub fn set_world(world: Arc<dyn Collective>) {
    *WORLD.lock().unwrap_or_else(|e| e.into_inner()) = Some(world);
}

/// Takes the installed job back out, so that dropping the last handle ends it (MPI is finalised
/// when its world is dropped).
pub fn take_world() -> Option<Arc<dyn Collective>> {
    WORLD.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The processes of one job and the collectives between them. Every rank must call the
/// collectives in the same order with buffers of the same length.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Replaces `values` on every rank by their element-wise sum over all ranks.
    fn sum_in_place(&self, values: &mut [f64]) -> Result<()>;
    /// Replaces `values` on every rank by rank 0's.
    fn broadcast_in_place(&self, values: &mut [f64]) -> Result<()>;
    /// Bytes this process has sent to collectives so far, and the seconds it spent in them.
    fn traffic(&self) -> (u64, f64) {
        (0, 0.0)
    }

    /// The items of `0..total` this rank handles: contiguous shares of `ceil(total / size)` in
    /// rank order (the chunking a single process uses for its threads), possibly empty.
    fn share(&self, total: usize) -> Range<usize> {
        let per_rank = total.div_ceil(self.size().max(1));
        let start = (self.rank() * per_rank).min(total);
        start..(start + per_rank).min(total)
    }

    /// Whether this is the rank that writes files and prints.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// One process alone: rank 0 of 1; sums and broadcasts leave the values as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_in_place(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_in_place(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// Gathers one equally long slice from every rank: the result holds rank 0's values, then rank
/// 1's, and so on (through a sum in which every rank fills only its own slot).
pub fn gather_all(collective: &dyn Collective, mine: &[f64]) -> Result<Vec<f64>> {
    let n = mine.len();
    let mut all = vec![0.0; n * collective.size()];
    let at = collective.rank() * n;
    all[at..at + n].copy_from_slice(mine);
    collective.sum_in_place(&mut all)?;
    Ok(all)
}

#[cfg(feature = "mpi")]
pub mod mpi {
    //! [`Collective`](super::Collective) on MPI (the `mpi` cargo feature): the world
    //! communicator of the job `mpirun` started, or a single rank when run without it.

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    use ::mpi::collective::SystemOperation;
    use ::mpi::environment::Universe;
    use ::mpi::topology::SimpleCommunicator;
    use ::mpi::traits::{Communicator, CommunicatorCollectives, Root};

    use super::Collective;
    use crate::error::{Error, Result};

    /// The MPI world of this job. Create it once, before any other thread starts; MPI is
    /// finalised when it is dropped.
    pub struct MpiWorld {
        // Dropped last: finalises MPI.
        _universe: Universe,
        world: SimpleCommunicator,
        sent_bytes: AtomicU64,
        nanos: AtomicU64,
    }

    // The communicator is only used from the thread that drives the training loop; the trait
    // needs Send + Sync because learners are shared with worker threads, which never call it.
    unsafe impl Send for MpiWorld {}
    unsafe impl Sync for MpiWorld {}

    impl MpiWorld {
        /// Initialises MPI (single-threaded use of MPI calls, from the main thread).
        pub fn init() -> Result<Self> {
            let universe = ::mpi::initialize().ok_or_else(|| {
                Error::Config("MPI was already initialised in this process".into())
            })?;
            let world = universe.world();
            Ok(Self {
                _universe: universe,
                world,
                sent_bytes: AtomicU64::new(0),
                nanos: AtomicU64::new(0),
            })
        }

        /// Ends every rank of the job with `code` (after an error on one rank, so that the
        /// others do not wait in a collective for it).
        pub fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }

        fn timed<R>(&self, bytes: usize, f: impl FnOnce() -> R) -> R {
            let started = Instant::now();
            let out = f();
            self.nanos
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            out
        }
    }

    impl Collective for MpiWorld {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn sum_in_place(&self, values: &mut [f64]) -> Result<()> {
            if self.size() > 1 {
                let send = values.to_vec();
                self.timed(std::mem::size_of_val(values), || {
                    self.world
                        .all_reduce_into(&send[..], values, SystemOperation::sum())
                });
            }
            Ok(())
        }
        fn broadcast_in_place(&self, values: &mut [f64]) -> Result<()> {
            if self.size() > 1 {
                self.timed(std::mem::size_of_val(values), || {
                    self.world.process_at_rank(0).broadcast_into(values)
                });
            }
            Ok(())
        }
        fn traffic(&self) -> (u64, f64) {
            (
                self.sent_bytes.load(Ordering::Relaxed),
                self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rank(usize, usize);
    impl Collective for Rank {
        fn rank(&self) -> usize {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
        fn sum_in_place(&self, _: &mut [f64]) -> Result<()> {
            Ok(())
        }
        fn broadcast_in_place(&self, _: &mut [f64]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn shares_cover_every_task_once_in_rank_order() {
        for total in 0..40 {
            for size in 1..6 {
                let shares: Vec<Range<usize>> =
                    (0..size).map(|r| Rank(r, size).share(total)).collect();
                let covered: Vec<usize> = shares.iter().flat_map(|s| s.clone()).collect();
                assert_eq!(
                    covered,
                    (0..total).collect::<Vec<_>>(),
                    "{total} over {size}"
                );
            }
        }
        assert_eq!(Rank(1, 3).share(32), 11..22);
        assert_eq!(SingleProcess.share(7), 0..7);
    }

    #[test]
    fn single_process_gathers_its_own_values() {
        assert_eq!(
            gather_all(&SingleProcess, &[1.0, 2.0]).unwrap(),
            vec![1.0, 2.0]
        );
    }
}
