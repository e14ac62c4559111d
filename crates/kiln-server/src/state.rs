//! Served models and their life: eager or lazy loading, leases that bound
//! concurrency, idle unloading (scale to zero) and least-recently-used eviction
//! under a memory budget. Readiness is true once every eagerly loaded model has
//! loaded and none has failed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use kiln_pipelines::{ModelInterface, Pipeline};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LoadPolicy;
use crate::error::ApiError;
use crate::jobs::Jobs;
use crate::metrics::Metrics;

/// Loads one model's pipeline (may take long: runs on a blocking thread). Called
/// again after the model was unloaded.
pub type Loader = Arc<dyn Fn() -> Result<Arc<dyn Pipeline>, String> + Send + Sync>;

/// How a model is scheduled.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// Predictions run at once (jobs and direct requests together).
    pub concurrency: usize,
    /// Queued jobs beyond which submissions get 429.
    pub max_queue: usize,
    pub execution_timeout: Option<Duration>,
    /// Unload after this long unused.
    pub idle_unload: Option<Duration>,
    pub load: LoadPolicy,
    /// Estimated bytes the loaded model takes (its weight files), for the budget.
    pub memory_bytes: u64,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            concurrency: 1,
            max_queue: 64,
            execution_timeout: None,
            idle_unload: None,
            load: LoadPolicy::Eager,
            memory_bytes: 0,
        }
    }
}

/// Where a served model is in its life.
#[derive(Clone)]
pub enum LoadState {
    Unloaded,
    Loading,
    Ready(Arc<dyn Pipeline>),
    Failed(String),
}

/// A model this server serves.
pub struct ServedModel {
    /// Name clients use (`catalog.schema.model`, or a folder's name).
    pub name: String,
    /// Registry version, when the model came from the registry.
    pub version: Option<u64>,
    /// The reference it was started with, for logs and `/v2/models` metadata.
    pub reference: String,
    pub settings: ModelSettings,
    loader: Loader,
    state: RwLock<LoadState>,
    /// Kept after unloading, so schemas can be served without the weights.
    interface: OnceLock<ModelInterface>,
    ever_loaded: AtomicBool,
    load_lock: tokio::sync::Mutex<()>,
    /// Ticks when a load finishes (for callers waiting on a load they did not start).
    load_done: tokio::sync::watch::Sender<u64>,
    failed_at: Mutex<Option<Instant>>,
    slots: Arc<Semaphore>,
    in_use: AtomicUsize,
    /// Direct requests waiting for a slot (bounded by `max_queue`).
    waiting: AtomicUsize,
    last_used: Mutex<Instant>,
    /// Bytes the loaded weights hold, as the pipeline counted them (0: not counted).
    resident_bytes: AtomicU64,
}

impl ServedModel {
    pub fn new(
        name: impl Into<String>,
        version: Option<u64>,
        reference: impl Into<String>,
        settings: ModelSettings,
        loader: Loader,
    ) -> Self {
        let concurrency = settings.concurrency.max(1);
        ServedModel {
            name: name.into(),
            version,
            reference: reference.into(),
            settings,
            loader,
            state: RwLock::new(LoadState::Unloaded),
            interface: OnceLock::new(),
            ever_loaded: AtomicBool::new(false),
            load_lock: tokio::sync::Mutex::new(()),
            load_done: tokio::sync::watch::Sender::new(0),
            failed_at: Mutex::new(None),
            slots: Arc::new(Semaphore::new(concurrency)),
            in_use: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            resident_bytes: AtomicU64::new(0),
        }
    }

    /// Bytes the model takes for the memory budget: what its loaded weights
    /// hold when the pipeline counted them, else its weight files' size.
    pub fn memory_estimate(&self) -> u64 {
        match self.resident_bytes.load(Ordering::SeqCst) {
            0 => self.settings.memory_bytes,
            counted => counted,
        }
    }

    /// The current state (a poisoned lock reads as a failed model, never a panic).
    pub fn state(&self) -> LoadState {
        match self.state.read() {
            Ok(state) => state.clone(),
            Err(_) => LoadState::Failed("internal lock poisoned".into()),
        }
    }

