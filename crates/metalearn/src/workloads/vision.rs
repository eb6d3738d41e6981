//! Vision workloads, with the shapes and settings of the vision peers' `speed_vision.py`:
//!
//! | workload | what one iteration is |
//! | --- | --- |
//! | `effnet-lite0-forward` | EfficientNet-Lite0 on 32 random 3x224x224 inputs, inference mode: pooled features and 1000 logits |
//! | `effnet-lite0-single` | the same on one image |
//!
//! The weights are random unless a weights file is given: the arithmetic is the same.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{time_prepared, BenchResult, Prepared};
use crate::error::{Error, Result};
use crate::nn::network::Network;
use crate::vision::{Backbone, EfficientNetLite};

/// The vision workloads, by name.
pub const VISION_WORKLOADS: [&str; 2] = ["effnet-lite0-forward", "effnet-lite0-single"];

/// Floating-point operations of one EfficientNet-Lite0 image at 224x224 (two per
/// multiply-add; 407M multiply-adds published, the convolutions and the classifier).
pub const LITE0_GFLOP_PER_IMAGE: f64 = 0.814;

/// Runs a vision workload for `iterations` timed iterations (after a warm-up), with the
/// weights of `weights` (an EfficientNet-Lite0 file) or random ones.
pub fn run_vision(
    workload: &str,
    iterations: usize,
    weights: Option<&PathBuf>,
    device: &Device,
) -> Result<BenchResult> {
    crate::runtime::init();
    if iterations == 0 {
        return Err(Error::Config("--iterations must be at least 1".into()));
    }
    let backbone = match weights {
        Some(path) => Backbone::load(path, Some("efficientnet_lite0"), DType::F32)?,
        None => random_lite0(device)?,
    };
    let batch = if workload == "effnet-lite0-single" {
        1
    } else {
        32
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let values: Vec<f32> = (0..batch * 3 * 224 * 224)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let images = Tensor::from_vec(values, (batch, 3, 224, 224), device)?;
    let prepared = match workload {
        "effnet-lite0-forward" | "effnet-lite0-single" => Prepared {
            step: Box::new(move || backbone.logits(&images).map(|_| ())),
            warmup: if batch == 1 { 3 } else { 2 },
            sentences: Some(batch),
        },
        other => {
            return Err(Error::Config(format!(
                "unknown vision workload `{other}`; choose one of: {}",
                VISION_WORKLOADS.join(", ")
            )))
        }
    };
    let mut result = time_prepared(workload, prepared, iterations, device)?;
    result.images_per_sec = result.sentences_per_sec.take();
    result.images_per_iter = result.sentences_per_iter.take();
    result.gflop_per_image = Some(LITE0_GFLOP_PER_IMAGE);
    Ok(result)
}

/// EfficientNet-Lite0 with a 1000-class classifier and random weights.
fn random_lite0(device: &Device) -> Result<Backbone> {
    let spec = EfficientNetLite::named("efficientnet_lite0").expect("known variant");
    let (arch, _) = spec.build(spec.resolution, Some(1000))?;
    let network = Network::build(&arch)?;
    let params = network.init_params(0, device, DType::F32)?;
    let stats = network.init_buffers(device, DType::F32)?;
    Backbone::new(
        "efficientnet_lite0",
        network,
        params,
        stats,
        crate::vision::Preprocess::efficientnet_lite(224),
    )
}
