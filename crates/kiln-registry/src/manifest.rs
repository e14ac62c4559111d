//! The per-version manifest: what pipeline serves the model, its signature,
//! configuration, presets and the checked list of artifact files.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the manifest inside a model folder or registry version.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One artifact file with its size and sha256, relative to the artifacts folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Everything Kiln needs to know to load and describe one model version.
/// `signature`, `config` and `presets` are owned by the pipeline named in `pipeline`;
/// the registry stores them without interpreting them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version, for future migrations.
    #[serde(default = "format_version")]
    pub format_version: u32,
    /// Pipeline kind, e.g. `tabular/glm`.
    pub pipeline: String,
    /// Registered name and version; absent in a free-standing model folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Input/output signature (pipeline-defined JSON).
    #[serde(default)]
    pub signature: serde_json::Value,
    /// Pipeline configuration, e.g. fitted GLM coefficients.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Named parameter presets.
    #[serde(default)]
    pub presets: BTreeMap<String, serde_json::Value>,
    /// Artifact files, checked on load.
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

fn format_version() -> u32 {
    1
}

impl Manifest {
    /// A new manifest for `pipeline` with empty signature, config and files.
    pub fn new(pipeline: impl Into<String>) -> Self {
        Manifest {
            format_version: format_version(),
            pipeline: pipeline.into(),
            name: None,
            version: None,
            created_at: None,
            description: String::new(),
            signature: serde_json::Value::Null,
            config: serde_json::Value::Null,
            presets: BTreeMap::new(),
            files: Vec::new(),
        }
    }

    /// Read and parse `folder/manifest.json`.
    pub fn read_from(folder: &Path) -> Result<Self> {
        let path = folder.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotAModelFolder {
                    path: folder.to_path_buf(),
                });
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| Error::InvalidManifest {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if manifest.pipeline.trim().is_empty() {
            return Err(Error::InvalidManifest {
                path,
                message: "`pipeline` must name the pipeline kind".into(),
            });
        }
        Ok(manifest)
    }

    /// Serialise as pretty JSON.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}
