//! Replicate Cog's container HTTP API for the first served model: `GET /`,
//! `/health-check`, `/openapi.json` from the pipeline's input schema,
//! `POST /predictions` (sync; `Prefer: respond-async` → 202 with webhooks;
//! `Accept: text/event-stream` → server-sent events), idempotent
//! `PUT /predictions/{id}`, `POST /predictions/{id}/cancel` and `POST /shutdown`.
//! Invalid input is a 422 with `detail`; a full queue is a 409.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use kiln_pipelines::InputSpec;
use serde_json::{Map, Value, json};

mod openapi;

pub use openapi::openapi;

use super::{body_or_error, validation_problems};
use crate::error::ApiError;
use crate::jobs::{
    InputProblem, Job, JobError, JobEvent, JobOptions, JobStatus, LiveJob, Protocol, SubmitError,
    progress_logs,
};
use crate::metrics::labelled;
use crate::state::{AppState, LoadState, ServedModel};

/// Cog's event names for `webhook_events_filter`.
pub(super) const EVENTS: [&str; 4] = ["start", "output", "logs", "completed"];

fn detail(status: StatusCode, detail: Value) -> Response {
    (status, Json(json!({ "detail": detail }))).into_response()
}

pub(super) fn error(e: ApiError) -> Response {
    match e {
        ApiError::QueueFull { .. } => e.with_retry_after(
            (
                StatusCode::CONFLICT,
                Json(
                    json!({"error": "At capacity - all prediction slots busy", "status": "failed"}),
                ),
            )
                .into_response(),
        ),
        ApiError::InvalidInput(_) | ApiError::BadRequest(_) => detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{"loc": ["body"], "msg": e.to_string(), "type": "value_error"}]),
        ),
        other => {
            let status = other.status();
            detail(status, json!(other.to_string()))
        }
    }
}

fn unprocessable(problems: &[InputProblem]) -> Response {
    let items: Vec<Value> = problems
        .iter()
        .map(|p| {
            let kind = match p.rule.as_str() {
                "missing" => "missing",
                "unknown" => "extra_forbidden",
                "type" => "type_error",
                _ => "value_error",
            };
            json!({"loc": ["body", "input", p.field], "msg": p.message, "type": kind})
        })
        .collect();
    detail(StatusCode::UNPROCESSABLE_ENTITY, Value::Array(items))
}

fn timestamp(ms: Option<i64>) -> Value {
    match ms {
        Some(ms) if ms >= 0 => json!(
            humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_millis(ms as u64))
                .to_string()
        ),
        _ => Value::Null,
    }
}

fn cog_status(status: JobStatus) -> &'static str {
    match status {
        JobStatus::InQueue => "starting",
        JobStatus::InProgress => "processing",
        JobStatus::Completed => "succeeded",
        JobStatus::Failed | JobStatus::TimedOut => "failed",
        JobStatus::Cancelled => "canceled",
    }
}

/// Images as data URLs (Cog's file outputs); other outputs unchanged.
pub fn render_output(output: &Value) -> Value {
    match kiln_pipelines::text_to_image::result::ImageResult::from_output(output) {
        Some(result) => result.images.iter().map(|i| json!(i.data_url())).collect(),
        None => output.clone(),
    }
}

