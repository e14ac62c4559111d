//! What a job is: its states, protocol, input problems, errors, options and the
//! stored record, plus the refusal reasons for a submission.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoreError;

/// A job's state, with RunPod's names (the other protocols map from these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::InQueue,
        JobStatus::InProgress,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InQueue => "IN_QUEUE",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
            JobStatus::TimedOut => "TIMED_OUT",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::InQueue | JobStatus::InProgress)
    }
}

/// Which protocol a job came in through; decides its webhook and output shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    RunPod,
    Cog,
    OpenAi,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::RunPod => "runpod",
            Protocol::Cog => "cog",
            Protocol::OpenAi => "openai",
        }
    }

    pub fn parse(text: &str) -> Option<Protocol> {
        [Protocol::RunPod, Protocol::Cog, Protocol::OpenAi]
            .into_iter()
            .find(|p| p.as_str() == text)
    }
}

/// One broken rule of the input, kept so each protocol can word it its own way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputProblem {
    pub field: String,
    /// `missing`, `unknown`, `type`, `constraint` or `malformed`.
    pub rule: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
}

impl InputProblem {
    pub fn from_field_problem(problem: &kiln_pipelines::FieldProblem) -> Self {
        use kiln_pipelines::ProblemKind;
        let (rule, expected, found) = match &problem.kind {
            ProblemKind::Missing => ("missing", None, None),
            ProblemKind::Unknown => ("unknown", None, None),
            ProblemKind::Type { expected, found } => {
                ("type", Some(expected.clone()), Some(found.clone()))
            }
            ProblemKind::Constraint => ("constraint", None, None),
            ProblemKind::Malformed => ("malformed", None, None),
        };
        InputProblem {
            field: problem.field.clone(),
            rule: rule.into(),
            message: problem.message.clone(),
            expected,
            found,
        }
    }
}

/// Why a job did not complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobError {
    /// The input broke the model's schema.
    Invalid { problems: Vec<InputProblem> },
    /// The model could not be loaded: the service is unavailable (503 where
    /// a protocol answers with a status), not the request at fault.
    Unavailable { message: String },
    /// A host the input pointed at (a LoRA URL) failed or timed out (502/504
    /// where a protocol answers with a status).
    Upstream { message: String, timed_out: bool },
    /// Anything else: execution error, timeout, cancellation.
    Failed { message: String },
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Invalid { problems } => {
                let text: Vec<String> = problems
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.message))
                    .collect();
                write!(f, "invalid input: {}", text.join("; "))
            }
            JobError::Failed { message }
            | JobError::Unavailable { message }
            | JobError::Upstream { message, .. } => f.write_str(message),
        }
    }
}

/// Per-job choices made at submission.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobOptions {
    /// URL that receives the job's state (RunPod: at the end; Cog: per event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Cog's `webhook_events_filter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_events: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_timeout_ms: Option<u64>,
    /// How long results are kept after the job ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Submitted by a synchronous call (shorter default TTL).
    #[serde(default)]
    pub sync: bool,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub model: String,
    pub protocol: Protocol,
    pub input: Value,
    pub options: JobOptions,
    pub status: JobStatus,
    pub output: Option<Value>,
    pub error: Option<JobError>,
    /// Progress lines (Cog's `logs`).
    pub logs: String,
    pub retries: u32,
    /// Unix milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
}

impl Job {
    /// A new job waiting in its queue.
    pub fn queued(
        id: String,
        model: &str,
        protocol: Protocol,
        input: Value,
        options: JobOptions,
    ) -> Job {
        Job {
            id,
            model: model.into(),
            protocol,
            input,
            options,
            status: JobStatus::InQueue,
            output: None,
            error: None,
            logs: String::new(),
            retries: 0,
            created_at: now_ms(),
            started_at: None,
            completed_at: None,
        }
    }

    /// Milliseconds spent queued (RunPod `delayTime`).
    pub fn delay_ms(&self) -> i64 {
        match self.started_at {
            Some(started) => started - self.created_at,
            None if self.status.is_final() => {
                self.completed_at.unwrap_or(self.created_at) - self.created_at
            }
            None => now_ms() - self.created_at,
        }
    }

    /// Milliseconds spent running (RunPod `executionTime`).
    pub fn execution_ms(&self) -> i64 {
        match (self.started_at, self.completed_at) {
            (Some(started), Some(done)) => done - started,
            (Some(started), None) => now_ms() - started,
            _ => 0,
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue for model {model:?} is full ({limit} jobs); retry later")]
    QueueFull { model: String, limit: usize },
    #[error("a job with id {0:?} already exists")]
    Duplicate(String),
    #[error("model {0:?} is not served here")]
    UnknownModel(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}