    fn set_state(&self, state: LoadState) {
        match self.state.write() {
            Ok(mut guard) => *guard = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
    }

    /// Loaded and able to predict now.
    pub fn is_ready(&self) -> bool {
        matches!(self.state(), LoadState::Ready(_))
    }

    /// Whether this model lets the server report ready: loaded, or lazy and
    /// loadable (or loaded once before), and never failed.
    pub fn allows_readiness(&self) -> bool {
        match self.state() {
            LoadState::Ready(_) => true,
            LoadState::Failed(_) => false,
            LoadState::Unloaded | LoadState::Loading => self.settled(),
        }
    }

    /// Past its start: anything but an eager model's first load in progress.
    pub fn settled(&self) -> bool {
        match self.state() {
            LoadState::Ready(_) | LoadState::Failed(_) => true,
            LoadState::Unloaded | LoadState::Loading => {
                self.settings.load == LoadPolicy::Lazy || self.ever_loaded.load(Ordering::SeqCst)
            }
        }
    }

    /// Why the model failed, when it did.
    pub fn failure(&self) -> Option<String> {
        match self.state() {
            LoadState::Failed(message) => Some(message),
            _ => None,
        }
    }

    /// The model's interface, once it has been loaded at least once.
    pub fn interface(&self) -> Option<&ModelInterface> {
        self.interface.get()
    }

    /// The interface, or "not ready" when the model has never loaded.
    pub fn interface_or_not_ready(&self) -> Result<&ModelInterface, ApiError> {
        if let LoadState::Failed(message) = self.state() {
            return Err(ApiError::ModelFailed {
                model: self.name.clone(),
                message,
            });
        }
        self.interface()
            .ok_or_else(|| ApiError::ModelNotReady(self.name.clone()))
    }

    /// A failed load is tried again after a pause when the model is lazy or had
    /// loaded before (a transient failure on reload); an eager model that never
    /// loaded stays failed, and readiness says so.
    fn may_retry_load(&self) -> bool {
        let retriable =
            self.settings.load == LoadPolicy::Lazy || self.ever_loaded.load(Ordering::SeqCst);
        let waited = self
            .failed_at
            .lock()
            .ok()
            .and_then(|t| t.map(|t| t.elapsed()))
            .is_none_or(|elapsed| elapsed >= LOAD_RETRY_PAUSE);
        retriable && waited
    }

    /// Predictions running on this model now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    fn touch(&self) {
        if let Ok(mut last) = self.last_used.lock() {
            *last = Instant::now();
        }
    }

    /// The version string protocols report.
    pub fn version_label(&self) -> String {
        self.version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "1".into())
    }
}

/// A model in use: holds one of its concurrency slots and keeps it from being
/// evicted until dropped.
pub struct ModelLease {
    pub pipeline: Arc<dyn Pipeline>,
    _use: InUse,
    _slot: OwnedSemaphorePermit,
}

/// Counts a prediction as running on a model while it lives.
struct InUse(Arc<ServedModel>);

impl InUse {
    fn new(model: &Arc<ServedModel>) -> Self {
        model.in_use.fetch_add(1, Ordering::SeqCst);
        InUse(Arc::clone(model))
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a failed (re)load waits before the next request may try again.
const LOAD_RETRY_PAUSE: Duration = Duration::from_secs(10);

/// Run the loader on this (blocking) thread and record the outcome on the model.
fn load_now(model: &ServedModel, metrics: &Metrics) -> Result<Arc<dyn Pipeline>, String> {
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (model.loader)()))
        .unwrap_or_else(|_| Err("the loader panicked".into()));
    let seconds = started.elapsed().as_secs_f64();
    metrics.model_loaded(&model.name, seconds, outcome.is_ok());
    match &outcome {
        Ok(pipeline) => {
            tracing::info!(model = %model.name, reference = %model.reference, seconds, "model loaded");
            let _ = model.interface.set(pipeline.interface().clone());
            if let Some(bytes) = pipeline.resident_bytes() {
                model.resident_bytes.store(bytes, Ordering::SeqCst);
                metrics.model_resident(&model.name, bytes);
            }
            model.ever_loaded.store(true, Ordering::SeqCst);
            model.touch();
            model.set_state(LoadState::Ready(Arc::clone(pipeline)));
        }
        Err(message) => {
            tracing::error!(model = %model.name, reference = %model.reference, %message, "model failed to load");
            if let Ok(mut failed_at) = model.failed_at.lock() {
                *failed_at = Some(Instant::now());
            }
            model.set_state(LoadState::Failed(message.clone()));
        }
    }
    model.load_done.send_modify(|v| *v += 1);
    outcome
}