/// A prediction in Cog's response shape.
pub fn prediction_body(job: &Job, live: Option<&LiveJob>) -> Value {
    let logs = match (job.status.is_final(), live) {
        (false, Some(live)) => progress_logs(&live.events()),
        _ => job.logs.clone(),
    };
    let predict_time = match (job.started_at, job.completed_at) {
        (Some(started), Some(done)) => json!({"predict_time": (done - started) as f64 / 1000.0}),
        _ => json!({}),
    };
    let error = match (&job.error, job.status) {
        (_, JobStatus::Cancelled) | (None, _) => Value::Null,
        (Some(JobError::Invalid { problems }), _) => json!(
            problems
                .iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        (Some(e), _) => json!(e.to_string()),
    };
    let mut body = json!({
        "id": job.id,
        "input": job.input,
        "output": job.output.as_ref().map(render_output),
        "logs": logs,
        "error": error,
        "status": cog_status(job.status),
        "metrics": predict_time,
        "created_at": timestamp(Some(job.created_at)),
        "started_at": timestamp(job.started_at),
        "completed_at": timestamp(job.completed_at),
    });
    if let Some(webhook) = &job.options.webhook {
        body["webhook"] = json!(webhook);
    }
    body
}

/// `GET /`: the discovery document.
pub async fn root() -> Response {
    Json(json!({
        "cog_version": concat!("kiln-", env!("CARGO_PKG_VERSION")),
        "docs_url": "/docs",
        "openapi_url": "/openapi.json",
        "shutdown_url": "/shutdown",
        "healthcheck_url": "/health-check",
        "predictions_url": "/predictions",
        "predictions_idempotent_url": "/predictions/{prediction_id}",
        "predictions_cancel_url": "/predictions/{prediction_id}/cancel",
    }))
    .into_response()
}

/// `GET /docs`: Swagger UI over `/openapi.json`, the page FastAPI serves for
/// Cog (the browser loads Swagger UI's script and style from jsDelivr).
pub async fn docs() -> Response {
    axum::response::Html(concat!(
        "<!DOCTYPE html>\n<html><head><title>Kiln - Swagger UI</title>\n",
        "<link rel=\"stylesheet\" href=\"https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css\">\n",
        "</head><body><div id=\"swagger-ui\"></div>\n",
        "<script src=\"https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js\"></script>\n",
        "<script>SwaggerUIBundle({url: 'openapi.json', dom_id: '#swagger-ui'});</script>\n",
        "</body></html>\n"
    ))
    .into_response()
}

/// `GET /health-check`: always 200, the status in the body.
pub async fn health_check(State(state): State<Arc<AppState>>) -> Response {
    let model = state.default_model().ok();
    let queue_depth = match &model {
        Some(model) => state.jobs.queue_depth(&model.name).await,
        None => 0,
    };
    let busy = match &model {
        Some(model) => !queues_behind_busy_slots(&state) && slots_busy(&state, model).await,
        None => false,
    };
    let (status, setup_status, logs) = match model.as_ref().map(|m| m.state()) {
        Some(LoadState::Failed(message)) => ("SETUP_FAILED", "failed", message),
        // Cog serves one model: its readiness is the default model's own.
        // (on a front: whether workers serve it).
        _ if !(if state.runs_models {
            model.as_ref().is_some_and(|m| m.allows_readiness())
        } else {
            state.ready()
        }) =>
        {
            ("STARTING", "processing", String::new())
        }
        _ => match &model {
            // Busy when a new prediction would be refused: every slot taken
            // (Cog), or with `[cog] queue`, the queue full.
            Some(model) if busy || queue_depth >= model.settings.max_queue => {
                ("BUSY", "succeeded", String::new())
            }
            _ => ("READY", "succeeded", String::new()),
        },
    };
    let started = state.started_unix_ms();
    Json(json!({
        "status": status,
        "setup": {
            "started_at": timestamp(Some(started)),
            "completed_at": if setup_status == "processing" { Value::Null } else { timestamp(Some(started)) },
            "status": setup_status,
            "logs": logs,
        },
    }))
    .into_response()
}

struct CogRequest {
    id: Option<String>,
    input: Value,
    options: JobOptions,
}

fn parse(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<CogRequest, Box<Response>> {
    let body = body_or_error(state, body).map_err(|e| Box::new(error(e)))?;
    let invalid = |loc: &str, msg: String| {
        Box::new(detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{"loc": ["body", loc], "msg": msg, "type": "value_error"}]),
        ))
    };
    let document: Map<String, Value> = if body.is_empty() {
        Map::new()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| invalid("body", format!("the body is not a JSON object: {e}")))?
    };
    let input = match document.get("input") {
        None | Some(Value::Null) => json!({}),
        Some(input @ Value::Object(_)) => input.clone(),
        Some(_) => return Err(invalid("input", "input must be an object".into())),
    };
    let id = match document.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 128 => Some(id.clone()),
        Some(_) => {
            return Err(invalid(
                "id",
                "id must be a non-empty string of at most 128 characters".into(),
            ));
        }
    };
    // Fields Cog's PredictionRequest declares and Kiln does not use: checked
    // against their declared types all the same, as pydantic checks them.
    match document.get("created_at") {
        None | Some(Value::Null) => {}
        Some(Value::String(text))
            if humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).is_ok()
                || humantime::parse_rfc3339(text).is_ok() => {}
        Some(_) => {
            return Err(invalid(
                "created_at",
                "created_at must be an RFC 3339 date-time".into(),
            ));
        }
    }
    match document.get("context") {
        None | Some(Value::Null) => {}
        Some(Value::Object(context)) if context.values().all(Value::is_string) => {}
        Some(_) => {
            return Err(invalid(
                "context",
                "context must be an object of strings".into(),
            ));
        }
    }
    match document.get("output_file_prefix") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(_) => {
            return Err(invalid(
                "output_file_prefix",
                "output_file_prefix must be a string".into(),
            ));
        }
    }
    let webhook = match document.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => {
            crate::jobs::webhook::check_webhook_url(url).map_err(|e| invalid("webhook", e))?;
            Some(url.clone())
        }
        Some(_) => return Err(invalid("webhook", "webhook must be a URL".into())),
    };
    let webhook_events = match document.get("webhook_events_filter") {
        None | Some(Value::Null) => None,
        Some(Value::Array(events)) => {
            let mut names = Vec::new();
            for event in events {
                match event.as_str() {
                    Some(name) if EVENTS.contains(&name) => names.push(name.to_string()),
                    _ => {
                        return Err(invalid(
                            "webhook_events_filter",
                            format!("unknown event {event}; events are {}", EVENTS.join(", ")),
                        ));
                    }
                }
            }
            Some(names)
        }
        Some(_) => {
            return Err(invalid(
                "webhook_events_filter",
                "must be a list of events".into(),
            ));
        }
    };
    Ok(CogRequest {
        id,
        input,
        options: JobOptions {
            webhook,
            webhook_events,
            execution_timeout_ms: None,
            ttl_ms: None,
            sync: false,
        },
    })
}

