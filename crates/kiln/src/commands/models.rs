//! `kiln models`: register, list, show, alias, tag and delete registry models.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Subcommand;
use kiln_registry::{Alias, ModelName, Registry};
use serde_json::json;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Publish a model folder (manifest.json + artifacts) as the next version.
    Register {
        /// `catalog.schema.model`
        name: String,
        /// The model folder to copy in.
        #[arg(long = "from")]
        from: PathBuf,
        /// Point this alias at the new version.
        #[arg(long)]
        alias: Option<String>,
    },
    /// Fetch a diffusers pipeline from the Hugging Face Hub into the HF cache
    /// (safetensors only, never pickles) and register it as NAME.
    Pull {
        /// `owner/name` on the Hub, e.g. black-forest-labs/FLUX.1-schnell.
        repo: String,
        /// Register the pulled folder as this `catalog.schema.model`.
        #[arg(long)]
        name: Option<String>,
        /// Branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
        /// Prefer this precision variant's weights (fp16, bf16) where a component has them.
        #[arg(long)]
        variant: Option<String>,
        /// Only these components, comma-separated (e.g. tokenizer,tokenizer_2); nothing is registered.
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
        /// Point this alias at the new version.
        #[arg(long)]
        alias: Option<String>,
    },
    /// List registered models.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a model's versions, aliases and tags.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        /// Also load the model (latest version, or NAME@alias / NAME/N) with
        /// the environment's settings (KILN_QUANTIZE, KILN_DTYPE, …) and
        /// report the bytes its weights hold in memory.
        #[arg(long)]
        load: bool,
    },
    /// Set or delete aliases.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Set or delete tags on a model or one of its versions.
    #[command(subcommand)]
    Tag(TagCommand),
    /// Delete one version (`--version`) or the whole model.
    Delete {
        name: String,
        #[arg(long)]
        version: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum AliasCommand {
    /// Point ALIAS at VERSION.
    Set {
        name: String,
        alias: String,
        version: u64,
    },
    /// Remove ALIAS.
    Delete { name: String, alias: String },
}

#[derive(Subcommand)]
pub enum TagCommand {
    /// Set KEY=VALUE.
    Set {
        name: String,
        tag: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Remove KEY.
    Delete {
        name: String,
        key: String,
        #[arg(long)]
        version: Option<u64>,
    },
}

pub fn run(home: &Path, command: ModelsCommand) -> Result<()> {
    let registry = Registry::open(home);
    match command {
        ModelsCommand::Register { name, from, alias } => {
            register(&registry, &name, &from, alias.as_deref())?;
        }
        ModelsCommand::Pull {
            repo,
            name,
            revision,
            variant,
            only,
            alias,
        } => {
            if only.is_some() && (name.is_some() || alias.is_some()) {
                bail!(
                    "--only pulls part of a pipeline, which cannot be registered: drop --name/--alias"
                );
            }
            let request = kiln_pipelines::pull::PullRequest {
                repo,
                revision,
                variant,
                only,
            };
            let folder = pull(&request)?;
            println!("pulled {} into {}", request.repo, folder.display());
            if let Some(name) = name {
                register(&registry, &name, &folder, alias.as_deref())?;
            }
        }
        ModelsCommand::List { json } => {
            let names = registry.list()?;
            let mut rows = Vec::new();
            for name in &names {
                let record = registry.record(name)?;
                let versions = registry.version_numbers(name)?;
                rows.push((name.to_string(), versions, record.aliases));
            }
            if json {
                let items: Vec<_> = rows
                    .iter()
                    .map(|(n, v, a)| json!({"name": n, "versions": v, "aliases": a}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else if rows.is_empty() {
                println!("no models registered in {}", home.display());
            } else {
                println!("{:<48} {:>8} {:>7}  ALIASES", "NAME", "VERSIONS", "LATEST");
                for (name, versions, aliases) in rows {
                    let latest = versions
                        .last()
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-".into());
                    let aliases: Vec<String> =
                        aliases.iter().map(|(a, v)| format!("@{a}={v}")).collect();
                    println!(
                        "{name:<48} {:>8} {latest:>7}  {}",
                        versions.len(),
                        aliases.join(" ")
                    );
                }
            }
        }
        ModelsCommand::Show { name, json, load } => {
            let resident_bytes = if load {
                let resolved = crate::resolve::resolve_model(&registry, &name)?;
                let pipeline = kiln_pipelines::load_pipeline(&resolved)?;
                Some(pipeline.resident_bytes())
            } else {
                None
            };
            let reference = name.clone();
            let Some(name) = kiln_registry::ModelRef::parse(&name)?.name().cloned() else {
                bail!(
                    "{name} is a folder, not a registered model: `kiln models show` reads the registry"
                );
            };
            let record = registry.record(&name)?;
            let versions = registry.versions(&name)?;
            if json {
                let mut shown = json!({
                    "name": record.name, "created_at": record.created_at,
                    "aliases": record.aliases, "tags": record.tags, "versions": versions,
                });
                if let Some(bytes) = resident_bytes {
                    shown["loaded"] = json!({"model": reference, "resident_bytes": bytes});
                }
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                if let Some(bytes) = resident_bytes {
                    match bytes {
                        Some(bytes) => println!(
                            "{reference} loaded: {bytes} bytes resident ({:.1} MiB)",
                            bytes as f64 / (1024.0 * 1024.0)
                        ),
                        None => println!(
                            "{reference} loaded: its pipeline does not count resident bytes"
                        ),
                    }
                }
                println!("{}  (created {})", record.name, record.created_at);
                for (key, value) in &record.tags {
                    println!("  tag {key}={value}");
                }
                for v in versions {
                    let aliases: Vec<String> = v.aliases.iter().map(|a| format!("@{a}")).collect();
                    let tags: Vec<String> =
                        v.tags.iter().map(|(k, val)| format!("{k}={val}")).collect();
                    println!(
                        "  version {:<4} {:<14} {:>10} bytes  {}  {} {}",
                        v.version,
                        v.pipeline,
                        v.size_bytes,
                        v.created_at.unwrap_or_default(),
                        aliases.join(" "),
                        tags.join(" ")
                    );
                }
            }
        }
        ModelsCommand::Alias(AliasCommand::Set {
            name,
            alias,
            version,
        }) => {
            let (name, alias) = (ModelName::parse(&name)?, Alias::parse(&alias)?);
            registry.set_alias(&name, &alias, version)?;
            println!("models:/{name}@{alias} -> version {version}");
        }
        ModelsCommand::Alias(AliasCommand::Delete { name, alias }) => {
            let (name, alias) = (ModelName::parse(&name)?, Alias::parse(&alias)?);
            registry.delete_alias(&name, &alias)?;
            println!("deleted alias @{alias} of {name}");
        }
        ModelsCommand::Tag(TagCommand::Set { name, tag, version }) => {
            let Some((key, value)) = tag.split_once('=') else {
                bail!("tags are written KEY=VALUE, got {tag:?}");
            };
            if key.is_empty() {
                bail!("the tag key must not be empty");
            }
            registry.set_tag(&ModelName::parse(&name)?, version, key, Some(value))?;
        }
        ModelsCommand::Tag(TagCommand::Delete { name, key, version }) => {
            registry.set_tag(&ModelName::parse(&name)?, version, &key, None)?;
        }
        ModelsCommand::Delete { name, version } => {
            let name = ModelName::parse(&name)?;
            match version {
                Some(version) => {
                    registry.delete_version(&name, version)?;
                    println!("deleted models:/{name}/{version}");
                }
                None => {
                    registry.delete_model(&name)?;
                    println!("deleted {name} and all its versions");
                }
            }
        }
    }
    Ok(())
}

/// Publish a model folder (a Kiln folder with manifest.json, a recognised
/// diffusers/single-file folder, or an HF cache repo folder) as the next version.
fn register(registry: &Registry, name: &str, from: &Path, alias: Option<&str>) -> Result<()> {
    let name = ModelName::parse(name)?;
    let from = kiln_registry::hf_cache_snapshot(from);
    let alias = alias.map(Alias::parse).transpose()?;
    // Every weight header parsed, pickles refused, shapes checked against the
    // component configs: a broken folder fails here, not at its first load.
    kiln_pipelines::weight_check::check_weight_files(&from)
        .map_err(|e| anyhow::anyhow!("{} cannot be registered: {e}", from.display()))?;
    let published = if from.join(kiln_registry::MANIFEST_FILE).is_file() {
        registry.register_folder(&name, &from, alias.as_ref())?
    } else {
        let manifest = kiln_pipelines::describe_model_folder(&from)
            .map_err(anyhow::Error::msg)?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no manifest.json and not a recognised model (a diffusers FLUX or SDXL folder, a transformers LLM folder, a GGUF file, or a Kiln model folder)",
                    from.display()
                )
            })?;
        eprintln!(
            "detected a {} model; copying {} into the registry",
            manifest.pipeline,
            from.display()
        );
        registry.register(&name, manifest, Some(&from), alias.as_ref())?
    };
    let version = published.version.unwrap_or_default();
    println!(
        "registered models:/{name}/{version} ({} files)",
        published.manifest.files.len()
    );
    if let Some(alias) = alias {
        println!("alias @{alias} -> version {version}");
    }
    Ok(())
}

/// Pull through the Hub (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`) with hf-hub's
/// progress bars; hosts from `KILN_PULL_ALLOWED_HOSTS` (default the Hub's).
fn pull(request: &kiln_pipelines::pull::PullRequest) -> Result<PathBuf> {
    let mut hub = kiln_fetch::Hub::from_env();
    hub.progress = true;
    let policy = kiln_pipelines::pull::policy_from_env(&hub);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(kiln_pipelines::pull::pull(&hub, &policy, request))
        .map_err(anyhow::Error::msg)
}
