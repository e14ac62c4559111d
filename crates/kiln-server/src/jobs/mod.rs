//! Durable jobs: every accepted job is committed to SQLite before the client hears
//! of it, queued per model under a bound, run by that model's workers with
//! progress, cancellation and an execution timeout, and kept for a TTL. Protocol
//! adapters (RunPod, Cog, OpenAI) submit jobs and render them in their shapes.

mod job;
mod live;
pub mod store;
pub(crate) mod webhook;
mod worker;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;

use crate::config::JobsSection;
use crate::metrics::Metrics;
use crate::state::AppState;
pub use job::{InputProblem, Job, JobError, JobOptions, JobStatus, Protocol, SubmitError, now_ms};
pub use live::{JobEvent, LiveJob};
pub use store::{JobStore, StoreError};
pub use worker::progress_logs;

/// The longest a request may ask results to be kept (RunPod `policy.ttl`).
const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

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

/// One model's queue of job ids.
struct ModelQueue {
    pending: Mutex<VecDeque<String>>,
    ready: Notify,
    limit: usize,
}

impl ModelQueue {
    /// The queue, locked, if it has room for one more job (held while the job
    /// is recorded, so the bound is exact).
    fn reserve(
        &self,
        model: &str,
    ) -> Result<std::sync::MutexGuard<'_, VecDeque<String>>, SubmitError> {
        let full = || SubmitError::QueueFull {
            model: model.into(),
            limit: self.limit,
        };
        let pending = lock(&self.pending);
        if pending.len() >= self.limit {
            return Err(full());
        }
        Ok(pending)
    }
}

/// The job system: store, per-model queues, live jobs and webhook delivery.
pub struct Jobs {
    pub store: JobStore,
    pub settings: JobsSection,
    queues: HashMap<String, Arc<ModelQueue>>,
    live: Mutex<HashMap<String, Arc<LiveJob>>>,
    webhooks: webhook::Sender,
    /// Jobs this process is running now.
    running: std::sync::atomic::AtomicUsize,
    /// Set at shutdown: workers take no new jobs.
    draining: AtomicBool,
    /// Where final states are counted (cancellations are counted here).
    metrics: Arc<Metrics>,
    drained: Notify,
}