fn wants_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
        })
}

fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

async fn predict_inner(
    state: Arc<AppState>,
    path_id: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let model = match state.default_model() {
        Ok(model) => model,
        Err(e) => return error(e),
    };
    let mut request = match parse(&state, body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    if let Some(id) = path_id {
        if request.id.as_ref().is_some_and(|body_id| *body_id != id) {
            return detail(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{"loc": ["body", "id"], "msg": "prediction ID must match the ID supplied in the URL", "type": "value_error"}]),
            );
        }
        match state.jobs.get(&id).await {
            // Idempotent PUT: a prediction still running answers as it is.
            Ok(Some(job)) if !job.status.is_final() => {
                let live = state.jobs.live(&id);
                return labelled(
                    (
                        StatusCode::ACCEPTED,
                        Json(prediction_body(&job, live.as_deref())),
                    )
                        .into_response(),
                    &model.name,
                );
            }
            // A finished one is forgotten: Cog starts a new prediction.
            Ok(Some(_)) => {
                if let Err(e) = state.jobs.forget_final(&id).await {
                    return error(ApiError::from(e));
                }
                request.id = Some(id);
            }
            Ok(None) => request.id = Some(id),
            Err(e) => return error(ApiError::from(e)),
        }
    }
    let stripped = if state.cog.strict_inputs {
        Vec::new()
    } else {
        strip_unknown_inputs(&model, &mut request.input)
    };
    if let Some(problems) = validation_problems(&model, &request.input) {
        return unprocessable(&problems);
    }
    whole_numbers_as_integers(&model, &mut request.input);
    if !queues_behind_busy_slots(&state) && slots_busy(&state, &model).await {
        return labelled(
            detail(StatusCode::CONFLICT, json!("Already running a prediction")),
            &model.name,
        );
    }
    let asynchronous = wants_async(&headers);
    request.options.sync = !asynchronous;
    let job = match state
        .jobs
        .submit(
            request.id,
            &model.name,
            Protocol::Cog,
            request.input,
            request.options,
        )
        .await
    {
        Ok(job) => job,
        // A concurrent PUT with the same id won the race: answer as for a repeat.
        Err(SubmitError::Duplicate(id)) => {
            return match state.jobs.get(&id).await {
                Ok(Some(job)) => labelled(
                    (
                        StatusCode::ACCEPTED,
                        Json(prediction_body(&job, state.jobs.live(&id).as_deref())),
                    )
                        .into_response(),
                    &model.name,
                ),
                Ok(None) => error(ApiError::JobNotFound(id)),
                Err(e) => error(ApiError::from(e)),
            };
        }
        Err(e) => return labelled(error(ApiError::from(e)), &model.name),
    };
    if !stripped.is_empty()
        && let Some(live) = state.jobs.live(&job.id)
    {
        tracing::warn!(prediction_id = %job.id, fields = ?stripped, "Stripped unknown input fields");
        live.push(JobEvent::Log(format!(
            "Stripped unknown input fields: {}",
            stripped.join(", ")
        )));
    }
    if asynchronous {
        return labelled(
            (StatusCode::ACCEPTED, Json(prediction_body(&job, None))).into_response(),
            &model.name,
        );
    }
    if wants_events(&headers) {
        return labelled(events(state, job.id).into_response(), &model.name);
    }
    let done = match state.jobs.wait_final(&job.id).await {
        Ok(Some(done)) => done,
        Ok(None) => return error(ApiError::JobNotFound(job.id)),
        Err(e) => return error(ApiError::from(e)),
    };
    if let Some(JobError::Invalid { problems }) = &done.error {
        return unprocessable(problems);
    }
    labelled(
        Json(prediction_body(&done, None)).into_response(),
        &model.name,
    )
}

