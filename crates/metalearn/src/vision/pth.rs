//! PyTorch `.pth` weight files, read without Python and without executing anything.

use candle_core::Tensor;

/// Every tensor of a PyTorch weight file (a state dict), by name, in the file's order.
pub fn read_pth(path: &std::path::Path) -> crate::error::Result<Vec<(String, Tensor)>> {
    Err(crate::error::Error::Checkpoint(format!(
        "{}: reading PyTorch files is not available",
        path.display()
    )))
}
