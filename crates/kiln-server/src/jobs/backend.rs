//! Where jobs are recorded and wait for a worker: one interface over the
//! embedded SQLite store with in-process queues (one machine, the default) and
//! Redis (many workers on many machines behind one endpoint).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use super::{Job, JobError, JobEvent, JobStatus, StoreError, SubmitError, lock, store::JobStore};
use crate::config::RestartPolicy;

/// A job this process took from the queue and must finish, keep alive or
/// give back.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: String,
    pub model: String,
    /// Taken over from workers that died running it as often as allowed
    /// (`[queue] max_takeovers`): the claimant fails it instead of running it.
    pub exhausted: bool,
}

/// A final state to record.
pub struct Ending<'a> {
    pub model: &'a str,
    pub status: JobStatus,
    pub output: Option<&'a Value>,
    pub error: Option<&'a JobError>,
    pub logs: &'a str,
    pub now: i64,
    pub expires_at: i64,
    /// Identifies this ending across retries of the same write, so a retry
    /// after a lost reply is recognised as already recorded.
    pub token: &'a str,
}

/// Something that happened to a job, told to the other processes sharing the
/// queue (the front that accepted it streams progress; the worker running it
/// stops on cancellation).
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteEvent {
    Job(JobEvent),
    Cancel,
}

/// What a restart found: jobs queued again, and jobs whose model is gone.
pub struct Recovered {
    pub requeued: usize,
    pub orphans: Vec<Job>,
}

/// The job store and queue, shared by every protocol and worker.
#[async_trait]
pub trait JobBackend: Send + Sync {
    /// Record a new job and queue it, unless its id is taken or `limit` jobs
    /// already wait for its model. Committed when this returns.
    async fn submit(&self, job: &Job, limit: usize) -> Result<(), SubmitError>;
    /// Record a job that will never run (its input was refused).
    async fn insert(&self, job: &Job) -> Result<(), StoreError>;
    /// The job, unless unknown or expired.
    async fn get(&self, id: &str, now: i64) -> Result<Option<Job>, StoreError>;
    /// Just the job's status (what waiters poll), unless unknown or expired.
    async fn status(&self, id: &str, now: i64) -> Result<Option<JobStatus>, StoreError>;
    /// Take the next job of `model` and mark it IN_PROGRESS for this process,
    /// waiting at most `wait` for one.
    async fn claim_next(&self, model: &str, wait: Duration) -> Result<Option<Claim>, StoreError>;
    /// Keep a claim alive; false when it is lost (the job ended, or another
    /// worker took it over after this one missed its visibility timeout).
    async fn heartbeat(&self, claim: &Claim) -> Result<bool, StoreError>;
    /// How often a running job's claim must be renewed (None: never).
    fn heartbeat_interval(&self) -> Option<Duration>;
    /// Put a claimed, unfinished job back in its queue (graceful shutdown of
    /// a worker); false when it was no longer this process's.
    async fn hand_back(&self, claim: &Claim) -> Result<bool, StoreError>;
    /// Record a final state for a queued or running job, only as its claimant
    /// when `claim` is given; false when it had already ended or was taken over.
    async fn finish(
        &self,
        id: &str,
        claim: Option<&Claim>,
        ending: &Ending<'_>,
    ) -> Result<bool, StoreError>;
    /// FAILED or TIMED_OUT → queued again; false for any other state.
    async fn retry(&self, job: &Job, limit: usize) -> Result<bool, SubmitError>;
    /// Ids of the jobs waiting for `model`, oldest first.
    async fn queued_ids(&self, model: &str) -> Result<Vec<String>, StoreError>;
    /// How many jobs wait for `model`.
    async fn depth(&self, model: &str) -> Result<usize, StoreError>;
    /// Jobs per status for `model`, with how many of them were retried.
    async fn counts(&self, model: &str) -> Result<Vec<(JobStatus, u64, u64)>, StoreError>;
    /// Remove a finished job so its id can be used again.
    async fn delete_final(&self, id: &str) -> Result<bool, StoreError>;
    /// Delete finished jobs whose results expired; their ids.
    async fn delete_expired(&self, now: i64) -> Result<Vec<String>, StoreError>;
    /// At start-up: apply the restart policy to jobs a previous run left.
    async fn recover(
        &self,
        policy: RestartPolicy,
        now: i64,
        failed_ttl_ms: i64,
    ) -> Result<Recovered, StoreError>;
    /// Live worker processes serving `model`; None where workers are this
    /// process's own (no question of "any worker").
    async fn workers(&self, model: &str) -> Result<Option<usize>, StoreError>;
    /// Tell the other processes; a no-op with one process.
    fn publish(&self, id: &str, event: RemoteEvent);
    /// Events other processes published, taken once by the job system.
    fn remote_events(&self) -> Option<mpsc::UnboundedReceiver<(String, RemoteEvent)>>;
    /// Wake every worker waiting in `claim_next` (shutdown).
    fn wake_all(&self);
    /// At the end of shutdown, after running jobs finished or went back:
    /// stop counting as a worker anywhere (no-op with one process).
    async fn leave(&self) {}
}

