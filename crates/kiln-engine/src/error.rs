//! The engine's error type: every variant names the file, tensor or rule involved.

use std::path::PathBuf;

/// Errors from devices, weight files and tensor operations.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(
        "{path}: pickle-based checkpoints (.ckpt/.pt/.pth/.bin/.pkl) are refused because loading them can run code; convert to .safetensors"
    )]
    PickleRefused { path: PathBuf },
    #[error("{path}: no .safetensors weights found")]
    NoWeights { path: PathBuf },
    #[error("{path}: {message}")]
    InvalidWeights { path: PathBuf, message: String },
    #[error("tensor {name:?} is missing from {files}")]
    MissingTensor { name: String, files: String },
    #[error("tensor {name:?} in {files} has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        files: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device: {0}")]
    Device(String),
}

/// Result alias for engine operations.
pub type Result<T> = std::result::Result<T, EngineError>;
