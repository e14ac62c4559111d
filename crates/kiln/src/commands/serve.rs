//! `kiln serve`: resolve the model references, then serve them until Ctrl-C/SIGTERM.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use kiln_pipelines::load_pipeline;
use kiln_registry::{ModelRef, Registry, ResolvedModel, Verification};
use kiln_server::{ModelSpec, Server, ServerConfig, shutdown_signal};

use crate::builtin;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to bind; 127.0.0.1 keeps Kiln private to this machine.
    #[arg(long, default_value = "127.0.0.1", env = "KILN_HOST")]
    host: String,
    /// Port (8080 is SageMaker's and KServe's convention).
    #[arg(long, default_value_t = 8080, env = "PORT")]
    port: u16,
    /// Largest request body in bytes; larger requests get 413.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    body_limit: usize,
    /// Models to serve: `models:/cat.sch.model/3`, `models:/cat.sch.model@alias`,
    /// `cat.sch.model` (latest) or a model folder. None: the built-in example GLM.
    models: Vec<String>,
}

fn model_spec(resolved: ResolvedModel, reference: String) -> ModelSpec {
    let name = resolved.display_name();
    ModelSpec {
        name,
        version: resolved.version,
        reference,
        loader: Box::new(move || load_pipeline(&resolved).map_err(|e| e.to_string())),
    }
}

fn default_spec(home: PathBuf) -> ModelSpec {
    ModelSpec {
        name: builtin::DEFAULT_MODEL.into(),
        version: None,
        reference: format!(
            "models:/{}@{}",
            builtin::DEFAULT_MODEL,
            builtin::DEFAULT_ALIAS
        ),
        loader: Box::new(move || {
            let resolved = builtin::ensure_default_model(&home).map_err(|e| format!("{e:#}"))?;
            load_pipeline(&resolved).map_err(|e| e.to_string())
        }),
    }
}

pub fn run(home: &Path, args: ServeArgs) -> Result<()> {
    let registry = Registry::open(home);
    let mut specs = Vec::new();
    for text in &args.models {
        let reference = ModelRef::parse(text)?;
        let resolved = registry
            .resolve(&reference, Verification::Full)
            .with_context(|| format!("cannot serve {text}"))?;
        if specs
            .iter()
            .any(|s: &ModelSpec| s.name == resolved.display_name())
        {
            anyhow::bail!(
                "{} is given twice; serve one version per name",
                resolved.display_name()
            );
        }
        specs.push(model_spec(resolved, text.clone()));
    }
    if specs.is_empty() {
        specs.push(default_spec(home.to_path_buf()));
    }
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        body_limit: args.body_limit,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let server = Server::bind(&config, specs)
            .await
            .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
        let address = server.local_addr()?;
        tracing::info!(%address, models = ?names, "kiln is listening (ready once every model has loaded)");
        server.run(shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
