//! Where LoRA files come from, and caches of them.
//!
//! A source is one of:
//! - a file inside the configured LoRA folders (`KILN_LORA_DIRS`,
//!   `:`-separated): an absolute path, or a path relative to one of them;
//!   paths escaping the folders (`..`, symlinks) are refused;
//! - an `https://` URL to a `.safetensors` file, fetched under the download
//!   policy (host allow-list `KILN_LORA_ALLOWED_HOSTS`, every redirect hop
//!   address-checked, size limit `KILN_LORA_MAX_BYTES`) into a disk cache
//!   (`KILN_LORA_CACHE_DIR`) keyed by the URL's SHA-256 and evicted least
//!   recently used beyond `KILN_LORA_DISK_CACHE_BYTES`;
//! - a CivitAI model page, download link or AIR (`urn:air:…:civitai:M@V`),
//!   mapped to CivitAI's download API (token from `CIVITAI_TOKEN`);
//! - a Hugging Face repo `owner/repo` or file `owner/repo/path.safetensors`,
//!   fetched by hf-hub into the HF cache (token from `HF_TOKEN`).
//!
//! Parsed files are kept in memory, least recently used evicted beyond
//! `KILN_LORA_CACHE_BYTES` (default 1 GiB), keyed by path, size and
//! modification time so an edited file is read again. Concurrent requests for
//! the same source fetch and parse it once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use kiln_fetch::{FetchError, Hub, Policy, SingleFlight, UpstreamFailure};
use serde_json::json;

use super::{LoraFile, read};
use crate::error::{PipelineError, ProblemKind};
use crate::text_to_image::image_io::confined_path;

/// The setting naming the folders LoRA files may be read from.
pub const LORA_DIRS: &str = "KILN_LORA_DIRS";
/// The setting naming the hosts LoRA URLs may point at.
pub const ALLOWED_HOSTS: &str = "KILN_LORA_ALLOWED_HOSTS";
/// Hosts LoRA URLs may point at unless configured otherwise.
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &["huggingface.co", "hf.co", "civitai.com"];
/// CivitAI's address.
pub const CIVITAI: &str = "https://civitai.com";

/// How LoRA sources are resolved and fetched.
#[derive(Debug, Clone)]
pub struct LoraSettings {
    /// Folders local files may be read from.
    pub dirs: Vec<PathBuf>,
    /// Rules for URL downloads.
    pub policy: Policy,
    /// Where downloaded files are kept.
    pub cache_dir: PathBuf,
    /// Bytes the download cache may hold.
    pub disk_budget: u64,
    pub hub: Hub,
    /// CivitAI's address (tests point it at a local server).
    pub civitai: String,
}

/// A byte count from the environment, by the one parser (`"1GiB"` or a
/// count); a bad value is logged and the default kept (the process-wide
/// parsed-LoRA cache is built on first use, where no load can fail).
fn env_bytes(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => kiln_engine::units::parse_bytes(&text).unwrap_or_else(|e| {
            tracing::warn!(variable = name, error = %e, "ignoring a bad byte size");
            default
        }),
        Err(_) => default,
    }
}

impl Default for LoraSettings {
    /// No LoRA folders; downloads from the default hosts into the user's cache.
    fn default() -> Self {
        LoraSettings {
            dirs: Vec::new(),
            policy: Policy {
                allowed_hosts: DEFAULT_ALLOWED_HOSTS
                    .iter()
                    .map(|h| h.to_string())
                    .collect(),
                max_bytes: super::MAX_LORA_BYTES,
                ..Policy::default()
            },
            cache_dir: std::env::temp_dir().join("kiln-loras"),
            disk_budget: 20 << 30,
            hub: Hub::from_env(),
            civitai: CIVITAI.to_string(),
        }
    }
}

fn invalid(field: &str, message: String) -> PipelineError {
    PipelineError::invalid(field, ProblemKind::Constraint, message)
}

/// A source resolved to a local file.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub path: PathBuf,
    /// Where it came from when not a local file (a URL, or `hf:owner/repo/file`).
    pub origin: Option<String>,
    /// Hex SHA-256 of the file, when it was downloaded here.
    pub sha256: Option<String>,
}

