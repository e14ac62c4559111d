//! Large outputs on a volume every front and worker mounts: an output above
//! the inline limit is written there (under a name derived from nothing a
//! client controls) and Redis keeps only the file's name, so images do not
//! fill Redis's memory. Files are deleted once their job expires.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::super::StoreError;

/// The shared results folder.
pub(super) struct ResultFiles {
    dir: PathBuf,
    inline_max: usize,
}

/// Whether `name` is one this module wrote (no separators, no `..`).
fn is_result_name(name: &str) -> bool {
    name.len() <= 80
        && name.ends_with(".json")
        && name
            .trim_end_matches(".json")
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-')
}

impl ResultFiles {
    pub(super) fn new(dir: &Path, inline_max: u64) -> Result<ResultFiles, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::new(format!("results folder {}: {e}", dir.display())))?;
        Ok(ResultFiles {
            dir: dir.to_path_buf(),
            inline_max: usize::try_from(inline_max).unwrap_or(usize::MAX),
        })
    }

    /// Whether an output of `len` bytes goes to a file.
    pub(super) fn wants(&self, len: usize) -> bool {
        len > self.inline_max
    }

    /// Write `json` for job `id`; returns the file's name. Written to a
    /// temporary name and renamed, so a reader never sees half a file.
    pub(super) async fn write(&self, id: &str, json: String) -> Result<String, StoreError> {
        let digest = Sha256::digest(id.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("{hex}-{}.json", uuid::Uuid::new_v4().simple());
        let path = self.dir.join(&name);
        let partial = self.dir.join(format!("{name}.partial"));
        let written = tokio::task::spawn_blocking(move || {
            std::fs::write(&partial, json.as_bytes())?;
            std::fs::rename(&partial, &path)
        })
        .await
        .map_err(|e| StoreError::new(format!("writing a result file: {e}")))?;
        written.map_err(|e| StoreError::new(format!("writing a result file: {e}")))?;
        Ok(name)
    }

    /// The output stored under `name`.
    pub(super) async fn read(&self, name: &str) -> Result<Value, StoreError> {
        if !is_result_name(name) {
            return Err(StoreError::new(format!(
                "invalid result file name {name:?}"
            )));
        }
        let path = self.dir.join(name);
        let text = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(|e| StoreError::new(format!("reading a result file: {e}")))?
            .map_err(|e| StoreError::new(format!("result file {name}: {e}")))?;
        Ok(serde_json::from_slice(&text)?)
    }

    /// Delete result files off the async threads (a shared volume may be slow).
    pub(super) async fn remove_all(&self, names: Vec<String>) {
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for name in names.iter().filter(|n| is_result_name(n)) {
                let _ = std::fs::remove_file(dir.join(name));
            }
        })
        .await;
    }

    /// Delete a result file (gone already is fine).
    pub(super) fn remove(&self, name: &str) {
        if is_result_name(name) {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_this_module_writes_are_read_or_removed() {
        assert!(is_result_name(
            "0a1b2c3d4e5f6a7b-0123456789abcdef0123456789abcdef.json"
        ));
        for bad in [
            "../etc/passwd",
            "a/b.json",
            "..json",
            "x.json",
            "abc.txt",
            "",
        ] {
            assert!(!is_result_name(bad), "{bad}");
        }
    }
}