impl Jobs {
    /// Stop taking new jobs and wait (up to `grace`) for running ones to record
    /// their results; jobs still queued stay queued for the next start.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        for queue in self.queues.values() {
            queue.ready.notify_waiters();
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.running.load(Ordering::SeqCst) > 0 {
            let wait = self.drained.notified();
            if self.running.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                tracing::warn!(
                    running = self.running.load(Ordering::SeqCst),
                    "shutdown grace period over: unfinished jobs run again at the next start"
                );
                break;
            }
        }
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// A job system for these models (name, queue bound).
    pub fn new(
        store: JobStore,
        settings: JobsSection,
        models: &[(String, usize)],
        metrics: Arc<Metrics>,
    ) -> Jobs {
        let queues = models
            .iter()
            .map(|(name, limit)| {
                (
                    name.clone(),
                    Arc::new(ModelQueue {
                        pending: Mutex::new(VecDeque::new()),
                        ready: Notify::new(),
                        limit: *limit,
                    }),
                )
            })
            .collect();
        let webhooks = webhook::Sender::new(
            settings.webhook_retries,
            settings.webhook_retry_delay,
            settings.webhook_private_addresses,
        );
        Jobs {
            store,
            settings,
            queues,
            live: Mutex::new(HashMap::new()),
            webhooks,
            running: std::sync::atomic::AtomicUsize::new(0),
            metrics,
            draining: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    fn queue(&self, model: &str) -> Option<&Arc<ModelQueue>> {
        self.queues.get(model)
    }

    /// Jobs waiting for `model`.
    pub fn queue_depth(&self, model: &str) -> usize {
        self.queue(model)
            .map(|q| lock(&q.pending).len())
            .unwrap_or(0)
    }

    /// The live companion of a queued or running job.
    pub fn live(&self, id: &str) -> Option<Arc<LiveJob>> {
        lock(&self.live).get(id).cloned()
    }

    fn track(&self, id: &str) -> Arc<LiveJob> {
        let live = Arc::new(LiveJob::new());
        lock(&self.live).insert(id.to_string(), Arc::clone(&live));
        live
    }

    /// Accept a job: committed to the store, then queued. Refused when the
    /// model's queue is at its bound.
    pub fn submit(
        &self,
        id: Option<String>,
        model: &str,
        protocol: Protocol,
        input: Value,
        options: JobOptions,
    ) -> Result<Job, SubmitError> {
        let queue = self
            .queue(model)
            .ok_or_else(|| SubmitError::UnknownModel(model.into()))?;
        let mut pending = queue.reserve(model)?;
        let id = match id {
            Some(id) => {
                if self.store.exists(&id)? {
                    return Err(SubmitError::Duplicate(id));
                }
                id
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        let job = Job::queued(id.clone(), model, protocol, input, options);
        self.store.insert(&job)?;
        self.track(&id);
        pending.push_back(id);
        drop(pending);
        queue.ready.notify_one();
        Ok(job)
    }

    /// Record a job that fails before it is queued (its input broke the schema).
    pub fn reject(
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
        self.store.insert(&job)?;
        self.record_failure(&job.id, &job.options, &error)?;
        let failed = self
            .get(&job.id)?
            .ok_or_else(|| StoreError::from(rusqlite::Error::QueryReturnedNoRows))?;
        self.metrics
            .job_ended(&failed.model, JobStatus::Failed.as_str());
        // The client that gave a webhook hears of the failure there too.
        self.deliver_final(&failed);
        Ok(failed)
    }

    /// Forget a finished job (its record and live events), freeing its id.
    pub fn forget_final(&self, id: &str) -> Result<bool, StoreError> {
        let removed = self.store.delete_final(id)?;
        if removed {
            lock(&self.live).remove(id);
        }
        Ok(removed)
    }

    /// The job as stored now, unless unknown or expired.
    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.store.get(id, now_ms())
    }

    /// Wait until the job ends or `timeout` passes; returns its state then.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Job>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut changes = self.live(id).map(|l| l.subscribe());
            let job = self.get(id)?;
            match (&job, &mut changes) {
                (Some(job), Some(changes)) if !job.status.is_final() => {
                    if tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_err()
                    {
                        return self.get(id);
                    }
                }
                _ => return Ok(job),
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
    /// stops at its next step. Returns the job as it is afterwards.
    pub fn cancel(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let Some(job) = self.get(id)? else {
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
        let cancelled = self.store.finish(
            id,
            JobStatus::Cancelled,
            None,
            Some(&error),
            &logs,
            now,
            self.expiry(&job.options, now),
        )?;
        if cancelled {
            // The worker of a running job finds it already final and does
            // not count it again.
            self.metrics
                .job_ended(&job.model, JobStatus::Cancelled.as_str());
            if let Some(queue) = self.queue(&job.model) {
                lock(&queue.pending).retain(|queued| queued != id);
            }
            if let Some(live) = self.live(id) {
                live.cancelled.store(true, Ordering::SeqCst);
                live.push(JobEvent::Finished);
            }
        }
        let job = self.get(id)?;
        if cancelled && let Some(job) = &job {
            self.deliver_final(job);
        }
        Ok(job)
    }

    /// Queue a FAILED or TIMED_OUT job again. `Ok(None)` when it is unknown,
    /// `Ok(Some(false))` when it is in another state.
    pub fn retry(&self, id: &str) -> Result<Option<bool>, SubmitError> {
        let Some(job) = self.get(id)? else {
            return Ok(None);
        };
        let Some(queue) = self.queue(&job.model) else {
            return Ok(Some(false));
        };
        let mut pending = queue.reserve(&job.model)?;
        if !self.store.retry(id)? {
            return Ok(Some(false));
        }
        self.track(id);
        pending.push_back(id.to_string());
        drop(pending);
        queue.ready.notify_one();
        Ok(Some(true))
    }

    /// Cancel every queued job of `model`; returns how many.
    pub fn purge_queue(&self, model: &str) -> Result<usize, StoreError> {
        let ids: Vec<String> = match self.queue(model) {
            Some(queue) => lock(&queue.pending).drain(..).collect(),
            None => Vec::new(),
        };
        // Every drained id is cancelled even if one fails, so none is stranded.
        let mut removed = 0;
        let mut first_error = None;
        for id in ids {
            match self.cancel(&id) {
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
    pub fn recover(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let queued = self.store.recover(
            self.settings.on_restart,
            now,
            self.settings.result_ttl.as_millis() as i64,
        )?;
        let mut count = 0;
        for job in queued {
            match self.queue(&job.model) {
                Some(queue) => {
                    self.track(&job.id);
                    lock(&queue.pending).push_back(job.id.clone());
                    count += 1;
                    queue.ready.notify_one();
                }
                None => {
                    let error = JobError::Failed {
                        message: format!("model {:?} is no longer served", job.model),
                    };
                    self.record_failure(&job.id, &job.options, &error)?;
                }
            }
        }
        Ok(count)
    }

    /// Start each model's workers and the housekeeping task (TTL purge, idle
    /// unloading). Runs until the runtime stops.
    pub fn start(state: &Arc<AppState>) {
        for model in &state.models {
            for _ in 0..model.settings.concurrency.max(1) {
                tokio::spawn(worker::run(Arc::clone(state), Arc::clone(model)));
            }
        }
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                state.unload_idle();
                match state.jobs.store.delete_expired(now_ms()) {
                    Ok(ids) => {
                        let mut live = lock(&state.jobs.live);
                        for id in &ids {
                            live.remove(id);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot purge expired jobs"),
                }
            }
        });
    }

    /// Store a queued or running job as FAILED now; false if it had already ended.
    fn record_failure(
        &self,
        id: &str,
        options: &JobOptions,
        error: &JobError,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        self.store.finish(
            id,
            JobStatus::Failed,
            None,
            Some(error),
            "",
            now,
            self.expiry(options, now),
        )
    }

    /// Record a job as FAILED from outside its normal path (a worker fault).
    fn fail(&self, id: &str, message: String) {
        let options = self
            .get(id)
            .ok()
            .flatten()
            .map(|j| j.options)
            .unwrap_or_default();
        let error = JobError::Failed { message };
        match self.record_failure(id, &options, &error) {
            Ok(true) => {
                if let Some(live) = self.live(id) {
                    live.push(JobEvent::Finished);
                }
                if let Ok(Some(job)) = self.get(id) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_poisoned_by_a_panic_keeps_taking_and_giving_jobs() {
        let queue = Arc::new(ModelQueue {
            pending: Mutex::new(VecDeque::from(["queued".to_string()])),
            ready: Notify::new(),
            limit: 4,
        });
        let poisoner = Arc::clone(&queue);
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.pending.lock();
            panic!("a panic while the queue is locked");
        })
        .join();
        assert!(queue.pending.is_poisoned());
        // Not "queue full" forever: there is room, and the queued job is kept.
        let mut pending = queue.reserve("m").expect("room in the queue");
        pending.push_back("next".into());
        drop(pending);
        assert!(!queue.pending.is_poisoned());
        assert_eq!(lock(&queue.pending).pop_front().as_deref(), Some("queued"));
    }
}
