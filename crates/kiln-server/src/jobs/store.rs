//! The durable job store: one SQLite table, written with `synchronous=FULL` in WAL
//! mode, so a job the client was told about survives a crash or a power cut.
//! Every state change is a guarded UPDATE, so a late writer (a worker finishing a
//! job that was cancelled meanwhile) never overwrites a final state.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;

use super::{Job, JobError, JobStatus, Protocol};
use crate::config::RestartPolicy;

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
#[error("job store: {message}")]
pub struct StoreError {
    message: String,
    /// The store cannot be reached now (a shared queue's connection): the
    /// service is unavailable, not broken.
    unreachable: bool,
}

impl StoreError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            unreachable: false,
        }
    }

    pub(crate) fn unreachable(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            unreachable: true,
        }
    }

    /// Whether retrying later may succeed (the store was unreachable).
    pub fn is_unreachable(&self) -> bool {
        self.unreachable
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::new(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::new(format!("stored JSON is unreadable: {e}"))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    model        TEXT NOT NULL,
    protocol     TEXT NOT NULL,
    input        TEXT NOT NULL,
    options      TEXT NOT NULL,
    status       TEXT NOT NULL,
    output       TEXT,
    error        TEXT,
    logs         TEXT NOT NULL DEFAULT '',
    retries      INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    completed_at INTEGER,
    expires_at   INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, model, seq);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at);
";

const COLUMNS: &str = "id, model, protocol, input, options, status, output, error, logs, retries, created_at, started_at, completed_at";

/// Jobs on disk (or in memory for tests and embedders that need no durability).
pub struct JobStore {
    connection: Mutex<Connection>,
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(StoreError::from)
}

/// A job as a store keeps it: enums and JSON as text. Both backends decode
/// through this one place.
pub(crate) struct StoredJob {
    pub id: String,
    pub model: String,
    pub protocol: String,
    pub input: String,
    pub options: String,
    pub status: String,
    pub output: Option<String>,
    pub error: Option<String>,
    pub logs: String,
    pub retries: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
}

