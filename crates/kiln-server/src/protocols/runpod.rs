//! RunPod serverless endpoint API: `/run`, `/runsync`, `/status/{id}`,
//! `/stream/{id}`, `/cancel/{id}`, `/retry/{id}`, `/purge-queue` and `/health`,
//! under `/v2/{model}/` (what the `runpod` SDK calls with
//! `RUNPOD_ENDPOINT_BASE_URL=http://host:port/v2`) and at the root for the first
//! model. Validation errors use rp_validator's sentences; image outputs use the
//! FLUX.1-dev shorts handler's shape.
//!
//! The SDK's `stream()` stops only at COMPLETED, FAILED or TIMED_OUT; `/stream`
//! of a CANCELLED job answers with an empty stream and the status, so a caller
//! that also checks for CANCELLED ends cleanly.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{body_or_error, validation_problems};
use crate::error::ApiError;
use crate::jobs::{InputProblem, Job, JobError, JobEvent, JobOptions, JobStatus, Protocol};
use crate::metrics::labelled;
use crate::state::{AppState, ServedModel};
use kiln_pipelines::text_to_image::result::{ImageResult, OutputImage};

/// `/runsync` waits this long by default, and at most `MAX_WAIT_MS`.
const DEFAULT_WAIT_MS: u64 = 90_000;
const MIN_WAIT_MS: u64 = 1_000;
const MAX_WAIT_MS: u64 = 300_000;

fn error(e: ApiError) -> Response {
    e.simple()
}

fn endpoint(state: &AppState, model: Option<&str>) -> Result<Arc<ServedModel>, ApiError> {
    match model {
        Some(name) => state.model(name),
        None => state.default_model(),
    }
}

/// rp_validator's sentence for one problem.
pub fn rp_validator_sentence(problem: &InputProblem) -> String {
    let k = &problem.field;
    match problem.rule.as_str() {
        "missing" => format!("{k} is a required input."),
        "unknown" => format!("Unexpected input. {k} is not a valid input option."),
        "type" => format!(
            "{k} should be {} type, not {}.",
            problem.expected.as_deref().unwrap_or("another"),
            problem.found.as_deref().unwrap_or("this")
        ),
        "constraint" => format!("{k} does not meet the constraints. ({})", problem.message),
        _ => format!("{k}: {}", problem.message),
    }
}

fn error_text(error: &JobError) -> String {
    match error {
        JobError::Invalid { problems } => problems
            .iter()
            .map(rp_validator_sentence)
            .collect::<Vec<_>>()
            .join(" "),
        JobError::Failed { message }
        | JobError::Unavailable { message }
        | JobError::Upstream { message, .. } => message.clone(),
    }
}

/// A FLUX-style output (`images: [{base64, width, height}]`) in the shorts
/// handler's shape, with the LoRA report; other outputs unchanged.
pub fn render_output(job: &Job, output: &Value) -> Value {
    let Some(result) = ImageResult::from_output(output) else {
        return output.clone();
    };
    let images = &result.images;
    let image =
        |i: &OutputImage| json!({"image_base64": i.base64, "width": i.width, "height": i.height});
    let mut body = Map::new();
    body.insert("status".into(), json!("success"));
    body.insert(
        "prompt".into(),
        job.input.get("prompt").cloned().unwrap_or(Value::Null),
    );
    body.insert("model".into(), json!(job.model));
    if let Some(seed) = result.seed {
        body.insert("seed".into(), json!(seed));
    }
    if let Some(first) = images.first() {
        body.insert("image".into(), image(first));
    }
    if images.len() > 1 {
        body.insert("images".into(), images.iter().map(image).collect());
    }
    // What was applied, so a LoRA that matched nothing is never silent.
    for key in ["timings", "loras", "lora_mode"] {
        if let Some(value) = output.get(key) {
            body.insert(key.into(), value.clone());
        }
    }
    Value::Object(body)
}

