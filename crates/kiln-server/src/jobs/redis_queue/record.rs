//! A job as a Redis hash: the fields a new job is written with, and the
//! decoding of a stored hash (through the store's shared `StoredJob`).

use std::collections::HashMap;

use super::super::store::StoredJob;
use super::super::{Job, StoreError};

/// The hash fields of a new job.
pub(super) fn job_fields(job: &Job) -> Result<Vec<(&'static str, String)>, StoreError> {
    Ok(vec![
        ("id", job.id.clone()),
        ("model", job.model.clone()),
        ("protocol", job.protocol.as_str().into()),
        ("input", serde_json::to_string(&job.input)?),
        ("options", serde_json::to_string(&job.options)?),
        ("status", job.status.as_str().into()),
        ("logs", job.logs.clone()),
        ("retries", job.retries.to_string()),
        ("created_at", job.created_at.to_string()),
    ])
}

pub(super) fn job_from_fields(mut fields: HashMap<String, String>) -> Result<Job, StoreError> {
    let mut take = |name: &str| {
        fields
            .remove(name)
            .ok_or_else(|| StoreError::new(format!("stored job lacks {name:?}")))
    };
    let number = |text: String| {
        text.parse::<i64>()
            .map_err(|_| StoreError::new(format!("stored number {text:?} is unreadable")))
    };
    let stored = StoredJob {
        id: take("id")?,
        model: take("model")?,
        protocol: take("protocol")?,
        input: take("input")?,
        options: take("options")?,
        status: take("status")?,
        created_at: number(take("created_at")?)?,
        retries: number(take("retries").unwrap_or_else(|_| "0".into()))?,
        logs: take("logs").unwrap_or_default(),
        output: take("output").ok(),
        error: take("error").ok(),
        started_at: take("started_at").ok().map(number).transpose()?,
        completed_at: take("completed_at").ok().map(number).transpose()?,
    };
    stored.decode()
}
