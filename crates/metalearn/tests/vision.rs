//! Pre-trained image backbones: EfficientNet-Lite's layout, weights read by name and shape,
//! outputs against PyTorch's (the tiny random model's fixture always; the shared
//! EfficientNet-Lite0 and the peers' reference outputs when `../shared` is present).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use metalearn::vision::backbone::read_weights;
use metalearn::vision::image::{decode_rgb, rgb_input};
use metalearn::vision::{Backbone, EfficientNetLite};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vision")
}

fn shared_lite0() -> Option<PathBuf> {
    let dir = repo().join("../shared/models/efficientnet-lite0");
    dir.join("model.safetensors").exists().then_some(dir)
}

/// splitmix64 values in [-1, 1), as the peers' reference inputs are made.
fn splitmix64_uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn top5(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(5);
    order
}

#[test]
fn lite_variants_have_the_published_sizes() -> Result<()> {
    // Trainable parameters with the 1000-class classifier: Lite0 exactly as the shared
    // weights hold them; the others to the published 0.1M (TensorFlow's Lite README).
    for (name, want, tolerance) in [
        ("efficientnet_lite0", 4_652_008, 0),
        ("efficientnet_lite1", 5_400_000, 50_000),
        ("efficientnet_lite2", 6_100_000, 50_000),
        ("efficientnet_lite3", 8_200_000, 50_000),
        ("efficientnet_lite4", 13_000_000, 50_000),
    ] {
        let spec = EfficientNetLite::named(name).context("known")?;
        let (arch, _) = spec.build(spec.resolution, Some(1000))?;
        let net = metalearn::Network::build(&arch)?;
        let count: usize = net
            .param_specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        ensure!(
            count.abs_diff(want) <= tolerance,
            "{name}: {count} parameters, published {want}"
        );
    }
    ensure!(EfficientNetLite::named("tf-EfficientNet-Lite2").is_some());
    ensure!(EfficientNetLite::named("efficientnet_b0").is_none());
    Ok(())
}

/// The tiny random EfficientNet-Lite of `tests/fixtures/vision` (made by `make_fixtures.py`
/// with PyTorch): its shape and PyTorch's outputs.
fn tiny_lite() -> Result<(EfficientNetLite, serde_json::Value)> {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny_lite.json"))?)?;
    let spec = EfficientNetLite {
        width: expected["width"].as_f64().context("width")?,
        depth: expected["depth"].as_f64().context("depth")?,
        resolution: expected["size"].as_u64().context("size")? as usize,
        stem: expected["stem"].as_u64().context("stem")? as usize,
        head: expected["head"].as_u64().context("head")? as usize,
        dropout: 0.2,
        tf_padding: true,
    };
    Ok((spec, expected))
}

