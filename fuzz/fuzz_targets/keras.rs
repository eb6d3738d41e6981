//! The Keras readers on arbitrary file contents: `keras::import` of the input as a full model
//! (`.keras` zip or legacy `.h5`) and as a weights-only file against a fixed architecture
//! (`.weights.h5` and legacy weights layouts). Every input must load or fail with an `Error`; a
//! model that loads must predict on zeros when it is small.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;
use metalearn::keras::import;

/// A folder with the input file and the founding model's architecture (`.keras`).
fn scratch() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static SCRATCH: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let dir = tempfile::tempdir().expect("temporary folder");
        let input = dir.path().join("input.h5");
        let architecture = dir.path().join("architecture.keras");
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/metalearn/tests/fixtures/keras/founding.keras");
        std::fs::copy(fixture, &architecture).expect("the founding.keras fixture");
        (dir, input, architecture)
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, input, architecture) = scratch();
    std::fs::write(input, data).expect("scratch file");
    for arch in [None, Some(architecture.as_path())] {
        if let Ok(model) = import(input, arch) {
            let shape = model.architecture().input_shape.clone();
            let size: usize = shape.iter().product();
            if size <= 1 << 12 && model.param_count() <= 1 << 16 {
                let mut dims = vec![2];
                dims.extend(shape);
                let x = Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).expect("zeros");
                let _ = model.predict(&x, 2);
            }
        }
    }
});