/// One model's queue of job ids in this process.
struct ModelQueue {
    pending: Mutex<VecDeque<String>>,
    ready: Notify,
}

/// The default backend: SQLite on this machine's disk, queues in memory
/// (rebuilt from the store at start-up).
pub struct LocalBackend {
    store: JobStore,
    queues: HashMap<String, Arc<ModelQueue>>,
}

impl LocalBackend {
    pub fn new(store: JobStore, models: &[String]) -> LocalBackend {
        let queues = models
            .iter()
            .map(|name| {
                let queue = ModelQueue {
                    pending: Mutex::new(VecDeque::new()),
                    ready: Notify::new(),
                };
                (name.clone(), Arc::new(queue))
            })
            .collect();
        LocalBackend { store, queues }
    }

    fn queue(&self, model: &str) -> Result<&Arc<ModelQueue>, SubmitError> {
        self.queues
            .get(model)
            .ok_or_else(|| SubmitError::UnknownModel(model.into()))
    }

    /// The queue, locked, if it has room for one more job (held while the job
    /// is recorded, so the bound is exact).
    fn reserve<'a>(
        queue: &'a ModelQueue,
        model: &str,
        limit: usize,
    ) -> Result<std::sync::MutexGuard<'a, VecDeque<String>>, SubmitError> {
        let pending = lock(&queue.pending);
        if pending.len() >= limit {
            return Err(SubmitError::QueueFull {
                model: model.into(),
                limit,
            });
        }
        Ok(pending)
    }
}

#[async_trait]
impl JobBackend for LocalBackend {
    async fn submit(&self, job: &Job, limit: usize) -> Result<(), SubmitError> {
        let queue = self.queue(&job.model)?;
        let mut pending = Self::reserve(queue, &job.model, limit)?;
        if self.store.exists(&job.id)? {
            return Err(SubmitError::Duplicate(job.id.clone()));
        }
        self.store.insert(job)?;
        pending.push_back(job.id.clone());
        drop(pending);
        queue.ready.notify_one();
        Ok(())
    }

    async fn insert(&self, job: &Job) -> Result<(), StoreError> {
        self.store.insert(job)
    }

    async fn get(&self, id: &str, now: i64) -> Result<Option<Job>, StoreError> {
        self.store.get(id, now)
    }

    async fn status(&self, id: &str, now: i64) -> Result<Option<JobStatus>, StoreError> {
        self.store.status(id, now)
    }