/// Whether predictions wait behind busy slots rather than get 409: with
/// `[cog] queue`, and always on a front (its workers are elsewhere; the
/// shared queue is what Replicate-style clients expect there).
fn queues_behind_busy_slots(state: &AppState) -> bool {
    state.cog.queue || !state.runs_models
}

/// Every prediction slot of the model taken (running or queued): Cog's BUSY.
async fn slots_busy(state: &AppState, model: &ServedModel) -> bool {
    model.in_use() + state.jobs.queue_depth(&model.name).await >= model.settings.concurrency.max(1)
}

/// Integer fields given as whole floats (`2.0`, which validation accepts)
/// stored and echoed as integers, as pydantic coerces them.
fn whole_numbers_as_integers(model: &ServedModel, input: &mut Value) {
    let (Some(interface), Value::Object(fields)) = (model.interface(), input) else {
        return;
    };
    let InputSpec::Fields(schema) = &interface.inputs else {
        return;
    };
    for field in &schema.fields {
        if matches!(field.kind, kiln_pipelines::FieldKind::Integer { .. })
            && let Some(value) = fields.get_mut(&field.name)
            && !value.is_i64()
            && let Some(x) = value
                .as_f64()
                .filter(|x| x.fract() == 0.0 && x.abs() < 9.0e15)
        {
            *value = Value::from(x as i64);
        }
    }
}

/// Drop input fields the model's schema does not know, as Cog does; returns
/// their names, sorted.
fn strip_unknown_inputs(model: &ServedModel, input: &mut Value) -> Vec<String> {
    let (Some(interface), Value::Object(fields)) = (model.interface(), input) else {
        return Vec::new();
    };
    let InputSpec::Fields(schema) = &interface.inputs else {
        return Vec::new();
    };
    let mut unknown: Vec<String> = fields
        .keys()
        .filter(|key| !schema.fields.iter().any(|f| &f.name == *key))
        .cloned()
        .collect();
    unknown.sort();
    for key in &unknown {
        fields.remove(key);
    }
    unknown
}

