//! Data-parallel meta-training under MPI (the `mpi` cargo feature, run with `mpirun` on this
//! machine's loopback): N ranks reproduce the single-process run in f64 for every algorithm,
//! meta-eval splits its episodes and gathers the same summary, resume works with the same or
//! another number of ranks, and a rank that dies ends the whole job instead of hanging it.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::meta_runs::{last_json, load_checkpoint, write_square_images};

/// `metalearn --threads 1 ARGS` under `mpirun -np RANKS`, or with `ranks = 0` one process of
/// `threads` threads, in `dir`.
fn command(dir: &Path, ranks: usize, args: &[&str]) -> Command {
    command_with_threads(dir, ranks, 1, args)
}

fn command_with_threads(dir: &Path, ranks: usize, threads: usize, args: &[&str]) -> Command {
    let binary = env!("CARGO_BIN_EXE_metalearn");
    let mut cmd = if ranks == 0 {
        Command::new(binary)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &ranks.to_string(), binary]);
        c
    };
    cmd.args(["--threads", &threads.to_string()])
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        // Containers and CI run as root; OpenMPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(dir);
    cmd
}

fn run(dir: &Path, ranks: usize, args: &[&str]) -> serde_json::Value {
    run_with_threads(dir, ranks, 1, args)
}

fn run_with_threads(dir: &Path, ranks: usize, threads: usize, args: &[&str]) -> serde_json::Value {
    let out = command_with_threads(dir, ranks, threads, args)
        .output()
        .expect("mpirun is installed (the mpi feature needs OpenMPI or MPICH)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{ranks} ranks, {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "one JSON line (rank 0's) expected: {stdout}"
    );
    last_json(&stdout)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every tensor of a checkpoint: weights, batch-norm statistics and the optimiser's state.
fn tensors(path: &Path) -> Vec<(String, candle_core::Tensor)> {
    let ckpt = load_checkpoint(path);
    let mut out = Vec::new();
    for (kind, set) in [
        ("param", &ckpt.params),
        ("buffer", &ckpt.buffers),
        ("state", &ckpt.state),
    ] {
        for name in set.names() {
            out.push((format!("{kind} {name}"), set.get(name).unwrap().clone()));
        }
    }
    assert!(!out.is_empty(), "{} holds no tensors", path.display());
    out
}

/// Largest relative difference between the tensors of two checkpoints (each tensor against its
/// largest magnitude).
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    let mut worst: f64 = 0.0;
    for ((name, t), (other, u)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        let x = t
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let y = u
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let (x, y) = (x.to_vec1::<f64>().unwrap(), y.to_vec1::<f64>().unwrap());
        let scale = x.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
        for (p, q) in x.iter().zip(&y) {
            let d = (p - q).abs() / scale;
            if d > worst {
                worst = d;
                if std::env::var_os("MPI_TEST_VERBOSE").is_some() {
                    eprintln!("{name}: {p} vs {q} (scale {scale})");
                }
            }
        }
    }
    worst
}

fn protonet_config(dir: &Path) -> PathBuf {
    write_square_images(&dir.join("images"), 10, 7);
    let path = dir.join("protonet.toml");
    std::fs::write(
        &path,
        "[task]\nkind = \"classification\"\ndata = \"images\"\nimage_size = [16, 16]\n\
         channels = 1\nways = 3\nshots = 2\nqueries = 2\nsplit = [0.5, 0.25, 0.25]\n\n\
         [model]\narch = \"conv4\"\nwidth = 8\n\n[algorithm]\nname = \"protonet\"\n\n\
         [training]\niterations = 100\nmeta_batch = 6\nouter_lr = 0.001\nvalidate_every = 2\n\
         validation_tasks = 5\ncheckpoint_every = 2\nseed = 3\n\n[eval]\nepisodes = 7\n",
    )
    .unwrap();
    path
}

#[test]
fn ranks_reproduce_one_process_in_f64_for_every_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let configs = repo().join("configs");
    let mut runs: Vec<(String, PathBuf)> = [
        "sine-maml",
        "sine-fomaml",
        "sine-meta-sgd",
        "sine-anil",
        "sine-reptile",
    ]
    .iter()
    .map(|c| (c.to_string(), configs.join(format!("{c}.toml"))))
    .collect();
    runs.push(("protonet".into(), protonet_config(dir.path())));
    for (name, config) in &runs {
        let config = config.to_str().unwrap();
        let train = |ranks: usize, threads: usize| {
            let out = format!("{name}-{ranks}-{threads}");
            let summary = run_with_threads(
                dir.path(),
                ranks,
                threads,
                &[
                    "meta-train",
                    "--config",
                    config,
                    "--iterations",
                    "3",
                    "--precision",
                    "f64",
                    "--out",
                    &out,
                    "--json",
                ],
            );
            assert_eq!(summary["iterations"], 3, "{summary}");
            (summary, dir.path().join(&out).join("latest.safetensors"))
        };
        let (_, one_thread) = train(0, 1);
        for ranks in [2, 3] {
            // One process whose threads split the meta-batch as the ranks do.
            let (single, single_ckpt) = train(0, ranks);
            let (split, split_ckpt) = train(ranks, 1);
            let difference = max_relative_difference(&single_ckpt, &split_ckpt);
            assert!(
                difference <= 1e-12,
                "{name}: {ranks} ranks differ from one process of {ranks} threads by \
                 {difference:e} (relative)"
            );
            assert_eq!(split["ranks"], ranks, "{split}");
            let (a, b) = (
                single["final_meta_loss"].as_f64().unwrap(),
                split["final_meta_loss"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-12 * a.abs(),
                "{name}: meta-loss {a} vs {b}"
            );
            // Against one thread, only the grouping of the tasks' sums differs; Adam turns the
            // rounding of nearly cancelling gradient components into small weight differences.
            let difference = max_relative_difference(&one_thread, &split_ckpt);
            assert!(
                difference <= 1e-8,
                "{name}: {ranks} ranks differ from one thread by {difference:e} (relative)"
            );
        }
    }
    // meta-eval splits its episodes across the ranks and reports what one process does.
    let model = dir.path().join("protonet-0-1");
    let model = model.to_str().unwrap();
    let alone = run(
        dir.path(),
        0,
        &["meta-eval", "--model", model, "--episodes", "7", "--json"],
    );
    let split = run(
        dir.path(),
        3,
        &["meta-eval", "--model", model, "--episodes", "7", "--json"],
    );
    assert_eq!(alone["episodes"], 7);
    for key in ["mean", "ci95"] {
        let (a, b) = (alone[key].as_f64().unwrap(), split[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-12,
            "meta-eval {key}: {a} alone, {b} on 3 ranks"
        );
    }
}

#[test]
fn resume_under_mpi_matches_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = protonet_config(dir.path());
    let config = config.to_str().unwrap();
    let train = |ranks: usize, out: &str, iterations: &str, resume: bool| {
        let mut args = vec![
            "meta-train",
            "--config",
            config,
            "--iterations",
            iterations,
            "--precision",
            "f64",
            "--out",
            out,
            "--json",
        ];
        if resume {
            args.push("--resume");
        }
        run(dir.path(), ranks, &args)
    };
    train(2, "whole", "6", false);
    train(2, "resumed", "4", false);
    train(2, "resumed", "6", true);
    let (whole, resumed) = (
        dir.path().join("whole/latest.safetensors"),
        dir.path().join("resumed/latest.safetensors"),
    );
    for ((name, t), (_, u)) in tensors(&whole).iter().zip(&tensors(&resumed)) {
        let bits = |t: &candle_core::Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bits(t),
            bits(u),
            "{name} differs after a resume on the same 2 ranks"
        );
    }
    // Another number of ranks takes over from the same checkpoint: the same as one process
    // whose thread count changes the same way.
    train(2, "switched", "4", false);
    train(3, "switched", "6", true);
    let single = |threads: usize, iterations: &str, resume: bool| {
        let mut args = vec![
            "meta-train",
            "--config",
            config,
            "--iterations",
            iterations,
            "--precision",
            "f64",
            "--out",
            "threads",
            "--json",
        ];
        if resume {
            args.push("--resume");
        }
        run_with_threads(dir.path(), 0, threads, &args)
    };
    single(2, "4", false);
    single(3, "6", true);
    let difference = max_relative_difference(
        &dir.path().join("threads/latest.safetensors"),
        &dir.path().join("switched/latest.safetensors"),
    );
    assert!(difference <= 1e-12, "resumed on 3 ranks: {difference:e}");
}

