//! Image commands end to end on a tiny random EfficientNet-Lite in timm's folder layout
//! (`crates/metalearn/tests/fixtures/vision/tiny_timm`): `train --backbone` by both methods on
//! a class folder and on a CSV, `evaluate` and `predict` of the self-contained checkpoint (the
//! backbone folder removed first), `embed`, and the errors for bad input.

mod common;

use std::path::{Path, PathBuf};

use common::cli::{last_json, run_err_in, run_ok_in};

fn tiny_backbone() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../metalearn/tests/fixtures/vision/tiny_timm")
}

/// A 40x40 image of class `class` (0..3): a colour per class, with a per-image ramp so that no
/// two images are equal.
fn picture(class: usize, index: usize) -> image::RgbImage {
    image::RgbImage::from_fn(40, 40, |x, y| {
        let ramp = ((x + y) as usize * (index + 1) % 64) as u8;
        match class {
            0 => image::Rgb([200 + ramp / 2, ramp, ramp]),
            1 => image::Rgb([ramp, 200 + ramp / 2, ramp]),
            _ => image::Rgb([ramp, ramp, 200 + ramp / 2]),
        }
    })
}

const CLASSES: [&str; 3] = ["red", "green", "blue"];

/// `dir/<class>/<i>.png` (one JPEG and one WebP among them) and `dir/images.csv`.
fn write_images(dir: &Path, per_class: usize) {
    let mut csv = String::from("file,kind\n");
    for (c, name) in CLASSES.iter().enumerate() {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for i in 0..per_class {
            let ext = match (c, i) {
                (0, 0) => "jpg",
                (1, 0) => "webp",
                _ => "png",
            };
            let path = dir.join(name).join(format!("{i}.{ext}"));
            let image = picture(c, i);
            if ext == "webp" {
                let file = std::fs::File::create(&path).unwrap();
                image::codecs::webp::WebPEncoder::new_lossless(file)
                    .encode(image.as_raw(), 40, 40, image::ExtendedColorType::Rgb8)
                    .unwrap();
            } else {
                image.save(&path).unwrap();
            }
            csv.push_str(&format!("{name}/{i}.{ext},{name}\n"));
        }
    }
    std::fs::write(dir.join("images.csv"), csv).unwrap();
}