/// Server-sent events for one prediction, as coglet sends them: `start`, one
/// `log` per step (`{"data", "source"}`), `output` (`{"chunk", "index"}`) and
/// `completed` (the whole prediction).
fn events(
    state: Arc<AppState>,
    id: String,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let cursor = 0usize;
    let stream = futures_util::stream::unfold(
        (state, id, cursor, false),
        |(state, id, mut cursor, done)| async move {
            if done {
                return None;
            }
            loop {
                let live = state.jobs.live(&id);
                let mut changes = live.as_ref().map(|l| l.subscribe());
                let events = live.as_ref().map(|l| l.events()).unwrap_or_default();
                if let Some(event) = events.get(cursor) {
                    cursor += 1;
                    let job = state.jobs.get(&id).await.ok().flatten();
                    let body = |job: &Option<Job>| {
                        job.as_ref()
                            .map(|j| prediction_body(j, live.as_deref()))
                            .unwrap_or(Value::Null)
                    };
                    let item = match event {
                        JobEvent::Started => {
                            Event::default().event("start").data(body(&job).to_string())
                        }
                        JobEvent::Progress { step, total } => Event::default().event("log").data(
                            json!({"data": format!("step {step}/{total}\n"), "source": "stdout"})
                                .to_string(),
                        ),
                        JobEvent::Log(line) => Event::default().event("log").data(
                            json!({"data": format!("{line}\n"), "source": "stderr"}).to_string(),
                        ),
                        JobEvent::Finished => {
                            // Output and completion together: the job is final now.
                            let output = job
                                .as_ref()
                                .and_then(|j| j.output.as_ref())
                                .map(render_output)
                                .unwrap_or(Value::Null);
                            let completed = Event::default()
                                .event("completed")
                                .data(body(&job).to_string());
                            let output = Event::default()
                                .event("output")
                                .data(json!({"chunk": output, "index": 0}).to_string());
                            return Some((
                                futures_util::stream::iter(vec![Ok(output), Ok(completed)]),
                                (state, id, cursor, true),
                            ));
                        }
                    };
                    return Some((
                        futures_util::stream::iter(vec![Ok(item)]),
                        (state, id, cursor, false),
                    ));
                }
                match &mut changes {
                    Some(changes) => {
                        if tokio::time::timeout(Duration::from_secs(15), changes.changed())
                            .await
                            .is_err()
                        {
                            continue;
                        }
                    }
                    None => {
                        // No live record: the job ended before we looked.
                        let job = state.jobs.get(&id).await.ok().flatten();
                        let body = job
                            .as_ref()
                            .map(|j| prediction_body(j, None))
                            .unwrap_or(Value::Null);
                        let completed = Event::default().event("completed").data(body.to_string());
                        return Some((
                            futures_util::stream::iter(vec![Ok(completed)]),
                            (state, id, cursor, true),
                        ));
                    }
                }
            }
        },
    );
    Sse::new(futures_util::StreamExt::flatten(stream))
}

/// `POST /predictions`.
pub async fn predict(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    predict_inner(state, None, headers, body).await
}

/// `PUT /predictions/{id}`.
pub async fn predict_idempotent(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    predict_inner(state, Some(id), headers, body).await
}

/// `POST /predictions/{id}/cancel`.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.jobs.cancel(&id).await {
        Ok(Some(job)) => labelled(Json(json!({})).into_response(), &job.model),
        Ok(None) => detail(StatusCode::NOT_FOUND, json!("Not Found")),
        Err(e) => error(ApiError::from(e)),
    }
}

/// `POST /shutdown`: stop accepting, finish in-flight requests, exit.
pub async fn shutdown(State(state): State<Arc<AppState>>) -> Response {
    state.request_shutdown();
    Json(json!({})).into_response()
}
