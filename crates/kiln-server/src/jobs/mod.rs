//! Durable jobs: every accepted job is committed to SQLite before the client hears
//! of it, queued per model under a bound, run by that model's workers with
//! progress, cancellation and an execution timeout, and kept for a TTL. Protocol
//! adapters (RunPod, Cog, OpenAI) submit jobs and render them in their shapes.

pub mod backend;
mod job;
mod live;
pub mod redis_queue;
pub mod store;
pub(crate) mod webhook;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;

use crate::config::JobsSection;
use crate::metrics::Metrics;
use crate::state::AppState;
pub use backend::{Claim, JobBackend, LocalBackend, RemoteEvent};
pub use job::{InputProblem, Job, JobError, JobOptions, JobStatus, Protocol, SubmitError, now_ms};
pub use live::{JobEvent, LiveJob};
pub use redis_queue::RedisBackend;
pub use store::{JobStore, StoreError};
pub use worker::progress_logs;

/// The longest a request may ask results to be kept (RunPod `policy.ttl`).
const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// How often a waiter looks at the job itself besides waiting for its events
/// (events from other processes can be lost while Redis reconnects).
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Lock `mutex`, recovering it when a thread panicked while holding it: the
/// queues and maps behind these locks are whole after every single operation,
/// so their data is kept (a poisoned lock once read as a full queue forever).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        tracing::warn!("a job lock was poisoned by a panic; recovered it");
        mutex.clear_poison();
        poisoned.into_inner()
    })
}

/// The job system: the backend (store and queues), live jobs and webhook
/// delivery.
pub struct Jobs {
    backend: Arc<dyn JobBackend>,
    pub settings: JobsSection,
    /// Each served model's queue bound.
    limits: HashMap<String, usize>,
    live: Mutex<HashMap<String, Arc<LiveJob>>>,
    webhooks: webhook::Sender,
    /// Jobs this process is running now.
    running: Mutex<HashMap<String, Claim>>,
    /// Workers between asking for a job and recording it as running.
    claiming: std::sync::atomic::AtomicUsize,
    /// Set at shutdown: workers take no new jobs.
    draining: AtomicBool,
    /// Where final states are counted (cancellations are counted here).
    metrics: Arc<Metrics>,
    drained: Notify,
}

