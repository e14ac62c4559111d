//! OpenAI-compatible endpoints: `GET /v1/models` and `POST /v1/images/generations`
//! (`prompt`, `model`, `n`, `size: "WxH"`, `response_format`; the pipeline's own
//! fields such as `seed` or `num_inference_steps` are accepted as extra fields),
//! and `GET /v1/images/files/{token}` behind `url` responses (an hour each).
//! Errors use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{body_or_error, validation_problems};
use crate::error::ApiError;
use crate::jobs::{InputProblem, Job, JobError, JobOptions, JobStatus, Protocol};
use crate::metrics::labelled;
use crate::state::AppState;

/// An OpenAI-shaped error response.
pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": param, "code": code}})),
    )
        .into_response()
}

/// Map Kiln's errors onto OpenAI's types.
pub fn error(e: ApiError) -> Response {
    let status = e.status();
    let message = e.to_string();
    let response = match &e {
        ApiError::ModelNotFound(_) => error_response(
            status,
            &message,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ),
        ApiError::QueueFull { .. } => error_response(
            status,
            &message,
            "rate_limit_error",
            None,
            Some("rate_limit_exceeded"),
        ),
        ApiError::Unauthorized => error_response(
            status,
            &message,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ),
        ApiError::ModelNotReady(_)
        | ApiError::ModelFailed { .. }
        | ApiError::Unavailable(_)
        | ApiError::Upstream { .. }
        | ApiError::Internal(_) => error_response(status, &message, "server_error", None, None),
        _ => error_response(status, &message, "invalid_request_error", None, None),
    };
    e.with_retry_after(response)
}

/// The wire name of a pipeline field (OpenAI's `n` and `size` stand for
/// `num_outputs` and `width`/`height`).
fn wire_name(field: &str) -> &str {
    match field {
        "num_outputs" => "n",
        "width" | "height" => "size",
        other => other,
    }
}

fn invalid(problems: &[InputProblem]) -> Response {
    let message = problems
        .iter()
        .map(|p| format!("{}: {}", wire_name(&p.field), p.message))
        .collect::<Vec<_>>()
        .join("; ");
    let param = problems.first().map(|p| wire_name(&p.field).to_string());
    error_response(
        StatusCode::BAD_REQUEST,
        &message,
        "invalid_request_error",
        param.as_deref(),
        Some("invalid_value"),
    )
}

fn bad_param(param: &str, message: String) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        &message,
        "invalid_request_error",
        Some(param),
        Some("invalid_value"),
    )
}

/// Any other `/v1/...` path: OpenAI's 404 envelope rather than an empty body.
pub async fn unknown_route(uri: axum::http::Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("Invalid URL ({})", uri.path()),
        "invalid_request_error",
        None,
        Some("unknown_url"),
    )
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let created = state.started_unix_ms() / 1000;
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": created, "owned_by": "kiln"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// An image request: the model asked for, whether to answer with URLs, and the
/// pipeline's fields.
struct ImageRequest {
    model: Option<String>,
    as_url: bool,
    fields: Map<String, Value>,
}

/// OpenAI's image request as the pipeline's fields.
fn image_fields(mut body: Map<String, Value>) -> Result<ImageRequest, Box<Response>> {
    let model = match body.remove("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(model)) => Some(model),
        Some(_) => {
            return Err(Box::new(bad_param(
                "model",
                "model must be a string".into(),
            )));
        }
    };
    let as_url = match body.remove("response_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "b64_json" => false,
        Some(Value::String(format)) if format == "url" => true,
        Some(other) => {
            return Err(Box::new(bad_param(
                "response_format",
                format!("response_format must be \"b64_json\" or \"url\", not {other}"),
            )));
        }
    };
    // Accepted for compatibility; they have no meaning for open models.
    for ignored in ["quality", "style", "user", "background", "moderation"] {
        body.remove(ignored);
    }
    if let Some(n) = body.remove("n")
        && !n.is_null()
    {
        body.insert("num_outputs".into(), n);
    }
    match body.remove("size") {
        None | Some(Value::Null) => {}
        Some(Value::String(size)) if size == "auto" => {}
        Some(Value::String(size)) => {
            let parsed = size.split_once('x').and_then(|(w, h)| {
                Some((w.trim().parse::<u64>().ok()?, h.trim().parse::<u64>().ok()?))
            });
            let Some((width, height)) = parsed else {
                return Err(Box::new(bad_param(
                    "size",
                    format!("size must look like \"1024x1024\", not {size:?}"),
                )));
            };
            if width % 16 != 0 || height % 16 != 0 {
                return Err(Box::new(bad_param(
                    "size",
                    format!("size {size:?}: width and height must be multiples of 16"),
                )));
            }
            body.insert("width".into(), json!(width));
            body.insert("height".into(), json!(height));
        }
        Some(_) => {
            return Err(Box::new(bad_param(
                "size",
                "size must be a string like \"1024x1024\"".into(),
            )));
        }
    }
    Ok(ImageRequest {
        model,
        as_url,
        fields: body,
    })
}

