//! Behaviour of task sampling and of meta-training: episodic splits and episode shapes, sinusoid
//! ranges, learning on small budgets, the training loop's files, checkpoint round trips and
//! exact resumption.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use metalearn::data::classes::{ClassPool, SplitSpec};
use metalearn::eval::meta_evaluate;
use metalearn::meta::learner::MetaLearner;
use metalearn::meta::{AlgorithmConfig, AlgorithmKind};
use metalearn::meta_training::{
    meta_train, resume, MetaTrainOptions, Schedule, BEST_FILE, LATEST_FILE, LOG_FILE,
};
use metalearn::tasks::episodic::{EpisodeSpec, EpisodicSampler};
use metalearn::tasks::sinusoid::SinusoidTasks;
use metalearn::tasks::{Split, Task, TaskKind, TaskSource};
use metalearn::{Activation, Architecture, Checkpoint, Layer, OptimizerConfig};

const SPLITS: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

// ---------------------------------------------------------------------------------------------
// Episodic sampler
// ---------------------------------------------------------------------------------------------

/// A pool whose single input feature is the example's index, so a sampled example can be traced
/// back to its class (`index / per_class`).
fn indexed_pool(classes: usize, per_class: usize, groups: Option<Vec<usize>>) -> ClassPool {
    let n = classes * per_class;
    let x = Tensor::from_vec(
        (0..n).map(|i| i as f32).collect::<Vec<_>>(),
        (n, 1),
        &Device::Cpu,
    )
    .expect("shape");
    let labels: Vec<usize> = (0..n).map(|i| i / per_class).collect();
    let names = (0..classes).map(|c| format!("class{c}")).collect();
    ClassPool::new(x, &labels, names, groups).expect("valid pool")
}

