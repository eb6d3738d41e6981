//! The shipped Omniglot configs from a user's point of view: their data paths are the files that
//! `metalearn data fetch omniglot --dir data/omniglot` writes, and following the README
//! (fetch, then `meta-train --config configs/omniglot-protonet.toml` in the repository folder)
//! trains without editing the config. The archives here are small stand-ins in the official
//! layout, with the alphabets the config names.

mod common;

use std::io::Write;
use std::path::Path;

use common::meta_runs::{metalearn, run_json};
use metalearn::data::fetch::omniglot_files;
use metalearn::experiment::ExperimentConfig;

fn configs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn omniglot_configs_read_the_files_data_fetch_writes() {
    let fetched: Vec<String> = omniglot_files()
        .iter()
        .map(|f| {
            let name = Path::new(&f.path).file_name().unwrap().to_string_lossy();
            format!("data/omniglot/{name}")
        })
        .collect();
    let mut checked = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("omniglot")
        {
            continue;
        }
        let config = ExperimentConfig::from_file(&path).unwrap();
        let data = config.task.data.iter().chain(&config.task.validation_data);
        for file in data {
            let file = file.display().to_string();
            assert!(
                fetched.contains(&file),
                "{}: `{file}` is not a file `data fetch omniglot --dir data/omniglot` writes ({fetched:?})",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "only {checked} data paths in the Omniglot configs"
    );
}

/// A 105x105 drawing in the Omniglot style (ink black on white): a square whose place and size
/// depend on the character and a dot that depends on the drawer.
fn drawing(character: usize, drawer: usize) -> Vec<u8> {
    let mut img = image::GrayImage::from_pixel(105, 105, image::Luma([255u8]));
    let (x0, y0) = (
        5 + 3 * (character % 20) as u32,
        5 + 4 * (character / 20) as u32,
    );
    let side = 20 + (character % 7) as u32 * 5;
    for y in y0..(y0 + side).min(104) {
        for x in x0..(x0 + side).min(104) {
            img.put_pixel(x, y, image::Luma([0]));
        }
    }
    img.put_pixel(60 + 5 * drawer as u32, 95, image::Luma([0]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

/// An archive in the official layout: `root/<Alphabet>/characterNN/<id>_<drawer>.png`.
fn write_archive(path: &Path, root: &str, alphabets: &[(&str, usize)], drawers: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default();
    let mut id = 0;
    for (alphabet, characters) in alphabets {
        for c in 1..=*characters {
            for d in 1..=drawers {
                zip.start_file(
                    format!("{root}/{alphabet}/character{c:02}/{id:04}_{d:02}.png"),
                    options,
                )
                .unwrap();
                zip.write_all(&drawing(id, d)).unwrap();
            }
            id += 1;
        }
    }
    zip.finish().unwrap();
}

#[test]
fn protonet_config_trains_from_the_fetched_paths_without_edits() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("configs")).unwrap();
    std::fs::copy(
        configs_dir().join("omniglot-protonet.toml"),
        root.join("configs/omniglot-protonet.toml"),
    )
    .unwrap();
    // Six drawings per character: one shot and five queries. Validation is 20-way within
    // Sanskrit, so it needs 20 characters.
    write_archive(
        &root.join("data/omniglot/images_background_small1.zip"),
        "images_background_small1",
        &[
            ("Balinese", 3),
            ("Early_Aramaic", 3),
            ("Greek", 3),
            ("Korean", 3),
            ("Latin", 3),
        ],
        6,
    );
    write_archive(
        &root.join("data/omniglot/images_background_small2.zip"),
        "images_background_small2",
        &[("Japanese_(katakana)", 2), ("Sanskrit", 20), ("Tagalog", 2)],
        6,
    );
    let summary = run_json(metalearn(
        root,
        2,
        &[
            "meta-train",
            "--config",
            "configs/omniglot-protonet.toml",
            "--iterations",
            "2",
            "--out",
            "runs/omniglot-protonet",
            "--json",
            "--quiet",
        ],
    ));
    assert!(
        root.join("runs/omniglot-protonet/best.safetensors")
            .is_file(),
        "{summary}"
    );
    // Validated on 20-way episodes of the validation archive's Sanskrit characters.
    let accuracy = summary["best_val_accuracy"].as_f64();
    assert!(
        accuracy.is_some_and(|a| (0.0..=1.0).contains(&a)),
        "no validation accuracy on the Sanskrit episodes: {summary}"
    );
    assert_eq!(summary["iterations"], 2, "{summary}");
}