    async fn claim_next(&self, model: &str, wait: Duration) -> Result<Option<Claim>, StoreError> {
        let Some(queue) = self.queues.get(model) else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let ready = queue.ready.notified();
            let (next, more) = {
                let mut pending = lock(&queue.pending);
                (pending.pop_front(), !pending.is_empty())
            };
            let Some(id) = next else {
                if tokio::time::timeout_at(deadline, ready).await.is_err() {
                    return Ok(None);
                }
                continue;
            };
            // Wake-ups coalesce: pass one on while work remains.
            if more {
                queue.ready.notify_one();
            }
            match self.store.start(&id, super::now_ms()) {
                Ok(true) => {
                    return Ok(Some(Claim {
                        id,
                        model: model.into(),
                        exhausted: false,
                    }));
                }
                // Cancelled while it waited.
                Ok(false) => continue,
                Err(e) => {
                    // Still IN_QUEUE in the store: keep it for the next try.
                    lock(&queue.pending).push_front(id);
                    return Err(e);
                }
            }
        }
    }

    async fn heartbeat(&self, _claim: &Claim) -> Result<bool, StoreError> {
        Ok(true)
    }

    fn heartbeat_interval(&self) -> Option<Duration> {
        None
    }

    async fn hand_back(&self, _claim: &Claim) -> Result<bool, StoreError> {
        // The next start re-queues it (or fails it) by the restart policy.
        Ok(false)
    }

    async fn finish(
        &self,
        id: &str,
        _claim: Option<&Claim>,
        ending: &Ending<'_>,
    ) -> Result<bool, StoreError> {
        let ended = self.store.finish(
            id,
            ending.status,
            ending.output,
            ending.error,
            ending.logs,
            ending.now,
            ending.expires_at,
        )?;
        if ended && let Some(queue) = self.queues.get(ending.model) {
            lock(&queue.pending).retain(|queued| queued != id);
        }
        Ok(ended)
    }

    async fn retry(&self, job: &Job, limit: usize) -> Result<bool, SubmitError> {
        let queue = self.queue(&job.model)?;
        let mut pending = Self::reserve(queue, &job.model, limit)?;
        if !self.store.retry(&job.id)? {
            return Ok(false);
        }
        pending.push_back(job.id.clone());
        drop(pending);
        queue.ready.notify_one();
        Ok(true)
    }

    async fn queued_ids(&self, model: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .queues
            .get(model)
            .map(|q| lock(&q.pending).iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn depth(&self, model: &str) -> Result<usize, StoreError> {
        Ok(self.queues.get(model).map_or(0, |q| lock(&q.pending).len()))
    }

    async fn counts(&self, model: &str) -> Result<Vec<(JobStatus, u64, u64)>, StoreError> {
        self.store.counts(model)
    }

    async fn delete_final(&self, id: &str) -> Result<bool, StoreError> {
        self.store.delete_final(id)
    }

    async fn delete_expired(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.store.delete_expired(now)
    }

    async fn recover(
        &self,
        policy: RestartPolicy,
        now: i64,
        failed_ttl_ms: i64,
    ) -> Result<Recovered, StoreError> {
        let mut recovered = Recovered {
            requeued: 0,
            orphans: Vec::new(),
        };
        for job in self.store.recover(policy, now, failed_ttl_ms)? {
            match self.queues.get(&job.model) {
                Some(queue) => {
                    lock(&queue.pending).push_back(job.id.clone());
                    queue.ready.notify_one();
                    recovered.requeued += 1;
                }
                None => recovered.orphans.push(job),
            }
        }
        Ok(recovered)
    }

    async fn workers(&self, _model: &str) -> Result<Option<usize>, StoreError> {
        Ok(None)
    }

    fn publish(&self, _id: &str, _event: RemoteEvent) {}

    fn remote_events(&self) -> Option<mpsc::UnboundedReceiver<(String, RemoteEvent)>> {
        None
    }

    fn wake_all(&self) {
        for queue in self.queues.values() {
            queue.ready.notify_waiters();
        }
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
        });
        let poisoner = Arc::clone(&queue);
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.pending.lock();
            panic!("a panic while the queue is locked");
        })
        .join();
        assert!(queue.pending.is_poisoned());
        // Not "queue full" forever: there is room, and the queued job is kept.
        let mut pending = LocalBackend::reserve(&queue, "m", 4).expect("room in the queue");
        pending.push_back("next".into());
        drop(pending);
        assert!(!queue.pending.is_poisoned());
        assert_eq!(lock(&queue.pending).pop_front().as_deref(), Some("queued"));
    }
}