impl Located {
    fn local(path: PathBuf) -> Self {
        Located {
            path,
            origin: None,
            sha256: None,
        }
    }
}

/// What kind of place a source names.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    Local(PathBuf),
    /// A URL to fetch (CivitAI pages already mapped to the download API),
    /// or a CivitAI model whose newest version is to be looked up.
    Url(String),
    CivitaiModel(u64),
    Hub {
        repo: String,
        file: Option<String>,
    },
}

fn looks_like_hub_id(source: &str) -> bool {
    let parts: Vec<&str> = source.split('/').collect();
    parts.len() >= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
}

fn digits(text: &str) -> Option<u64> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text[..end].parse().ok()
}

/// CivitAI's download URL for a model version.
fn civitai_download(base: &str, version: u64) -> String {
    format!("{base}/api/download/models/{version}?type=Model&format=SafeTensor")
}

/// Classify `source` (trimmed). Local relative paths win over Hub ids when the
/// file exists in a LoRA folder.
pub fn classify(source: &str, settings: &LoraSettings) -> SourceKind {
    let source = source.trim();
    if let Some(rest) = source.strip_prefix("hf://") {
        return hub_kind(rest);
    }
    if let Some(air) = source.strip_prefix("urn:air:")
        && let Some(position) = air.find("civitai:")
    {
        let ids = &air[position + "civitai:".len()..];
        return match ids.split_once('@').and_then(|(_, v)| digits(v)) {
            Some(version) => SourceKind::Url(civitai_download(&settings.civitai, version)),
            None => match digits(ids) {
                Some(model) => SourceKind::CivitaiModel(model),
                None => SourceKind::Url(source.to_string()),
            },
        };
    }
    if let Some(page) = source
        .strip_prefix(&format!("{}/models/", settings.civitai))
        .or_else(|| source.strip_prefix("https://www.civitai.com/models/"))
    {
        let version = source
            .split_once("modelVersionId=")
            .and_then(|(_, v)| digits(v));
        return match (version, digits(page)) {
            (Some(version), _) => SourceKind::Url(civitai_download(&settings.civitai, version)),
            (None, Some(model)) => SourceKind::CivitaiModel(model),
            (None, None) => SourceKind::Url(source.to_string()),
        };
    }
    if let Some(rest) = source
        .strip_prefix("https://huggingface.co/")
        .and_then(|rest| rest.split_once("/blob/"))
    {
        // A file page (…/blob/rev/file): fetch the file itself.
        return SourceKind::Url(format!(
            "https://huggingface.co/{}/resolve/{}",
            rest.0, rest.1
        ));
    }
    if source.contains("://") {
        return SourceKind::Url(source.to_string());
    }
    let path = Path::new(source);
    if path.is_absolute() {
        return SourceKind::Local(path.to_path_buf());
    }
    if let Some(found) = settings
        .dirs
        .iter()
        .map(|dir| dir.join(path))
        .find(|candidate| candidate.exists())
    {
        return SourceKind::Local(found);
    }
    if looks_like_hub_id(source) {
        return hub_kind(source);
    }
    SourceKind::Local(path.to_path_buf())
}

fn hub_kind(id: &str) -> SourceKind {
    let mut parts = id.trim_matches('/').splitn(3, '/');
    let owner = parts.next().unwrap_or_default();
    let name = parts.next().unwrap_or_default();
    SourceKind::Hub {
        repo: format!("{owner}/{name}"),
        file: parts.next().map(str::to_string),
    }
}

/// A fetch error as users read it (with the setting to change where one
/// helps), and whether the remote side is to blame.
#[derive(Debug, Clone)]
struct FetchFailure {
    message: String,
    upstream: Option<UpstreamFailure>,
}

impl FetchFailure {
    /// The request's error on `field`: 502/504 when the host failed, else the
    /// caller's mistake.
    fn on(self, field: &str, source: &str) -> PipelineError {
        let message = format!("{source}: {}", self.message);
        match self.upstream {
            Some(kind) => PipelineError::Upstream {
                field: field.to_string(),
                message,
                timed_out: kind == UpstreamFailure::TimedOut,
            },
            None => invalid(field, message),
        }
    }
}

