//! `kiln serve`: read the configuration (a TOML file, environment, flags),
//! resolve the models, then serve them until Ctrl-C, SIGTERM or Cog's `/shutdown`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use kiln_pipelines::load_pipeline;
use kiln_registry::{IntegrityCache, ModelRef, Registry, ResolvedModel, Verification};
use kiln_server::config::{LoadPolicy, ModelEntry, ProtocolMounts, ServeConfig, parse_bytes};
use kiln_server::{ModelSettings, ModelSpec, Mount, Role, Server, shutdown_signal};

use crate::builtin;
use crate::resolve::{folder_bytes, locate_model};

#[derive(Args)]
pub struct ServeArgs {
    /// TOML configuration: listener, API keys, protocols, jobs and models
    /// (see docs/serving.md). Flags and the environment override it.
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to bind (default 127.0.0.1, private to this machine; env KILN_HOST).
    #[arg(long)]
    host: Option<String>,
    /// Port (default 8080, SageMaker's and KServe's convention; env PORT).
    #[arg(long)]
    port: Option<u16>,
    /// Largest request body, e.g. 32MiB; larger requests get 413.
    #[arg(long)]
    body_limit: Option<String>,
    /// The shared job queue, `redis://HOST:PORT/DB` (env KILN_QUEUE): this
    /// process accepts jobs into it and workers (`kiln worker`) run them.
    /// Default: the embedded SQLite store, jobs run here.
    #[arg(long)]
    queue: Option<String>,
    /// With --queue: also run this process's models' jobs (a front that works).
    #[arg(long)]
    work: bool,
    /// Models to serve besides the configuration's: `models:/cat.sch.model/3`,
    /// `models:/cat.sch.model@alias`, `cat.sch.model` (latest) or a model folder.
    /// None at all: the built-in example GLM.
    models: Vec<String>,
}

