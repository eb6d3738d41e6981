//! Omniglot loading: archives and folders in the official layout, ink polarity, rotations,
//! splits, the decoded-image cache, and errors on corrupt input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use metalearn::data::classes::SplitSpec;
use metalearn::data::omniglot::{
    is_omniglot_path, AlphabetSplit, CacheOutcome, CachePolicy, OmniglotData, OmniglotOptions,
    OmniglotSplit, Resample,
};
use metalearn::experiment::ExperimentConfig;
use metalearn::tasks::episodic::{EpisodeSpec, EpisodicSampler};
use metalearn::tasks::{Split, TaskKind};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Alphabets and their number of characters in the synthetic archive.
const LAYOUT: &[(&str, usize)] = &[("Alpha", 2), ("Beta", 3), ("Gamma", 1)];
const DRAWERS: usize = 4;

/// A 105x105 drawing: white background, a black square whose place depends on the character
/// (always in the top-left quadrant) and a black dot whose place depends on the drawer.
fn drawing(character: usize, drawer: usize) -> Vec<u8> {
    let mut img = image::GrayImage::from_pixel(105, 105, image::Luma([255u8]));
    let offset = 4 * character as u32;
    for y in offset..offset + 30 {
        for x in offset..offset + 30 {
            img.put_pixel(x, y, image::Luma([0]));
        }
    }
    let dot = 60 + 5 * drawer as u32;
    img.put_pixel(dot, 90, image::Luma([0]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

/// Every file of the synthetic data set as (path below the root, PNG bytes).
fn synthetic_files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut global = 0;
    for (alphabet, characters) in LAYOUT {
        for c in 1..=*characters {
            for d in 1..=DRAWERS {
                files.push((
                    format!("{alphabet}/character{c:02}/{global:04}_{d:02}.png"),
                    drawing(global, d),
                ));
            }
            global += 1;
        }
    }
    files
}

/// Writes a zip in the official layout (`root/<Alphabet>/<characterNN>/<file>.png`, with folder
/// entries) plus any `extra` entries.
fn write_zip(path: &Path, root: &str, extra: &[(&str, &[u8])]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default();
    zip.add_directory(format!("{root}/"), options).unwrap();
    for (name, bytes) in synthetic_files() {
        zip.start_file(format!("{root}/{name}"), options).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    for (name, bytes) in extra {
        zip.start_file(name.to_string(), options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn write_folder(root: &Path) {
    for (name, bytes) in synthetic_files() {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

fn options(cache: CachePolicy) -> OmniglotOptions {
    OmniglotOptions {
        cache,
        ..OmniglotOptions::default()
    }
}

fn pixels(data: &OmniglotData) -> Vec<f32> {
    data.images.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("images_background.zip");
    write_zip(&zip, "images_background", &[]);
    (dir, zip)
}

#[test]
fn zip_loads_classes_groups_and_ink_polarity() {
    let (dir, zip) = fixture();
    let data = OmniglotData::load(&zip, &options(CachePolicy::Off)).unwrap();
    let characters: usize = LAYOUT.iter().map(|l| l.1).sum();
    assert_eq!(data.len(), characters * DRAWERS);
    assert_eq!(data.images.dims(), &[characters * DRAWERS, 1, 28, 28]);
    assert_eq!(data.alphabets, vec!["Alpha", "Beta", "Gamma"]);
    assert_eq!(
        data.class_names,
        vec![
            "Alpha/character01",
            "Alpha/character02",
            "Beta/character01",
            "Beta/character02",
            "Beta/character03",
            "Gamma/character01"
        ]
    );
    assert_eq!(data.groups, vec![0, 0, 1, 1, 1, 2]);
    for class in 0..characters {
        assert_eq!(data.labels.iter().filter(|&&l| l == class).count(), DRAWERS);
    }
    // Ink = 1: the black square (top-left, 30 of 105 pixels from at most 20 in) is ~1 after
    // resizing, the white bottom-left corner is 0.
    let first = &pixels(&data)[..28 * 28];
    assert!(first.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(first[3 * 28 + 3] > 0.99, "{}", first[3 * 28 + 3]);
    assert!(first[27 * 28] < 1e-6, "{}", first[27 * 28]);
    let mean: f32 = first.iter().sum::<f32>() / first.len() as f32;
    let expected = (30.0 * 30.0 + 1.0) / (105.0 * 105.0);
    assert!(
        (mean - expected).abs() < 1e-3,
        "mean ink {mean} vs {expected}"
    );
    // The pool groups classes by alphabet.
    let pool = data.class_pool().unwrap();
    assert_eq!(pool.num_classes(), characters);
    assert_eq!(pool.groups(), data.groups.as_slice());
    drop(dir);
}

#[test]
fn folder_layout_gives_the_same_data_as_the_zip() {
    let (dir, zip) = fixture();
    let root = dir.path().join("unpacked");
    write_folder(&root);
    assert!(is_omniglot_path(&root));
    assert!(is_omniglot_path(&zip));
    assert!(
        !is_omniglot_path(&root.join("Alpha")),
        "a class folder is not Omniglot"
    );
    let from_zip = OmniglotData::load(&zip, &options(CachePolicy::Off)).unwrap();
    let from_folder = OmniglotData::load(&root, &options(CachePolicy::Off)).unwrap();
    assert_eq!(from_zip.class_names, from_folder.class_names);
    assert_eq!(from_zip.labels, from_folder.labels);
    assert_eq!(pixels(&from_zip), pixels(&from_folder));
}

#[test]
fn size_and_filter_are_configurable() {
    let (_dir, zip) = fixture();
    let lanczos = OmniglotData::load(
        &zip,
        &OmniglotOptions {
            height: 14,
            width: 20,
            resample: Resample::Lanczos3,
            ..options(CachePolicy::Off)
        },
    )
    .unwrap();
    assert_eq!(lanczos.images.dims()[1..], [1, 14, 20]);
    let values = pixels(&lanczos);
    assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(values[14 * 20 + 21] > 0.9, "ink stays ink under Lanczos");
}

/// The fixture loaded without a cache, with or without rotated and mirrored copies.
fn load_with_copies(zip: &Path, rotations: bool, reflections: bool) -> OmniglotData {
    let options = OmniglotOptions {
        rotations,
        reflections,
        ..options(CachePolicy::Off)
    };
    OmniglotData::load(zip, &options).unwrap()
}

/// Checks that `copies` holds `factor` times the classes and images of `plain`, each class in
/// its character's alphabet and made from that character.
fn assert_copies_of(copies: &OmniglotData, plain: &OmniglotData, factor: usize) {
    let classes = plain.num_classes();
    assert_eq!(copies.num_classes(), factor * classes);
    assert_eq!(copies.len(), factor * plain.len());
    for c in 0..copies.num_classes() {
        assert_eq!(copies.groups[c], plain.groups[c % classes]);
        assert_eq!(copies.base_class[c], c % classes);
    }
}

#[test]
fn rotations_add_classes_in_the_same_alphabet() {
    let (_dir, zip) = fixture();
    let plain = load_with_copies(&zip, false, false);
    let rotated = load_with_copies(&zip, true, false);
    let classes = plain.num_classes();
    assert_copies_of(&rotated, &plain, 4);
    assert_eq!(rotated.class_names[classes], "Alpha/character01/rot90");
    assert_eq!(
        rotated.class_names[3 * classes + 5],
        "Gamma/character01/rot270"
    );
    // The first image turned clockwise by 90 degrees: the square moves from top-left to
    // top-right.
    let n = plain.len();
    let all = pixels(&rotated);
    let turned = &all[n * 28 * 28..(n + 1) * 28 * 28];
    assert_eq!(rotated.labels[n], classes + rotated.labels[0]);
    assert!(turned[3 * 28 + 24] > 0.99);
    assert!(turned[3 * 28 + 3] < 1e-6);
    for y in 0..28 {
        for x in 0..28 {
            assert_eq!(turned[y * 28 + x], all[(27 - x) * 28 + y]);
        }
    }
    // A split by character keeps each character's rotations with it.
    let splits = rotated
        .split(&OmniglotSplit::Fractions(SplitSpec {
            fractions: [0.5, 0.0, 0.5],
            by_group: false,
            seed: 3,
        }))
        .unwrap();
    // Rotated copies are meta-training classes only; held-out splits keep the characters as
    // drawn.
    for c in 0..rotated.num_classes() {
        let home = |class: usize| splits.iter().position(|s| s.contains(&class));
        let base = rotated.base_class[c];
        if c == base {
            assert!(home(c).is_some(), "character {c} is in no split");
        } else if home(base) == Some(0) {
            assert_eq!(
                home(c),
                Some(0),
                "rotated class {c} of a training character"
            );
        } else {
            assert_eq!(home(c), None, "rotated class {c} of a held-out character");
        }
    }
    assert!(splits[0].iter().any(|&c| rotated.base_class[c] != c));
}

#[test]
fn reflections_add_mirrored_classes_after_the_rotations() {
    let (_dir, zip) = fixture();
    let plain = load_with_copies(&zip, false, false);
    let classes = plain.num_classes();
    let n = plain.len();
    let mirrored = load_with_copies(&zip, false, true);
    assert_copies_of(&mirrored, &plain, 2);
    assert_eq!(mirrored.class_names[classes], "Alpha/character01/mirror");
    // The first image mirrored left-right: the square moves from top-left to top-right.
    let all = pixels(&mirrored);
    let flipped = &all[n * 28 * 28..(n + 1) * 28 * 28];
    assert_eq!(mirrored.labels[n], classes + mirrored.labels[0]);
    for y in 0..28 {
        for x in 0..28 {
            assert_eq!(flipped[y * 28 + x], all[y * 28 + 27 - x]);
        }
    }
    assert!(flipped[3 * 28 + 24] > 0.99);

    let both = load_with_copies(&zip, true, true);
    assert_copies_of(&both, &plain, 8);
    // Rotations keep their class ids; the mirror images and their rotations follow.
    assert_eq!(both.class_names[classes], "Alpha/character01/rot90");
    assert_eq!(both.class_names[4 * classes], "Alpha/character01/mirror");
    assert_eq!(
        both.class_names[5 * classes + 5],
        "Gamma/character01/mirror-rot90"
    );
    // Mirrored, then turned clockwise: pixel (x, y) comes from (y, 27 - x) of the mirror image,
    // which is (27 - y, 27 - x) of the drawing.
    let all = pixels(&both);
    let turned = &all[5 * n * 28 * 28..(5 * n + 1) * 28 * 28];
    for y in 0..28 {
        for x in 0..28 {
            assert_eq!(turned[y * 28 + x], all[(27 - x) * 28 + 27 - y]);
        }
    }
}

#[test]
fn alphabet_splits_and_samplers() {
    let (_dir, zip) = fixture();
    let data = OmniglotData::load(&zip, &options(CachePolicy::Off)).unwrap();
    let named = OmniglotSplit::Alphabets(AlphabetSplit {
        train: vec!["Beta".into()],
        validation: vec!["Gamma".into()],
        test: vec!["Alpha".into()],
    });
    assert_eq!(
        data.split(&named).unwrap(),
        [vec![2, 3, 4], vec![5], vec![0, 1]]
    );
    let unknown = OmniglotSplit::Alphabets(AlphabetSplit {
        train: vec!["Klingon".into()],
        ..AlphabetSplit::default()
    });
    let err = data.split(&unknown).unwrap_err().to_string();
    assert!(
        err.contains("Klingon") && err.contains("Alpha, Beta, Gamma"),
        "{err}"
    );
    let twice = OmniglotSplit::Alphabets(AlphabetSplit {
        train: vec!["Beta".into()],
        test: vec!["Beta".into()],
        ..AlphabetSplit::default()
    });
    assert!(data.split(&twice).is_err());

    let by_alphabet = data
        .split(&OmniglotSplit::Fractions(SplitSpec {
            fractions: [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
            by_group: true,
            seed: 0,
        }))
        .unwrap();
    for list in &by_alphabet {
        let groups: std::collections::BTreeSet<usize> =
            list.iter().map(|&c| data.groups[c]).collect();
        assert_eq!(
            groups.len(),
            1,
            "one whole alphabet per split: {by_alphabet:?}"
        );
    }

    let episode = EpisodeSpec {
        ways: 3,
        shots: 1,
        queries: 2,
        same_group: true,
    };
    use metalearn::tasks::TaskSource;
    let sampler = EpisodicSampler::with_splits(
        data.class_pool().unwrap(),
        episode,
        data.split(&named).unwrap(),
    )
    .unwrap();
    let task = sampler
        .sample(Split::Train, &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    assert_eq!(task.support.0.dims(), &[3, 1, 28, 28]);
    assert_eq!(task.query.0.dims(), &[6, 1, 28, 28]);
}

#[test]
fn second_load_comes_from_the_cache_and_equals_the_first() {
    let (dir, zip) = fixture();
    let cache = dir.path().join("cache");
    let opts = options(CachePolicy::Dir(cache.clone()));
    let (first, outcome) = OmniglotData::load_with_cache_outcome(&zip, &opts).unwrap();
    let CacheOutcome::Written(path) = outcome else {
        panic!("first load should write the cache, got {outcome:?}");
    };
    assert!(path.starts_with(&cache));
    let (second, outcome) = OmniglotData::load_with_cache_outcome(&zip, &opts).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit(path.clone()));
    assert_eq!(first.class_names, second.class_names);
    assert_eq!(first.groups, second.groups);
    assert_eq!(first.alphabets, second.alphabets);
    assert_eq!(first.labels, second.labels);
    assert_eq!(pixels(&first), pixels(&second));

    // Rotations are applied after the cache: the same file serves both.
    let (rotated, outcome) = OmniglotData::load_with_cache_outcome(
        &zip,
        &OmniglotOptions {
            rotations: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(outcome.is_hit());
    assert_eq!(rotated.num_classes(), 4 * first.num_classes());

    // Another size is another cache file.
    let (_, outcome) = OmniglotData::load_with_cache_outcome(
        &zip,
        &OmniglotOptions {
            height: 20,
            width: 20,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(
        matches!(outcome, CacheOutcome::Written(ref p) if *p != path),
        "{outcome:?}"
    );

    // A changed archive is a new key: the old file is not used.
    write_zip(
        &zip,
        "images_background",
        &[("images_background/.DS_Store", b"x")],
    );
    let (_, outcome) = OmniglotData::load_with_cache_outcome(&zip, &opts).unwrap();
    assert!(matches!(outcome, CacheOutcome::Written(_)), "{outcome:?}");
}

#[test]
fn default_cache_sits_beside_the_archive() {
    let (dir, zip) = fixture();
    let (_, outcome) =
        OmniglotData::load_with_cache_outcome(&zip, &options(CachePolicy::Default)).unwrap();
    let CacheOutcome::Written(path) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(path.parent().unwrap(), dir.path().join(".metalearn-cache"));
    let (_, outcome) =
        OmniglotData::load_with_cache_outcome(&zip, &options(CachePolicy::Default)).unwrap();
    assert!(outcome.is_hit());
}

#[test]
fn corrupt_cache_files_are_detected_and_rebuilt() {
    let (dir, zip) = fixture();
    let opts = options(CachePolicy::Dir(dir.path().join("cache")));
    let (reference, outcome) = OmniglotData::load_with_cache_outcome(&zip, &opts).unwrap();
    let CacheOutcome::Written(path) = outcome else {
        panic!("{outcome:?}");
    };
    let good = std::fs::read(&path).unwrap();

    // A flipped pixel byte: checksum mismatch.
    let mut flipped = good.clone();
    let middle = flipped.len() - 100;
    flipped[middle] ^= 0x40;
    // A truncated file, a file of another format, an empty file.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (flipped, "checksum"),
        (good[..good.len() / 2].to_vec(), "length"),
        (
            b"not a cache file at all, but long enough to have a magic".to_vec(),
            "version",
        ),
        (Vec::new(), "version"),
    ];
    for (bytes, reason_word) in cases {
        std::fs::write(&path, bytes).unwrap();
        let (data, outcome) = OmniglotData::load_with_cache_outcome(&zip, &opts).unwrap();
        match outcome {
            CacheOutcome::Rebuilt { path: p, reason } => {
                assert_eq!(p, path);
                assert!(reason.contains(reason_word), "{reason}");
            }
            other => panic!("expected a rebuild, got {other:?}"),
        }
        assert_eq!(pixels(&data), pixels(&reference));
        assert_eq!(data.labels, reference.labels);
        assert_eq!(std::fs::read(&path).unwrap(), good, "rewritten whole");
    }
}

#[test]
fn corrupt_or_unexpected_entries_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.zip");
    write_zip(
        &broken,
        "images_background",
        &[(
            "images_background/Alpha/character01/9999_01.png",
            b"not a png",
        )],
    );
    let err = OmniglotData::load(&broken, &options(CachePolicy::Off))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("images_background/Alpha/character01/9999_01.png") && err.contains("PNG"),
        "{err}"
    );

    let stray = dir.path().join("stray.zip");
    write_zip(
        &stray,
        "images_background",
        &[("images_background/notes.txt", b"hello")],
    );
    let err = OmniglotData::load(&stray, &options(CachePolicy::Off))
        .unwrap_err()
        .to_string();
    assert!(err.contains("images_background/notes.txt"), "{err}");

    let shallow = dir.path().join("shallow.zip");
    write_zip(&shallow, "images_background", &[("Alpha/x.png", b"")]);
    let err = OmniglotData::load(&shallow, &options(CachePolicy::Off))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Alpha/x.png"), "{err}");

    let not_zip = dir.path().join("plain.zip");
    std::fs::write(&not_zip, b"PK but not really").unwrap();
    let err = OmniglotData::load(&not_zip, &options(CachePolicy::Off))
        .unwrap_err()
        .to_string();
    assert!(err.contains("plain.zip") && err.contains("zip"), "{err}");

    let missing = dir.path().join("missing.zip");
    let err = OmniglotData::load(&missing, &options(CachePolicy::Off))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.zip") && err.contains("data fetch"),
        "{err}"
    );

    let folder = dir.path().join("folder");
    write_folder(&folder);
    std::fs::write(folder.join("Beta/character02/9999_01.png"), b"garbage").unwrap();
    let err = OmniglotData::load(&folder, &options(CachePolicy::Off))
        .unwrap_err()
        .to_string();
    assert!(err.contains("9999_01.png"), "{err}");
}

/// A 2-way 1-shot ProtoNet experiment on the Omniglot archive `zip`, with `task_lines` added to
/// the `[task]` table.
fn protonet_toml(zip: &Path, cache: &Path, task_lines: &str) -> String {
    format!(
        r#"
[task]
kind = "classification"
data = "{}"
ways = 2
shots = 1
cache_dir = "{}"
{task_lines}

[model]
arch = "conv4"
width = 8

[algorithm]
name = "protonet"
"#,
        zip.display(),
        cache.display()
    )
}

#[test]
fn experiment_config_reads_omniglot_archives() {
    let (dir, zip) = fixture();
    let toml = protonet_toml(
        &zip,
        &dir.path().join("cache"),
        "queries = 3\nrotations = true\nsplit_alphabets = { train = [\"Alpha\", \"Beta\"], test = [\"Gamma\"] }",
    );
    let config = ExperimentConfig::from_toml(&toml).unwrap();
    let source = config.task_source().unwrap();
    assert_eq!(source.input_shape(), vec![1, 28, 28]);
    assert_eq!(source.kind(), TaskKind::Classification { ways: 2 });
    let task = source
        .sample(Split::Train, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    assert_eq!(task.support.0.dims(), &[2, 1, 28, 28]);
    // Gamma's single character is not multiplied by rotations outside meta-training.
    let err = source.check_split(Split::Test).unwrap_err().to_string();
    assert!(err.contains("has 1"), "{err}");
    assert!(
        source.check_split(Split::Validation).is_err(),
        "no validation alphabets"
    );

    // Omniglot-only keys on other data are refused.
    let csv = dir.path().join("table.csv");
    std::fs::write(&csv, "a,label\n1,x\n2,y\n").unwrap();
    let mut on_csv = config.clone();
    on_csv.task.data = Some(csv);
    let err = on_csv.task_source().err().unwrap().to_string();
    assert!(err.contains("Omniglot"), "{err}");

    let unknown = toml.replace("rotations = true", "rotate = true");
    assert!(ExperimentConfig::from_toml(&unknown).is_err());
}

#[test]
fn real_minimal_background_split() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/omniglot");
    let zip = root.join("images_background_small1.zip");
    if !zip.is_file() {
        println!(
            "shared Omniglot data not found at {}; skipping the real-data checks",
            root.display()
        );
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let opts = options(CachePolicy::Dir(cache.path().to_path_buf()));
    let start = Instant::now();
    let (data, outcome) = OmniglotData::load_with_cache_outcome(&zip, &opts).unwrap();
    let first = start.elapsed();
    assert!(matches!(outcome, CacheOutcome::Written(_)), "{outcome:?}");
    let start = Instant::now();
    let (again, outcome) = OmniglotData::load_with_cache_outcome(&zip, &opts).unwrap();
    let cached = start.elapsed();
    assert!(outcome.is_hit(), "{outcome:?}");
    println!(
        "images_background_small1.zip: first load {:.3} s, cached load {:.3} s",
        first.as_secs_f64(),
        cached.as_secs_f64()
    );
    assert_eq!(data.alphabets.len(), 5);
    assert_eq!(
        data.alphabets,
        vec!["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    );
    assert_eq!(data.num_classes(), 136);
    assert_eq!(data.len(), 2720);
    assert_eq!(data.images.dims(), &[2720, 1, 28, 28]);
    assert_eq!(data.labels, again.labels);
    assert_eq!(pixels(&data), pixels(&again));
    assert!(data.class_names.iter().all(|n| n.matches('/').count() == 1));
    assert!(data.class_names.contains(&"Latin/character01".to_string()));
    // Strokes on a blank page: a little ink on average, and most pixels empty.
    let values = pixels(&data);
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    let empty = values.iter().filter(|&&v| v == 0.0).count() as f32 / values.len() as f32;
    assert!((0.02..0.4).contains(&mean), "mean ink {mean}");
    assert!(empty > 0.5, "fraction of empty pixels {empty}");
}

#[test]
fn supersampled_images_match_the_loaded_ones_and_follow_rotations_and_reflections() {
    use metalearn::data::augment::Augment;
    let (_dir, zip) = fixture();
    let options = OmniglotOptions {
        rotations: true,
        reflections: true,
        ..options(CachePolicy::Off)
    };
    let data = OmniglotData::load(&zip, &options).unwrap();
    let fine = data.supersampled(&zip, &options, 3).unwrap();
    assert_eq!(fine.len(), data.len());
    // Without perturbation, shrinking the fine images gives the loaded images (105 -> 84 -> 28
    // by box filters is the 105 -> 28 box filter up to rounding to 8 bits), rotated and
    // mirrored copies included.
    let indices: Vec<u32> = (0..data.len() as u32).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let shrunk = Augment::default().apply_supersampled(&fine, &indices, &mut rng);
    let loaded = pixels(&data);
    let worst = shrunk
        .iter()
        .zip(&loaded)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.05, "largest pixel difference {worst}");
    assert!(loaded.iter().any(|&v| v > 0.5), "the fixture has ink");
}

#[test]
fn config_augmentation_touches_only_training_and_validation_data_comes_from_its_archive() {
    let (dir, zip) = fixture();
    let second = dir.path().join("images_background_small2.zip");
    write_zip(&second, "images_background_small2", &[]);
    let base = protonet_toml(
        &zip,
        &dir.path().join("cache"),
        "queries = 2\nsplit_alphabets = { train = [\"Alpha\", \"Beta\"], validation = [\"Beta\"], test = [\"Gamma\"] }",
    );
    // Beta in two splits of one archive is refused; with validation_data, validation alphabets
    // are looked up in the second archive and may also be trained on in the first.
    let plain = ExperimentConfig::from_toml(&base).unwrap();
    let err = plain.task_source().err().unwrap().to_string();
    assert!(err.contains("two splits"), "{err}");
    let with_validation = base.replace(
        "queries = 2\n",
        &format!("queries = 2\nvalidation_data = \"{}\"\n", second.display()),
    );
    let source = ExperimentConfig::from_toml(&with_validation)
        .unwrap()
        .task_source()
        .unwrap();
    source.check_split(Split::Validation).unwrap();
    let task = source
        .sample(Split::Validation, &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    assert_eq!(task.support.0.dims(), &[2, 1, 28, 28]);

    // Augmentation changes meta-training images, never validation ones.
    let augmented = with_validation.replace(
        "queries = 2\n",
        "queries = 2\naugment = { shift = 1.5, rotation = 10, scale = 0.1, shear = 0.1, stroke = 0.4 }\n",
    );
    let augmented = ExperimentConfig::from_toml(&augmented)
        .unwrap()
        .task_source()
        .unwrap();
    let draw = |source: &dyn metalearn::tasks::TaskSource, split| {
        let task = source
            .sample(split, &mut ChaCha8Rng::seed_from_u64(5))
            .unwrap();
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (values(&task.support.0), values(&task.support.1))
    };
    let (plain_x, plain_y) = draw(source.as_ref(), Split::Train);
    let (aug_x, aug_y) = draw(augmented.as_ref(), Split::Train);
    assert_eq!(plain_y, aug_y, "the same classes and drawings are drawn");
    assert_ne!(plain_x, aug_x, "training images are perturbed");
    let ink = |x: &[f32]| x.iter().sum::<f32>();
    let ratio = ink(&aug_x) / ink(&plain_x);
    assert!(
        (0.5..2.0).contains(&ratio),
        "ink changed by a factor {ratio}"
    );
    assert_eq!(
        draw(source.as_ref(), Split::Validation),
        draw(augmented.as_ref(), Split::Validation)
    );

    // Bad settings are named.
    let bad = with_validation.replace(
        "queries = 2\n",
        "queries = 2\naugment = { rotation = 90 }\n",
    );
    let err = ExperimentConfig::from_toml(&bad).err().unwrap().to_string();
    assert!(err.contains("task.augment.rotation"), "{err}");
    let no_split = with_validation.replace(
        "split_alphabets = { train = [\"Alpha\", \"Beta\"], validation = [\"Beta\"], test = [\"Gamma\"] }\n",
        "",
    );
    let err = ExperimentConfig::from_toml(&no_split)
        .unwrap()
        .task_source()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("split_alphabets"), "{err}");
}