impl StoredJob {
    pub(crate) fn decode(self) -> Result<Job, StoreError> {
        let protocol = &self.protocol;
        let status = &self.status;
        Ok(Job {
            protocol: Protocol::parse(protocol)
                .ok_or_else(|| StoreError::new(format!("unknown protocol {protocol:?}")))?,
            input: serde_json::from_str(&self.input)?,
            options: serde_json::from_str(&self.options)?,
            status: JobStatus::parse(status)
                .ok_or_else(|| StoreError::new(format!("unknown status {status:?}")))?,
            output: self.output.map(|o| serde_json::from_str(&o)).transpose()?,
            error: self.error.map(|e| serde_json::from_str(&e)).transpose()?,
            retries: u32::try_from(self.retries.max(0)).unwrap_or(u32::MAX),
            id: self.id,
            model: self.model,
            logs: self.logs,
            created_at: self.created_at,
            started_at: self.started_at,
            completed_at: self.completed_at,
        })
    }
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Job, StoreError>> {
    let stored = StoredJob {
        id: row.get(0)?,
        model: row.get(1)?,
        protocol: row.get(2)?,
        input: row.get(3)?,
        options: row.get(4)?,
        status: row.get(5)?,
        output: row.get(6)?,
        error: row.get(7)?,
        logs: row.get(8)?,
        retries: row.get(9)?,
        created_at: row.get(10)?,
        started_at: row.get(11)?,
        completed_at: row.get(12)?,
    };
    Ok(stored.decode())
}

impl JobStore {
    /// Open (creating) the database file.
    pub fn open(path: &Path) -> Result<JobStore, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::new(format!("cannot create {}: {e}", parent.display())))?;
        }
        let connection = Connection::open(path)
            .map_err(|e| StoreError::new(format!("cannot open {}: {e}", path.display())))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::with_connection(connection)
    }

    /// A store that lives in memory only.
    pub fn in_memory() -> Result<JobStore, StoreError> {
        Self::with_connection(Connection::open_in_memory()?)
    }

    fn with_connection(connection: Connection) -> Result<JobStore, StoreError> {
        connection.execute_batch(SCHEMA)?;
        Ok(JobStore {
            connection: Mutex::new(connection),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut connection = self
            .connection
            .lock()
            .map_err(|_| StoreError::new("the connection lock is poisoned"))?;
        f(&mut connection)
    }

    /// Record a new job (committed when this returns).
    pub fn insert(&self, job: &Job) -> Result<(), StoreError> {
        let input = to_json(&job.input)?;
        let options = to_json(&job.options)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs (id, model, protocol, input, options, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    job.id,
                    job.model,
                    job.protocol.as_str(),
                    input,
                    options,
                    job.status.as_str(),
                    job.created_at
                ],
            )?;
            Ok(())
        })
    }

    /// Remove a finished job, so its id can be used again (Cog's PUT on a
    /// finished id starts a new prediction). A job still queued or running is
    /// never removed; returns whether one was.
    pub fn delete_final(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "DELETE FROM jobs WHERE id = ?1 AND status NOT IN ('IN_QUEUE', 'IN_PROGRESS')",
                [id],
            )? > 0)
        })
    }

    /// Whether a job with this id exists (expired jobs included until purged).
    pub fn exists(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(
                c.query_row("SELECT 1 FROM jobs WHERE id = ?1", [id], |_| Ok(()))
                    .optional()?
                    .is_some(),
            )
        })
    }

    /// The job, unless it does not exist or its results have expired.
    pub fn get(&self, id: &str, now: i64) -> Result<Option<Job>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {COLUMNS} FROM jobs WHERE id = ?1 AND (expires_at IS NULL OR expires_at > ?2)"
                ),
                params![id, now],
                job_from_row,
            )
            .optional()?
            .transpose()
        })
    }

    /// The job's status, unless it does not exist or has expired.
    pub fn status(&self, id: &str, now: i64) -> Result<Option<JobStatus>, StoreError> {
        let text: Option<String> = self.with(|c| {
            Ok(c.query_row(
                "SELECT status FROM jobs WHERE id = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                params![id, now],
                |row| row.get(0),
            )
            .optional()?)
        })?;
        text.map(|t| {
            JobStatus::parse(&t).ok_or_else(|| StoreError::new(format!("unknown status {t:?}")))
        })
        .transpose()
    }

    /// IN_QUEUE → IN_PROGRESS; false when the job is no longer queued.
    pub fn start(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE jobs SET status = 'IN_PROGRESS', started_at = ?2 WHERE id = ?1 AND status = 'IN_QUEUE'",
                params![id, now],
            )? == 1)
        })
    }

    /// Record a final state for a job that is queued or running; false when it
    /// had already reached one (e.g. cancelled while running).
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        id: &str,
        status: JobStatus,
        output: Option<&Value>,
        error: Option<&JobError>,
        logs: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let output = output.map(to_json).transpose()?;
        let error = error.map(to_json).transpose()?;
        self.with(|c| {
            Ok(c.execute(
                "UPDATE jobs SET status = ?2, output = ?3, error = ?4, logs = ?5,
                        completed_at = ?6, expires_at = ?7
                 WHERE id = ?1 AND status IN ('IN_QUEUE', 'IN_PROGRESS')",
                params![id, status.as_str(), output, error, logs, now, expires_at],
            )? == 1)
        })
    }

    /// FAILED or TIMED_OUT → IN_QUEUE again; false for any other state.
    pub fn retry(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE jobs SET status = 'IN_QUEUE', output = NULL, error = NULL, logs = '',
                        started_at = NULL, completed_at = NULL, expires_at = NULL,
                        retries = retries + 1
                 WHERE id = ?1 AND status IN ('FAILED', 'TIMED_OUT')",
                [id],
            )? == 1)
        })
    }

    /// Apply the restart policy to jobs that were running when the server
    /// stopped, then return every queued job in submission order.
    pub fn recover(
        &self,
        policy: RestartPolicy,
        now: i64,
        failed_ttl_ms: i64,
    ) -> Result<Vec<Job>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            match policy {
                RestartPolicy::Requeue => {
                    tx.execute(
                        "UPDATE jobs SET status = 'IN_QUEUE', started_at = NULL, retries = retries + 1
                         WHERE status = 'IN_PROGRESS'",
                        [],
                    )?;
                }
                RestartPolicy::Fail => {
                    let error = to_json(&JobError::Failed {
                        message: "the server stopped while this job was running".into(),
                    })?;
                    tx.execute(
                        "UPDATE jobs SET status = 'FAILED', error = ?1, completed_at = ?2, expires_at = ?3
                         WHERE status = 'IN_PROGRESS'",
                        params![error, now, now + failed_ttl_ms],
                    )?;
                }
            }
            let queued = {
                let mut statement = tx.prepare(&format!(
                    "SELECT {COLUMNS} FROM jobs WHERE status = 'IN_QUEUE' ORDER BY seq"
                ))?;
                let rows = statement.query_map([], job_from_row)?;
                let mut jobs = Vec::new();
                for row in rows {
                    jobs.push(row??);
                }
                jobs
            };
            tx.commit()?;
            Ok(queued)
        })
    }

    /// Delete finished jobs whose results have expired; returns how many.
    pub fn delete_expired(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?1 RETURNING id",
            )?;
            let ids = statement
                .query_map([now], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ids)
        })
    }

    /// Jobs per status for one model (RunPod `/health`).
    pub fn counts(&self, model: &str) -> Result<Vec<(JobStatus, u64, u64)>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT status, COUNT(*), SUM(CASE WHEN retries > 0 THEN 1 ELSE 0 END)
                 FROM jobs WHERE model = ?1 GROUP BY status",
            )?;
            let rows = statement.query_map([model], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (status, count, retried) = row?;
                if let Some(status) = JobStatus::parse(&status) {
                    out.push((status, count.max(0) as u64, retried.max(0) as u64));
                }
            }
            Ok(out)
        })
    }
}