/// Image pipelines run one job at a time by default, LLMs as many requests as
/// their batching engine runs at once (`max_batch_size`); others one per core.
fn default_concurrency(resolved: &ResolvedModel) -> usize {
    if resolved.manifest.pipeline == kiln_pipelines::text_generation::PIPELINE_KIND {
        // A bad value fails the model's load, naming the key.
        kiln_pipelines::text_generation::batch_config(resolved).map_or(1, |c| c.max_batch_size)
    } else if resolved.manifest.pipeline.starts_with("text_to_image") {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Apply `[[models]] config` keys over the manifest's config.
fn override_config(
    config: &mut serde_json::Value,
    overrides: &serde_json::Map<String, serde_json::Value>,
) {
    if !config.is_object() {
        *config = serde_json::Value::Object(Default::default());
    }
    if let Some(config) = config.as_object_mut() {
        config.extend(overrides.clone());
    }
}

/// The one weight file of a single-file model (a GGUF LLM), if it is one.
/// The model's one file, for models that are a file (a GGUF LLM, an ONNX graph).
fn single_file(resolved: &ResolvedModel) -> Option<PathBuf> {
    ["gguf", "onnx"]
        .iter()
        .find_map(|key| resolved.manifest.config.get(*key))
        .and_then(serde_json::Value::as_str)
        .map(|name| resolved.dir.join(name))
}

fn model_spec(
    config: &ServeConfig,
    entry: &ModelEntry,
    mut resolved: ResolvedModel,
    home: PathBuf,
) -> ModelSpec {
    if let Some(overrides) = &entry.config {
        override_config(&mut resolved.manifest.config, overrides);
    }
    let settings = ModelSettings {
        concurrency: entry
            .concurrency
            .unwrap_or_else(|| default_concurrency(&resolved)),
        max_queue: entry.max_queue.unwrap_or(config.jobs.max_queue),
        execution_timeout: entry.execution_timeout.or(config.jobs.execution_timeout),
        idle_unload: entry.idle_unload,
        load: entry.load.unwrap_or(LoadPolicy::Eager),
        memory_bytes: match single_file(&resolved) {
            Some(file) => std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
            None => folder_bytes(&resolved.dir),
        },
    };
    // A single-file model outside the registry, given as its file, is named
    // after the file.
    let file_stem = single_file(&resolved)
        .filter(|_| resolved.name.is_none() && Path::new(&entry.source).is_file())
        .and_then(|f| f.file_stem().map(|s| s.to_string_lossy().into_owned()));
    let name = entry
        .name
        .clone()
        .or(file_stem)
        .unwrap_or_else(|| resolved.display_name());
    let resolved = Arc::new(resolved);
    // Every load checks the files again, hashing those changed since the last
    // check: weights rewritten after start are never served unverified.
    let integrity = IntegrityCache::new();
    ModelSpec {
        name,
        version: resolved.version,
        reference: entry.source.clone(),
        settings,
        loader: Arc::new(move || {
            let relative = |message: String| relative_paths(&message, &resolved.dir, &home);
            integrity
                .verify(&resolved, Verification::Full)
                .map_err(|e| relative(e.to_string()))?;
            load_pipeline(&resolved).map_err(|e| relative(e.to_string()))
        }),
    }
}

/// A load error as clients see it: paths inside the model relative to its
/// folder, other paths under the Kiln home as `$KILN_HOME/...`, so no
/// absolute server path reaches a client.
fn relative_paths(message: &str, model_dir: &Path, home: &Path) -> String {
    let mut out = message.to_string();
    let dir = model_dir.display().to_string();
    if !dir.is_empty() {
        out = out
            .replace(&format!("{dir}/"), "")
            .replace(&dir, "the model folder");
    }
    let home = home.display().to_string();
    if !home.is_empty() {
        out = out.replace(&home, "$KILN_HOME");
    }
    out
}

/// A configured model that cannot even be found (an unknown name, a missing
/// folder or manifest): the server starts anyway and reports it failed, with
/// the reason, while serving the others.
fn unresolvable_spec(config: &ServeConfig, entry: &ModelEntry, error: &anyhow::Error) -> ModelSpec {
    let name = unresolved_name(entry);
    let message = format!("{error:#}");
    tracing::error!(model = %name, reference = %entry.source, %message, "model cannot be found; serving the others");
    let load = entry.load.unwrap_or(LoadPolicy::Eager);
    unloadable_spec(config, entry, name, message, load)
}

/// A model this process can name but never load, with its queue bound; its
/// loader fails with `message`.
fn unloadable_spec(
    config: &ServeConfig,
    entry: &ModelEntry,
    name: String,
    message: String,
    load: LoadPolicy,
) -> ModelSpec {
    ModelSpec {
        name,
        version: None,
        reference: entry.source.clone(),
        settings: ModelSettings {
            max_queue: entry.max_queue.unwrap_or(config.jobs.max_queue),
            concurrency: entry.concurrency.unwrap_or(1),
            load,
            ..ModelSettings::default()
        },
        loader: Arc::new(move || Err(message.clone())),
    }
}

/// A model's name from its configuration alone: `name`, else the registry
/// name or folder name its source gives.
fn unresolved_name(entry: &ModelEntry) -> String {
    entry
        .name
        .clone()
        .unwrap_or_else(|| match ModelRef::parse(&entry.source) {
            Ok(ModelRef::Registered { name, .. }) => name.to_string(),
            Ok(ModelRef::LocalFolder(path)) => {
                local_name(&path).unwrap_or_else(|| entry.source.clone())
            }
            Err(_) => entry.source.clone(),
        })
}

/// The name a model folder or file is served under, from its path alone, as
/// `model_spec` names it once resolved: a folder by its name, a single-file
/// model (`.onnx`, `.gguf`) by its stem. None for `.`, `..` and roots.
fn local_name(path: &Path) -> Option<String> {
    let is_file_model = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx") || e.eq_ignore_ascii_case("gguf"));
    let name = if is_file_model {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
}

/// A model as a front that runs no model knows it: its name and queue bound
/// (workers elsewhere hold the files; this machine need not).
fn front_spec(config: &ServeConfig, entry: &ModelEntry) -> ModelSpec {
    let name = unresolved_name(entry);
    let message = format!("model {name:?} runs on the queue's workers, not on this front");
    unloadable_spec(config, entry, name, message, LoadPolicy::Lazy)
}

fn default_spec(config: &ServeConfig, home: PathBuf) -> ModelSpec {
    ModelSpec {
        name: builtin::DEFAULT_MODEL.into(),
        version: None,
        reference: format!(
            "models:/{}@{}",
            builtin::DEFAULT_MODEL,
            builtin::DEFAULT_ALIAS
        ),
        settings: ModelSettings {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_queue: config.jobs.max_queue,
            ..ModelSettings::default()
        },
        loader: Arc::new(move || {
            let resolved = builtin::ensure_default_model(&home).map_err(|e| format!("{e:#}"))?;
            load_pipeline(&resolved).map_err(|e| e.to_string())
        }),
    }
}

fn read_config(home: &Path, args: &ServeArgs) -> Result<ServeConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            ServeConfig::from_toml(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("in {}", path.display()))?
        }
        None => ServeConfig::default(),
    };
    config
        .apply_env(|key| std::env::var(key).ok())
        .map_err(anyhow::Error::msg)?;
    if let Some(host) = &args.host {
        config.server.host = host.clone();
    }
    if let Some(port) = args.port {
        config.server.port = port;
    }
    if let Some(limit) = &args.body_limit {
        config.server.body_limit =
            parse_bytes(limit).map_err(|e| anyhow::anyhow!("--body-limit: {e}"))?;
    }
    if config.jobs.database.is_none() {
        config.jobs.database = Some(home.join("jobs.sqlite"));
    }
    if let Some(url) = &args.queue {
        config.queue.url = Some(url.clone());
    }
    if args.work {
        config.queue.work = true;
    }
    if config.queue.url.is_some() {
        config.queue.role = Role::Front;
    }
    for text in &args.models {
        config.models.push(ModelEntry {
            name: None,
            source: text.clone(),
            concurrency: None,
            max_queue: None,
            execution_timeout: None,
            idle_unload: None,
            load: None,
            config: None,
        });
    }
    Ok(config)
}

