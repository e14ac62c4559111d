//! The on-disk registry: publishing versions atomically, resolving references,
//! aliases, tags, deletion and integrity checks.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{WriterLock, list_files, sha256_file, unique_suffix, write_atomic};
use crate::integrity::IntegrityCache;
use crate::manifest::{FileEntry, MANIFEST_FILE, Manifest};
use crate::name::{Alias, ModelName};
use crate::reference::{ModelRef, VersionSelector};

const RECORD_FILE: &str = "model.json";

/// Kiln's data directory: `$KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else
/// `~/.local/share/kiln`, else `./.kiln`.
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(data).join("kiln");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/kiln");
    }
    PathBuf::from(".kiln")
}

/// How thoroughly artifacts are checked when a model is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Sizes and sha256 of every listed file.
    Full,
    /// Sizes only (for very large weights when startup time matters).
    SizeOnly,
}

/// Mutable, per-model state: aliases, tags and the next version number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub created_at: String,
    /// Version numbers are never reused, even after deletion.
    pub next_version: u64,
    #[serde(default)]
    pub aliases: BTreeMap<String, u64>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub version_tags: BTreeMap<u64, BTreeMap<String, String>>,
}

/// One published version as listed by `kiln models show`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionSummary {
    pub version: u64,
    pub pipeline: String,
    pub created_at: Option<String>,
    pub aliases: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub size_bytes: u64,
}

/// A reference resolved to a folder and its (verified) manifest.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub name: Option<ModelName>,
    pub version: Option<u64>,
    /// Folder holding `manifest.json` and the artifacts.
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl ResolvedModel {
    /// A short display name: `catalog.schema.model` or the folder's name.
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(name) => name.to_string(),
            None => self
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.dir.display().to_string()),
        }
    }
}

/// The model registry rooted at `$KILN_HOME/registry`.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

impl Registry {
    /// Open (lazily creating) the registry inside a Kiln home directory.
    pub fn open(home: &Path) -> Self {
        Registry {
            root: home.join("registry"),
        }
    }

    fn model_dir(&self, name: &ModelName) -> PathBuf {
        self.root
            .join("models")
            .join(name.catalog())
            .join(name.schema())
            .join(name.model())
    }

    fn version_dir(&self, name: &ModelName, version: u64) -> PathBuf {
        self.model_dir(name)
            .join("versions")
            .join(version.to_string())
    }

    fn lock(&self) -> Result<WriterLock> {
        WriterLock::acquire(&self.root.join(".lock"))
    }

    fn staging_dir(&self) -> PathBuf {
        self.root.join(".staging").join(unique_suffix())
    }

