//! Where LoRA files come from, and a cache of parsed files. A source is a file
//! inside the configured LoRA folders (`KILN_LORA_DIRS`, `:`-separated): an
//! absolute path, or a path relative to one of those folders. Paths escaping
//! the folders (`..`, symlinks) are refused. Parsed files are kept in memory,
//! least recently used evicted beyond a byte budget (`KILN_LORA_CACHE_BYTES`,
//! default 1 GiB), keyed by path, size and modification time so an edited file
//! is read again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::{LoraFile, read};
use crate::error::{PipelineError, ProblemKind};
use crate::text_to_image::image_io::{confined_path, dirs_from_env};

/// The setting naming the folders LoRA files may be read from.
pub const LORA_DIRS: &str = "KILN_LORA_DIRS";

/// Folders LoRA files may be read from.
pub fn allowed_lora_dirs() -> Vec<PathBuf> {
    dirs_from_env(LORA_DIRS)
}

fn invalid(field: &str, message: String) -> PipelineError {
    PipelineError::invalid(field, ProblemKind::Constraint, message)
}

/// The file a source names, confined to `allowed`.
pub fn resolve_source(
    field: &str,
    source: &str,
    allowed: &[PathBuf],
) -> Result<PathBuf, PipelineError> {
    let source = source.trim();
    if source.starts_with("http://") || source.starts_with("https://") {
        return Err(invalid(
            field,
            format!(
                "{source}: downloading LoRAs from URLs is not available in this build yet; put the file in {LORA_DIRS}"
            ),
        ));
    }
    if allowed.is_empty() {
        return Err(invalid(
            field,
            format!(
                "no LoRA folders are configured; set {LORA_DIRS} to the folders holding LoRA files"
            ),
        ));
    }
    let path = Path::new(source);
    if path.is_absolute() {
        return confined_path(field, path, allowed, LORA_DIRS);
    }
    for dir in allowed {
        let candidate = dir.join(path);
        if candidate.exists() {
            return confined_path(field, &candidate, allowed, LORA_DIRS);
        }
    }
    Err(invalid(
        field,
        format!(
            "{source} is not a file in the LoRA folders ({LORA_DIRS}); Hugging Face and CivitAI sources are not available in this build yet"
        ),
    ))
}

type CacheKey = (PathBuf, u64, Option<SystemTime>);

/// Parsed LoRA files, least recently used first.
pub struct LoraCache {
    budget: u64,
    entries: Mutex<Vec<(CacheKey, Arc<LoraFile>, u64)>>,
}

impl LoraCache {
    pub fn new(budget: u64) -> Self {
        LoraCache {
            budget,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The process-wide cache.
    pub fn shared() -> &'static LoraCache {
        static CACHE: OnceLock<LoraCache> = OnceLock::new();
        CACHE.get_or_init(|| {
            let budget = std::env::var("KILN_LORA_CACHE_BYTES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1 << 30);
            LoraCache::new(budget)
        })
    }

    /// The parsed file at `path` (read and parsed on a miss).
    pub fn get(&self, field: &str, path: &Path) -> Result<Arc<LoraFile>, PipelineError> {
        let metadata = std::fs::metadata(path)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
        let key: CacheKey = (path.to_path_buf(), metadata.len(), metadata.modified().ok());
        if let Ok(mut entries) = self.entries.lock()
            && let Some(index) = entries.iter().position(|(k, _, _)| *k == key)
        {
            let entry = entries.remove(index);
            let file = Arc::clone(&entry.1);
            entries.push(entry);
            return Ok(file);
        }
        let file = Arc::new(read(path).map_err(|e| invalid(field, e.to_string()))?);
        if let Ok(mut entries) = self.entries.lock() {
            entries.push((key, Arc::clone(&file), metadata.len()));
            let mut total: u64 = entries.iter().map(|(_, _, size)| size).sum();
            while total > self.budget && entries.len() > 1 {
                total -= entries.remove(0).2;
            }
        }
        Ok(file)
    }

    /// Files held now.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
