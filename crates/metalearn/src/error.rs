//! The crate's error type: every failure names what went wrong and, where it can, what to do.

use std::path::PathBuf;

/// Errors returned by metalearn.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the tensor engine (candle).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Input data is malformed (a CSV cell, an image, a task request).
    #[error("{0}")]
    Data(String),
    /// A checkpoint file is not valid or does not match its architecture.
    #[error("{0}")]
    Checkpoint(String),
    /// A configuration value (API argument, flag or config-file field) is invalid.
    #[error("{0}")]
    Config(String),
    /// Tensor shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The loss became NaN or infinite during training.
    #[error("{0}")]
    NonFinite(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
