//! The serving configuration: one TOML file (`kiln serve --config kiln.toml`) with
//! environment overrides, describing the listener, keys, protocols and their
//! mount points, the job system, and each model's queue, concurrency and
//! scale-to-zero settings.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Everything `kiln serve` can be told.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub server: ServerSection,
    pub protocols: ProtocolMounts,
    pub cog: CogSection,
    pub jobs: JobsSection,
    pub queue: QueueSection,
    pub models: Vec<ModelEntry>,
}

/// `[server]`: listener, limits and keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    /// Largest request body (bytes, or "32MiB"); 413 beyond.
    #[serde(deserialize_with = "bytes")]
    pub body_limit: u64,
    /// API keys; when any is set every route but the health checks needs one.
    pub api_keys: Vec<String>,
    /// Total bytes loaded models may take; least recently used idle models are
    /// unloaded to make room. None: no budget.
    #[serde(deserialize_with = "optional_bytes")]
    pub memory_budget: Option<u64>,
    /// Whether one failed model makes the whole server unready (Triton's
    /// `--strict-readiness`). Off by default: a model that failed is reported
    /// failed on its own routes and the others are served.
    pub strict_readiness: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            host: "127.0.0.1".into(),
            port: 8080,
            body_limit: 32 * 1024 * 1024,
            api_keys: Vec::new(),
            memory_budget: None,
            strict_readiness: false,
        }
    }
}

/// Where a protocol is mounted: `true`/`"/"` at the root, a prefix such as
/// `"/runpod"`, or `false` to leave it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    Off,
    At(String),
}

impl Mount {
    pub fn prefix(&self) -> Option<&str> {
        match self {
            Mount::Off => None,
            Mount::At(prefix) => Some(prefix),
        }
    }
}

impl<'de> Deserialize<'de> for Mount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Prefix(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Flag(false) => Ok(Mount::Off),
            Raw::Flag(true) => Ok(Mount::At("/".into())),
            Raw::Prefix(prefix) => {
                if !prefix.starts_with('/') || (prefix.len() > 1 && prefix.ends_with('/')) {
                    return Err(serde::de::Error::custom(format!(
                        "mount point {prefix:?} must start with '/' and not end with one"
                    )));
                }
                Ok(Mount::At(prefix))
            }
        }
    }
}

/// `[protocols]`: which wire protocols to serve and where.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolMounts {
    pub mlflow: Mount,
    pub kserve: Mount,
    pub runpod: Mount,
    pub cog: Mount,
    pub openai: Mount,
}

impl Default for ProtocolMounts {
    fn default() -> Self {
        let root = || Mount::At("/".into());
        ProtocolMounts {
            mlflow: root(),
            kserve: root(),
            runpod: root(),
            cog: root(),
            openai: root(),
        }
    }
}

/// `[cog]`: where Kiln's Cog routes may differ from Cog on purpose.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CogSection {
    /// Refuse unknown input fields with 422 (Cog strips them and predicts).
    pub strict_inputs: bool,
    /// Queue predictions behind busy slots, up to `max_queue` (Cog answers 409
    /// and its health check says BUSY while every slot is taken).
    pub queue: bool,
}

/// What happens at start-up to jobs that were running when the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// Run them again from the start.
    Requeue,
    /// Mark them FAILED with a message saying why.
    Fail,
}

/// `[jobs]`: the durable job store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSection {
    /// The SQLite file; default `$KILN_HOME/jobs.sqlite`.
    pub database: Option<std::path::PathBuf>,
    /// How long finished async jobs are kept (RunPod: 30 minutes).
    #[serde(deserialize_with = "duration")]
    pub result_ttl: Duration,
    /// How long finished synchronous jobs are kept (RunPod `/runsync`: 1 minute).
    #[serde(deserialize_with = "duration")]
    pub sync_result_ttl: Duration,
    pub on_restart: RestartPolicy,
    /// Queued jobs per model beyond which new ones get 429 (per-model override).
    pub max_queue: usize,
    /// Longest a job may run (per-model override); TIMED_OUT beyond.
    #[serde(deserialize_with = "optional_duration")]
    pub execution_timeout: Option<Duration>,
    /// Webhook deliveries: attempts after the first, and the pause between them.
    pub webhook_retries: u32,
    #[serde(deserialize_with = "duration")]
    pub webhook_retry_delay: Duration,
    /// Allow webhooks to loopback, private and link-local addresses (off: a
    /// request could otherwise make Kiln call internal services).
    pub webhook_private_addresses: bool,
    /// At shutdown, how long running jobs may take to finish and record their
    /// results before the process exits (they run again at the next start).
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
}