    /// Read a model's record, or `ModelNotFound`.
    pub fn record(&self, name: &ModelName) -> Result<ModelRecord> {
        let path = self.model_dir(name).join(RECORD_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ModelNotFound(name.to_string()));
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| Error::InvalidManifest {
            path,
            message: e.to_string(),
        })
    }

    fn write_record(&self, name: &ModelName, record: &ModelRecord) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
        bytes.push(b'\n');
        write_atomic(&self.model_dir(name).join(RECORD_FILE), &bytes)
    }

    /// Publish the model folder at `source` (a `manifest.json` plus artifacts) as the
    /// next version of `name`. Files are copied and hashed before the writer lock is
    /// taken; the version appears atomically (directory rename) under the lock.
    pub fn register_folder(
        &self,
        name: &ModelName,
        source: &Path,
        alias: Option<&Alias>,
    ) -> Result<ResolvedModel> {
        let manifest = Manifest::read_from(source)?;
        self.register(name, manifest, Some(source), alias)
    }

    /// Publish `manifest` (its `files` are recomputed) with the artifacts in
    /// `artifacts_from` (every file except a `manifest.json` there) as a new version.
    pub fn register(
        &self,
        name: &ModelName,
        mut manifest: Manifest,
        artifacts_from: Option<&Path>,
        alias: Option<&Alias>,
    ) -> Result<ResolvedModel> {
        let staging = self.staging_dir();
        fs::create_dir_all(&staging).map_err(|e| Error::io("create directory", &staging, e))?;
        let staged = self.stage(&staging, &mut manifest, artifacts_from);
        let published = staged.and_then(|()| self.publish(name, &staging, manifest, alias));
        if published.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        published
    }

    fn stage(&self, staging: &Path, manifest: &mut Manifest, from: Option<&Path>) -> Result<()> {
        manifest.files.clear();
        let Some(from) = from else { return Ok(()) };
        // A single-file model (a GGUF file) is its own only artifact.
        let (from, files) = match (from.is_file(), from.parent(), from.file_name()) {
            (true, Some(parent), Some(name)) => (parent, vec![PathBuf::from(name)]),
            _ => (from, list_files(from)?),
        };
        for relative in files {
            if relative == Path::new(MANIFEST_FILE) {
                continue;
            }
            let target = staging.join(&relative);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
            }
            let source = from.join(&relative);
            let size = fs::copy(&source, &target).map_err(|e| Error::io("copy", &source, e))?;
            manifest.files.push(FileEntry {
                path: relative.to_string_lossy().replace('\\', "/"),
                size,
                sha256: sha256_file(&target)?,
            });
        }
        Ok(())
    }

    fn publish(
        &self,
        name: &ModelName,
        staging: &Path,
        mut manifest: Manifest,
        alias: Option<&Alias>,
    ) -> Result<ResolvedModel> {
        let _lock = self.lock()?;
        let mut record = match self.record(name) {
            Ok(record) => record,
            Err(Error::ModelNotFound(_)) => ModelRecord {
                name: name.to_string(),
                created_at: now(),
                next_version: 1,
                aliases: BTreeMap::new(),
                tags: BTreeMap::new(),
                version_tags: BTreeMap::new(),
            },
            Err(e) => return Err(e),
        };
        let version = record.next_version;
        manifest.name = Some(name.to_string());
        manifest.version = Some(version);
        manifest.created_at = Some(now());
        write_atomic(&staging.join(MANIFEST_FILE), &manifest.to_json_bytes())?;
        let target = self.version_dir(name, version);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        }
        fs::rename(staging, &target).map_err(|e| Error::io("publish version into", &target, e))?;
        record.next_version = version + 1;
        if let Some(alias) = alias {
            record.aliases.insert(alias.to_string(), version);
        }
        self.write_record(name, &record)?;
        Ok(ResolvedModel {
            name: Some(name.clone()),
            version: Some(version),
            dir: target,
            manifest,
        })
    }

    /// Published version numbers of a model, ascending.
    pub fn version_numbers(&self, name: &ModelName) -> Result<Vec<u64>> {
        self.record(name)?;
        let dir = self.model_dir(name).join("versions");
        let mut versions = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(versions),
            Err(e) => return Err(Error::io("read directory", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read directory", &dir, e))?;
            if let Some(v) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
            {
                versions.push(v);
            }
        }
        versions.sort_unstable();
        Ok(versions)
    }

    /// Resolve a reference to a folder and manifest, checking artifact integrity.
    pub fn resolve(
        &self,
        reference: &ModelRef,
        verification: Verification,
    ) -> Result<ResolvedModel> {
        let resolved = self.locate(reference)?;
        IntegrityCache::new().verify(&resolved, verification)?;
        Ok(resolved)
    }

    /// Resolve a reference to a folder and manifest without reading the
    /// artifacts: a server checks them on every load instead, through an
    /// [`IntegrityCache`].
    pub fn locate(&self, reference: &ModelRef) -> Result<ResolvedModel> {
        Ok(match reference {
            ModelRef::LocalFolder(path) => ResolvedModel {
                name: None,
                version: None,
                dir: path.clone(),
                manifest: Manifest::read_from(path)?,
            },
            ModelRef::Registered { name, selector } => {
                let version = self.select_version(name, selector)?;
                let dir = self.version_dir(name, version);
                ResolvedModel {
                    name: Some(name.clone()),
                    version: Some(version),
                    manifest: Manifest::read_from(&dir)?,
                    dir,
                }
            }
        })
    }

    fn select_version(&self, name: &ModelName, selector: &VersionSelector) -> Result<u64> {
        match selector {
            VersionSelector::Number(v) => {
                self.record(name)?;
                if self.version_dir(name, *v).join(MANIFEST_FILE).is_file() {
                    Ok(*v)
                } else {
                    Err(Error::VersionNotFound {
                        name: name.to_string(),
                        version: *v,
                    })
                }
            }
            VersionSelector::Alias(alias) => self
                .record(name)?
                .aliases
                .get(alias.as_str())
                .copied()
                .ok_or_else(|| Error::AliasNotFound {
                    name: name.to_string(),
                    alias: alias.to_string(),
                }),
            VersionSelector::Latest => self
                .version_numbers(name)?
                .last()
                .copied()
                .ok_or_else(|| Error::NoVersions(name.to_string())),
        }
    }

    /// All registered model names, sorted.
    pub fn list(&self) -> Result<Vec<ModelName>> {
        let mut names = Vec::new();
        let models = self.root.join("models");
        for catalog in subdirs(&models)? {
            for schema in subdirs(&models.join(&catalog))? {
                for model in subdirs(&models.join(&catalog).join(&schema))? {
                    if let Ok(name) = ModelName::parse(&format!("{catalog}.{schema}.{model}"))
                        && self.model_dir(&name).join(RECORD_FILE).is_file()
                    {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every version of a model with its aliases and tags.
    pub fn versions(&self, name: &ModelName) -> Result<Vec<VersionSummary>> {
        let record = self.record(name)?;
        let mut out = Vec::new();
        for version in self.version_numbers(name)? {
            let manifest = Manifest::read_from(&self.version_dir(name, version))?;
            out.push(VersionSummary {
                version,
                pipeline: manifest.pipeline,
                created_at: manifest.created_at,
                aliases: record
                    .aliases
                    .iter()
                    .filter(|(_, v)| **v == version)
                    .map(|(a, _)| a.clone())
                    .collect(),
                tags: record
                    .version_tags
                    .get(&version)
                    .cloned()
                    .unwrap_or_default(),
                size_bytes: manifest.files.iter().map(|f| f.size).sum(),
            });
        }
        Ok(out)
    }

    /// Point `alias` at `version` (which must exist).
    pub fn set_alias(&self, name: &ModelName, alias: &Alias, version: u64) -> Result<()> {
        self.update_record(name, |registry, record| {
            registry.select_version(name, &VersionSelector::Number(version))?;
            record.aliases.insert(alias.to_string(), version);
            Ok(())
        })
    }

    /// Remove `alias`; an unknown alias is an error.
    pub fn delete_alias(&self, name: &ModelName, alias: &Alias) -> Result<()> {
        self.update_record(name, |_, record| {
            record
                .aliases
                .remove(alias.as_str())
                .map(|_| ())
                .ok_or_else(|| Error::AliasNotFound {
                    name: name.to_string(),
                    alias: alias.to_string(),
                })
        })
    }

    /// Set (value `Some`) or remove (`None`) a tag on the model or on one version.
    pub fn set_tag(
        &self,
        name: &ModelName,
        version: Option<u64>,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        self.update_record(name, |registry, record| {
            let tags = match version {
                None => &mut record.tags,
                Some(v) => {
                    registry.select_version(name, &VersionSelector::Number(v))?;
                    record.version_tags.entry(v).or_default()
                }
            };
            match value {
                Some(value) => {
                    tags.insert(key.to_string(), value.to_string());
                }
                None => {
                    tags.remove(key);
                }
            }
            Ok(())
        })
    }

    /// Delete one version and the aliases that pointed at it.
    pub fn delete_version(&self, name: &ModelName, version: u64) -> Result<()> {
        self.update_record(name, |registry, record| {
            registry.select_version(name, &VersionSelector::Number(version))?;
            let dir = registry.version_dir(name, version);
            registry.remove_tree(&dir)?;
            record.aliases.retain(|_, v| *v != version);
            record.version_tags.remove(&version);
            Ok(())
        })
    }

    /// Delete a model with all its versions.
    pub fn delete_model(&self, name: &ModelName) -> Result<()> {
        let _lock = self.lock()?;
        self.record(name)?;
        self.remove_tree(&self.model_dir(name))
    }

    /// Make a tree disappear atomically (rename into staging), then remove it.
    fn remove_tree(&self, dir: &Path) -> Result<()> {
        let trash = self.staging_dir();
        if let Some(parent) = trash.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        }
        fs::rename(dir, &trash).map_err(|e| Error::io("delete", dir, e))?;
        fs::remove_dir_all(&trash).map_err(|e| Error::io("delete", &trash, e))
    }

    fn update_record(
        &self,
        name: &ModelName,
        change: impl FnOnce(&Self, &mut ModelRecord) -> Result<()>,
    ) -> Result<()> {
        let _lock = self.lock()?;
        let mut record = self.record(name)?;
        change(self, &mut record)?;
        self.write_record(name, &record)
    }
}

fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false)
            && let Some(name) = entry.file_name().to_str()
        {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