#[test]
fn a_rank_that_dies_ends_the_job_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let config = protonet_config(dir.path());
    let config = config.to_str().unwrap();
    let mut job = command(
        dir.path(),
        2,
        &[
            "meta-train",
            "--config",
            config,
            "--iterations",
            "1000000",
            "--precision",
            "f64",
            "--out",
            "killed",
            "--json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Wait for a checkpoint, then kill one rank (a child of mpirun running metalearn).
    let latest = dir.path().join("killed/latest.safetensors");
    let started = Instant::now();
    while !latest.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", job.id()))
        .unwrap_or_default();
    let rank = children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("metalearn"))
        })
        .expect("a metalearn rank under mpirun");
    Command::new("kill")
        .args(["-9", &rank.to_string()])
        .status()
        .unwrap();
    let killed_at = Instant::now();
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            assert!(
                !status.success(),
                "the job succeeded although a rank was killed"
            );
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the job still runs a minute after one of its ranks died"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.is_empty(), "the job ended without saying why");
    // Resume from the last checkpoint to 8 iterations; an uninterrupted run ends the same.
    let done = load_checkpoint(&latest).section("loop").unwrap()["iteration"]
        .as_u64()
        .unwrap();
    let target = (done + 4).to_string();
    let train = |out: &str, resume: bool| {
        let mut args = vec![
            "meta-train",
            "--config",
            config,
            "--iterations",
            &target,
            "--precision",
            "f64",
            "--out",
            out,
            "--json",
        ];
        if resume {
            args.push("--resume");
        }
        run(dir.path(), 2, &args)
    };
    train("killed", true);
    train("whole", false);
    let difference = max_relative_difference(
        &dir.path().join("whole/latest.safetensors"),
        &dir.path().join("killed/latest.safetensors"),
    );
    assert_eq!(
        difference, 0.0,
        "the resumed run differs from the uninterrupted one"
    );
}