/// Shared state behind every route.
pub struct AppState {
    pub models: Vec<Arc<ServedModel>>,
    pub metrics: Arc<Metrics>,
    pub body_limit: usize,
    pub started: Instant,
    /// Bytes all loaded models may take together.
    pub memory_budget: Option<u64>,
    /// One failed model makes the server unready (else only itself).
    pub strict_readiness: bool,
    /// Cog's routes: input strictness and queueing behind busy slots.
    pub cog: crate::config::CogSection,
    /// Generated images behind OpenAI `url` responses.
    pub image_links: crate::image_links::ImageLinks,
    /// Where the OpenAI routes are mounted (`/` or a prefix), for image links.
    pub openai_mount: String,
    /// API keys; empty means no authentication.
    pub api_keys: Vec<String>,
    pub jobs: Jobs,
    /// Whether this process loads models and runs their jobs (false on a
    /// front of a shared queue: workers elsewhere run them).
    pub runs_models: bool,
    /// On a front: live workers per model, as last counted in the queue.
    pub remote_workers: Mutex<std::collections::HashMap<String, usize>>,
    /// Unix milliseconds when the server started.
    pub started_at_ms: i64,
    /// Signalled by Cog's `POST /shutdown`.
    pub shutdown: tokio::sync::Notify,
}

impl AppState {
    /// Unix milliseconds when the server started.
    pub fn started_unix_ms(&self) -> i64 {
        self.started_at_ms
    }

    /// Ask the server to stop gracefully.
    pub fn request_shutdown(&self) {
        self.shutdown.notify_one();
    }

    /// True once every eager model has loaded or failed and at least one can
    /// serve; with `strict_readiness`, only when none has failed.
    pub fn ready(&self) -> bool {
        if !self.runs_models {
            // A front is ready when workers serve its models.
            let workers = crate::jobs::lock(&self.remote_workers);
            let served = |m: &Arc<ServedModel>| workers.get(&m.name).is_some_and(|n| *n > 0);
            return if self.strict_readiness {
                self.models.iter().all(served)
            } else {
                self.models.iter().any(served)
            };
        }
        if self.strict_readiness {
            return self.models.iter().all(|m| m.allows_readiness());
        }
        self.models.iter().all(|m| m.settled()) && self.models.iter().any(|m| m.allows_readiness())
    }

    /// Refuse to load a model on a front whose workers run it.
    fn check_runs_here(&self, model: &ServedModel) -> Result<(), ApiError> {
        if self.runs_models {
            return Ok(());
        }
        Err(ApiError::Unavailable(format!(
            "model {:?} runs on workers behind the shared queue; this front serves it through the job routes (RunPod, Cog, OpenAI images) only",
            model.name
        )))
    }

    /// Models that failed to load, with the reasons.
    pub fn failures(&self) -> Vec<(String, String)> {
        self.models
            .iter()
            .filter_map(|m| m.failure().map(|reason| (m.name.clone(), reason)))
            .collect()
    }

    /// Look a model up by the name clients use.
    pub fn model(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
    }