impl Default for JobsSection {
    fn default() -> Self {
        JobsSection {
            database: None,
            result_ttl: Duration::from_secs(30 * 60),
            sync_result_ttl: Duration::from_secs(60),
            on_restart: RestartPolicy::Requeue,
            max_queue: 64,
            execution_timeout: None,
            webhook_retries: 2,
            webhook_retry_delay: Duration::from_secs(10),
            webhook_private_addresses: false,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What this process does with the shared queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Accepts requests and runs its models' jobs (one machine, the default).
    #[default]
    Standalone,
    /// Accepts requests into the shared queue; runs jobs only with `work`.
    Front,
    /// Runs jobs from the shared queue; serves only probes and metrics.
    Worker,
}

/// `[queue]`: where jobs wait. Without `url`, in the embedded SQLite store of
/// `[jobs]`; with `redis://HOST:PORT/DB`, in Redis, shared by every front and
/// worker pointed at it (docs/deploy.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// `redis://[user:password@]host:port/db`; None: the SQLite store.
    pub url: Option<String>,
    /// A front that also runs its models' jobs (`kiln serve --work`).
    pub work: bool,
    /// How long a running job may go without its worker's heartbeat before
    /// another worker takes it over (a worker killed mid-job).
    #[serde(deserialize_with = "duration")]
    pub visibility_timeout: Duration,
    /// Prefix of every Redis key, so deployments can share one Redis.
    pub key_prefix: String,
    /// How many times a job may be taken over from a worker that died running
    /// it before it is failed instead (a job that crashes its workers).
    pub max_takeovers: u32,
    /// PEM certificate(s) to trust for `rediss://` instead of the system's
    /// roots (a private CA).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// A folder every front and worker mounts (a shared volume): outputs
    /// larger than `inline_results` are written there instead of into Redis.
    pub results_dir: Option<std::path::PathBuf>,
    /// Largest output kept in Redis itself when `results_dir` is set.
    #[serde(deserialize_with = "bytes")]
    pub inline_results: u64,
    #[serde(skip)]
    pub role: Role,
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            url: None,
            work: false,
            visibility_timeout: Duration::from_secs(30),
            key_prefix: "kiln:".into(),
            max_takeovers: 3,
            tls_ca_file: None,
            results_dir: None,
            inline_results: 256 * 1024,
            role: Role::Standalone,
        }
    }
}

/// When a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadPolicy {
    /// At start-up; readiness waits for it.
    Eager,
    /// On its first request (scale from zero).
    Lazy,
}

/// `[[models]]`: one served model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The name clients use; default: the registry name or folder name.
    pub name: Option<String>,
    /// `models:/catalog.schema.model@alias`, a registry name, or a model folder.
    pub source: String,
    /// Jobs run at once (default 1 for generative models, one per core otherwise).
    pub concurrency: Option<usize>,
    pub max_queue: Option<usize>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub execution_timeout: Option<Duration>,
    /// Unload after this long without requests (scale to zero).
    #[serde(default, deserialize_with = "optional_duration")]
    pub idle_unload: Option<Duration>,
    pub load: Option<LoadPolicy>,
    /// Keys that override the model manifest's `config` (e.g. FLUX's
    /// `lora_mode = "fused"` or `max_pixels`).
    pub config: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ServeConfig {
    /// Parse a TOML document; errors name the line and the key.
    pub fn from_toml(text: &str) -> Result<ServeConfig, String> {
        let config: ServeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    /// Rules serde cannot express.
    pub fn check(&self) -> Result<(), String> {
        if self.server.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err("server.api_keys: keys must not be empty".into());
        }
        if self.jobs.max_queue == 0 || self.models.iter().any(|m| m.max_queue == Some(0)) {
            return Err("max_queue must be at least 1".into());
        }
        if self.models.iter().any(|m| m.concurrency == Some(0)) {
            return Err("concurrency must be at least 1".into());
        }
        Ok(())
    }

    /// Apply environment overrides: `KILN_HOST`, `PORT`, `KILN_API_KEYS`
    /// (comma-separated), `KILN_MEMORY_BUDGET`, `KILN_JOBS_DB`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        if let Some(host) = get("KILN_HOST") {
            self.server.host = host;
        }
        if let Some(port) = get("PORT") {
            self.server.port = port
                .parse()
                .map_err(|_| format!("PORT={port:?} is not a port number"))?;
        }
        if let Some(keys) = get("KILN_API_KEYS") {
            let keys: Vec<String> = keys
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect();
            // An empty or blank variable must never switch authentication off.
            if keys.is_empty() {
                return Err(
                    "KILN_API_KEYS is set but lists no key; unset it, or list keys separated by commas".into(),
                );
            }
            self.server.api_keys = keys;
        }
        if let Some(budget) = get("KILN_MEMORY_BUDGET") {
            self.server.memory_budget =
                Some(parse_bytes(&budget).map_err(|e| format!("KILN_MEMORY_BUDGET: {e}"))?);
        }
        if let Some(path) = get("KILN_JOBS_DB") {
            self.jobs.database = Some(path.into());
        }
        if let Some(url) = get("KILN_QUEUE") {
            self.queue.url = Some(url);
        }
        Ok(())
    }
}