fn describe(error: FetchError) -> FetchFailure {
    let message = match &error {
        FetchError::HostNotAllowed { .. } => format!("{error}; add the host to {ALLOWED_HOSTS}"),
        _ => error.to_string(),
    };
    FetchFailure {
        message,
        upstream: error.upstream(),
    }
}

/// Downloads in progress, by cache key, and their outcome.
fn downloads() -> &'static SingleFlight<String, Result<Located, FetchFailure>> {
    static FLIGHTS: OnceLock<SingleFlight<String, Result<Located, FetchFailure>>> = OnceLock::new();
    FLIGHTS.get_or_init(SingleFlight::default)
}

/// The local file a source names: confined to the LoRA folders, or fetched.
pub fn locate(
    field: &str,
    source: &str,
    settings: &LoraSettings,
) -> Result<Located, PipelineError> {
    let trimmed = source.trim();
    match classify(trimmed, settings) {
        SourceKind::Local(path) => {
            if settings.dirs.is_empty() {
                return Err(invalid(
                    field,
                    format!(
                        "no LoRA folders are configured; set {LORA_DIRS} to the folders holding LoRA files"
                    ),
                ));
            }
            // A relative name was looked up in the LoRA folders already; it is
            // never tried against the server's working directory.
            if !path.is_absolute() && !settings.dirs.iter().any(|dir| path.starts_with(dir)) {
                return Err(invalid(
                    field,
                    format!(
                        "{trimmed} is not a file in the LoRA folders ({LORA_DIRS}), a URL, or a Hugging Face id (owner/repo[/file.safetensors])"
                    ),
                ));
            }
            // The same answer for a missing file and one outside the folders,
            // naming the source as the client wrote it (never a server path).
            confined_path(field, &path, &settings.dirs, LORA_DIRS)
                .map(Located::local)
                .map_err(|_| {
                    invalid(
                        field,
                        format!("{trimmed} is not a file in the LoRA folders ({LORA_DIRS})"),
                    )
                })
        }
        SourceKind::Url(url) => {
            let key = kiln_fetch::download::sha256_hex(&url);
            downloads()
                .run(key.clone(), || {
                    cached_download(&url, &key, settings).map_err(describe)
                })
                .map_err(|failure| failure.on(field, trimmed))
        }
        SourceKind::CivitaiModel(model) => {
            let url = format!("{}/api/v1/models/{model}", settings.civitai);
            let info = kiln_fetch::block_on(kiln_fetch::get_json(&url, &settings.policy))
                .map_err(|e| describe(e).on(field, trimmed))?;
            let version = info["modelVersions"][0]["id"].as_u64().ok_or_else(|| {
                invalid(
                    field,
                    format!("{trimmed}: CivitAI lists no version for model {model}"),
                )
            })?;
            locate(
                field,
                &civitai_download(&settings.civitai, version),
                settings,
            )
        }
        SourceKind::Hub { repo, file } => {
            let key = format!("hf:{repo}/{}", file.as_deref().unwrap_or(""));
            downloads()
                .run(key, || {
                    hub_file(&repo, file.as_deref(), settings).map_err(describe)
                })
                .map_err(|failure| failure.on(field, trimmed))
        }
    }
}

