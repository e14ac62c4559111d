//! The registry's error type: every variant names the model, file or rule involved.

use std::path::PathBuf;

/// Errors from naming, resolving, storing and verifying models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid model name {name:?}: {rule}")]
    InvalidName { name: String, rule: String },
    #[error("invalid alias {alias:?}: {rule}")]
    InvalidAlias { alias: String, rule: String },
    #[error("invalid model reference {reference:?}: {rule}")]
    InvalidReference { reference: String, rule: String },
    #[error("model {0} is not registered")]
    ModelNotFound(String),
    #[error("model {name} has no version {version}")]
    VersionNotFound { name: String, version: u64 },
    #[error("model {name} has no alias @{alias}")]
    AliasNotFound { name: String, alias: String },
    #[error("model {0} has no versions")]
    NoVersions(String),
    #[error("{path}: not a Kiln model folder (no manifest.json)")]
    NotAModelFolder { path: PathBuf },
    #[error("integrity check failed for {file} in {model}: {problem}")]
    Integrity {
        model: String,
        file: String,
        problem: String,
    },
    #[error("invalid manifest {path}: {message}")]
    InvalidManifest { path: PathBuf, message: String },
    #[error("artifact path {0:?} escapes the model folder")]
    UnsafeArtifactPath(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for registry operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// True when the error means "no such model/version/alias" (HTTP 404 territory).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::ModelNotFound(_)
                | Error::VersionNotFound { .. }
                | Error::AliasNotFound { .. }
                | Error::NoVersions(_)
                | Error::NotAModelFolder { .. }
        )
    }
}
