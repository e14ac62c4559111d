//! The shared queue in Redis: jobs as hashes, one stream per model read by a
//! consumer group, so any number of fronts accept jobs and any number of
//! workers on any machines run them. A worker that dies mid-job stops
//! renewing its entry; after the visibility timeout another worker claims it
//! (XAUTOCLAIM) and the first one's late result is refused by the owner guard,
//! so a job completes exactly once. Events travel over pub/sub.

mod connection;
mod events;
mod record;
mod results;
mod scripts;

use connection::redacted;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncCommands, Script};
use tokio::sync::mpsc;

use super::backend::{Claim, Ending, JobBackend, Recovered, RemoteEvent};
use super::{Job, JobStatus, StoreError, SubmitError, now_ms};
use crate::config::{QueueSection, RestartPolicy};

/// The consumer group every worker reads a model's stream with.
const GROUP: &str = "workers";

/// The compiled scripts (sent by hash, loaded on first use).
struct Scripts {
    submit: Script,
    claim: Script,
    heartbeat: Script,
    finish: Script,
    retry: Script,
    hand_back: Script,
    delete_final: Script,
    depth: Script,
}

/// Jobs and queues in Redis.
pub struct RedisBackend {
    client: redis::Client,
    connection: ConnectionManager,
    /// Connections for blocking reads, one per waiting worker (a blocking
    /// command would stall every other command on a shared connection).
    blocking: Mutex<Vec<ConnectionManager>>,
    prefix: String,
    /// This process's consumer name, the owner of the jobs it claims.
    consumer: String,
    visibility: Duration,
    /// The models this process serves (and leaves at shutdown).
    models: Vec<String>,
    max_takeovers: u32,
    /// Jobs this process holds now: never taken over by itself when their
    /// heartbeats were late.
    held: Mutex<HashSet<String>>,
    /// Where each model's scan for abandoned entries resumes.
    reclaim_cursor: Mutex<HashMap<String, String>>,
    scripts: Scripts,
    /// Where large outputs go (None: all in Redis).
    results: Option<results::ResultFiles>,
    publisher: mpsc::UnboundedSender<(String, RemoteEvent)>,
    incoming: Mutex<Option<mpsc::UnboundedReceiver<(String, RemoteEvent)>>>,
}