/// The feature cache of these tests (one value for every test of this binary, which share the
/// process environment the commands inherit).
fn use_test_cache() {
    std::env::set_var(
        "METALEARN_CACHE",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("vision-cli-cache"),
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_evaluate_predict_and_embed_with_a_backbone() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    write_images(&data, 4);
    // The model must not need the backbone folder once trained.
    let backbone = work.path().join("backbone");
    std::fs::create_dir_all(&backbone).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_backbone().join(f), backbone.join(f)).unwrap();
    }
    use_test_cache();
    let model = work.path().join("proto.safetensors");
    let out = run_ok_in(
        &[
            "train",
            "--backbone",
            s(&backbone),
            "--data",
            s(&data),
            "--method",
            "prototype",
            "--out",
            s(&model),
            "--json",
        ],
        None,
    );
    let report = last_json(&out);
    assert_eq!(report["images"], 12);
    assert_eq!(report["classes"], 3);
    // Linear probe on two images per class from the CSV (seeded draw).
    let probe = work.path().join("probe.safetensors");
    let out = run_ok_in(
        &[
            "train",
            "--backbone",
            s(&backbone),
            "--data",
            s(&data.join("images.csv")),
            "--path-column",
            "file",
            "--target",
            "kind",
            "--method",
            "linear-probe",
            "--shots-per-class",
            "2",
            "--seed",
            "3",
            "--out",
            s(&probe),
            "--json",
        ],
        None,
    );
    assert_eq!(last_json(&out)["images"], 6);
    // Fine-tuning every layer: the training loss falls.
    let tuned = work.path().join("tuned.safetensors");
    let out = run_ok_in(
        &[
            "train",
            "--backbone",
            s(&backbone),
            "--data",
            s(&data),
            "--method",
            "finetune",
            "--epochs",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--seed",
            "1",
            "--out",
            s(&tuned),
            "--json",
        ],
        None,
    );
    let losses: Vec<f64> = last_json(&out)["epoch_losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "losses {losses:?}");
    std::fs::remove_dir_all(&backbone).unwrap();
    for m in [&model, &probe, &tuned] {
        let out = run_ok_in(
            &["evaluate", "--model", s(m), "--data", s(&data), "--json"],
            None,
        );
        let scores = last_json(&out);
        assert_eq!(scores["images"], 12);
        let accuracy = scores["accuracy"].as_f64().unwrap();
        // Colours this far apart are told apart even by random features.
        assert!(accuracy >= 0.75, "{}: accuracy {accuracy}", m.display());
    }
    // The second evaluation of the same images reads the cached features.
    let out = run_ok_in(
        &[
            "evaluate",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--json",
        ],
        None,
    );
    assert_eq!(last_json(&out)["cached"], true);
    let predictions = work.path().join("pred.csv");
    run_ok_in(
        &[
            "predict",
            "--model",
            s(&model),
            "--data",
            s(&data.join("images.csv")),
            "--path-column",
            "file",
            "--out",
            s(&predictions),
        ],
        None,
    );
    let text = std::fs::read_to_string(&predictions).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "path,label,confidence");
    assert_eq!(lines.len(), 13);
    assert!(lines[1].starts_with("red/0.jpg,"), "{}", lines[1]);
    let right = lines[1..]
        .iter()
        .filter(|l| l.split(',').next().unwrap().split('/').next() == l.split(',').nth(1))
        .count();
    assert!(right >= 9, "{right} of 12 predicted right:\n{text}");
    // Features of every image, with a path column.
    std::fs::create_dir_all(&backbone).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_backbone().join(f), backbone.join(f)).unwrap();
    }
    let features = work.path().join("features.csv");
    let out = run_ok_in(
        &[
            "embed",
            "--backbone",
            s(&backbone),
            "--data",
            s(&data),
            "--out",
            s(&features),
            "--json",
        ],
        None,
    );
    assert_eq!(last_json(&out)["rows"], 12);
    let text = std::fs::read_to_string(&features).unwrap();
    let header = text.lines().next().unwrap();
    assert!(
        header.starts_with("path,dim_0,dim_1,") && header.ends_with("dim_31"),
        "{header}"
    );
    assert_eq!(text.lines().count(), 13);
    assert!(text.lines().nth(1).unwrap().starts_with("blue/0.png,"));
}

