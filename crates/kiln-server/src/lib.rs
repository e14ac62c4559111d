//! Kiln's HTTP server: protocol adapters (MLflow/SageMaker scoring, KServe v1/v2,
//! RunPod serverless, Replicate Cog, OpenAI), durable jobs, scheduling and
//! scale-to-zero, API keys, truthful health and readiness, body limits,
//! Prometheus metrics and graceful shutdown. Protocols never touch tensors beyond
//! their wire codecs; pipelines do the work.

pub mod auth;
pub mod config;
pub mod error;
pub mod image_links;
pub mod jobs;
pub mod metrics;
pub mod protocols;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use config::{LoadPolicy, Mount, Role, ServeConfig};
pub use error::ApiError;
pub use state::{AppState, LoadState, Loader, ModelSettings, ServedModel};

use config::ProtocolMounts;
use jobs::{JobBackend, JobStore, Jobs, LocalBackend, RedisBackend};
use protocols::{cog, databricks, kserve, mlflow, openai, openai_text, runpod};

/// A model to serve and how to load it.
pub struct ModelSpec {
    pub name: String,
    pub version: Option<u64>,
    pub reference: String,
    pub settings: ModelSettings,
    pub loader: Loader,
}

fn mlflow_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ping", get(mlflow::ping))
        .route("/health", get(mlflow::ping))
        .route("/version", get(mlflow::version))
        .route("/invocations", post(mlflow::invocations))
        .route(
            "/models/{name}/invocations",
            post(mlflow::model_invocations),
        )
        // Databricks Model Serving, for `mlflow.deployments`' databricks client.
        .route("/api/2.0/serving-endpoints", get(databricks::list))
        .route("/api/2.0/serving-endpoints/", get(databricks::list))
        .route("/api/2.0/serving-endpoints/{name}", get(databricks::get))
        // Scored as MLflow's per-model route scores (same shapes, same errors).
        .route(
            "/serving-endpoints/{name}/invocations",
            post(mlflow::model_invocations),
        )
        .route(
            "/.well-known/databricks-config",
            get(databricks::host_metadata),
        )
}

fn kserve_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/v2/models/{name}", get(kserve::model_metadata))
        .route("/v2/models/{name}/ready", get(kserve::model_ready))
        .route("/v2/models/{name}/infer", post(kserve::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(kserve::version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(kserve::version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(kserve::version_infer),
        )
        .route(
            "/v1/models/{name}",
            get(kserve::v1_model).post(kserve::v1_predict),
        )
}

fn runpod_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/run", post(runpod::run))
        .route("/runsync", post(runpod::runsync))
        .route("/status/{id}", get(runpod::status).post(runpod::status))
        .route("/stream/{id}", get(runpod::stream).post(runpod::stream))
        .route("/cancel/{id}", post(runpod::cancel))
        .route("/retry/{id}", post(runpod::retry))
        .route("/purge-queue", post(runpod::purge_queue))
        .route("/v2/{model}/run", post(runpod::model_run))
        .route("/v2/{model}/runsync", post(runpod::model_runsync))
        .route(
            "/v2/{model}/status/{id}",
            get(runpod::model_status).post(runpod::model_status),
        )
        .route(
            "/v2/{model}/stream/{id}",
            get(runpod::model_stream).post(runpod::model_stream),
        )
        .route("/v2/{model}/cancel/{id}", post(runpod::model_cancel))
        .route("/v2/{model}/retry/{id}", post(runpod::model_retry))
        .route("/v2/{model}/purge-queue", post(runpod::model_purge_queue))
        .route("/v2/{model}/health", get(runpod::model_health))
}

fn cog_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(cog::root))
        .route("/health-check", get(cog::health_check))
        .route("/openapi.json", get(cog::openapi))
        .route("/docs", get(cog::docs))
        .route("/predictions", post(cog::predict))
        .route(
            "/predictions/{id}",
            axum::routing::put(cog::predict_idempotent),
        )
        .route("/predictions/{id}/cancel", post(cog::cancel))
        .route("/shutdown", post(cog::shutdown))
}

fn openai_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/images/generations", post(openai::image_generations))
        .route("/v1/images/files/{token}", get(openai::image_file))
        .route("/v1/chat/completions", post(openai_text::chat_completions))
        .route("/v1/completions", post(openai_text::completions))
        .route("/v1/{*rest}", axum::routing::any(openai::unknown_route))
}

fn mount(
    app: Router<Arc<AppState>>,
    at: &config::Mount,
    routes: Router<Arc<AppState>>,
) -> Router<Arc<AppState>> {
    match at.prefix() {
        None => app,
        Some("/") => app.merge(routes),
        Some(prefix) => app.nest(prefix, routes),
    }
}

/// Every enabled protocol at its mount point, wired to shared state.
pub fn router(state: Arc<AppState>, mounts: &ProtocolMounts) -> Router {
    let mut app = Router::new();
    app = mount(app, &mounts.mlflow, mlflow_routes());
    app = mount(app, &mounts.kserve, kserve_routes());
    app = mount(app, &mounts.runpod, runpod_routes());
    app = mount(app, &mounts.cog, cog_routes());
    app = mount(app, &mounts.openai, openai_routes());
    // Probes work whichever protocols are mounted.
    if mounts.kserve.prefix() != Some("/") {
        app = app
            .route("/v2/health/live", get(kserve::live))
            .route("/v2/health/ready", get(kserve::ready));
    }
    app.route("/metrics", get(metrics::metrics_endpoint))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.body_limit))
        .with_state(state)
}

