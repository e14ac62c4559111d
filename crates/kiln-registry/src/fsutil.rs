//! Filesystem helpers: atomic writes, hashing, confined copies and the writer lock.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lowercase hex sha256 of a file's contents, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|e| Error::io("read", path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Write `bytes` to `path` atomically: a temporary sibling is written, synced and renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = parent.join(format!(".{file_name}.tmp-{}", unique_suffix()));
    let mut file = File::create(&temp).map_err(|e| Error::io("create", &temp, e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io("write", &temp, e))?;
    fs::rename(&temp, path).map_err(|e| Error::io("rename into", path, e))
}

/// Holds the registry's exclusive writer lock until dropped (advisory `flock`).
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    pub fn acquire(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open lock file", path, e))?;
        file.lock().map_err(|e| Error::io("lock", path, e))?;
        Ok(WriterLock { _file: file })
    }
}

/// Every regular file under `root`, as paths relative to it, sorted. Symlinks to
/// files are followed (the HF cache links snapshot files to blobs) and their
/// contents copied; symlinks to folders and special files are refused.
pub fn list_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read directory", &dir, e))?;
            let kind = entry
                .file_type()
                .map_err(|e| Error::io("stat", entry.path(), e))?;
            let child = relative.join(entry.file_name());
            let followed_file =
                kind.is_symlink() && fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
            if kind.is_dir() {
                pending.push(child);
            } else if kind.is_file() || followed_file {
                out.push(child);
            } else {
                return Err(Error::UnsafeArtifactPath(child.display().to_string()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A Hugging Face cache repository folder (`models--owner--name`, with `refs/` and
/// `snapshots/`) resolves to the snapshot its `refs/main` names (or the only
/// snapshot); any other folder is returned as it is.
pub fn hf_cache_snapshot(dir: &Path) -> PathBuf {
    let snapshots = dir.join("snapshots");
    if !snapshots.is_dir() {
        return dir.to_path_buf();
    }
    if let Ok(revision) = fs::read_to_string(dir.join("refs/main")) {
        let candidate = snapshots.join(revision.trim());
        if revision.trim().chars().all(|c| c.is_ascii_hexdigit()) && candidate.is_dir() {
            return candidate;
        }
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(&snapshots)
        .map(|e| {
            e.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    match entries.as_slice() {
        [only] => only.clone(),
        _ => dir.to_path_buf(),
    }
}

/// Check that a manifest-relative path stays inside its folder.
pub fn confined(relative: &str) -> Result<PathBuf> {
    let path = Path::new(relative);
    let ok = !relative.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(path.to_path_buf())
    } else {
        Err(Error::UnsafeArtifactPath(relative.to_string()))
    }
}

/// A suffix unique across processes (pid) and threads (counter) for staging directories.
pub fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{count}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hf_cache_folders_resolve_to_their_snapshot_and_links_are_followed() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--acme--tiny");
        let snapshot = repo.join("snapshots/abc123");
        fs::create_dir_all(&snapshot).unwrap();
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::create_dir_all(repo.join("blobs")).unwrap();
        fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        fs::write(repo.join("blobs/deadbeef"), b"weights").unwrap();
        std::os::unix::fs::symlink("../../blobs/deadbeef", snapshot.join("model.safetensors"))
            .unwrap();
        assert_eq!(hf_cache_snapshot(&repo), snapshot);
        assert_eq!(
            list_files(&snapshot).unwrap(),
            vec![PathBuf::from("model.safetensors")]
        );
        let plain = cache.path().join("plain");
        fs::create_dir_all(&plain).unwrap();
        assert_eq!(hf_cache_snapshot(&plain), plain);
    }

    #[test]
    fn confined_paths_refuse_traversal() {
        assert!(confined("weights/model.safetensors").is_ok());
        assert!(confined("../etc/passwd").is_err());
        assert!(confined("/etc/passwd").is_err());
        assert!(confined("a/./b").is_ok());
        assert!(confined("").is_err());
    }
}