/// The `/status` body.
pub fn status_body(job: &Job) -> Value {
    let mut body = Map::new();
    body.insert("id".into(), json!(job.id));
    body.insert("status".into(), json!(job.status.as_str()));
    body.insert("delayTime".into(), json!(job.delay_ms().max(0)));
    body.insert("executionTime".into(), json!(job.execution_ms().max(0)));
    if job.retries > 0 {
        body.insert("retries".into(), json!(job.retries));
    }
    if let Some(output) = &job.output {
        body.insert("output".into(), render_output(job, output));
    }
    if let Some(e) = &job.error
        && job.status != JobStatus::Completed
    {
        body.insert("error".into(), json!(error_text(e)));
    }
    Value::Object(body)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Policy {
    execution_timeout: Option<u64>,
    ttl: Option<u64>,
    #[allow(dead_code)]
    low_priority: Option<bool>,
}

/// Parse `{"input", "webhook"?, "policy"?}`.
fn parse_run(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    sync: bool,
) -> Result<(Value, JobOptions), ApiError> {
    let body = body_or_error(state, body)?;
    let mut document: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be a JSON object with \"input\": {e}"
        ))
    })?;
    let input = match document.remove("input") {
        Some(input @ Value::Object(_)) | Some(input @ Value::Array(_)) => input,
        Some(_) => return Err(ApiError::BadRequest("\"input\" must be an object".into())),
        None => {
            return Err(ApiError::BadRequest(
                "the body needs an \"input\" object".into(),
            ));
        }
    };
    let webhook = match document.remove("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => {
            crate::jobs::webhook::check_webhook_url(&url)
                .map_err(|e| ApiError::BadRequest(format!("\"webhook\": {e}")))?;
            Some(url)
        }
        Some(_) => {
            return Err(ApiError::BadRequest(
                "\"webhook\" must be a URL string".into(),
            ));
        }
    };
    let policy: Policy = match document.remove("policy") {
        None | Some(Value::Null) => Policy::default(),
        Some(value) => serde_json::from_value(value)
            .map_err(|e| ApiError::BadRequest(format!("\"policy\": {e}")))?,
    };
    Ok((
        input,
        JobOptions {
            webhook,
            webhook_events: None,
            execution_timeout_ms: policy.execution_timeout,
            ttl_ms: policy.ttl,
            sync,
        },
    ))
}

/// Submit a job, or record it as FAILED at once when its input breaks the schema
/// (as a RunPod handler's validator would).
async fn submit(
    state: &AppState,
    model: &ServedModel,
    input: Value,
    options: JobOptions,
) -> Result<Job, ApiError> {
    if let Some(problems) = validation_problems(model, &input) {
        return state
            .jobs
            .reject(
                &model.name,
                Protocol::RunPod,
                input,
                options,
                JobError::Invalid { problems },
            )
            .await
            .map_err(ApiError::from);
    }
    state
        .jobs
        .submit(None, &model.name, Protocol::RunPod, input, options)
        .await
        .map_err(ApiError::from)
}

async fn run_inner(
    state: &AppState,
    model: Option<&str>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let model = match endpoint(state, model) {
        Ok(model) => model,
        Err(e) => return error(e),
    };
    let result = match parse_run(state, body, false) {
        Ok((input, options)) => submit(state, &model, input, options).await,
        Err(e) => Err(e),
    };
    // Refusals (a full queue's 429 included) count against the model too.
    let response = match result {
        Ok(job) => Json(json!({"id": job.id, "status": job.status.as_str()})).into_response(),
        Err(e) => error(e),
    };
    labelled(response, &model.name)
}

/// `POST /run`.
pub async fn run(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run_inner(&state, None, body).await
}

/// `POST /v2/{model}/run`.
pub async fn model_run(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run_inner(&state, Some(&model), body).await
}

#[derive(Deserialize)]
pub struct WaitQuery {
    wait: Option<u64>,
}