#[test]
fn bad_images_and_bad_data_are_named() {
    let work = tempfile::tempdir().unwrap();
    use_test_cache();
    let data = work.path().join("data");
    write_images(&data, 3);
    let backbone = tiny_backbone();
    let model = work.path().join("m.safetensors");
    // A truncated PNG: named, or skipped and counted on request.
    let bad = data.join("green").join("9.png");
    let bytes = std::fs::read(data.join("green").join("1.png")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--backbone",
            s(&backbone),
            "--data",
            s(&data),
            "--method",
            "prototype",
            "--out",
            s(&model),
            "--json",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let args = train(&[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = run_err_in(&refs, None);
    assert!(
        e.contains("9.png") && e.contains("--skip-bad-images"),
        "{e}"
    );
    assert!(!model.exists(), "nothing is written after an error");
    let args = train(&["--skip-bad-images"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = last_json(&run_ok_in(&refs, None));
    assert_eq!(
        (report["images"].as_u64(), report["skipped"].as_u64()),
        (Some(9), Some(1))
    );
    std::fs::remove_file(&bad).unwrap();
    std::fs::remove_file(&model).unwrap();
    // More shots than a class has.
    let args = train(&["--shots-per-class", "5"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = run_err_in(&refs, None);
    assert!(e.contains("class `") && e.contains("only 3"), "{e}");
    // One class only.
    let single = work.path().join("single");
    std::fs::create_dir_all(single.join("red")).unwrap();
    picture(0, 0)
        .save(single.join("red").join("0.png"))
        .unwrap();
    let e = run_err_in(
        &[
            "train",
            "--backbone",
            s(&backbone),
            "--data",
            s(&single),
            "--out",
            s(&model),
        ],
        None,
    );
    assert!(
        e.contains("1 class(es)") && e.contains("at least two"),
        "{e}"
    );
    // An empty class folder.
    std::fs::create_dir_all(single.join("blue")).unwrap();
    let e = run_err_in(
        &[
            "train",
            "--backbone",
            s(&backbone),
            "--data",
            s(&single),
            "--out",
            s(&model),
        ],
        None,
    );
    assert!(e.contains("blue") && e.contains("holds no images"), "{e}");
    // Weights that do not fit the architecture: the tensor and both shapes.
    let lukemelas = tiny_backbone().join("../tiny_lite.safetensors");
    let e = run_err_in(
        &[
            "train",
            "--backbone",
            s(&lukemelas),
            "--architecture",
            "efficientnet_lite0",
            "--data",
            s(&data),
            "--out",
            s(&model),
        ],
        None,
    );
    assert!(
        e.contains("_conv_stem.weight")
            && e.contains("[8, 3, 3, 3]")
            && e.contains("[32, 3, 3, 3]"),
        "{e}"
    );
    // A bare weights file whose name gives no architecture.
    let e = run_err_in(
        &[
            "train",
            "--backbone",
            s(&lukemelas),
            "--data",
            s(&data),
            "--out",
            s(&model),
        ],
        None,
    );
    assert!(e.contains("--architecture"), "{e}");
    // A .pth that pickles a whole module is refused without running it.
    let module = tiny_backbone().join("../../pth/whole_module.pth");
    let e = run_err_in(
        &[
            "train",
            "--backbone",
            s(&module),
            "--architecture",
            "efficientnet_lite0",
            "--data",
            s(&data),
            "--out",
            s(&model),
        ],
        None,
    );
    assert!(
        e.contains("whole_module.pth") && e.contains("state_dict"),
        "{e}"
    );
    // Unknown method.
    let e = run_err_in(
        &[
            "train",
            "--backbone",
            s(&backbone),
            "--data",
            s(&data),
            "--method",
            "protoype",
            "--out",
            s(&model),
        ],
        None,
    );
    assert!(e.contains("prototype"), "{e}");
    assert!(!model.exists());
}

/// `--backbone hf:OWNER/MODEL` downloads a timm folder through `HF_ENDPOINT` into `HF_HOME`'s
/// cache (here from a local server), then works offline from the cache; a model the Hub lacks
/// is named with the missing file.
#[test]
fn a_hub_name_downloads_a_timm_folder() {
    use common::hub_server::HubServer;
    let work = tempfile::tempdir().unwrap();
    use_test_cache();
    let data = work.path().join("data");
    write_images(&data, 2);
    let server = HubServer::start(&tiny_backbone(), "timm/tiny-lite");
    let home = work.path().join("hf-home");
    let embed = |spec: &str, offline: bool| {
        std::process::Command::new(env!("CARGO_BIN_EXE_metalearn"))
            .args(["embed", "--backbone", spec, "--data"])
            .arg(&data)
            .arg("--out")
            .arg(work.path().join("features.csv"))
            .arg("--json")
            .env("HF_ENDPOINT", &server.endpoint)
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
            .env_remove("HF_HUB_CACHE")
            .output()
            .expect("the metalearn binary runs")
    };
    for offline in [false, true] {
        let out = embed("hf:timm/tiny-lite", offline);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json = last_json(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(json["rows"], 6);
        assert_eq!(json["dim"], 32);
    }
    let served = server.served();
    assert!(served >= 2, "{served} requests");
    let out = embed("hf:timm/absent", false);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("hf:timm/absent") && e.contains("config.json"),
        "{e}"
    );
}