/// The tiny random EfficientNet-Lite gives PyTorch's features and logits.
#[test]
fn tiny_lite_matches_pytorch() -> Result<()> {
    let (spec, expected) = tiny_lite()?;
    let path = fixtures().join("tiny_lite.safetensors");
    let tensors = read_weights(&path)?;
    let backbone = Backbone::from_tensors(tensors, &path, "tiny_lite", &spec, DType::F32)?;
    let size = spec.resolution;
    let x = splitmix64_uniform(7, 2 * 3 * size * size);
    let x = Tensor::from_vec(x, (2, 3, size, size), &Device::Cpu)?;
    // The folded CPU kernels (the default) and the reference layer path.
    for kernels in [true, false] {
        let (features, logits) = metalearn::kernels::with_kernels(kernels, || {
            let f = backbone.features(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let l = backbone.logits(&x)?.flatten_all()?.to_vec1::<f32>()?;
            Ok::<_, anyhow::Error>((f, l))
        })?;
        let df = max_abs_diff(&features, &floats(&expected["features"]));
        let dl = max_abs_diff(&logits, &floats(&expected["logits"]));
        eprintln!(
            "tiny EfficientNet-Lite against PyTorch ({} path): features {df:.1e}, logits {dl:.1e}",
            if kernels { "folded" } else { "reference" }
        );
        ensure!(df < 1e-4 && dl < 1e-4, "features {df}, logits {dl}");
    }
    Ok(())
}

#[test]
fn wrong_tensors_are_named_with_both_shapes() -> Result<()> {
    let path = fixtures().join("tiny_lite.safetensors");
    let (spec, _) = tiny_lite()?;
    let mut tensors = read_weights(&path)?;
    // The right tensors for another architecture: a shape does not fit.
    let wider = EfficientNetLite {
        stem: 16,
        ..spec.clone()
    };
    let e = Backbone::from_tensors(tensors.clone(), &path, "tiny", &wider, DType::F32)
        .expect_err("stem width differs")
        .to_string();
    ensure!(
        e.contains("tiny_lite.safetensors")
            && e.contains("_conv_stem.weight")
            && e.contains("[8, 3, 3, 3]")
            && e.contains("[16, 3, 3, 3]"),
        "{e}"
    );
    // A missing tensor.
    tensors.retain(|(n, _)| n != "_blocks.3._bn1.running_var");
    let e = Backbone::from_tensors(tensors.clone(), &path, "tiny", &spec, DType::F32)
        .expect_err("missing")
        .to_string();
    ensure!(
        e.contains("`_blocks.3._bn1.running_var`") && e.contains("missing"),
        "{e}"
    );
    // An unknown architecture name lists the known ones.
    let e = Backbone::load(&path, Some("resnet1000"), DType::F32)
        .expect_err("unknown")
        .to_string();
    ensure!(
        e.contains("resnet1000") && e.contains("efficientnet_lite0"),
        "{e}"
    );
    Ok(())
}

/// The shared EfficientNet-Lite0 against the PyTorch reference outputs of the vision peers
/// (`shared/bench/peers/vision/effnet_lite0_reference.json`): pooled features and logits
/// within 1e-4 and the same top-5 classes, on two photos and two random inputs.
#[test]
fn efficientnet_lite0_matches_pytorch_reference() -> Result<()> {
    let Some(dir) = shared_lite0() else {
        eprintln!(
            "../shared/models/efficientnet-lite0 not found: the comparison with PyTorch's \
             outputs is skipped (the tiny model's fixture ran)"
        );
        return Ok(());
    };
    let peers = repo().join("../shared/bench/peers/vision");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        peers.join("effnet_lite0_reference.json"),
    )?)?;
    let backbone = Backbone::load(
        &dir.join("model.safetensors"),
        Some("efficientnet_lite0"),
        DType::F32,
    )?;
    for input in reference["inputs"].as_array().context("inputs")? {
        let name = input["name"].as_str().context("name")?;
        let x = match input["kind"].as_str() {
            Some("png") => {
                let image = decode_rgb(&peers.join(input["file"].as_str().context("file")?))?;
                rgb_input(&image, &backbone.preprocess)
            }
            _ => splitmix64_uniform(input["seed"].as_u64().context("seed")?, 3 * 224 * 224),
        };
        let sum: f64 = x.iter().map(|&v| v as f64).sum();
        let want_sum = input["input_sum"].as_f64().context("sum")?;
        ensure!(
            (sum - want_sum).abs() < 1e-2,
            "{name}: input sum {sum} vs {want_sum}"
        );
        let x = Tensor::from_vec(x, (1, 3, 224, 224), &Device::Cpu)?;
        let features = backbone.features(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let logits = backbone.logits(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let df = max_abs_diff(&features, &floats(&input["features"]));
        let dl = max_abs_diff(&logits, &floats(&input["logits"]));
        let want_top5: Vec<usize> = input["top5"]
            .as_array()
            .context("top5")?
            .iter()
            .map(|e| e[0].as_u64().expect("class") as usize)
            .collect();
        eprintln!("{name}: features {df:.1e}, logits {dl:.1e} from PyTorch's");
        ensure!(df < 1e-4 && dl < 1e-4, "{name}: features {df}, logits {dl}");
        ensure!(
            top5(&logits) == want_top5,
            "{name}: top-5 {:?} vs {want_top5:?}",
            top5(&logits)
        );
    }
    Ok(())
}

/// The shared model's legacy PyTorch file (read without running code) holds the same tensors
/// as its safetensors copy, and loads as the same backbone.
#[test]
fn efficientnet_lite0_pth_equals_its_safetensors() -> Result<()> {
    let Some(dir) = shared_lite0() else {
        eprintln!("../shared/models/efficientnet-lite0 not found: the .pth comparison is skipped");
        return Ok(());
    };
    let pth = read_weights(&dir.join("efficientnet-lite0-57934424.pth"))?;
    let safe = read_weights(&dir.join("model.safetensors"))?;
    let counters = pth
        .iter()
        .filter(|(n, _)| n.ends_with("num_batches_tracked"))
        .count();
    ensure!(
        pth.len() == 296 && counters == 49,
        "{} tensors, {counters} counters",
        pth.len()
    );
    for (name, t) in &safe {
        let (_, u) = pth
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("{name} missing from the .pth"))?;
        let diff = (t - u)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        ensure!(diff == 0.0, "{name} differs by {diff}");
    }
    let backbone = Backbone::load(
        &dir.join("efficientnet-lite0-57934424.pth"),
        Some("efficientnet_lite0"),
        DType::F32,
    )?;
    ensure!(backbone.classes() == Some(1000) && backbone.feature_dim() == 1280);
    Ok(())
}

