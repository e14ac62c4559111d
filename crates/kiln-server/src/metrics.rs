//! Prometheus metrics: requests by route/method/status/model, latency histograms,
//! model load time and state; served at `/metrics` in the text exposition format.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::state::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    route: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    model: String,
    status: String,
}

/// Attached to a response by a handler so the metrics layer can label it by model.
#[derive(Clone, Debug)]
pub struct ModelLabel(pub String);

/// `response`, labelled with the model it served for the request metrics.
pub fn labelled(mut response: Response, model: &str) -> Response {
    response
        .extensions_mut()
        .insert(ModelLabel(model.to_string()));
    response
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

fn job_histogram() -> Histogram {
    // 1 ms .. ~9 h
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

/// All of Kiln's series.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    load_seconds: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    loaded: Family<ModelLabels, Gauge>,
    resident: Family<ModelLabels, Gauge>,
    unloads: Family<ModelLabels, Counter>,
    jobs: Family<JobLabels, Counter>,
    queue_depth: Family<ModelLabels, Gauge>,
    workers: Family<ModelLabels, Gauge>,
    queue_wait: Family<ModelLabels, Histogram, fn() -> Histogram>,
    execution: Family<ModelLabels, Histogram, fn() -> Histogram>,
    steps: Family<ModelLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let load_seconds = Family::<ModelLabels, Gauge<f64, AtomicU64>>::default();
        let loaded = Family::<ModelLabels, Gauge>::default();
        let resident = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method, status and model",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route and model",
            latency.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Time the last load of each model took",
            load_seconds.clone(),
        );
        registry.register(
            "model_loaded",
            "1 while a model is loaded and ready",
            loaded.clone(),
        );
        registry.register(
            "model_resident_bytes",
            "Bytes the loaded model's weights hold (quantized layers as stored)",
            resident.clone(),
        );
        let unloads = Family::<ModelLabels, Counter>::default();
        let jobs = Family::<JobLabels, Counter>::default();
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        let queue_wait = Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            job_histogram,
        );
        let execution = Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            job_histogram,
        );
        let steps = Family::<ModelLabels, Counter>::default();
        registry.register(
            "model_unloads",
            "Models unloaded (idle or memory budget)",
            unloads.clone(),
        );
        registry.register(
            "jobs",
            "Jobs that reached a final state, by model and state",
            jobs.clone(),
        );
        registry.register("queue_depth", "Jobs waiting per model", queue_depth.clone());
        let workers = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "queue_workers",
            "Live worker processes serving the model through the shared queue (fronts only)",
            workers.clone(),
        );
        registry.register(
            "job_queue_wait_seconds",
            "Time jobs spent queued before running",
            queue_wait.clone(),
        );
        registry.register(
            "job_execution_seconds",
            "Time jobs spent running",
            execution.clone(),
        );
        registry.register(
            "denoising_steps",
            "Denoising steps run (rate() gives steps per second)",
            steps.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            load_seconds,
            loaded,
            resident,
            unloads,
            jobs,
            queue_depth,
            workers,
            queue_wait,
            execution,
            steps,
        }
    }

    /// Record a finished model load.
    pub fn model_loaded(&self, model: &str, seconds: f64, ok: bool) {
        let labels = ModelLabels {
            model: model.to_string(),
        };
        self.load_seconds.get_or_create(&labels).set(seconds);
        self.loaded.get_or_create(&labels).set(i64::from(ok));
    }

    /// Record an unload.
    /// Record the bytes a loaded model's weights hold.
    pub fn model_resident(&self, model: &str, bytes: u64) {
        let labels = ModelLabels {
            model: model.to_string(),
        };
        self.resident
            .get_or_create(&labels)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn model_unloaded(&self, model: &str) {
        let labels = ModelLabels {
            model: model.to_string(),
        };
        self.loaded.get_or_create(&labels).set(0);
        self.resident.get_or_create(&labels).set(0);
        self.unloads.get_or_create(&labels).inc();
    }

    /// A job left the queue after `waited` seconds.
    pub fn job_started(&self, model: &str, waited: f64) {
        self.queue_wait
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .observe(waited);
    }

    /// A job reached a final state after running `seconds`.
    pub fn job_finished(&self, model: &str, status: &str, seconds: f64) {
        self.job_ended(model, status);
        self.execution
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .observe(seconds);
    }

    /// A job reached a final state (counted once, by whoever recorded it:
    /// the worker, or a cancellation).
    pub fn job_ended(&self, model: &str, status: &str) {
        self.jobs
            .get_or_create(&JobLabels {
                model: model.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// One denoising step ran.
    pub fn denoising_step(&self, model: &str) {
        self.steps
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .inc();
    }

    /// Jobs waiting for `model` now.
    pub fn queue_depth(&self, model: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .set(depth as i64);
    }

    /// Worker processes serving `model` through the shared queue now.
    pub fn queue_workers(&self, model: &str, workers: usize) {
        self.workers
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .set(workers as i64);
    }

    fn record(&self, route: &str, method: &str, status: u16, model: &str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method: method.to_string(),
                status,
                model: model.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                route: route.to_string(),
                model: model.to_string(),
            })
            .observe(seconds);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Middleware: time every request and count it by its route template.
pub async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_string();
    let response = next.run(request).await;
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map(|m| m.0.clone())
        .unwrap_or_default();
    state.metrics.record(
        &route,
        &method,
        response.status().as_u16(),
        &model,
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The serving metrics of every loaded model whose engine keeps them (read at
/// scrape time).
fn engine_metrics(state: &AppState) -> Vec<(String, kiln_textgen::EngineMetrics)> {
    state
        .models
        .iter()
        .filter_map(|model| match model.state() {
            crate::state::LoadState::Ready(pipeline) => pipeline
                .text_generation()
                .and_then(|engine| engine.metrics())
                .map(|m| (model.name.clone(), m)),
            _ => None,
        })
        .collect()
}

/// `GET /metrics`.
pub async fn metrics_endpoint(State(state): State<Arc<AppState>>) -> Response {
    // Queue depths as they are now, not as a timer last saw them.
    for model in &state.models {
        let depth = state.jobs.queue_depth(&model.name).await;
        state.metrics.queue_depth(&model.name, depth);
        if !state.runs_models {
            let workers = crate::jobs::lock(&state.remote_workers)
                .get(&model.name)
                .copied()
                .unwrap_or(0);
            state.metrics.queue_workers(&model.name, workers);
        }
    }
    let mut text = state.metrics.render();
    let engines = engine_metrics(&state);
    if !engines.is_empty() {
        // The engines' families go before OpenMetrics' closing `# EOF`.
        let end = text.rfind("# EOF").unwrap_or(text.len());
        text.insert_str(end, &kiln_textgen::metrics::render_prometheus(&engines));
    }
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
