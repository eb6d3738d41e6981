//! The `metalearn` binary: parses the command line, runs the command, and turns any error into a
//! message on stderr and a non-zero exit status.

use std::process::ExitCode;

use clap::Parser;
mod args;
mod commands;
mod console;

use commands::{apply_threads, error_chain, run, Cli};

/// mimalloc keeps freed pages for reuse: with the system allocator every large tensor was fresh
/// memory from the kernel, and page faults took 2.4 s of the 9.7 s of CPU time of four Conv-4
/// ProtoNet episodes (`metalearn bench --workload protonet-conv4`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (index 15 of `mi_option_t` in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hands freed memory back to the kernel: a training step frees and reallocates the same
/// large buffers every iteration; with mimalloc's default 10 ms purge delay the four episodes
/// above still took 11,576 page faults and 1.85 s of kernel time, without purging 733 and
/// 0.36 s. Memory stays bounded by the peak of one step.
fn keep_freed_memory() {
    // Safety: sets a plain integer option; mimalloc reads it on every purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() -> ExitCode {
    keep_freed_memory();
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let place = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error in metalearn{place}: {payload}; please report it with the \
             command line that caused it"
        );
    }));
    // Usage errors exit with status 2 and --help / --version with 0, as clap decides.
    let cli = Cli::parse();
    // Before any thread or tensor exists: `--threads`, then second-order gradients on and the
    // thread count pinned. The order matters: `init` builds a pool of that many threads.
    apply_threads(cli.threads);
    metalearn::runtime::init();
    #[cfg(feature = "mpi")]
    let world = match metalearn::distributed::mpi::MpiWorld::init() {
        Ok(world) => {
            let world = std::sync::Arc::new(world);
            metalearn::distributed::set_world(world.clone());
            world
        }
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(&cli);
    #[cfg(feature = "mpi")]
    {
        use metalearn::distributed::Collective;
        if let Err(error) = &outcome {
            if world.size() > 1 {
                // The other ranks may be waiting in a collective for this one: end them all.
                eprintln!(
                    "error (rank {} of {}): {}; ending every rank",
                    world.rank(),
                    world.size(),
                    error_chain(error)
                );
                world.abort(1);
            }
        }
        // The last handle: finalises MPI.
        drop(metalearn::distributed::take_world());
        drop(world);
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