/// The same tiny weights as a timm model folder (`config.json` with `model_args` and
/// `pretrained_cfg`, tensors in timm's `tf_efficientnet_lite` names, renamed by the fixture
/// script on its own) give the same outputs, and take the preprocessing from the config.
#[test]
fn timm_folder_reads_as_the_same_network() -> Result<()> {
    let (_, expected) = tiny_lite()?;
    let backbone = Backbone::load(&fixtures().join("tiny_timm"), None, DType::F32)?;
    ensure!(backbone.preprocess.size == 32 && backbone.preprocess.resize == 36);
    ensure!(backbone.preprocess.mean == [0.5; 3] && backbone.preprocess.std == [0.5; 3]);
    let x = splitmix64_uniform(7, 2 * 3 * 32 * 32);
    let x = Tensor::from_vec(x, (2, 3, 32, 32), &Device::Cpu)?;
    let logits = backbone.logits(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let dl = max_abs_diff(&logits, &floats(&expected["logits"]));
    ensure!(dl < 1e-4, "logits differ by {dl}");
    // A bare weights file needs its architecture named.
    let e = Backbone::load(&fixtures().join("tiny_lite.safetensors"), None, DType::F32)
        .expect_err("no architecture")
        .to_string();
    ensure!(
        e.contains("--architecture") && e.contains("efficientnet_lite0"),
        "{e}"
    );
    Ok(())
}

/// Photo preprocessing against PIL's (torchvision's `Resize(256)` + `CenterCrop(224)` with
/// bilinear antialiasing), in 8-bit levels, on the photos of a folder named by
/// `METALEARN_PHOTO_CHECK` (`NAME.png` beside `NAME_pil224.png`, the latter made by PIL); the
/// check reports and bounds the largest difference. Without the variable it says so.
#[test]
fn photo_preprocessing_matches_pil() -> Result<()> {
    let Some(dir) = std::env::var_os("METALEARN_PHOTO_CHECK").map(PathBuf::from) else {
        eprintln!("METALEARN_PHOTO_CHECK not set: the comparison with PIL's resizing is skipped");
        return Ok(());
    };
    let levels = metalearn::vision::Preprocess {
        mean: [0.0; 3],
        std: [1.0 / 255.0; 3],
        ..metalearn::vision::Preprocess::efficientnet_lite(224)
    };
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let Some(stem) = name
            .strip_suffix(".png")
            .filter(|s| !s.ends_with("_pil224"))
        else {
            continue;
        };
        let ours = metalearn::vision::image::photo_input(&decode_rgb(&path)?, &levels)?;
        let pil = rgb_input(
            &decode_rgb(&dir.join(format!("{stem}_pil224.png")))?,
            &levels,
        );
        let diffs: Vec<f32> = ours.iter().zip(&pil).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().cloned().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        eprintln!("{stem}: largest difference from PIL {max:.1} levels, mean {mean:.3}");
        ensure!(
            max <= 2.0 && mean <= 0.3,
            "{stem}: {max} levels at most, {mean} on average"
        );
        checked += 1;
    }
    ensure!(
        checked > 0,
        "no NAME.png / NAME_pil224.png pairs in {}",
        dir.display()
    );
    // With the shared model: our whole pipeline on the original photos gives PyTorch's top 5.
    if let Some(model) = shared_lite0() {
        let peers = repo().join("../shared/bench/peers/vision");
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            peers.join("effnet_lite0_reference.json"),
        )?)?;
        let weights = model.join("model.safetensors");
        let backbone = Backbone::load(&weights, Some("efficientnet_lite0"), DType::F32)?;
        for input in reference["inputs"].as_array().context("inputs")? {
            let name = input["name"].as_str().context("name")?;
            let photo = dir.join(format!("{name}.png"));
            if input["kind"] != "png" || !photo.exists() {
                continue;
            }
            let x = metalearn::vision::features::image_input(&photo, &backbone.preprocess)?;
            let x = Tensor::from_vec(x, (1, 3, 224, 224), &Device::Cpu)?;
            let logits = backbone.logits(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let want: Vec<usize> = input["top5"]
                .as_array()
                .context("top5")?
                .iter()
                .map(|e| e[0].as_u64().expect("class") as usize)
                .collect();
            eprintln!("{name}: top 5 {:?}, PyTorch {want:?}", top5(&logits));
            ensure!(
                top5(&logits) == want,
                "{name}: top 5 differs from PyTorch's"
            );
        }
    }
    Ok(())
}