async fn runsync_inner(
    state: &AppState,
    model: Option<&str>,
    wait: Option<u64>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let submitted = async {
        let model = endpoint(state, model)?;
        let (input, options) = parse_run(state, body, true)?;
        let job = submit(state, &model, input, options).await?;
        Ok::<_, ApiError>((model, job))
    }
    .await;
    let (model, job) = match submitted {
        Ok(pair) => pair,
        Err(e) => return error(e),
    };
    let wait = wait
        .unwrap_or(DEFAULT_WAIT_MS)
        .clamp(MIN_WAIT_MS, MAX_WAIT_MS);
    match state.jobs.wait(&job.id, Duration::from_millis(wait)).await {
        Ok(Some(job)) => labelled(Json(status_body(&job)).into_response(), &model.name),
        Ok(None) => error(ApiError::JobNotFound(job.id)),
        Err(e) => error(ApiError::from(e)),
    }
}

/// `POST /runsync[?wait=ms]`.
pub async fn runsync(
    State(state): State<Arc<AppState>>,
    Query(query): Query<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    runsync_inner(&state, None, query.wait, body).await
}

/// `POST /v2/{model}/runsync[?wait=ms]`.
pub async fn model_runsync(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    Query(query): Query<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    runsync_inner(&state, Some(&model), query.wait, body).await
}

/// The job, if it exists and belongs to this endpoint.
async fn find(state: &AppState, model: Option<&str>, id: &str) -> Result<Job, ApiError> {
    let job = state
        .jobs
        .get(id)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::JobNotFound(id.to_string()))?;
    match model {
        Some(model) if model != job.model => Err(ApiError::JobNotFound(id.to_string())),
        _ => Ok(job),
    }
}

async fn status_inner(state: &AppState, model: Option<&str>, id: &str) -> Response {
    match find(state, model, id).await {
        Ok(job) => labelled(Json(status_body(&job)).into_response(), &job.model),
        Err(e) => error(e),
    }
}

/// `GET|POST /status/{id}`.
pub async fn status(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    status_inner(&state, None, &id).await
}

/// `GET|POST /v2/{model}/status/{id}`.
pub async fn model_status(
    State(state): State<Arc<AppState>>,
    Path((model, id)): Path<(String, String)>,
) -> Response {
    status_inner(&state, Some(&model), &id).await
}

async fn stream_inner(state: &AppState, model: Option<&str>, id: &str) -> Response {
    if let Err(e) = find(state, model, id).await {
        return error(e);
    }
    // Without a live record (after a restart) there is nothing left to stream:
    // the SDK's stream() ends on a final status with an empty stream, and the
    // output stays available from /status.
    let events = match state.jobs.live(id) {
        Some(live) => live.take_unstreamed(),
        None => Vec::new(),
    };
    // Read after the events: a Finished event means the final state is stored.
    let job = match find(state, model, id).await {
        Ok(job) => job,
        Err(e) => return error(e),
    };
    let mut stream = Vec::new();
    for event in events {
        match event {
            JobEvent::Progress { step, total } => {
                stream.push(json!({"output": {"step": step, "total": total}}))
            }
            JobEvent::Finished => {
                if let Some(output) = &job.output {
                    stream.push(json!({"output": render_output(&job, output)}));
                }
            }
            JobEvent::Started | JobEvent::Log(_) => {}
        }
    }
    let mut body = json!({"id": job.id, "status": job.status.as_str(), "stream": stream});
    if let Some(e) = &job.error
        && job.status != JobStatus::Completed
    {
        body["error"] = json!(error_text(e));
    }
    labelled(Json(body).into_response(), &job.model)
}

/// `GET /stream/{id}`: chunks since the last read.
pub async fn stream(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    stream_inner(&state, None, &id).await
}

/// `GET /v2/{model}/stream/{id}`.
pub async fn model_stream(
    State(state): State<Arc<AppState>>,
    Path((model, id)): Path<(String, String)>,
) -> Response {
    stream_inner(&state, Some(&model), &id).await
}