/// The response body for a finished image job (base64 images).
pub fn job_body(job: &Job) -> Value {
    images_body(job, None)
}

/// Where image links live for a request: `{scheme}://{host}{mount}/v1/images/files/`
/// (the scheme from `X-Forwarded-Proto` behind a proxy).
fn link_base(headers: &HeaderMap, mount: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http");
    let mount = mount.trim_end_matches('/');
    format!("{scheme}://{host}{mount}/v1/images/files/")
}

/// `data` as OpenAI returns it: `b64_json`, or with `links` (the store and
/// the links' base) a `url` that serves the image for an hour.
fn images_body(job: &Job, links: Option<(&crate::image_links::ImageLinks, &str)>) -> Value {
    let result = job
        .output
        .as_ref()
        .and_then(kiln_pipelines::text_to_image::result::ImageResult::from_output);
    let images = result
        .as_ref()
        .map(|r| r.images.as_slice())
        .unwrap_or_default();
    let data: Vec<Value> = images
        .iter()
        .map(|image| match links {
            Some((store, base)) => {
                let token = store.put(image.bytes(), &image.mime_type);
                json!({"url": format!("{base}{token}")})
            }
            None => json!({"b64_json": image.base64}),
        })
        .collect();
    let mut body = json!({
        "created": job.created_at / 1000,
        "data": data,
    });
    if let Some(seed) = result.and_then(|r| r.seed) {
        body["seed"] = json!(seed);
    }
    body
}

/// `GET /v1/images/files/{token}`: the image behind a `url` response.
pub async fn image_file(State(state): State<Arc<AppState>>, Path(token): Path<String>) -> Response {
    match state.image_links.get(&token) {
        Some((bytes, mime)) => (
            [
                (header::CONTENT_TYPE, mime),
                (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
            ],
            bytes.as_ref().clone(),
        )
            .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "no such image: the link is unknown or has expired (links last an hour)",
            "invalid_request_error",
            None,
            None,
        ),
    }
}

/// `POST /v1/images/generations`.
pub async fn image_generations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(&state, body) {
        Ok(body) => body,
        Err(e) => return error(e),
    };
    let document: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(document) => document,
        Err(e) => {
            return error(ApiError::BadRequest(format!(
                "the body must be a JSON object: {e}"
            )));
        }
    };
    let ImageRequest {
        model: model_name,
        as_url,
        fields,
    } = match image_fields(document) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let model = match model_name {
        Some(name) => state.model(&name),
        None => state.default_model(),
    };
    let model = match model {
        Ok(model) => model,
        Err(e) => return error(e),
    };
    let input = Value::Object(fields);
    if let Some(problems) = validation_problems(&model, &input) {
        return invalid(&problems);
    }
    let options = JobOptions {
        sync: true,
        ..JobOptions::default()
    };
    let job = match state
        .jobs
        .submit(None, &model.name, Protocol::OpenAi, input, options)
        .await
    {
        Ok(job) => job,
        Err(e) => return labelled(error(ApiError::from(e)), &model.name),
    };
    let done = match state.jobs.wait_final(&job.id).await {
        Ok(Some(done)) => done,
        Ok(None) => return error(ApiError::JobNotFound(job.id)),
        Err(e) => return error(ApiError::from(e)),
    };
    let response = match (&done.status, &done.error) {
        (JobStatus::Completed, _) => {
            let base = link_base(&headers, &state.openai_mount);
            let links = as_url.then_some((&state.image_links, base.as_str()));
            Json(images_body(&done, links)).into_response()
        }
        (_, Some(JobError::Invalid { problems })) => invalid(problems),
        // A model that cannot load is a 503, as on every other protocol.
        (_, Some(JobError::Unavailable { message })) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            message,
            "server_error",
            None,
            None,
        ),
        // A LoRA host that failed is the gateway's problem, not the request's.
        (_, Some(JobError::Upstream { message, timed_out })) => error_response(
            if *timed_out {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            },
            message,
            "server_error",
            None,
            None,
        ),
        (status, error) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &error
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| status.as_str().to_string()),
            "server_error",
            None,
            None,
        ),
    };
    labelled(response, &model.name)
}
