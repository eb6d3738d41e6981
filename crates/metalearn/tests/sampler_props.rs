//! Properties of the episodic sampler and of the class splits (generic and Omniglot), checked on
//! small synthetic pools whose every example carries its own index as its only input value, so a
//! task's inputs say exactly which examples it drew.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use metalearn::data::classes::{split_classes, ClassPool, SplitSpec};
use metalearn::data::omniglot::{AlphabetSplit, OmniglotData, OmniglotSplit};
use metalearn::tasks::episodic::{EpisodeSpec, EpisodicSampler};
use metalearn::tasks::{Split, Task, TaskSource};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const SPLITS: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

/// A synthetic labelled pool: example `i` has input value `i` and class `labels[i]`.
#[derive(Clone, Debug)]
struct Pool {
    labels: Vec<usize>,
    groups: Vec<usize>,
}

impl Pool {
    /// `sizes[c]` examples of class `c`, interleaved so that a class's examples are not
    /// contiguous; class `c` is in group `c % groups`.
    fn new(sizes: &[usize], groups: usize) -> Self {
        let mut labels = Vec::new();
        let most = sizes.iter().copied().max().unwrap_or(0);
        for round in 0..most {
            for (class, &size) in sizes.iter().enumerate() {
                if round < size {
                    labels.push(class);
                }
            }
        }
        Self {
            labels,
            groups: (0..sizes.len()).map(|c| c % groups.max(1)).collect(),
        }
    }

    fn num_classes(&self) -> usize {
        self.groups.len()
    }

    fn inputs(&self) -> Tensor {
        let ids: Vec<f32> = (0..self.labels.len()).map(|i| i as f32).collect();
        Tensor::from_vec(ids, (self.labels.len(), 1), &Device::Cpu).unwrap()
    }