async fn cancel_inner(state: &AppState, model: Option<&str>, id: &str) -> Response {
    if let Err(e) = find(state, model, id).await {
        return error(e);
    }
    match state.jobs.cancel(id).await {
        Ok(Some(job)) => labelled(
            Json(json!({"id": job.id, "status": job.status.as_str()})).into_response(),
            &job.model,
        ),
        Ok(None) => error(ApiError::JobNotFound(id.to_string())),
        Err(e) => error(ApiError::from(e)),
    }
}

/// `POST /cancel/{id}`.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    cancel_inner(&state, None, &id).await
}

/// `POST /v2/{model}/cancel/{id}`.
pub async fn model_cancel(
    State(state): State<Arc<AppState>>,
    Path((model, id)): Path<(String, String)>,
) -> Response {
    cancel_inner(&state, Some(&model), &id).await
}

async fn retry_inner(state: &AppState, model: Option<&str>, id: &str) -> Response {
    let job = match find(state, model, id).await {
        Ok(job) => job,
        Err(e) => return error(e),
    };
    match state.jobs.retry(id).await {
        Ok(Some(true)) => Json(json!({"id": id, "status": "IN_QUEUE"})).into_response(),
        Ok(Some(false)) => error(ApiError::BadRequest(format!(
            "only FAILED or TIMED_OUT jobs can be retried; job {id} is {}",
            job.status.as_str()
        ))),
        Ok(None) => error(ApiError::JobNotFound(id.to_string())),
        Err(e) => error(ApiError::from(e)),
    }
}

/// `POST /retry/{id}`.
pub async fn retry(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    retry_inner(&state, None, &id).await
}

/// `POST /v2/{model}/retry/{id}`.
pub async fn model_retry(
    State(state): State<Arc<AppState>>,
    Path((model, id)): Path<(String, String)>,
) -> Response {
    retry_inner(&state, Some(&model), &id).await
}

async fn purge_inner(state: &AppState, model: Option<&str>) -> Response {
    let model = match endpoint(state, model) {
        Ok(model) => model,
        Err(e) => return error(e),
    };
    match state.jobs.purge_queue(&model.name).await {
        Ok(removed) => Json(json!({"removed": removed, "status": "completed"})).into_response(),
        Err(e) => error(ApiError::from(e)),
    }
}

/// `POST /purge-queue`.
pub async fn purge_queue(State(state): State<Arc<AppState>>) -> Response {
    purge_inner(&state, None).await
}

/// `POST /v2/{model}/purge-queue`.
pub async fn model_purge_queue(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Response {
    purge_inner(&state, Some(&model)).await
}

/// `GET /v2/{model}/health`: job counts and workers.
pub async fn model_health(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Response {
    let model = match state.model(&model) {
        Ok(model) => model,
        Err(e) => return error(e),
    };
    let counts = match state.jobs.counts(&model.name).await {
        Ok(counts) => counts,
        Err(e) => return error(ApiError::from(e)),
    };
    let count = |status: JobStatus| {
        counts
            .iter()
            .filter(|(s, _, _)| *s == status)
            .map(|(_, n, _)| *n)
            .sum::<u64>()
    };
    let retried: u64 = counts.iter().map(|(_, _, r)| *r).sum();
    // Behind a shared queue, the workers are processes elsewhere.
    let (running, workers) = match state.jobs.workers(&model.name).await {
        Ok(Some(processes)) => (count(JobStatus::InProgress) as usize, processes),
        _ => (model.in_use(), model.settings.concurrency.max(1)),
    };
    (
        StatusCode::OK,
        Json(json!({
            "jobs": {
                "completed": count(JobStatus::Completed),
                "failed": count(JobStatus::Failed) + count(JobStatus::TimedOut),
                "inProgress": count(JobStatus::InProgress),
                "inQueue": count(JobStatus::InQueue),
                "retried": retried,
            },
            "workers": {"idle": workers.saturating_sub(running), "running": running},
        })),
    )
        .into_response()
}
