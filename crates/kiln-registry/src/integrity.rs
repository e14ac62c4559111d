//! Checking a model's files against its manifest: sizes and sha256 digests,
//! with a memory of what was verified so a reload re-hashes only the files
//! that changed since (size, modification and change times, inode).

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::fsutil::{confined, sha256_file};
use crate::store::{ResolvedModel, Verification};

/// What identifies one state of a file: if any part differs, it may have been
/// rewritten and must be hashed again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    size: u64,
    modified: Option<SystemTime>,
    /// Change time and inode (Unix): a rewrite that restores the modification
    /// time still moves these.
    changed_ns: i128,
    inode: (u64, u64),
}

impl FileStamp {
    fn of(metadata: &fs::Metadata) -> Self {
        #[cfg(unix)]
        let (changed_ns, inode) = {
            use std::os::unix::fs::MetadataExt;
            (
                i128::from(metadata.ctime()) * 1_000_000_000 + i128::from(metadata.ctime_nsec()),
                (metadata.dev(), metadata.ino()),
            )
        };
        #[cfg(not(unix))]
        let (changed_ns, inode) = (0, (0, 0));
        FileStamp {
            size: metadata.len(),
            modified: metadata.modified().ok(),
            changed_ns,
            inode,
        }
    }
}

/// Remembers which files were verified, in which state and against which
/// digest. One per served model: every load calls [`IntegrityCache::verify`].
#[derive(Debug, Default)]
pub struct IntegrityCache {
    verified: Mutex<HashMap<PathBuf, (FileStamp, String)>>,
}

impl IntegrityCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Check every file the manifest lists. With [`Verification::Full`], a
    /// file is hashed unless it was verified before against the same digest
    /// and has not changed since.
    pub fn verify(&self, model: &ResolvedModel, verification: Verification) -> Result<()> {
        let label = model_label(model);
        for entry in &model.manifest.files {
            let fail = |problem: String| Error::Integrity {
                model: label.clone(),
                file: entry.path.clone(),
                problem,
            };
            let path = model.dir.join(confined(&entry.path)?);
            let metadata =
                fs::metadata(&path).map_err(|e| fail(format!("cannot read it ({e})")))?;
            let size = metadata.len();
            if size != entry.size {
                return Err(fail(format!(
                    "size is {size} bytes, manifest says {}",
                    entry.size
                )));
            }
            if verification != Verification::Full {
                continue;
            }
            let stamp = FileStamp::of(&metadata);
            let known = self
                .verified
                .lock()
                .map(|v| {
                    v.get(&path)
                        .is_some_and(|(s, d)| *s == stamp && *d == entry.sha256)
                })
                .unwrap_or(false);
            if known {
                continue;
            }
            let digest = sha256_file(&path)?;
            if digest != entry.sha256 {
                if let Ok(mut verified) = self.verified.lock() {
                    verified.remove(&path);
                }
                return Err(fail(format!(
                    "sha256 is {digest}, manifest says {}",
                    entry.sha256
                )));
            }
            if let Ok(mut verified) = self.verified.lock() {
                verified.insert(path, (stamp, digest));
            }
        }
        Ok(())
    }
}

fn model_label(model: &ResolvedModel) -> String {
    model
        .name
        .as_ref()
        .map(|n| match model.version {
            Some(v) => format!("{n} version {v}"),
            None => n.to_string(),
        })
        .unwrap_or_else(|| model.display_name())
}