    fn class_pool(&self) -> ClassPool {
        let names = (0..self.num_classes()).map(|c| format!("c{c}")).collect();
        ClassPool::new(
            self.inputs(),
            &self.labels,
            names,
            Some(self.groups.clone()),
        )
        .unwrap()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Checks one task against the pool: labels `0..ways` with `shots` support and `queries` query
/// examples each, every label one class of `allowed`, distinct classes for distinct labels, and
/// no example drawn twice (within or across support and query). Returns the classes drawn.
fn check_task(
    task: &Task,
    example_class: &[usize],
    allowed: &[usize],
    spec: &EpisodeSpec,
) -> std::result::Result<Vec<usize>, TestCaseError> {
    let (sx, sy) = (values(&task.support.0), values(&task.support.1));
    let (qx, qy) = (values(&task.query.0), values(&task.query.1));
    prop_assert_eq!(sx.len(), spec.ways * spec.shots);
    prop_assert_eq!(sy.len(), spec.ways * spec.shots);
    prop_assert_eq!(qx.len(), spec.ways * spec.queries);
    prop_assert_eq!(qy.len(), spec.ways * spec.queries);
    for (labels, per_class) in [(&sy, spec.shots), (&qy, spec.queries)] {
        let mut counts = BTreeMap::new();
        for &label in labels.iter() {
            prop_assert_eq!(label.fract(), 0.0, "label {} is not a class id", label);
            *counts.entry(label as usize).or_insert(0) += 1;
        }
        let expected: BTreeMap<usize, usize> = (0..spec.ways).map(|l| (l, per_class)).collect();
        prop_assert_eq!(counts, expected);
    }
    let mut class_of_label: BTreeMap<usize, usize> = BTreeMap::new();
    let mut drawn = BTreeSet::new();
    for (x, y) in sx.iter().zip(&sy).chain(qx.iter().zip(&qy)) {
        let example = *x as usize;
        prop_assert!(drawn.insert(example), "example {} drawn twice", example);
        let class = example_class[example];
        prop_assert!(
            allowed.contains(&class),
            "class {} is not in the split",
            class
        );
        let previous = class_of_label.insert(*y as usize, class);
        prop_assert!(
            previous.is_none() || previous == Some(class),
            "label {} covers two classes",
            y
        );
    }
    let classes: Vec<usize> = class_of_label.values().copied().collect();
    let distinct: BTreeSet<usize> = classes.iter().copied().collect();
    prop_assert_eq!(distinct.len(), spec.ways, "two labels share a class");
    Ok(classes)
}

/// Checks that the three lists are sorted, disjoint and cover every class exactly once.
fn check_partition(
    splits: &[Vec<usize>; 3],
    num_classes: usize,
) -> std::result::Result<(), TestCaseError> {
    let mut seen = vec![0usize; num_classes];
    for list in splits {
        prop_assert!(list.windows(2).all(|w| w[0] < w[1]), "unsorted {:?}", list);
        for &c in list {
            prop_assert!(c < num_classes);
            seen[c] += 1;
        }
    }
    prop_assert!(
        seen.iter().all(|&n| n == 1),
        "class counts per split {:?}",
        seen
    );
    Ok(())
}

/// Fractions `[train, validation, test]` that sum to 1.
fn fractions() -> impl Strategy<Value = [f64; 3]> {
    (0.2f64..0.9, 0.0f64..1.0).prop_map(|(train, share)| {
        let validation = (1.0 - train) * share;
        [train, validation, 1.0 - train - validation]
    })
}

/// A pool, an episode shape that its classes can serve, and a split.
fn sampler_case() -> impl Strategy<Value = (Vec<usize>, usize, EpisodeSpec, SplitSpec)> {
    (1usize..4, 1usize..4, 2usize..4)
        .prop_flat_map(|(shots, queries, ways)| {
            let need = shots + queries;
            (
                prop::collection::vec(need..need + 4, 6..16),
                1usize..4,
                Just(EpisodeSpec {
                    ways,
                    shots,
                    queries,
                    same_group: false,
                }),
                fractions(),
                any::<bool>(),
                any::<u64>(),
            )
        })
        .prop_map(|(sizes, groups, spec, fractions, by_group, seed)| {
            let split = SplitSpec {
                fractions,
                by_group,
                seed,
            };
            (sizes, groups, spec, split)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn class_splits_partition_the_classes_and_keep_groups_whole(
        sizes in prop::collection::vec(1usize..4, 1..30),
        groups in 1usize..6,
        fractions in fractions(),
        by_group in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let pool = Pool::new(&sizes, groups);
        let spec = SplitSpec { fractions, by_group, seed };
        let splits = split_classes(&pool.class_pool(), &spec).unwrap();
        check_partition(&splits, pool.num_classes())?;
        if by_group {
            for (s, list) in splits.iter().enumerate() {
                for &c in list {
                    let group = pool.groups[c];
                    let elsewhere = splits
                        .iter()
                        .enumerate()
                        .any(|(t, other)| t != s && other.iter().any(|&o| pool.groups[o] == group));
                    prop_assert!(!elsewhere, "group {} is cut across splits", group);
                }
            }
        }
        // The split depends on its seed only.
        prop_assert_eq!(split_classes(&pool.class_pool(), &spec).unwrap(), splits);
    }

    #[test]
    fn episodes_have_exact_labels_counts_and_distinct_examples(
        (sizes, groups, spec, split) in sampler_case(),
        task_seed in any::<u64>(),
    ) {
        let pool = Pool::new(&sizes, groups);
        let sampler = EpisodicSampler::new(pool.class_pool(), spec.clone(), &split).unwrap();
        let mut all: [Vec<usize>; 3] = Default::default();
        for (slot, split) in SPLITS.iter().enumerate() {
            all[slot] = sampler.classes(*split).to_vec();
        }
        check_partition(&all, pool.num_classes())?;
        let mut rng = ChaCha8Rng::seed_from_u64(task_seed);
        for split in SPLITS {
            let classes = sampler.classes(split).to_vec();
            match sampler.sample(split, &mut rng) {
                Ok(task) => {
                    check_task(&task, &pool.labels, &classes, &spec)?;
                }
                Err(e) => {
                    // Only a split too small for the ways may refuse, and it says so.
                    prop_assert!(classes.len() < spec.ways, "{}", e);
                    prop_assert!(sampler.check_split(split).is_err());
                }
            }
        }
    }

    #[test]
    fn sampling_is_a_function_of_the_seed(
        (sizes, groups, spec, split) in sampler_case(),
        task_seed in any::<u64>(),
    ) {
        let pool = Pool::new(&sizes, groups);
        let sampler = EpisodicSampler::new(pool.class_pool(), spec, &split).unwrap();
        prop_assume!(sampler.check_split(Split::Train).is_ok());
        let draw = |seed: u64| {
            let tasks = sampler
                .sample_batch(Split::Train, 3, &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap();
            tasks
                .iter()
                .map(|t| {
                    [&t.support.0, &t.support.1, &t.query.0, &t.query.1].map(values)
                })
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(draw(task_seed), draw(task_seed));
    }

    #[test]
    fn same_group_tasks_stay_inside_one_group(
        sizes in prop::collection::vec(3usize..6, 8..20),
        groups in 1usize..4,
        ways in 2usize..4,
        task_seed in any::<u64>(),
    ) {
        let pool = Pool::new(&sizes, groups);
        let spec = EpisodeSpec { ways, shots: 1, queries: 2, same_group: true };
        let all: Vec<usize> = (0..pool.num_classes()).collect();
        let sampler = EpisodicSampler::with_splits(
            pool.class_pool(),
            spec.clone(),
            [all.clone(), Vec::new(), Vec::new()],
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(task_seed);
        for _ in 0..4 {
            let task = sampler.sample(Split::Train, &mut rng).unwrap();
            let classes = check_task(&task, &pool.labels, &all, &spec)?;
            let used: BTreeSet<usize> = classes.iter().map(|&c| pool.groups[c]).collect();
            prop_assert_eq!(used.len(), 1, "classes {:?} span groups", classes);
        }
    }
}

/// Synthetic Omniglot: `characters[a]` characters in alphabet `a`, `images` drawings of each,
/// and, with `rotations`, three rotated copies of every character as extra classes.
fn omniglot(characters: &[usize], images: usize, rotations: bool) -> OmniglotData {
    let mut groups = Vec::new();
    let mut class_names = Vec::new();
    for (a, &count) in characters.iter().enumerate() {
        for c in 0..count {
            groups.push(a);
            class_names.push(format!("Alphabet{a}/character{c:02}"));
        }
    }
    let base_count = groups.len();
    let mut base_class: Vec<usize> = (0..base_count).collect();
    if rotations {
        for suffix in ["rot90", "rot180", "rot270"] {
            for c in 0..base_count {
                groups.push(groups[c]);
                class_names.push(format!("{}/{suffix}", class_names[c]));
                base_class.push(c);
            }
        }
    }
    let labels: Vec<usize> = (0..class_names.len())
        .flat_map(|c| std::iter::repeat_n(c, images))
        .collect();
    let ids: Vec<f32> = (0..labels.len()).map(|i| i as f32).collect();
    OmniglotData {
        images: Tensor::from_vec(ids, (labels.len(), 1, 1, 1), &Device::Cpu).unwrap(),
        labels,
        class_names,
        groups,
        alphabets: (0..characters.len())
            .map(|a| format!("Alphabet{a}"))
            .collect(),
        base_class,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn omniglot_splits_keep_rotations_and_alphabets_together(
        characters in prop::collection::vec(1usize..6, 2..7),
        rotations in any::<bool>(),
        fractions in fractions(),
        by_group in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let data = omniglot(&characters, 1, rotations);
        let split = OmniglotSplit::Fractions(SplitSpec { fractions, by_group, seed });
        let splits = data.split(&split).unwrap();
        // Rotated copies of held-out characters are dropped: the characters as drawn form a
        // partition, and every rotated copy kept is a meta-training class.
        let characters_only: [Vec<usize>; 3] = std::array::from_fn(|i| {
            splits[i].iter().copied().filter(|&c| data.base_class[c] == c).collect()
        });
        let characters_count = (0..data.num_classes()).filter(|&c| data.base_class[c] == c).count();
        check_partition(&characters_only, characters_count)?;
        let slot_of = |c: usize| splits.iter().position(|l| l.contains(&c));
        for c in 0..data.num_classes() {
            let base = data.base_class[c];
            if c != base {
                let expected = if slot_of(base) == Some(0) { Some(0) } else { None };
                prop_assert_eq!(
                    slot_of(c),
                    expected,
                    "{} is split from its character",
                    &data.class_names[c]
                );
                continue;
            }
            if by_group {
                for d in 0..data.num_classes() {
                    if data.groups[d] == data.groups[c] && data.base_class[d] == d {
                        prop_assert_eq!(slot_of(c), slot_of(d), "alphabet cut across splits");
                    }
                }
            }
        }
        prop_assert_eq!(data.split(&split).unwrap(), splits);
    }

    #[test]
    fn omniglot_alphabet_splits_hold_exactly_the_named_alphabets(
        characters in prop::collection::vec(2usize..5, 3..7),
        rotations in any::<bool>(),
        assignment in prop::collection::vec(0usize..4, 7),
    ) {
        let data = omniglot(&characters, 1, rotations);
        // Each alphabet goes to train, validation, test or nowhere (3).
        let mut named = AlphabetSplit::default();
        for (a, name) in data.alphabets.iter().enumerate() {
            match assignment[a] {
                0 => named.train.push(name.clone()),
                1 => named.validation.push(name.clone()),
                2 => named.test.push(name.clone()),
                _ => {}
            }
        }
        let splits = data.split(&OmniglotSplit::Alphabets(named)).unwrap();
        for (slot, list) in splits.iter().enumerate() {
            // Rotated copies (class ids past the characters) serve meta-training only.
            let expected: Vec<usize> = (0..data.num_classes())
                .filter(|&c| assignment[data.groups[c]] == slot)
                .filter(|&c| slot == 0 || data.base_class[c] == c)
                .collect();
            prop_assert_eq!(list, &expected);
        }
    }

    #[test]
    fn omniglot_episodes_come_from_their_split(
        characters in prop::collection::vec(2usize..6, 3..6),
        rotations in any::<bool>(),
        ways in 2usize..4,
        shots in 1usize..3,
        queries in 1usize..3,
        seed in any::<u64>(),
    ) {
        let data = omniglot(&characters, shots + queries + 1, rotations);
        let spec = EpisodeSpec { ways, shots, queries, same_group: false };
        let split = OmniglotSplit::Fractions(SplitSpec {
            fractions: [0.5, 0.25, 0.25],
            by_group: false,
            seed,
        });
        let sampler = EpisodicSampler::with_splits(
            data.class_pool().unwrap(),
            spec.clone(),
            data.split(&split).unwrap(),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for split in SPLITS {
            let classes = sampler.classes(split).to_vec();
            if classes.len() < ways {
                prop_assert!(sampler.sample(split, &mut rng).is_err());
                continue;
            }
            let task = sampler.sample(split, &mut rng).unwrap();
            check_task(&task, &data.labels, &classes, &spec)?;
        }
    }
}