pub use kiln_engine::units::parse_bytes;

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(n) => Ok(n),
        NumberOrText::Text(text) => parse_bytes(&text).map_err(serde::de::Error::custom),
    }
}

fn optional_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    bytes(deserializer).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like 30s: {e}")))
}

fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_and_env_overrides_it() {
        let mut config = ServeConfig::from_toml(
            r#"
            [server]
            port = 9000
            body_limit = "8MiB"
            api_keys = ["a"]
            memory_budget = "2GiB"
            [protocols]
            runpod = "/runpod"
            kserve = false
            [jobs]
            result_ttl = "10m"
            on_restart = "fail"
            [[models]]
            name = "flux"
            source = "models:/a.b.flux@champion"
            concurrency = 1
            idle_unload = "15m"
            load = "lazy"
            "#,
        )
        .unwrap();
        assert_eq!(config.server.body_limit, 8 << 20);
        assert_eq!(config.server.memory_budget, Some(2 << 30));
        assert_eq!(config.protocols.runpod, Mount::At("/runpod".into()));
        assert_eq!(config.protocols.kserve, Mount::Off);
        assert_eq!(config.protocols.cog, Mount::At("/".into()));
        assert_eq!(config.jobs.result_ttl, Duration::from_secs(600));
        assert_eq!(config.jobs.on_restart, RestartPolicy::Fail);
        assert_eq!(config.models[0].idle_unload, Some(Duration::from_secs(900)));
        assert_eq!(config.models[0].load, Some(LoadPolicy::Lazy));
        config
            .apply_env(|k| match k {
                "PORT" => Some("7000".into()),
                "KILN_API_KEYS" => Some("x, y,".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.server.port, 7000);
        assert_eq!(config.server.api_keys, vec!["x", "y"]);
        for blank in ["", ",", " , "] {
            let error = config
                .apply_env(|k| (k == "KILN_API_KEYS").then(|| blank.to_string()))
                .unwrap_err();
            assert!(error.contains("KILN_API_KEYS"), "{error}");
            assert_eq!(
                config.server.api_keys,
                vec!["x", "y"],
                "{blank:?} kept the keys"
            );
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let config = ServeConfig::from_toml(include_str!("../../../examples/kiln.toml")).unwrap();
        assert_eq!(config.models[0].name.as_deref(), Some("flux-schnell"));
        assert_eq!(config.models[0].idle_unload, Some(Duration::from_secs(900)));
        let overrides = config.models[0].config.as_ref().unwrap();
        assert_eq!(overrides["lora_mode"], "runtime");
    }

    #[test]
    fn mistakes_name_the_key() {
        let err = ServeConfig::from_toml("[server]\nprot = 1\n").unwrap_err();
        assert!(err.contains("prot"), "{err}");
        let err = ServeConfig::from_toml("[jobs]\nresult_ttl = \"soon\"\n").unwrap_err();
        assert!(err.contains("soon"), "{err}");
        let err = ServeConfig::from_toml("[server]\napi_keys = [\"\"]\n").unwrap_err();
        assert!(err.contains("api_keys"), "{err}");
        let err = ServeConfig::from_toml("[jobs]\nmax_queue = 0\n").unwrap_err();
        assert!(err.contains("max_queue"), "{err}");
        let err = ServeConfig::from_toml("[protocols]\ncog = \"cog/\"\n").unwrap_err();
        assert!(err.contains("must start with"), "{err}");
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
    }
}