fn example_indices(x: &Tensor) -> Vec<usize> {
    x.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 inputs")
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

fn label_values(y: &Tensor) -> Vec<usize> {
    y.to_vec1::<f32>()
        .expect("1-D f32 labels")
        .into_iter()
        .map(|v| {
            assert_eq!(v.fract(), 0.0, "label {v} is not an integer");
            v as usize
        })
        .collect()
}

/// Checks one episode's shape and labelling; returns the pool classes it used.
fn check_episode(task: &Task, spec: &EpisodeSpec, per_class: usize) -> BTreeSet<usize> {
    let (ways, shots, queries) = (spec.ways, spec.shots, spec.queries);
    assert_eq!(task.support.0.dims(), &[ways * shots, 1]);
    assert_eq!(task.query.0.dims(), &[ways * queries, 1]);
    let mut label_to_class: BTreeMap<usize, usize> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (set, per_label) in [(&task.support, shots), (&task.query, queries)] {
        let idx = example_indices(&set.0);
        let labels = label_values(&set.1);
        assert_eq!(idx.len(), labels.len());
        let mut counts = vec![0usize; ways];
        for (&i, &label) in idx.iter().zip(&labels) {
            assert!(label < ways, "label {label} outside 0..{ways}");
            counts[label] += 1;
            let class = i / per_class;
            // One pool class per label, the same in support and query.
            let mapped = *label_to_class.entry(label).or_insert(class);
            assert_eq!(
                mapped, class,
                "label {label} mixes classes {mapped} and {class}"
            );
            assert!(seen.insert(i), "example {i} drawn twice in one task");
        }
        assert_eq!(counts, vec![per_label; ways], "examples per label");
    }
    let classes: BTreeSet<usize> = label_to_class.values().copied().collect();
    assert_eq!(classes.len(), ways, "two labels share a class");
    classes
}

fn tensors_equal(a: &Tensor, b: &Tensor) -> bool {
    let v = |t: &Tensor| {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32")
    };
    a.dims() == b.dims() && v(a) == v(b)
}

fn tasks_equal(a: &Task, b: &Task) -> bool {
    tensors_equal(&a.support.0, &b.support.0)
        && tensors_equal(&a.support.1, &b.support.1)
        && tensors_equal(&a.query.0, &b.query.0)
        && tensors_equal(&a.query.1, &b.query.1)
}

#[test]
fn episodic_splits_are_class_disjoint_and_episodes_well_formed() -> Result<()> {
    let (classes, per_class) = (30, 8);
    let spec = EpisodeSpec {
        ways: 4,
        shots: 2,
        queries: 3,
        same_group: false,
    };
    let sampler = EpisodicSampler::new(
        indexed_pool(classes, per_class, None),
        spec.clone(),
        &SplitSpec {
            fractions: [0.6, 0.2, 0.2],
            by_group: false,
            seed: 3,
        },
    )?;
    let lists: Vec<BTreeSet<usize>> = SPLITS
        .iter()
        .map(|&s| sampler.classes(s).iter().copied().collect())
        .collect();
    assert_eq!(lists.iter().map(|l| l.len()).sum::<usize>(), classes);
    let all: BTreeSet<usize> = lists.iter().flatten().copied().collect();
    assert_eq!(all.len(), classes, "splits overlap or miss classes");
    assert_eq!(lists[0].len(), 18);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (split, allowed) in SPLITS.iter().zip(&lists) {
        let mut used = BTreeSet::new();
        for task in sampler.sample_batch(*split, 25, &mut rng)? {
            let classes = check_episode(&task, &spec, per_class);
            assert!(
                classes.is_subset(allowed),
                "{split:?} task used classes {classes:?} outside its split {allowed:?}"
            );
            used.extend(classes);
        }
        assert!(
            used.len() > spec.ways,
            "{split:?} tasks always use the same classes"
        );
    }
    Ok(())
}

#[test]
fn episodic_sampling_is_reproducible_from_the_seed() -> Result<()> {
    let spec = EpisodeSpec {
        ways: 3,
        shots: 1,
        queries: 2,
        same_group: false,
    };
    let sampler = EpisodicSampler::new(indexed_pool(20, 5, None), spec, &SplitSpec::default())?;
    let draw = |seed: u64| {
        sampler
            .sample_batch(Split::Train, 6, &mut ChaCha8Rng::seed_from_u64(seed))
            .expect("sampling")
    };
    let (a, b, c) = (draw(9), draw(9), draw(10));
    assert!(
        a.iter().zip(&b).all(|(x, y)| tasks_equal(x, y)),
        "same seed, different tasks"
    );
    assert!(
        !a.iter().zip(&c).all(|(x, y)| tasks_equal(x, y)),
        "different seeds gave identical tasks"
    );
    // The split itself depends only on the split seed.
    let again = EpisodicSampler::new(
        indexed_pool(20, 5, None),
        sampler.episode().clone(),
        &SplitSpec::default(),
    )?;
    for s in SPLITS {
        assert_eq!(sampler.classes(s), again.classes(s));
    }
    Ok(())
}

#[test]
fn same_group_tasks_and_group_splits_keep_groups_together() -> Result<()> {
    // 8 groups ("alphabets") of 5 classes.
    let (classes, per_class) = (40, 4);
    let groups: Vec<usize> = (0..classes).map(|c| c / 5).collect();
    let spec = EpisodeSpec {
        ways: 3,
        shots: 1,
        queries: 1,
        same_group: true,
    };
    let sampler = EpisodicSampler::new(
        indexed_pool(classes, per_class, Some(groups.clone())),
        spec.clone(),
        &SplitSpec {
            fractions: [0.5, 0.25, 0.25],
            by_group: true,
            seed: 7,
        },
    )?;
    for split in SPLITS {
        let split_groups: BTreeSet<usize> =
            sampler.classes(split).iter().map(|&c| groups[c]).collect();
        for g in &split_groups {
            let members = (0..classes).filter(|&c| groups[c] == *g).count();
            let inside = sampler
                .classes(split)
                .iter()
                .filter(|&&c| groups[c] == *g)
                .count();
            assert_eq!(inside, members, "group {g} is split across splits");
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut groups_used = BTreeSet::new();
    for task in sampler.sample_batch(Split::Train, 30, &mut rng)? {
        let task_groups: BTreeSet<usize> = check_episode(&task, &spec, per_class)
            .into_iter()
            .map(|c| groups[c])
            .collect();
        assert_eq!(
            task_groups.len(),
            1,
            "a same-group task mixed groups {task_groups:?}"
        );
        groups_used.extend(task_groups);
    }
    assert!(groups_used.len() > 1, "every task came from one group");
    Ok(())
}

#[test]
fn impossible_episodes_are_errors_that_say_what_to_lower() {
    // 10 classes: validation and test get 2 each, too few for 5-way tasks.
    let spec = EpisodeSpec {
        ways: 5,
        shots: 1,
        queries: 1,
        same_group: false,
    };
    let sampler = EpisodicSampler::new(indexed_pool(10, 4, None), spec, &SplitSpec::default())
        .expect("every class has enough examples");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert!(sampler.sample(Split::Train, &mut rng).is_ok());
    let err = sampler
        .sample(Split::Validation, &mut rng)
        .expect_err("5-way tasks from 2 classes");
    assert!(err.to_string().contains("lower ways"), "message: {err}");
    let err = sampler
        .check_split(Split::Test)
        .expect_err("5-way tasks from 2 classes");
    assert!(err.to_string().contains("lower ways"), "message: {err}");

    // 4 examples per class, but 3 shots + 2 queries.
    let err = EpisodicSampler::new(
        indexed_pool(10, 4, None),
        EpisodeSpec {
            ways: 2,
            shots: 3,
            queries: 2,
            same_group: false,
        },
        &SplitSpec::default(),
    )
    .expect_err("not enough examples per class");
    let text = err.to_string();
    assert!(text.contains("lower shots or queries"), "message: {text}");
    assert!(
        text.contains('4') && text.contains('5'),
        "message should give the counts: {text}"
    );

    // Same-group tasks when no group has enough classes.
    let groups = (0..12).map(|c| c / 2).collect();
    let sampler = EpisodicSampler::new(
        indexed_pool(12, 3, Some(groups)),
        EpisodeSpec {
            ways: 3,
            shots: 1,
            queries: 1,
            same_group: true,
        },
        &SplitSpec::default(),
    )
    .expect("example counts are fine");
    let err = sampler
        .sample(Split::Train, &mut rng)
        .expect_err("groups of 2 classes cannot serve 3-way tasks");
    assert!(err.to_string().contains("lower ways"), "message: {err}");
}

// ---------------------------------------------------------------------------------------------
// Sinusoid tasks
// ---------------------------------------------------------------------------------------------

#[test]
fn sinusoid_tasks_respect_the_configured_ranges() -> Result<()> {
    let source = SinusoidTasks {
        amplitude: [1.0, 2.0],
        phase: [0.5, 1.0],
        x_range: [-1.0, 3.0],
        support: 7,
        query: 4,
        test_grid: Some(11),
    };
    source.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..200 {
        let f = source.draw_function(&mut rng);
        assert!(
            (1.0..=2.0).contains(&f.amplitude),
            "amplitude {}",
            f.amplitude
        );
        assert!((0.5..=1.0).contains(&f.phase), "phase {}", f.phase);
    }
    for _ in 0..50 {
        let task = source.sample(Split::Train, &mut rng)?;
        assert_eq!(task.support.0.dims(), &[7, 1]);
        assert_eq!(task.query.0.dims(), &[4, 1]);
        for (x, y) in [&task.support, &task.query] {
            for v in x.flatten_all()?.to_vec1::<f32>()? {
                assert!((-1.0..=3.0).contains(&v), "x = {v} outside [-1, 3]");
            }
            for v in y.flatten_all()?.to_vec1::<f32>()? {
                assert!(
                    v.abs() <= 2.0 + 1e-6,
                    "|y| = {v} above the largest amplitude"
                );
            }
        }
    }
    // Points lie on the drawn sinusoid; the test grid spans the input range evenly.
    let (task, f) = source.sample_with_grid(11, &mut rng)?;
    let xs = task.query.0.flatten_all()?.to_vec1::<f32>()?;
    let ys = task.query.1.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(xs.len(), 11);
    for (i, (&x, &y)) in xs.iter().zip(&ys).enumerate() {
        assert!(
            (x as f64 - (-1.0 + 0.4 * i as f64)).abs() < 1e-6,
            "grid point {i} is {x}"
        );
        assert!(
            (y as f64 - f.eval(x as f64)).abs() < 1e-5,
            "y({x}) = {y}, expected {}",
            f.eval(x as f64)
        );
    }
    let test_task = source.sample(Split::Test, &mut rng)?;
    assert_eq!(test_task.query.0.dims(), &[11, 1]);
    assert_eq!(test_task.support.0.dims(), &[7, 1]);
    // Reversed ranges are refused with the field's name.
    let bad = SinusoidTasks {
        amplitude: [5.0, 0.1],
        ..SinusoidTasks::default()
    };
    let err = bad.validate().expect_err("reversed amplitude range");
    assert!(err.to_string().contains("amplitude"), "message: {err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Learning
// ---------------------------------------------------------------------------------------------

fn maml_config(inner_lr: f64) -> AlgorithmConfig {
    AlgorithmConfig {
        name: AlgorithmKind::Maml,
        first_order: false,
        inner_lr,
        inner_steps: 1,
        eval_inner_steps: 1,
        distance_scale: 1.0,
        adapt_from: None,
    }
}

#[test]
fn maml_on_sinusoids_lowers_post_adaptation_error() -> Result<()> {
    metalearn::runtime::init();
    let source = SinusoidTasks::default();
    let arch = Architecture::mlp(&[1, 40, 40, 1], Activation::Relu)?;
    let mut learner = MetaLearner::new(
        &arch,
        maml_config(0.01),
        TaskKind::Regression,
        OptimizerConfig::adam(1e-3),
        0,
        DType::F32,
    )?;
    let held_out = |l: &MetaLearner| {
        meta_evaluate(l, &source, Split::Test, 100, Some(5), 77)
            .expect("evaluation")
            .mean
    };
    let before = held_out(&learner);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..300 {
        let tasks = source.sample_batch(Split::Train, 5, &mut rng)?;
        learner.meta_train_step(&tasks)?;
    }
    let after = held_out(&learner);
    eprintln!("sinusoid MAML: post-adaptation MSE {before:.3} -> {after:.3}");
    assert!(
        after < 0.75 * before,
        "post-adaptation MSE did not drop enough: {before:.3} -> {after:.3}"
    );
    Ok(())
}

/// Gaussian blobs: each class is a 2-D centre plus noise, padded with nuisance features of large
/// variance that carry no class information (an embedding has to learn to ignore them).
fn blob_sampler(classes: usize, per_class: usize, ways: usize) -> Result<EpisodicSampler> {
    let nuisance = 4;
    let dim = 2 + nuisance;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let noise = Normal::new(0.0, 0.35).expect("valid std");
    let wide = Normal::new(0.0, 3.0).expect("valid std");
    let mut values = Vec::with_capacity(classes * per_class * dim);
    let mut labels = Vec::new();
    for c in 0..classes {
        let centre: [f64; 2] = [rng.gen_range(-3.0..3.0), rng.gen_range(-3.0..3.0)];
        for _ in 0..per_class {
            values.push((centre[0] + noise.sample(&mut rng)) as f32);
            values.push((centre[1] + noise.sample(&mut rng)) as f32);
            for _ in 0..nuisance {
                values.push(wide.sample(&mut rng) as f32);
            }
            labels.push(c);
        }
    }
    let x = Tensor::from_vec(values, (classes * per_class, dim), &Device::Cpu)?;
    let names = (0..classes).map(|c| format!("blob{c}")).collect();
    let pool = ClassPool::new(x, &labels, names, None)?;
    Ok(EpisodicSampler::new(
        pool,
        EpisodeSpec {
            ways,
            shots: 1,
            queries: 5,
            same_group: false,
        },
        &SplitSpec::default(),
    )?)
}

#[test]
fn protonet_on_gaussian_blobs_beats_chance() -> Result<()> {
    metalearn::runtime::init();
    let ways = 5;
    let source = blob_sampler(60, 12, ways)?;
    let arch = Architecture::mlp(&[6, 32, 8], Activation::Relu)?;
    let mut learner = MetaLearner::new(
        &arch,
        AlgorithmConfig::new(AlgorithmKind::Protonet),
        TaskKind::Classification { ways },
        OptimizerConfig::adam(3e-3),
        5,
        DType::F32,
    )?;
    let accuracy = |l: &MetaLearner| {
        meta_evaluate(l, &source, Split::Test, 200, None, 11)
            .expect("evaluation")
            .mean
    };
    let before = accuracy(&learner);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..200 {
        let tasks = source.sample_batch(Split::Train, 4, &mut rng)?;
        learner.meta_train_step(&tasks)?;
    }
    let after = accuracy(&learner);
    let chance = 1.0 / ways as f64;
    eprintln!("ProtoNet blobs: accuracy {before:.3} -> {after:.3} (chance {chance})");
    assert!(
        after > 3.0 * chance,
        "accuracy {after:.3} is not clearly above chance {chance}"
    );
    assert!(
        after > before + 0.05,
        "no improvement: {before:.3} -> {after:.3}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Training loop, checkpoints, resumption
// ---------------------------------------------------------------------------------------------

fn small_sinusoids() -> SinusoidTasks {
    SinusoidTasks {
        support: 5,
        query: 5,
        test_grid: Some(20),
        ..SinusoidTasks::default()
    }
}

fn options(iterations: u64, out_dir: Option<&Path>) -> MetaTrainOptions {
    MetaTrainOptions {
        iterations,
        meta_batch: 3,
        validate_every: 10,
        validation_tasks: 4,
        checkpoint_every: 10,
        out_dir: out_dir.map(Path::to_path_buf),
        seed: 5,
        outer_lr: 2e-3,
        // Depends on the iteration count only, so a resumed run sees the same rates.
        schedule: Schedule::Step {
            every: 15,
            factor: 0.5,
        },
        progress: false,
        experiment: serde_json::json!({"test": "meta_behaviour"}),
        extra_sections: Default::default(),
    }
}

fn sinusoid_learner(kind: AlgorithmKind) -> Result<MetaLearner> {
    let arch = Architecture::mlp(&[1, 16, 16, 1], Activation::Relu)?;
    let config = AlgorithmConfig {
        name: kind,
        first_order: false,
        inner_lr: 0.02,
        inner_steps: 2,
        eval_inner_steps: 3,
        distance_scale: 1.0,
        adapt_from: None,
    };
    Ok(MetaLearner::new(
        &arch,
        config,
        TaskKind::Regression,
        OptimizerConfig::adam(2e-3),
        8,
        DType::F32,
    )?)
}

fn weights_of(learner: &MetaLearner) -> Vec<f32> {
    let meta = learner.meta_params();
    let mut out: Vec<f32> = meta
        .weights
        .to_f64_vec()
        .expect("values")
        .into_iter()
        .map(|v| v as f32)
        .collect();
    if let Some(lrs) = meta.inner_lrs {
        out.extend(
            lrs.to_f64_vec()
                .expect("values")
                .into_iter()
                .map(|v| v as f32),
        );
    }
    out
}

#[test]
fn meta_train_writes_checkpoints_and_log() -> Result<()> {
    metalearn::runtime::init();
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let source = small_sinusoids();
    let mut learner = sinusoid_learner(AlgorithmKind::Maml)?;
    let report = meta_train(&mut learner, &source, &options(20, Some(&out)), None)?;
    assert_eq!(report.iterations, 20);
    assert_eq!(learner.iteration(), 20);
    assert!(report.final_meta_loss.is_finite());
    for file in [BEST_FILE, LATEST_FILE, LOG_FILE] {
        assert!(out.join(file).is_file(), "{file} was not written");
    }
    assert_eq!(
        report.latest_checkpoint.as_deref(),
        Some(out.join(LATEST_FILE).as_path())
    );
    assert_eq!(
        report.best_checkpoint.as_deref(),
        Some(out.join(BEST_FILE).as_path())
    );
    let (best_iteration, best) = report.best_validation.expect("validated");
    assert!([10, 20].contains(&best_iteration));
    let log = std::fs::read_to_string(out.join(LOG_FILE))?;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(lines.len(), 2, "one log line per validation:\n{log}");
    for (line, iteration) in lines.iter().zip([10, 20]) {
        assert_eq!(line["iteration"], iteration);
        assert!(
            line["meta_loss"].as_f64().is_some_and(f64::is_finite),
            "{line}"
        );
        assert!(
            line["val_mse"].as_f64().is_some_and(f64::is_finite),
            "{line}"
        );
    }
    let best_logged = lines
        .iter()
        .map(|l| l["val_mse"].as_f64().expect("number"))
        .fold(f64::INFINITY, f64::min);
    assert_eq!(
        best.mean, best_logged,
        "best checkpoint is not the best validation"
    );
    // Both checkpoints load as learners, and the latest one carries the experiment section.
    let latest = Checkpoint::load(out.join(LATEST_FILE), &Device::Cpu)?;
    assert_eq!(
        latest.section("experiment"),
        Some(&serde_json::json!({"test": "meta_behaviour"}))
    );
    let restored = MetaLearner::from_checkpoint(&latest)?;
    assert_eq!(restored.iteration(), 20);
    let best_ckpt = Checkpoint::load(out.join(BEST_FILE), &Device::Cpu)?;
    assert_eq!(
        MetaLearner::from_checkpoint(&best_ckpt)?.iteration(),
        best_iteration
    );
    Ok(())
}

fn predictions_after_round_trip(learner: &MetaLearner, task: &Task, dir: &Path) -> Result<()> {
    let path = dir.join(format!(
        "{}.safetensors",
        learner.algorithm_config().name.name()
    ));
    learner.to_checkpoint()?.save(&path)?;
    let restored = MetaLearner::from_checkpoint(&Checkpoint::load(&path, &Device::Cpu)?)?;
    assert_eq!(restored.iteration(), learner.iteration());
    assert_eq!(restored.algorithm_config(), learner.algorithm_config());
    assert_eq!(weights_of(&restored), weights_of(learner));
    let predict = |l: &MetaLearner| -> Result<Vec<f32>> {
        let adapted = l.adapt((&task.support.0, &task.support.1), None)?;
        Ok(l.predict(&adapted, &task.query.0)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let (a, b) = (predict(learner)?, predict(&restored)?);
    assert_eq!(
        a,
        b,
        "{}: predictions changed after a checkpoint round trip",
        path.display()
    );
    Ok(())
}

#[test]
fn checkpoint_round_trip_gives_identical_predictions() -> Result<()> {
    metalearn::runtime::init();
    let dir = tempfile::tempdir()?;
    let source = small_sinusoids();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let task = source.sample(Split::Test, &mut rng)?;
    for kind in [
        AlgorithmKind::Maml,
        AlgorithmKind::MetaSgd,
        AlgorithmKind::Reptile,
    ] {
        let mut learner = sinusoid_learner(kind)?;
        for _ in 0..5 {
            learner.meta_train_step(&source.sample_batch(Split::Train, 3, &mut rng)?)?;
        }
        predictions_after_round_trip(&learner, &task, dir.path())?;
    }
    // ProtoNet with batch-norm: the running statistics travel too.
    let ways = 3;
    let blobs = blob_sampler(20, 8, ways)?;
    let mut arch = Architecture::new(&[6]);
    arch.push(Layer::dense(8));
    arch.push(Layer::batch_norm());
    arch.push(Layer::relu());
    arch.push(Layer::dense(4));
    let mut learner = MetaLearner::new(
        &arch,
        AlgorithmConfig::new(AlgorithmKind::Protonet),
        TaskKind::Classification { ways },
        OptimizerConfig::adam(1e-3),
        2,
        DType::F32,
    )?;
    let initial_stats = learner.buffers().to_f64_vec()?;
    for _ in 0..5 {
        learner.meta_train_step(&blobs.sample_batch(Split::Train, 2, &mut rng)?)?;
    }
    assert_ne!(
        learner.buffers().to_f64_vec()?,
        initial_stats,
        "running statistics never updated"
    );
    let task = blobs.sample(Split::Test, &mut rng)?;
    predictions_after_round_trip(&learner, &task, dir.path())
}

#[test]
fn resumed_training_matches_an_uninterrupted_run_exactly() -> Result<()> {
    metalearn::runtime::init();
    let dir = tempfile::tempdir()?;
    let source = small_sinusoids();
    for kind in [AlgorithmKind::Maml, AlgorithmKind::MetaSgd] {
        let interrupted = dir.path().join(format!("interrupted-{}", kind.name()));
        let mut first = sinusoid_learner(kind)?;
        meta_train(&mut first, &source, &options(20, Some(&interrupted)), None)?;
        let (mut resumed, ckpt) = resume(&interrupted, &Device::Cpu)?;
        assert_eq!(resumed.iteration(), 20);
        let report = meta_train(
            &mut resumed,
            &source,
            &options(40, Some(&interrupted)),
            Some(&ckpt),
        )?;
        assert_eq!(report.iterations, 40);

        let mut straight = sinusoid_learner(kind)?;
        let straight_dir = dir.path().join(format!("straight-{}", kind.name()));
        meta_train(
            &mut straight,
            &source,
            &options(40, Some(&straight_dir)),
            None,
        )?;
        assert_eq!(straight.iteration(), 40);
        let (a, b) = (weights_of(&resumed), weights_of(&straight));
        assert!(
            a == b,
            "{}: resumed run differs from the uninterrupted one (max |Δ| = {:e})",
            kind.name(),
            a.iter()
                .zip(&b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        );
        assert_ne!(
            weights_of(&first),
            a,
            "training after resume changed nothing"
        );
        // The logs agree from the resumed iteration on.
        let log = |d: &Path| std::fs::read_to_string(d.join(LOG_FILE)).expect("log");
        let val = |text: String| -> Vec<(u64, f64)> {
            text.lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
                    (
                        v["iteration"].as_u64().expect("iteration"),
                        v["val_mse"].as_f64().expect("val"),
                    )
                })
                .collect()
        };
        assert_eq!(val(log(&interrupted)), val(log(&straight_dir)));
    }
    Ok(())
}

#[test]
fn a_learner_in_f64_trains_on_f32_tasks() -> Result<()> {
    // Task sources produce f32 tensors; an f64 learner converts them.
    metalearn::runtime::init();
    let source = small_sinusoids();
    let arch = Architecture::mlp(&[1, 8, 1], Activation::Tanh)?;
    let mut learner = MetaLearner::new(
        &arch,
        maml_config(0.01),
        TaskKind::Regression,
        OptimizerConfig::adam(1e-3),
        0,
        DType::F64,
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let loss = learner.meta_train_step(&source.sample_batch(Split::Train, 2, &mut rng)?)?;
    assert!(loss.is_finite());
    let score = learner.evaluate_task(&source.sample(Split::Test, &mut rng)?, None)?;
    assert!(score.is_finite());
    Ok(())
}

/// Every algorithm, called directly with no task, answers an error instead of panicking.
#[test]
fn empty_meta_batch_is_an_error_for_every_algorithm() -> Result<()> {
    let arch = Architecture::mlp(&[1, 8, 1], Activation::Relu)?;
    for kind in [
        AlgorithmKind::Maml,
        AlgorithmKind::MetaSgd,
        AlgorithmKind::Anil,
        AlgorithmKind::Reptile,
    ] {
        let learner = MetaLearner::new(
            &arch,
            AlgorithmConfig::new(kind),
            TaskKind::Regression,
            OptimizerConfig::adam(1e-3),
            0,
            DType::F32,
        )?;
        let algorithm = metalearn::meta::build_algorithm(learner.algorithm_config())?;
        let result = algorithm.meta_train_step(
            learner.network(),
            &learner.meta_params(),
            &[],
            TaskKind::Regression,
        );
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("empty meta-batch"),
            "{kind:?}: {message:?}"
        );
    }
    Ok(())
}