/// A bound server whose models are loading in the background.
pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    mounts: ProtocolMounts,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Jobs(#[from] jobs::StoreError),
}

impl Server {
    /// Bind the listener, open the job store (re-queueing jobs a previous run
    /// left), start the workers, then load every eager model on blocking
    /// threads; readiness turns true when those have loaded.
    pub async fn bind(config: &ServeConfig, models: Vec<ModelSpec>) -> Result<Server, StartError> {
        let address = format!("{}:{}", config.server.host, config.server.port);
        let listener = TcpListener::bind((config.server.host.as_str(), config.server.port))
            .await
            .map_err(|source| StartError::Bind {
                address: address.clone(),
                source,
            })?;
        let queues: Vec<(String, usize)> = models
            .iter()
            .map(|m| (m.name.clone(), m.settings.max_queue))
            .collect();
        let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
        let role = config.queue.role;
        let runs_models = match role {
            Role::Standalone | Role::Worker => true,
            Role::Front => config.queue.work,
        };
        let mut shared_queue = None;
        let backend: Arc<dyn JobBackend> = match &config.queue.url {
            Some(_) => {
                let redis = Arc::new(RedisBackend::connect(&config.queue, &names).await?);
                redis.sweep_results();
                shared_queue = Some(Arc::clone(&redis));
                redis
            }
            None if role != Role::Standalone => {
                return Err(StartError::Jobs(jobs::StoreError::new(
                    "a front or worker needs a shared queue: give --queue redis://HOST:PORT/DB (or KILN_QUEUE)",
                )));
            }
            None => {
                let store = match &config.jobs.database {
                    Some(path) => JobStore::open(path)?,
                    None => JobStore::in_memory()?,
                };
                Arc::new(LocalBackend::new(store, &names))
            }
        };
        let metrics = Arc::new(metrics::Metrics::new());
        let jobs = Jobs::new(backend, config.jobs.clone(), &queues, Arc::clone(&metrics));
        let served: Vec<Arc<ServedModel>> = models
            .into_iter()
            .map(|spec| {
                Arc::new(ServedModel::new(
                    spec.name,
                    spec.version,
                    spec.reference,
                    spec.settings,
                    spec.loader,
                ))
            })
            .collect();
        let state = Arc::new(AppState {
            models: served,
            metrics,
            body_limit: usize::try_from(config.server.body_limit).unwrap_or(usize::MAX),
            started: Instant::now(),
            memory_budget: config.server.memory_budget,
            strict_readiness: config.server.strict_readiness,
            cog: config.cog.clone(),
            image_links: image_links::ImageLinks::default(),
            openai_mount: config.protocols.openai.prefix().unwrap_or("/").to_string(),
            api_keys: config.server.api_keys.clone(),
            jobs,
            runs_models,
            remote_workers: std::sync::Mutex::new(Default::default()),
            started_at_ms: jobs::now_ms(),
            shutdown: tokio::sync::Notify::new(),
        });
        let recovered = state.jobs.recover().await?;
        if recovered > 0 {
            tracing::info!(jobs = recovered, "re-queued jobs from the previous run");
        }
        Jobs::start(&state, runs_models);
        if let Some(redis) = shared_queue
            && runs_models
        {
            let weak = Arc::downgrade(&state);
            redis.announce_worker(names, move |name| {
                weak.upgrade()
                    .and_then(|state| state.model(name).ok())
                    .is_some_and(|model| model.allows_readiness())
            });
        }
        if !runs_models {
            count_workers(&state);
        }
        for model in &state.models {
            if runs_models && model.settings.load == LoadPolicy::Eager {
                let state = Arc::clone(&state);
                let model = Arc::clone(model);
                tokio::spawn(async move {
                    let _ = state.ensure_loaded(&model).await;
                });
            }
        }
        Ok(Server {
            state,
            listener,
            mounts: config.protocols.clone(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serve until `shutdown` resolves (or a client asks through Cog's
    /// `/shutdown`), then stop accepting and finish in-flight requests.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = Arc::clone(&self.state);
        let state_for_drain = Arc::clone(&self.state);
        let app = router(self.state, &self.mounts);
        let stop = async move {
            tokio::select! {
                _ = shutdown => {},
                _ = state.shutdown.notified() => {
                    tracing::info!("shutdown requested over HTTP: finishing in-flight requests");
                },
            }
        };
        axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await?;
        let grace = state_for_drain.jobs.settings.shutdown_grace;
        state_for_drain.jobs.drain(grace).await;
        Ok(())
    }
}

/// On a front: count each model's live workers every second, for readiness.
fn count_workers(state: &Arc<AppState>) {
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for model in &state.models {
                match state.jobs.workers(&model.name).await {
                    Ok(Some(count)) => {
                        jobs::lock(&state.remote_workers).insert(model.name.clone(), count);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(model = %model.name, error = %e, "cannot count workers")
                    }
                }
            }
        }
    });
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested: finishing in-flight requests");
}
