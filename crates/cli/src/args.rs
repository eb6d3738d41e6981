//! Argument groups and switches that several commands share.

use std::path::PathBuf;

use clap::Args;

use metalearn::error::{Error, Result};
use metalearn::transfer::DataFiles;

/// Where examples come from: `--data FILE --target COLUMN` or `--images DIR`.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// CSV file with a header row and one example per row.
    #[arg(long, value_name = "FILE", conflicts_with = "images")]
    pub data: Option<PathBuf>,
    /// The CSV column to predict (every other column is a feature).
    #[arg(long, value_name = "COLUMN")]
    pub target: Option<String>,
    /// Image folder with one sub-folder per class (instead of --data).
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
}

impl DataArgs {
    /// The files these flags name, for the library's loaders.
    pub fn files(&self) -> DataFiles {
        DataFiles {
            data: self.data.clone(),
            target: self.target.clone(),
            images: self.images.clone(),
        }
    }
}

/// The device chosen by a command's `--cuda` switch: the first CUDA GPU, or the CPU.
pub fn compute_device(cuda: bool) -> Result<candle_core::Device> {
    if !cuda {
        return Ok(candle_core::Device::Cpu);
    }
    candle_core::Device::new_cuda(0).map_err(|e| {
        Error::Config(format!(
            "--cuda: no CUDA device ({e}); build with `--features cuda` on a machine with an \
             NVIDIA GPU, or drop --cuda to run on the CPU"
        ))
    })
}
