//! Kiln's model registry: three-level model names, auto-incrementing versions,
//! mutable aliases and tags, and per-version manifests whose artifacts are
//! checked against their recorded sha256 when loaded.
//!
//! Layout under `$KILN_HOME/registry`:
//! ```text
//! .lock                                   exclusive lock held by writers
//! .staging/                               versions being written (renamed into place)
//! models/<catalog>/<schema>/<model>/
//!     model.json                          aliases, tags, next version number
//!     versions/<n>/manifest.json          immutable once published
//!     versions/<n>/artifacts/...          files listed in the manifest
//! ```

mod error;
mod fsutil;
mod integrity;
mod manifest;
mod name;
mod reference;
mod store;

pub use error::{Error, Result};
pub use fsutil::{hf_cache_snapshot, sha256_file};
pub use integrity::IntegrityCache;
pub use manifest::{FileEntry, MANIFEST_FILE, Manifest};
pub use name::{Alias, ModelName};
pub use reference::{ModelRef, VersionSelector};
pub use store::{ModelRecord, Registry, ResolvedModel, Verification, VersionSummary, default_home};