impl Jobs {
    /// Stop taking new jobs and wait (up to `grace`) for running ones to record
    /// their results. Jobs still running then go back to the shared queue (or,
    /// with the local store, run again at the next start); queued jobs stay.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        self.backend.wake_all();
        let deadline = tokio::time::Instant::now() + grace;
        while self.running_count() > 0 {
            let wait = self.drained.notified();
            if self.running_count() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                let unfinished: Vec<Claim> = lock(&self.running).values().cloned().collect();
                tracing::warn!(
                    running = unfinished.len(),
                    "shutdown grace period over: handing unfinished jobs back"
                );
                for claim in unfinished {
                    match self.backend.hand_back(&claim).await {
                        Ok(true) => {
                            // Stop computing it here: another worker runs it.
                            if let Some(live) = self.live(&claim.id) {
                                live.cancelled.store(true, Ordering::SeqCst);
                            }
                            tracing::info!(job_id = %claim.id, "job handed back to the queue")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(job_id = %claim.id, error = %e, "cannot hand a job back; another worker takes it after the visibility timeout")
                        }
                    }
                }
                break;
            }
        }
        self.backend.leave().await;
    }

    /// Jobs running here, and claims about to be (so shutdown waits for them).
    fn running_count(&self) -> usize {
        lock(&self.running).len() + self.claiming.load(Ordering::SeqCst)
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// A job system over `backend` for these models (name, queue bound).
    pub fn new(
        backend: Arc<dyn JobBackend>,
        settings: JobsSection,
        models: &[(String, usize)],
        metrics: Arc<Metrics>,
    ) -> Jobs {
        let webhooks = webhook::Sender::new(
            settings.webhook_retries,
            settings.webhook_retry_delay,
            settings.webhook_private_addresses,
        );
        Jobs {
            backend,
            settings,
            limits: models.iter().cloned().collect(),
            live: Mutex::new(HashMap::new()),
            webhooks,
            running: Mutex::new(HashMap::new()),
            claiming: std::sync::atomic::AtomicUsize::new(0),
            metrics,
            draining: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    /// Jobs waiting for `model` (0 when the backend cannot be asked now).
    pub async fn queue_depth(&self, model: &str) -> usize {
        match self.backend.depth(model).await {
            Ok(depth) => depth,
            Err(e) => {
                tracing::warn!(%model, error = %e, "cannot read the queue depth");
                0
            }
        }
    }

    /// Jobs per status for `model` (RunPod `/health`).
    pub async fn counts(&self, model: &str) -> Result<Vec<(JobStatus, u64, u64)>, StoreError> {
        self.backend.counts(model).await
    }

    /// Worker processes serving `model` through the shared queue; None when
    /// this process runs its own jobs.
    pub async fn workers(&self, model: &str) -> Result<Option<usize>, StoreError> {
        self.backend.workers(model).await
    }

    /// The live companion of a queued or running job.
    pub fn live(&self, id: &str) -> Option<Arc<LiveJob>> {
        lock(&self.live).get(id).cloned()
    }

    /// The job's live companion, created if it has none.
    fn track(&self, id: &str) -> Arc<LiveJob> {
        Arc::clone(
            lock(&self.live)
                .entry(id.to_string())
                .or_insert_with(|| Arc::new(LiveJob::new())),
        )
    }

    /// The companion for a run of the job: the current one unless it belongs
    /// to an earlier run (finished, or stopped: a retry, or a job this
    /// process lost and took back), which a new run must not inherit.
    fn track_run(&self, id: &str) -> Arc<LiveJob> {
        let mut live = lock(&self.live);
        match live.get(id) {
            Some(current) if !current.is_finished() && !current.is_cancelled() => {
                Arc::clone(current)
            }
            _ => {
                let fresh = Arc::new(LiveJob::new());
                live.insert(id.to_string(), Arc::clone(&fresh));
                fresh
            }
        }
    }

    /// Record an event of a job this process holds, and tell the others.
    pub(crate) fn emit(&self, id: &str, live: &LiveJob, event: JobEvent) {
        live.push(event.clone());
        self.backend.publish(id, RemoteEvent::Job(event));
    }

    /// Accept a job: committed to the store, then queued. Refused when the
    /// model's queue is at its bound.
    pub async fn submit(
        &self,
        id: Option<String>,
        model: &str,
        protocol: Protocol,
        input: Value,
        options: JobOptions,
    ) -> Result<Job, SubmitError> {
        let limit = *self
            .limits
            .get(model)
            .ok_or_else(|| SubmitError::UnknownModel(model.into()))?;
        let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let job = Job::queued(id.clone(), model, protocol, input, options);
        // Tracked before it is queued, so no event of a fast worker elsewhere
        // arrives before there is a record to take it.
        let created = !lock(&self.live).contains_key(&id);
        self.track(&id);
        if let Err(e) = self.backend.submit(&job, limit).await {
            if created {
                lock(&self.live).remove(&id);
            }
            return Err(e);
        }
        Ok(job)
    }

    /// Record a job that fails before it is queued (its input broke the schema).
    pub async fn reject(
        &self,
        model: &str,
        protocol: Protocol,
        input: Value,
        options: JobOptions,
        error: JobError,
    ) -> Result<Job, StoreError> {
        let job = Job::queued(
            uuid::Uuid::new_v4().to_string(),
            model,
            protocol,
            input,
            options,
        );
        self.backend.insert(&job).await?;
        self.record_failure(&job, &error).await?;
        let failed = self
            .get(&job.id)
            .await?
            .ok_or_else(|| StoreError::new("a rejected job vanished from the store"))?;
        self.metrics
            .job_ended(&failed.model, JobStatus::Failed.as_str());
        // The client that gave a webhook hears of the failure there too.
        self.deliver_final(&failed);
        Ok(failed)
    }

    /// Forget a finished job (its record and live events), freeing its id.
    pub async fn forget_final(&self, id: &str) -> Result<bool, StoreError> {
        let removed = self.backend.delete_final(id).await?;
        if removed {
            lock(&self.live).remove(id);
        }
        Ok(removed)
    }

    /// The job as stored now, unless unknown or expired.
    pub async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.backend.get(id, now_ms()).await
    }

    /// Wait until the job ends or `timeout` passes; returns its state then.
    /// Between events it polls only the job's status (never its input or
    /// output), and reads the whole job once at the end.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Job>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut changes = self.live(id).map(|l| l.subscribe());
            let status = self.backend.status(id, now_ms()).await?;
            let job = match status {
                Some(status) if !status.is_final() => {
                    if tokio::time::Instant::now() < deadline {
                        None
                    } else {
                        self.get(id).await?
                    }
                }
                Some(_) => self.get(id).await?,
                None => return Ok(None),
            };
            match &job {
                None => {
                    let now = tokio::time::Instant::now();
                    let poll = deadline.min(now + WAIT_POLL);
                    match &mut changes {
                        Some(changes) => {
                            let _ = tokio::time::timeout_at(poll, changes.changed()).await;
                        }
                        None => tokio::time::sleep_until(poll).await,
                    }
                }
                Some(job) if !job.status.is_final() => return Ok(Some(job.clone())),
                Some(job) => {
                    // The final event may have been lost on the way here.
                    if let Some(live) = self.live(&job.id)
                        && !live.is_finished()
                    {
                        live.push(JobEvent::Finished);
                    }
                    return Ok(Some(job.clone()));
                }
            }
        }
    }

    /// Wait until the job ends, however long it takes (synchronous protocols).
    pub async fn wait_final(&self, id: &str) -> Result<Option<Job>, StoreError> {
        loop {
            match self.wait(id, Duration::from_secs(3600)).await? {
                Some(job) if !job.status.is_final() => continue,
                other => return Ok(other),
            }
        }
    }

    /// Cancel a job that has not ended: a queued one never runs, a running one
    /// stops at its next step (wherever its worker is). Returns the job as it
    /// is afterwards.
    pub async fn cancel(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let Some(job) = self.get(id).await? else {
            return Ok(None);
        };
        if job.status.is_final() {
            return Ok(Some(job));
        }
        let now = now_ms();
        let error = JobError::Failed {
            message: "cancelled".into(),
        };
        // The logs so far live in memory until the job ends: keep them.
        let logs = match self.live(id) {
            Some(live) => progress_logs(&live.events()),
            None => job.logs.clone(),
        };
        let token = uuid::Uuid::new_v4().to_string();
        let ending = backend::Ending {
            token: &token,
            model: &job.model,
            status: JobStatus::Cancelled,
            output: None,
            error: Some(&error),
            logs: &logs,
            now,
            expires_at: self.expiry(&job.options, now),
        };
        let cancelled = self.backend.finish(id, None, &ending).await?;
        if cancelled {
            // The worker of a running job finds it already final and does
            // not count it again.
            self.metrics
                .job_ended(&job.model, JobStatus::Cancelled.as_str());
            self.backend.publish(id, RemoteEvent::Cancel);
            if let Some(live) = self.live(id) {
                live.cancelled.store(true, Ordering::SeqCst);
                live.push(JobEvent::Finished);
            }
        }
        let job = self.get(id).await?;
        if cancelled && let Some(job) = &job {
            self.deliver_final(job);
        }
        Ok(job)
    }

    /// Queue a FAILED or TIMED_OUT job again. `Ok(None)` when it is unknown,
    /// `Ok(Some(false))` when it is in another state.
    pub async fn retry(&self, id: &str) -> Result<Option<bool>, SubmitError> {
        let Some(job) = self.get(id).await? else {
            return Ok(None);
        };
        let Some(limit) = self.limits.get(&job.model) else {
            return Ok(Some(false));
        };
        let queued = self.backend.retry(&job, *limit).await?;
        if queued {
            self.track_run(id);
        }
        Ok(Some(queued))
    }

    /// Cancel every queued job of `model`; returns how many.
    pub async fn purge_queue(&self, model: &str) -> Result<usize, StoreError> {
        let ids = self.backend.queued_ids(model).await?;
        // Every queued id is cancelled even if one fails, so none is stranded.
        let mut removed = 0;
        let mut first_error = None;
        for id in ids {
            let queued = match self.get(&id).await {
                Ok(Some(job)) => job.status == JobStatus::InQueue,
                _ => true,
            };
            if !queued {
                continue;
            }
            match self.cancel(&id).await {
                Ok(Some(_)) => removed += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job_id = %id, error = %e, "cannot cancel a purged job");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// How long a finished job's results are kept: the request's TTL within
    /// [1 s, 7 days], else the configured default.
    fn ttl_ms(&self, options: &JobOptions) -> i64 {
        let default = if options.sync {
            self.settings.sync_result_ttl
        } else {
            self.settings.result_ttl
        };
        match options.ttl_ms {
            Some(ms) => ms.clamp(1_000, MAX_TTL_MS) as i64,
            None => i64::try_from(default.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// When a job finishing at `now` expires.
    fn expiry(&self, options: &JobOptions, now: i64) -> i64 {
        now.saturating_add(self.ttl_ms(options))
    }

    /// Re-queue jobs left by a previous run (per the restart policy). Call once,
    /// before the workers start.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let recovered = self
            .backend
            .recover(
                self.settings.on_restart,
                now_ms(),
                self.settings.result_ttl.as_millis() as i64,
            )
            .await?;
        for job in &recovered.orphans {
            let error = JobError::Failed {
                message: format!("model {:?} is no longer served", job.model),
            };
            self.record_failure(job, &error).await?;
        }
        Ok(recovered.requeued)
    }

    /// Start the workers of the models this process runs (none on a front
    /// that does not work), the relay of other processes' events, and the
    /// housekeeping task (TTL purge, idle unloading). Runs until the runtime
    /// stops.
    pub fn start(state: &Arc<AppState>, run_models: bool) {
        if run_models {
            for model in &state.models {
                for _ in 0..model.settings.concurrency.max(1) {
                    tokio::spawn(worker::run(Arc::clone(state), Arc::clone(model)));
                }
            }
        }
        if let Some(mut events) = state.jobs.backend.remote_events() {
            let state = Arc::clone(state);
            tokio::spawn(async move {
                while let Some((id, event)) = events.recv().await {
                    let Some(live) = state.jobs.live(&id) else {
                        continue;
                    };
                    match event {
                        RemoteEvent::Cancel => live.cancelled.store(true, Ordering::SeqCst),
                        RemoteEvent::Job(event) => {
                            if !live.is_finished() {
                                live.push(event);
                            }
                        }
                    }
                }
            });
        }
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                state.unload_idle();
                match state.jobs.backend.delete_expired(now_ms()).await {
                    Ok(ids) => {
                        let keep = state.jobs.settings.result_ttl;
                        let mut live = lock(&state.jobs.live);
                        for id in &ids {
                            live.remove(id);
                        }
                        // Where the store expires jobs by itself (Redis),
                        // companions go a result TTL after their job ended.
                        live.retain(|_, job| job.finished_for().is_none_or(|age| age < keep));
                        // Companions whose end this process never heard of
                        // (a lost event, a job cancelled through another
                        // front) go after a day plus the result TTL.
                        live.retain(|_, job| job.age() < keep + Duration::from_secs(24 * 3600));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot purge expired jobs"),
                }
            }
        });
    }

    /// Store a queued or running job as FAILED now; false if it had already ended.
    async fn record_failure(&self, job: &Job, error: &JobError) -> Result<bool, StoreError> {
        let now = now_ms();
        let token = uuid::Uuid::new_v4().to_string();
        let ending = backend::Ending {
            token: &token,
            model: &job.model,
            status: JobStatus::Failed,
            output: None,
            error: Some(error),
            logs: "",
            now,
            expires_at: self.expiry(&job.options, now),
        };
        self.backend.finish(&job.id, None, &ending).await
    }

    /// Record a job as FAILED from outside its normal path (a worker fault).
    async fn fail(&self, id: &str, message: String) {
        let Ok(Some(job)) = self.get(id).await else {
            tracing::error!(job_id = id, %message, "cannot read a failed job to record it");
            return;
        };
        let error = JobError::Failed { message };
        match self.record_failure(&job, &error).await {
            Ok(true) => {
                if let Some(live) = self.live(id) {
                    self.emit(id, &live, JobEvent::Finished);
                }
                if let Ok(Some(job)) = self.get(id).await {
                    self.deliver_final(&job);
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(job_id = id, error = %e, "cannot record a failed job"),
        }
    }

    /// Send the job's final webhook, if it has one.
    fn deliver_final(&self, job: &Job) {
        if wants_event(job, "completed")
            && let Some(url) = &job.options.webhook
        {
            let body = crate::protocols::webhook_body(job, self.live(&job.id).as_deref());
            self.send_webhook(job, url, body, true);
        }
    }

    /// Send a Cog `logs` webhook for progress, at most one per 500 ms.
    fn deliver_progress(&self, job: &Job, live: &LiveJob) {
        // A timed-out computation that is still winding down reports nothing more.
        if job.protocol != Protocol::Cog || job.options.webhook.is_none() || live.is_finished() {
            return;
        }
        let due = match live.last_webhook.lock() {
            Ok(mut last) => {
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
                if due {
                    *last = Some(std::time::Instant::now());
                }
                due
            }
            Err(_) => false,
        };
        if due {
            self.deliver_event(job, "logs");
        }
    }

    /// Send a non-final Cog webhook event when the job's filter wants it.
    fn deliver_event(&self, job: &Job, event: &str) {
        if job.protocol == Protocol::Cog
            && wants_event(job, event)
            && let Some(url) = &job.options.webhook
        {
            let body = crate::protocols::webhook_body(job, self.live(&job.id).as_deref());
            self.send_webhook(job, url, body, false);
        }
    }

    /// Send through the job's ordered channel (created on first use), so its
    /// events arrive in the order they happened; directly when it has no live
    /// record.
    fn send_webhook(&self, job: &Job, url: &str, body: Value, retry: bool) {
        let Some(live) = self.live(&job.id) else {
            self.webhooks.send(url.to_string(), body, retry);
            return;
        };
        let Ok(mut channel) = live.webhook_channel.lock() else {
            return;
        };
        let sender = channel.get_or_insert_with(|| self.webhooks.ordered(url.to_string()));
        if sender.send((body, retry)).is_err() {
            tracing::warn!(job_id = %job.id, "webhook channel closed");
        }
    }
}

/// Whether the job's webhook takes `event` (Cog's `webhook_events_filter`;
/// other protocols send their one final webhook always).
fn wants_event(job: &Job, event: &str) -> bool {
    match (&job.options.webhook_events, job.protocol) {
        (Some(filter), Protocol::Cog) => filter.iter().any(|e| e == event),
        _ => true,
    }
}