    /// The model used when a request names none: the first served.
    pub fn default_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        self.models
            .first()
            .cloned()
            .ok_or_else(|| ApiError::ModelNotFound("(no models are served)".into()))
    }

    /// Take a concurrency slot on `model`, loading it first when it is not loaded
    /// (scale from zero). With `wait_for_startup` false, an eager model still on
    /// its first load answers "not ready" at once (synchronous protocols' 503).
    pub async fn lease(
        &self,
        model: &Arc<ServedModel>,
        wait_for_startup: bool,
    ) -> Result<ModelLease, ApiError> {
        self.check_runs_here(model)?;
        if !wait_for_startup
            && model.settings.load == LoadPolicy::Eager
            && !model.ever_loaded.load(Ordering::SeqCst)
        {
            if let LoadState::Failed(message) = model.state() {
                return Err(ApiError::ModelFailed {
                    model: model.name.clone(),
                    message,
                });
            }
            return Err(ApiError::ModelNotReady(model.name.clone()));
        }
        let slot = Arc::clone(&model.slots)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Internal("the model's slots are closed".into()))?;
        let in_use = InUse::new(model);
        let pipeline = self.ensure_loaded(model).await?;
        model.touch();
        Ok(ModelLease {
            pipeline,
            _use: in_use,
            _slot: slot,
        })
    }

    /// [`lease`](Self::lease) for a request answered directly (not a job): at
    /// most `max_queue` such requests wait for a slot; past that the client
    /// gets 429 with `Retry-After` instead of an unbounded backlog.
    pub async fn lease_bounded(&self, model: &Arc<ServedModel>) -> Result<ModelLease, ApiError> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if model.slots.available_permits() == 0 {
            let before = model.waiting.fetch_add(1, Ordering::SeqCst);
            let _waiting = Waiting(&model.waiting);
            if before >= model.settings.max_queue {
                return Err(ApiError::QueueFull {
                    model: model.name.clone(),
                    limit: model.settings.max_queue,
                });
            }
            return self.lease(model, false).await;
        }
        self.lease(model, false).await
    }

    /// Load `model` unless it is loaded; concurrent callers share one load. The
    /// load finishes and records its outcome even if every caller goes away.
    pub async fn ensure_loaded(
        &self,
        model: &Arc<ServedModel>,
    ) -> Result<Arc<dyn Pipeline>, ApiError> {
        let failed = |message: String| ApiError::ModelFailed {
            model: model.name.clone(),
            message,
        };
        self.check_runs_here(model)?;
        loop {
            if let LoadState::Ready(pipeline) = model.state() {
                return Ok(pipeline);
            }
            let mut finished = model.load_done.subscribe();
            let guard = model.load_lock.lock().await;
            match model.state() {
                LoadState::Ready(pipeline) => return Ok(pipeline),
                LoadState::Failed(message) if !model.may_retry_load() => {
                    return Err(failed(message));
                }
                LoadState::Loading => {
                    // A load whose caller went away is still running: wait for it.
                    drop(guard);
                    let _ = finished.changed().await;
                    continue;
                }
                LoadState::Failed(_) | LoadState::Unloaded => {}
            }
            self.make_room_for(model);
            model.set_state(LoadState::Loading);
            let (loading, metrics) = (Arc::clone(model), Arc::clone(&self.metrics));
            let outcome = tokio::task::spawn_blocking(move || load_now(&loading, &metrics))
                .await
                .unwrap_or_else(|e| Err(format!("the loading task failed: {e}")));
            drop(guard);
            return outcome.map_err(failed);
        }
    }

    /// Drop a loaded, idle model's weights; the next request loads it again.
    /// False when it is not loaded or is in use.
    pub fn unload(&self, model: &ServedModel, why: &str) -> bool {
        let previous = {
            let mut state = match model.state.write() {
                Ok(state) => state,
                Err(poisoned) => poisoned.into_inner(),
            };
            if !matches!(*state, LoadState::Ready(_)) || model.in_use() != 0 {
                return false;
            }
            std::mem::replace(&mut *state, LoadState::Unloaded)
        };
        self.metrics.model_unloaded(&model.name);
        tracing::info!(model = %model.name, why, "model unloaded");
        // Freeing gigabytes of weights is slow: keep it off the async threads.
        let release = move || {
            drop(previous);
            kiln_engine::memory::release_free_memory();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(release);
            }
            Err(_) => release(),
        }
        true
    }

    /// Evict least-recently-used idle models until `model` fits the budget.
    fn make_room_for(&self, model: &ServedModel) {
        let Some(budget) = self.memory_budget else {
            return;
        };
        loop {
            let loaded: u64 = self
                .models
                .iter()
                .filter(|m| m.name != model.name)
                .filter(|m| matches!(m.state(), LoadState::Ready(_) | LoadState::Loading))
                .map(|m| m.memory_estimate())
                .sum();
            if loaded + model.memory_estimate() <= budget {
                return;
            }
            let victim = self
                .models
                .iter()
                .filter(|m| m.is_ready() && m.name != model.name && m.in_use() == 0)
                .max_by_key(|m| m.idle_for());
            match victim {
                Some(victim) if self.unload(victim, "memory budget") => {}
                _ => {
                    tracing::warn!(model = %model.name, budget, loaded, "loading over the memory budget: every loaded model is busy");
                    return;
                }
            }
        }
    }

    /// Unload models idle past their `idle_unload`.
    pub fn unload_idle(&self) {
        for model in &self.models {
            if let Some(limit) = model.settings.idle_unload
                && model.is_ready()
                && model.in_use() == 0
                && model.idle_for() >= limit
            {
                self.unload(model, "idle");
            }
        }
    }
}