impl RedisBackend {
    /// Connect, create each model's stream and group, and start the event
    /// relay. Fails when Redis cannot be reached now (a later loss is
    /// survived: connections reconnect).
    pub async fn connect(settings: &QueueSection, models: &[String]) -> Result<Self, StoreError> {
        let url = settings.url.as_deref().unwrap_or_default();
        let client = connection::client(settings)?;
        let connection = connection::manager(&client, Duration::from_secs(5))
            .await
            .map_err(|e| StoreError::new(format!("cannot reach {}: {e}", redacted(url))))?;
        let (publisher, outgoing) = mpsc::unbounded_channel();
        let (deliver, incoming) = mpsc::unbounded_channel();
        let backend = RedisBackend {
            client: client.clone(),
            connection: connection.clone(),
            blocking: Mutex::new(Vec::new()),
            prefix: settings.key_prefix.clone(),
            consumer: connection::consumer_name(),
            visibility: settings.visibility_timeout.max(Duration::from_millis(300)),
            models: models.to_vec(),
            max_takeovers: settings.max_takeovers.max(1),
            held: Mutex::new(HashSet::new()),
            reclaim_cursor: Mutex::new(HashMap::new()),
            scripts: Scripts {
                submit: Script::new(&scripts::with_waiting(scripts::SUBMIT)),
                claim: Script::new(scripts::CLAIM),
                heartbeat: Script::new(scripts::HEARTBEAT),
                finish: Script::new(scripts::FINISH),
                retry: Script::new(&scripts::with_waiting(scripts::RETRY)),
                hand_back: Script::new(scripts::HAND_BACK),
                delete_final: Script::new(scripts::DELETE_FINAL),
                depth: Script::new(&scripts::with_waiting(scripts::DEPTH)),
            },
            results: settings
                .results_dir
                .as_deref()
                .map(|dir| results::ResultFiles::new(dir, settings.inline_results))
                .transpose()?,
            publisher,
            incoming: Mutex::new(Some(incoming)),
        };
        for model in models {
            backend.ensure_group(model).await?;
        }
        let channel = backend.key("events");
        tokio::spawn(events::publish(
            connection,
            channel.clone(),
            backend.consumer.clone(),
            outgoing,
        ));
        tokio::spawn(events::subscribe(
            client,
            channel,
            backend.consumer.clone(),
            deliver,
        ));
        Ok(backend)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn job_key(&self, id: &str) -> String {
        self.key(&format!("job:{id}"))
    }

    fn queue_key(&self, model: &str) -> String {
        self.key(&format!("queue:{model}"))
    }

    fn workers_key(&self, model: &str) -> String {
        self.key(&format!("workers:{model}"))
    }

    fn counts_key(&self, model: &str) -> String {
        self.key(&format!("counts:{model}"))
    }

    /// The model's stream and consumer group (reading from the start, so jobs
    /// queued before the first worker came are not skipped).
    async fn ensure_group(&self, model: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.queue_key(model))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut connection)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Run `attempt`, re-creating the model's group once if Redis lost it (a
    /// restart without persistence).
    async fn with_group<T, F, Fut>(&self, model: &str, attempt: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match attempt().await {
            Err(e) if e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP") => {
                self.ensure_group(model).await?;
                Ok(attempt().await?)
            }
            other => Ok(other?),
        }
    }

    fn blocking_connection(&self) -> Option<ConnectionManager> {
        self.blocking.lock().ok().and_then(|mut pool| pool.pop())
    }

    fn return_blocking(&self, connection: ConnectionManager) {
        if let Ok(mut pool) = self.blocking.lock() {
            pool.push(connection);
        }
    }

    /// Claim the job behind a delivered entry; None when the entry was stale.
    async fn claim_entry(
        &self,
        model: &str,
        entry: &StreamId,
        reclaimed: bool,
    ) -> Result<Option<Claim>, StoreError> {
        let Some(id) = entry.get::<String>("id") else {
            return Ok(None);
        };
        let mut connection = self.connection.clone();
        if reclaimed && super::lock(&self.held).contains(&id) {
            // Ours, its heartbeat only late: renew it rather than run it twice.
            let _: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                .arg(self.queue_key(model))
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(0)
                .arg(&entry.id)
                .arg("JUSTID")
                .query_async(&mut connection)
                .await;
            return Ok(None);
        }
        let claimed: i64 = self
            .scripts
            .claim
            .key(self.job_key(&id))
            .key(self.queue_key(model))
            .arg(GROUP)
            .arg(&entry.id)
            .arg(&self.consumer)
            .arg(now_ms())
            .arg(if reclaimed { "1" } else { "0" })
            .arg(self.max_takeovers)
            .invoke_async(&mut connection)
            .await?;
        if claimed != 1 && claimed != 2 {
            return Ok(None);
        }
        if reclaimed {
            tracing::warn!(job_id = %id, %model, "took over a job whose worker went silent");
        }
        super::lock(&self.held).insert(id.clone());
        Ok(Some(Claim {
            id,
            model: model.into(),
            exhausted: claimed == 2,
        }))
    }

    /// Delete result files whose jobs expired, every 30 s until the runtime
    /// stops (every process with the shared folder sweeps; removal is
    /// idempotent).
    pub fn sweep_results(self: &std::sync::Arc<Self>) {
        if self.results.is_none() {
            return;
        }
        let backend = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let key = backend.key("results");
                let mut connection = backend.connection.clone();
                let expired: redis::RedisResult<Vec<String>> = connection
                    .zrangebyscore_limit(&key, "-inf", now_ms(), 0, 500)
                    .await;
                let Ok(expired) = expired else { continue };
                if let Some(files) = &backend.results {
                    files.remove_all(expired.clone()).await;
                }
                if !expired.is_empty() {
                    let removed: redis::RedisResult<()> = connection.zrem(&key, &expired).await;
                    if let Err(e) = removed {
                        tracing::warn!(error = %e, "cannot forget swept result files");
                    }
                }
            }
        });
    }

    /// Register this process as a worker for each of `models` that `serves`
    /// (loaded, or loadable on demand), renewed until the runtime stops
    /// (fronts count live workers for readiness).
    pub fn announce_worker(
        self: &std::sync::Arc<Self>,
        models: Vec<String>,
        serves: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) {
        let backend = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            // Every second (a model that just loaded shows up at once); an
            // entry lapses a visibility timeout after its last renewal.
            let every = (backend.visibility / 3).min(Duration::from_secs(1));
            let lapse = backend.visibility.max(Duration::from_secs(3)).as_millis() as i64;
            loop {
                let now = now_ms();
                let until = now + lapse;
                let mut connection = backend.connection.clone();
                for model in models.iter().filter(|m| serves(m)) {
                    let key = backend.workers_key(model);
                    let renewed: redis::RedisResult<()> = redis::pipe()
                        .zadd(&key, &backend.consumer, until)
                        .ignore()
                        .zrembyscore(&key, "-inf", now)
                        .ignore()
                        .query_async(&mut connection)
                        .await;
                    if let Err(e) = renewed {
                        tracing::warn!(error = %e, "cannot renew this worker's registration; retrying");
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }
}

#[async_trait]
impl JobBackend for RedisBackend {
    async fn submit(&self, job: &Job, limit: usize) -> Result<(), SubmitError> {
        let fields = record::job_fields(job)?;
        let outcome: i64 = self
            .with_group(&job.model, || {
                let mut invocation = self.scripts.submit.key(self.job_key(&job.id));
                invocation
                    .key(self.queue_key(&job.model))
                    .arg(GROUP)
                    .arg(limit)
                    .arg(&job.id);
                for (name, value) in &fields {
                    invocation.arg(*name).arg(value);
                }
                let mut connection = self.connection.clone();
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        match outcome {
            1 => Ok(()),
            -1 => Err(SubmitError::Duplicate(job.id.clone())),
            _ => Err(SubmitError::QueueFull {
                model: job.model.clone(),
                limit,
            }),
        }
    }

    async fn insert(&self, job: &Job) -> Result<(), StoreError> {
        let fields = record::job_fields(job)?;
        let mut connection = self.connection.clone();
        let () = connection
            .hset_multiple(self.job_key(&job.id), &fields)
            .await?;
        Ok(())
    }

    async fn get(&self, id: &str, _now: i64) -> Result<Option<Job>, StoreError> {
        let mut connection = self.connection.clone();
        let mut fields: HashMap<String, String> = connection.hgetall(self.job_key(id)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let file = fields.remove("output_file");
        let mut job = record::job_from_fields(fields)?;
        if let Some(name) = file {
            let files = self.results.as_ref().ok_or_else(|| {
                StoreError::new("the job's output is on the shared results volume, which this process does not mount ([queue] results_dir)")
            })?;
            job.output = Some(files.read(&name).await?);
        }
        Ok(Some(job))
    }

    async fn claim_next(&self, model: &str, wait: Duration) -> Result<Option<Claim>, StoreError> {
        let queue = self.queue_key(model);
        // First, a job whose worker went silent past the visibility timeout:
        // the scan resumes where the last one stopped, so long-running healthy
        // jobs at the head of the list never hide an abandoned one behind them.
        let connection = self.connection.clone();
        for _ in 0..8 {
            let start = super::lock(&self.reclaim_cursor)
                .get(model)
                .cloned()
                .unwrap_or_else(|| "0-0".into());
            let abandoned: StreamAutoClaimReply = self
                .with_group(model, || {
                    let mut connection = connection.clone();
                    let command = redis::cmd("XAUTOCLAIM")
                        .arg(&queue)
                        .arg(GROUP)
                        .arg(&self.consumer)
                        .arg(self.visibility.as_millis() as u64)
                        .arg(&start)
                        .arg("COUNT")
                        .arg(1)
                        .to_owned();
                    async move { command.query_async(&mut connection).await }
                })
                .await?;
            super::lock(&self.reclaim_cursor)
                .insert(model.to_string(), abandoned.next_stream_id.clone());
            for entry in &abandoned.claimed {
                if let Some(claim) = self.claim_entry(model, entry, true).await? {
                    return Ok(Some(claim));
                }
            }
            if abandoned.next_stream_id == "0-0" {
                break;
            }
        }
        // Then the next new one, waiting up to `wait` on a connection of its own.
        let mut blocking = match self.blocking_connection() {
            Some(connection) => connection,
            None => connection::manager(&self.client, wait + Duration::from_secs(5)).await?,
        };
        let read: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&queue)
            .arg(">")
            .query_async(&mut blocking)
            .await;
        self.return_blocking(blocking);
        let read = match read {
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group(model).await?;
                return Ok(None);
            }
            other => other?,
        };
        for stream in read.map(|r| r.keys).unwrap_or_default() {
            for entry in &stream.ids {
                if let Some(claim) = self.claim_entry(model, entry, false).await? {
                    return Ok(Some(claim));
                }
            }
        }
        Ok(None)
    }

    async fn status(&self, id: &str, _now: i64) -> Result<Option<JobStatus>, StoreError> {
        let mut connection = self.connection.clone();
        let status: Option<String> = connection.hget(self.job_key(id), "status").await?;
        status
            .map(|s| {
                JobStatus::parse(&s).ok_or_else(|| StoreError::new(format!("unknown status {s:?}")))
            })
            .transpose()
    }

    async fn heartbeat(&self, claim: &Claim) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let alive: i64 = self
            .scripts
            .heartbeat
            .key(self.job_key(&claim.id))
            .key(self.queue_key(&claim.model))
            .arg(GROUP)
            .arg(&self.consumer)
            .invoke_async(&mut connection)
            .await?;
        Ok(alive == 1)
    }

    fn heartbeat_interval(&self) -> Option<Duration> {
        Some(self.visibility / 3)
    }

    async fn hand_back(&self, claim: &Claim) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let handed: i64 = self
            .scripts
            .hand_back
            .key(self.job_key(&claim.id))
            .key(self.queue_key(&claim.model))
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(&claim.id)
            .invoke_async(&mut connection)
            .await?;
        super::lock(&self.held).remove(&claim.id);
        Ok(handed == 1)
    }

    async fn finish(
        &self,
        id: &str,
        claim: Option<&Claim>,
        ending: &Ending<'_>,
    ) -> Result<bool, StoreError> {
        let mut output = ending
            .output
            .map(serde_json::to_string)
            .transpose()?
            .unwrap_or_default();
        let mut file = String::new();
        if let Some(files) = &self.results
            && files.wants(output.len())
        {
            file = files.write(id, std::mem::take(&mut output)).await?;
        }
        let error = ending
            .error
            .map(serde_json::to_string)
            .transpose()?
            .unwrap_or_default();
        let owner = if claim.is_some() {
            &self.consumer[..]
        } else {
            ""
        };
        let mut connection = self.connection.clone();
        let finished: redis::RedisResult<i64> = self
            .scripts
            .finish
            .key(self.job_key(id))
            .key(self.queue_key(ending.model))
            .key(self.counts_key(ending.model))
            .key(self.key("results"))
            .arg(GROUP)
            .arg(owner)
            .arg(ending.status.as_str())
            .arg(output)
            .arg(error)
            .arg(ending.logs)
            .arg(ending.now)
            .arg(ending.expires_at)
            .arg(&file)
            .arg(ending.token)
            .invoke_async(&mut connection)
            .await;
        // After an error the write may have happened (a lost reply): the file
        // stays, and a retry with the same token finds the ending recorded.
        let finished = finished?;
        if claim.is_some() {
            super::lock(&self.held).remove(id);
        }
        // A refused ending, or a replay of one recorded with its own file,
        // leaves no new file behind.
        if finished != 1
            && let Some(files) = &self.results
        {
            files.remove(&file);
        }
        Ok(finished == 1 || finished == 2)
    }

    async fn retry(&self, job: &Job, limit: usize) -> Result<bool, SubmitError> {
        let outcome: i64 = self
            .with_group(&job.model, || {
                let mut connection = self.connection.clone();
                let mut invocation = self.scripts.retry.key(self.job_key(&job.id));
                invocation
                    .key(self.queue_key(&job.model))
                    .arg(GROUP)
                    .arg(limit)
                    .arg(&job.id);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        match outcome {
            -2 => Err(SubmitError::QueueFull {
                model: job.model.clone(),
                limit,
            }),
            n => Ok(n == 1),
        }
    }

    async fn queued_ids(&self, model: &str) -> Result<Vec<String>, StoreError> {
        let mut connection = self.connection.clone();
        let entries: redis::streams::StreamRangeReply =
            connection.xrange_all(self.queue_key(model)).await?;
        Ok(entries
            .ids
            .iter()
            .filter_map(|entry| entry.get::<String>("id"))
            .collect())
    }

    async fn depth(&self, model: &str) -> Result<usize, StoreError> {
        let waiting: i64 = self
            .with_group(model, || {
                let mut connection = self.connection.clone();
                let mut invocation = self.scripts.depth.key(self.queue_key(model));
                invocation.arg(GROUP);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        Ok(usize::try_from(waiting).unwrap_or(0))
    }

    async fn counts(&self, model: &str) -> Result<Vec<(JobStatus, u64, u64)>, StoreError> {
        let mut connection = self.connection.clone();
        let ended: HashMap<String, u64> = connection.hgetall(self.counts_key(model)).await?;
        let pending: redis::streams::StreamPendingReply = connection
            .xpending(self.queue_key(model), GROUP)
            .await
            .unwrap_or(redis::streams::StreamPendingReply::Empty);
        let waiting = self.depth(model).await? as u64;
        let mut counts = vec![
            (JobStatus::InQueue, waiting, 0),
            (JobStatus::InProgress, pending.count() as u64, 0),
        ];
        for status in JobStatus::ALL.into_iter().filter(|s| s.is_final()) {
            let count = ended.get(status.as_str()).copied().unwrap_or(0);
            let retried = ended
                .get(&format!("retried:{}", status.as_str()))
                .copied()
                .unwrap_or(0);
            counts.push((status, count, retried));
        }
        Ok(counts)
    }

    async fn delete_final(&self, id: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let deleted: i64 = self
            .scripts
            .delete_final
            .key(self.job_key(id))
            .invoke_async(&mut connection)
            .await?;
        Ok(deleted == 1)
    }

    async fn delete_expired(&self, _now: i64) -> Result<Vec<String>, StoreError> {
        // Redis expires finished jobs itself (PEXPIREAT at the end).
        Ok(Vec::new())
    }

    async fn recover(
        &self,
        _policy: RestartPolicy,
        _now: i64,
        _failed_ttl_ms: i64,
    ) -> Result<Recovered, StoreError> {
        // Nothing to do at start-up: jobs a dead worker held are taken over
        // after the visibility timeout by whichever worker asks first.
        Ok(Recovered {
            requeued: 0,
            orphans: Vec::new(),
        })
    }

    async fn workers(&self, model: &str) -> Result<Option<usize>, StoreError> {
        let mut connection = self.connection.clone();
        let live: usize = connection
            .zcount(self.workers_key(model), now_ms(), "+inf")
            .await?;
        Ok(Some(live))
    }

    fn publish(&self, id: &str, event: RemoteEvent) {
        let _ = self.publisher.send((id.to_string(), event));
    }

    fn remote_events(&self) -> Option<mpsc::UnboundedReceiver<(String, RemoteEvent)>> {
        self.incoming.lock().ok().and_then(|mut slot| slot.take())
    }

    fn wake_all(&self) {
        // Workers wait at most their read's block time.
    }

    async fn leave(&self) {
        let mut connection = self.connection.clone();
        for model in &self.models {
            let queue = self.queue_key(model);
            // Fronts stop counting this worker at once.
            let _: redis::RedisResult<()> = connection
                .zrem(self.workers_key(model), &self.consumer)
                .await;
            // The consumer goes from the group unless it still holds entries
            // (deleting it would drop them, and they must be taken over).
            let holding: redis::RedisResult<redis::streams::StreamPendingCountReply> = connection
                .xpending_consumer_count(&queue, GROUP, "-", "+", 1, &self.consumer)
                .await;
            if matches!(holding, Ok(reply) if reply.ids.is_empty()) {
                let removed: redis::RedisResult<i64> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&queue)
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .query_async(&mut connection)
                    .await;
                if let Err(e) = removed {
                    tracing::debug!(%model, error = %e, "cannot remove this consumer from the group");
                }
            }
        }
    }
}