/// `kiln worker`: run the models' jobs from the shared queue. Its HTTP
/// listener serves only the health probes and metrics.
pub fn run_worker(home: &Path, args: ServeArgs) -> Result<()> {
    let mut config = read_config(home, &args)?;
    if config.queue.url.is_none() {
        anyhow::bail!(
            "a worker takes jobs from a shared queue: give --queue redis://HOST:PORT/DB (or KILN_QUEUE)"
        );
    }
    config.queue.role = Role::Worker;
    config.protocols = ProtocolMounts {
        mlflow: Mount::Off,
        kserve: Mount::Off,
        runpod: Mount::Off,
        cog: Mount::Off,
        openai: Mount::Off,
    };
    serve_config(home, config)
}

pub fn run(home: &Path, args: ServeArgs) -> Result<()> {
    let config = read_config(home, &args)?;
    serve_config(home, config)
}

fn serve_config(home: &Path, config: ServeConfig) -> Result<()> {
    let registry = Registry::open(home);
    let mut specs: Vec<ModelSpec> = Vec::new();
    let front_only = config.queue.role == Role::Front && !config.queue.work;
    for entry in &config.models {
        // A front names a model from its reference alone; where the path
        // gives no name (`.`), it must be told one.
        let nameless = |source: &str| matches!(ModelRef::parse(source), Ok(ModelRef::LocalFolder(path)) if local_name(&path).is_none());
        if front_only && entry.name.is_none() && nameless(&entry.source) {
            anyhow::bail!(
                "{}: a front names models without reading their files, and this path gives no name; set `name` (the same on the workers)",
                entry.source
            );
        }
        let located = if front_only {
            Ok(None)
        } else {
            locate_model(&registry, &entry.source).map(Some)
        };
        let spec = match located {
            Ok(None) => front_spec(&config, entry),
            Ok(Some(resolved)) => model_spec(&config, entry, resolved, home.to_path_buf()),
            // With nothing else to serve, a typo is better told at once.
            Err(error) if config.models.len() == 1 => {
                return Err(error.context(format!("cannot serve {}", entry.source)));
            }
            Err(error) => unresolvable_spec(&config, entry, &error),
        };
        if specs.iter().any(|s| s.name == spec.name) {
            anyhow::bail!(
                "{} is given twice; serve one version per name (set `name` in the configuration)",
                spec.name
            );
        }
        specs.push(spec);
    }
    if specs.is_empty() {
        specs.push(default_spec(&config, home.to_path_buf()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let server = Server::bind(&config, specs).await?;
        let address = server.local_addr()?;
        let role = match config.queue.role {
            Role::Standalone => "standalone",
            Role::Front if config.queue.work => "front and worker",
            Role::Front => "front (workers run the models)",
            Role::Worker => "worker",
        };
        tracing::info!(%address, models = ?names, role, auth = !config.server.api_keys.is_empty(), "kiln is listening (ready once every eager model has loaded)");
        server.run(shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_errors_show_no_absolute_server_paths() {
        let message = "cannot load model a.b.c: /srv/kiln/registry/models/a/b/c/versions/1/vae/config.json: missing field; see /srv/kiln/registry/models/a/b/c/versions/1 and /srv/kiln/cache";
        assert_eq!(
            relative_paths(
                message,
                Path::new("/srv/kiln/registry/models/a/b/c/versions/1"),
                Path::new("/srv/kiln")
            ),
            "cannot load model a.b.c: vae/config.json: missing field; see the model folder and $KILN_HOME/cache"
        );
    }

    #[test]
    fn fronts_name_local_models_as_workers_do() {
        assert_eq!(
            local_name(Path::new("/models/flux.1-schnell/")).as_deref(),
            Some("flux.1-schnell")
        );
        assert_eq!(
            local_name(Path::new("models/classifier.onnx")).as_deref(),
            Some("classifier")
        );
        assert_eq!(local_name(Path::new("qwen.GGUF")).as_deref(), Some("qwen"));
        assert_eq!(local_name(Path::new("..")), None);
    }

    #[test]
    fn model_config_keys_override_the_manifest() {
        let mut config = serde_json::json!({"variant": "dev", "max_pixels": 100});
        let overrides = serde_json::json!({"lora_mode": "fused", "max_pixels": 50});
        override_config(&mut config, overrides.as_object().unwrap());
        assert_eq!(
            config,
            serde_json::json!({"variant": "dev", "max_pixels": 50, "lora_mode": "fused"})
        );
        let mut empty = serde_json::Value::Null;
        override_config(&mut empty, overrides.as_object().unwrap());
        assert_eq!(empty["lora_mode"], "fused");
    }
}