/// Pick the LoRA file of a Hub repo when the source names none.
fn pick_hub_file(repo: &str, files: &[String]) -> Result<String, FetchError> {
    let weights: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    match weights.as_slice() {
        [only] => Ok((*only).clone()),
        [] => Err(FetchError::Hub(format!("{repo} has no .safetensors file"))),
        many => many
            .iter()
            .find(|f| f.ends_with("pytorch_lora_weights.safetensors"))
            .map(|f| (*f).clone())
            .ok_or_else(|| {
                FetchError::Hub(format!(
                    "{repo} has several .safetensors files ({}); name one as {repo}/<file>",
                    many.iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
    }
}

fn hub_file(
    repo: &str,
    file: Option<&str>,
    settings: &LoraSettings,
) -> Result<Located, FetchError> {
    let hub = &settings.hub;
    let path = kiln_fetch::block_on(async {
        let file = match file {
            Some(file) => file.to_string(),
            None => pick_hub_file(repo, &hub.list(repo, "main", &settings.policy).await?)?,
        };
        let path = hub.file(repo, "main", &file, &settings.policy).await?;
        Ok((file, path))
    })?;
    tracing::info!(repo, file = %path.0, "LoRA from the Hugging Face Hub");
    Ok(Located {
        path: path.1,
        origin: Some(format!("hf:{repo}/{}", path.0)),
        sha256: None,
    })
}

/// The cached copy of `url` (key = SHA-256 of the URL), downloaded on a miss.
fn cached_download(url: &str, key: &str, settings: &LoraSettings) -> Result<Located, FetchError> {
    let dir = &settings.cache_dir;
    let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(format!("{key}.safetensors"));
    let record_path = dir.join(format!("{key}.json"));
    if path.exists() {
        // Touch it: the modification time orders eviction.
        if let Ok(file) = std::fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
        let record: serde_json::Value = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        return Ok(Located {
            path,
            origin: Some(url.to_string()),
            sha256: record["sha256"].as_str().map(str::to_string),
        });
    }
    let started = std::time::Instant::now();
    let downloaded = kiln_fetch::block_on(kiln_fetch::download_to(
        url,
        &settings.policy,
        &path,
        &mut |_, _| {},
    ))?;
    tracing::info!(%url, bytes = downloaded.bytes, seconds = started.elapsed().as_secs_f64(), "LoRA downloaded");
    let record = json!({
        "source": url,
        "final_url": downloaded.final_url,
        "sha256": downloaded.sha256,
        "bytes": downloaded.bytes,
    });
    std::fs::write(&record_path, record.to_string()).map_err(io)?;
    evict_downloads(dir, settings.disk_budget, &path);
    Ok(Located {
        path,
        origin: Some(url.to_string()),
        sha256: Some(downloaded.sha256),
    })
}

/// Remove the least recently used downloads until the cache fits `budget`
/// (never `keep`, the file just fetched).
pub fn evict_downloads(dir: &Path, budget: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter_map(|p| {
            let metadata = std::fs::metadata(&p).ok()?;
            Some((metadata.modified().ok()?, metadata.len(), p))
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|(_, size, _)| size).sum();
    for (_, size, path) in files {
        if total <= budget {
            break;
        }
        if path == keep {
            continue;
        }
        tracing::info!(path = %path.display(), "LoRA download evicted");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("json"));
        total -= size;
    }
}

type CacheKey = (PathBuf, u64, Option<SystemTime>);

/// Parsed LoRA files, least recently used first.
pub struct LoraCache {
    budget: u64,
    entries: Mutex<Vec<(CacheKey, Arc<LoraFile>, u64)>>,
    parsing: SingleFlight<CacheKey, Result<Arc<LoraFile>, String>>,
}

impl LoraCache {
    pub fn new(budget: u64) -> Self {
        LoraCache {
            budget,
            entries: Mutex::new(Vec::new()),
            parsing: SingleFlight::default(),
        }
    }

    /// The process-wide cache.
    pub fn shared() -> &'static LoraCache {
        static CACHE: OnceLock<LoraCache> = OnceLock::new();
        CACHE.get_or_init(|| LoraCache::new(env_bytes("KILN_LORA_CACHE_BYTES", 1 << 30)))
    }

    fn lookup(&self, key: &CacheKey) -> Option<Arc<LoraFile>> {
        let mut entries = self.entries.lock().ok()?;
        let index = entries.iter().position(|(k, _, _)| k == key)?;
        let entry = entries.remove(index);
        let file = Arc::clone(&entry.1);
        entries.push(entry);
        Some(file)
    }

    /// The parsed file at `path` (read and parsed on a miss, once however many
    /// requests ask at the same time).
    pub fn get(&self, field: &str, path: &Path) -> Result<Arc<LoraFile>, PipelineError> {
        let metadata = std::fs::metadata(path).map_err(|e| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            invalid(field, format!("cannot read {name}: {}", e.kind()))
        })?;
        let key: CacheKey = (path.to_path_buf(), metadata.len(), metadata.modified().ok());
        if let Some(file) = self.lookup(&key) {
            return Ok(file);
        }
        self.parsing
            .run(key.clone(), || {
                if let Some(file) = self.lookup(&key) {
                    return Ok(file);
                }
                let file = Arc::new(read(path).map_err(|e| e.to_string())?);
                if let Ok(mut entries) = self.entries.lock() {
                    entries.push((key.clone(), Arc::clone(&file), metadata.len()));
                    let mut total: u64 = entries.iter().map(|(_, _, size)| size).sum();
                    while total > self.budget && entries.len() > 1 {
                        total -= entries.remove(0).2;
                    }
                }
                Ok(file)
            })
            .map_err(|message| invalid(field, message))
    }

    /// Files held now.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dirs: Vec<PathBuf>) -> LoraSettings {
        LoraSettings {
            dirs,
            policy: Policy::default(),
            cache_dir: std::env::temp_dir(),
            disk_budget: 0,
            hub: Hub {
                endpoint: kiln_fetch::hub::DEFAULT_ENDPOINT.into(),
                token: None,
                cache: std::env::temp_dir(),
                progress: false,
            },
            civitai: CIVITAI.into(),
        }
    }

    #[test]
    fn sources_are_classified_by_shape() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("styles")).unwrap();
        std::fs::write(dir.path().join("styles/ink.safetensors"), b"x").unwrap();
        let s = settings(vec![dir.path().to_path_buf()]);
        assert_eq!(
            classify("styles/ink.safetensors", &s),
            SourceKind::Local(dir.path().join("styles/ink.safetensors"))
        );
        assert_eq!(
            classify("owner/repo", &s),
            SourceKind::Hub {
                repo: "owner/repo".into(),
                file: None
            }
        );
        assert_eq!(
            classify("hf://owner/repo/sub/lora.safetensors", &s),
            SourceKind::Hub {
                repo: "owner/repo".into(),
                file: Some("sub/lora.safetensors".into())
            }
        );
        let download = "https://civitai.com/api/download/models/456?type=Model&format=SafeTensor";
        for page in [
            "https://civitai.com/models/123/some-style?modelVersionId=456",
            "https://civitai.com/models/123?modelVersionId=456",
            "urn:air:flux1:lora:civitai:123@456",
        ] {
            assert_eq!(
                classify(page, &s),
                SourceKind::Url(download.into()),
                "{page}"
            );
        }
        assert_eq!(
            classify("https://civitai.com/models/123/some-style", &s),
            SourceKind::CivitaiModel(123)
        );
        assert_eq!(
            classify("https://huggingface.co/o/r/blob/main/x.safetensors", &s),
            SourceKind::Url("https://huggingface.co/o/r/resolve/main/x.safetensors".into())
        );
        assert_eq!(
            classify("../escape.safetensors", &s),
            SourceKind::Local("../escape.safetensors".into())
        );
        assert_eq!(
            classify("/abs/x.safetensors", &s),
            SourceKind::Local("/abs/x.safetensors".into())
        );
    }

    #[test]
    fn a_hub_repo_without_a_file_needs_one_obvious_safetensors() {
        let files = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pick_hub_file("o/r", &files(&["README.md", "lora.safetensors"])).unwrap(),
            "lora.safetensors"
        );
        assert_eq!(
            pick_hub_file(
                "o/r",
                &files(&["a.safetensors", "pytorch_lora_weights.safetensors"])
            )
            .unwrap(),
            "pytorch_lora_weights.safetensors"
        );
        let many = pick_hub_file("o/r", &files(&["a.safetensors", "b.safetensors"]))
            .unwrap_err()
            .to_string();
        assert!(
            many.contains("a.safetensors, b.safetensors") && many.contains("o/r/<file>"),
            "{many}"
        );
        assert!(pick_hub_file("o/r", &files(&["x.bin"])).is_err());
    }

    #[test]
    fn eviction_removes_least_recently_used_downloads_first() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let path = dir.path().join(format!("{name}.safetensors"));
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            std::fs::write(path.with_extension("json"), b"{}").unwrap();
            let when = now - std::time::Duration::from_secs(100 - i as u64 * 10);
            std::fs::File::options()
                .append(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        let keep = dir.path().join("new.safetensors");
        evict_downloads(dir.path(), 200, &keep);
        assert!(!dir.path().join("old.safetensors").exists());
        assert!(!dir.path().join("old.json").exists());
        assert!(dir.path().join("mid.safetensors").exists() && keep.exists());
        evict_downloads(dir.path(), 0, &keep);
        assert!(keep.exists() && !dir.path().join("mid.safetensors").exists());
    }
}
