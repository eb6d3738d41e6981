//! The checkpoint loaders on arbitrary file contents: `Checkpoint::load`, `Sequential::load` on
//! top of it, what the CLI reads (`load_model` with the `data` section, `inspect`'s
//! `describe`) and the meta-learning side (`MetaLearner::from_checkpoint`, the stored
//! experiment config, `learner_for_ways`). Every input must load or fail with an `Error`; a
//! model that loads must predict on a small input, and save and load again.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;
use metalearn::transfer::load_model;
use metalearn::inspect::describe;
use metalearn::eval::runs::learner_for_ways;
use metalearn::experiment::ExperimentConfig;
use metalearn::meta::learner::MetaLearner;
use metalearn::{Checkpoint, Sequential};

/// Largest activation (elements per example) for which a loaded model is run forward: a
/// checkpoint holds weights but not activations, so a small file may describe a network whose
/// activations would not fit in memory.
const FORWARD_LIMIT: usize = 1 << 14;

/// A folder with the input file and a file for re-saving.
fn scratch() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static SCRATCH: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        // One thread for the tensor engine: the fuzzer runs one input at a time.
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let dir = tempfile::tempdir().expect("temporary folder");
        let input = dir.path().join("input.safetensors");
        let resaved = dir.path().join("resaved.safetensors");
        (dir, input, resaved)
    })
}

fn small_enough(model: &Sequential) -> bool {
    let network = model.network();
    std::iter::once(network.architecture().input_shape.as_slice())
        .chain(network.layer_shapes().iter().map(Vec::as_slice))
        .all(|shape| {
            shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .is_some_and(|n| n <= FORWARD_LIMIT)
        })
}

fuzz_target!(|data: &[u8]| {
    let (_, input, resaved) = scratch();
    std::fs::write(input, data).expect("write the input");
    if let Ok(model) = Sequential::load(input) {
        if small_enough(&model) {
            let mut shape = vec![2];
            shape.extend(&model.architecture().input_shape);
            let x = Tensor::zeros(shape, model.dtype(), &Device::Cpu).expect("zeros");
            if let Err(e) = model.predict(&x, 2) {
                panic!("a loaded model cannot predict: {e}");
            }
        }
        model.save(resaved).expect("a loaded model saves");
        if let Err(e) = Sequential::load(resaved) {
            panic!("a re-saved model does not load: {e}");
        }
    }
    let _ = load_model(input);
    let _ = describe(input);
    let Ok(ckpt) = Checkpoint::load(input, &Device::Cpu) else {
        return;
    };
    let _ = MetaLearner::from_checkpoint(&ckpt);
    let _ = learner_for_ways(&ckpt, 20);
    if let Some(section) = ckpt.section("experiment") {
        if let Ok(cfg) = serde_json::from_value::<ExperimentConfig>(section.clone()) {
            let _ = cfg.validate();
        }
    }
});
