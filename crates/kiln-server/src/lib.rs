//! Kiln's HTTP server: protocol adapters (MLflow/SageMaker scoring, KServe v1/v2),
//! truthful health and readiness, body limits, Prometheus metrics and graceful
//! shutdown. Protocols never touch tensors beyond their wire codecs; pipelines do
//! the work.

pub mod error;
pub mod metrics;
pub mod protocols;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use kiln_pipelines::Pipeline;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use state::{AppState, LoadState, ServedModel};

use protocols::{kserve, mlflow};

/// Loads one model's pipeline (may take long: runs on a blocking thread).
pub type Loader = Box<dyn FnOnce() -> Result<Arc<dyn Pipeline>, String> + Send>;

/// A model to serve and how to load it.
pub struct ModelSpec {
    pub name: String,
    pub version: Option<u64>,
    pub reference: String,
    pub loader: Loader,
}

/// Network and limit settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest accepted request body in bytes (413 beyond).
    pub body_limit: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            body_limit: 32 * 1024 * 1024,
        }
    }
}

/// Every route, wired to shared state.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        // MLflow scoring server and SageMaker.
        .route("/ping", get(mlflow::ping))
        .route("/health", get(mlflow::ping))
        .route("/version", get(mlflow::version))
        .route("/invocations", post(mlflow::invocations))
        .route(
            "/models/{name}/invocations",
            post(mlflow::model_invocations),
        )
        // KServe Open Inference Protocol v2.
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
        // KServe v1.
        .route(
            "/v1/models/{name}",
            get(kserve::v1_model).post(kserve::v1_predict),
        )
        .route("/metrics", get(metrics::metrics_endpoint))
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
}

impl Server {
    /// Bind the listener, then start loading every model on blocking threads;
    /// readiness turns true when all have loaded.
    pub async fn bind(config: &ServerConfig, models: Vec<ModelSpec>) -> std::io::Result<Server> {
        let listener = TcpListener::bind((config.host.as_str(), config.port)).await?;
        let mut served = Vec::with_capacity(models.len());
        let mut loaders = Vec::with_capacity(models.len());
        for spec in models {
            let model = Arc::new(ServedModel::new(spec.name, spec.version, spec.reference));
            served.push(Arc::clone(&model));
            loaders.push((model, spec.loader));
        }
        let state = Arc::new(AppState {
            models: served,
            metrics: metrics::Metrics::new(),
            body_limit: config.body_limit,
            started: Instant::now(),
        });
        for (model, loader) in loaders {
            let state = Arc::clone(&state);
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(loader))
                    .unwrap_or_else(|_| Err("the loader panicked".into()));
                let seconds = started.elapsed().as_secs_f64();
                state
                    .metrics
                    .model_loaded(&model.name, seconds, outcome.is_ok());
                match outcome {
                    Ok(pipeline) => {
                        tracing::info!(model = %model.name, reference = %model.reference, seconds, "model loaded");
                        model.set_state(LoadState::Ready(pipeline));
                    }
                    Err(message) => {
                        tracing::error!(model = %model.name, reference = %model.reference, %message, "model failed to load");
                        model.set_state(LoadState::Failed(message));
                    }
                }
            });
        }
        Ok(Server { state, listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serve until `shutdown` resolves, then stop accepting and finish in-flight requests.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = router(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
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
