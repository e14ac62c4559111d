//! MLflow scoring protocol (also SageMaker's container contract): `/ping`, `/health`,
//! `/version`, `POST /invocations` with pandas-style JSON or CSV.
//!
//! With several models served, `/invocations` scores the first one given to
//! `kiln serve`; the header `X-Kiln-Model: <name>` or the path
//! `/models/<name>/invocations` picks another.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_pipelines::{PredictInput, PredictRequest, RawFrame};
use serde_json::{Map, Value, json};

use super::{body_or_error, media_type, predict, prediction_json};
use crate::error::ApiError;
use crate::metrics::labelled;
use crate::state::{AppState, ServedModel};

/// Header selecting the model for `/invocations` when several are served.
pub const MODEL_HEADER: &str = "x-kiln-model";
/// SageMaker passes this through to the container and back.
pub const SAGEMAKER_ATTRIBUTES: &str = "x-amzn-sagemaker-custom-attributes";

const INPUT_KEYS: [&str; 4] = [
    "dataframe_split",
    "dataframe_records",
    "instances",
    "inputs",
];

/// `GET /ping` and `GET /health`: 200 once the server is ready, else 503 with
/// why: `loading`, or each failed model and its reason.
pub async fn ping(State(state): State<Arc<AppState>>) -> Response {
    if state.ready() {
        return (StatusCode::OK, "\n").into_response();
    }
    let failures = state.failures();
    let body = if failures.is_empty() {
        "loading\n".to_string()
    } else {
        failures
            .iter()
            .map(|(model, reason)| format!("failed: {model}: {reason}\n"))
            .collect()
    };
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

/// `GET /version`.
pub async fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `POST /invocations`.
pub async fn invocations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let model = match headers.get(MODEL_HEADER).and_then(|v| v.to_str().ok()) {
        Some(name) => state.model(name),
        None => state.default_model(),
    };
    match model {
        Ok(model) => score(&state, &model, &headers, body).await,
        Err(error) => error.mlflow(),
    }
}

/// `POST /models/{name}/invocations`.
pub async fn model_invocations(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match state.model(&name) {
        Ok(model) => score(&state, &model, &headers, body).await,
        Err(error) => error.mlflow(),
    }
}

async fn score(
    state: &AppState,
    model: &Arc<ServedModel>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // SageMaker LLM containers (MAX, LMI) take OpenAI chat and completion bodies.
    if let Some((api, document)) = openai_body(headers, &body) {
        return super::openai_text::serve_model(state, model, api, document).await;
    }
    let result = async {
        let body = body_or_error(state, body)?;
        let request = parse_request(headers, &body)?;
        predict(state, model, request).await
    }
    .await;
    let mut response = match result {
        Ok(prediction) => {
            Json(json!({"predictions": prediction_json(&prediction)})).into_response()
        }
        Err(error) => error.mlflow(),
    };
    if let Some(attributes) = headers.get(SAGEMAKER_ATTRIBUTES) {
        response.headers_mut().insert(
            HeaderName::from_static(SAGEMAKER_ATTRIBUTES),
            attributes.clone(),
        );
    }
    labelled(response, &model.name)
}

/// Turn an `/invocations` body into a request, as MLflow's scoring server reads it.
pub fn parse_request(headers: &HeaderMap, body: &[u8]) -> Result<PredictRequest, ApiError> {
    match media_type(headers).as_deref() {
        Some("application/json") => parse_json(body),
        Some("text/csv") => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::BadRequest("the CSV body is not valid UTF-8".into()))?;
            Ok(PredictRequest {
                input: PredictInput::Frame(RawFrame::from_csv(text)?),
                params: Map::new(),
            })
        }
        other => Err(ApiError::UnsupportedMediaType {
            found: other.unwrap_or("(none)").to_string(),
            expected: "application/json or text/csv",
        }),
    }
}

fn parse_json(body: &[u8]) -> Result<PredictRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!("Invalid input: the body is not valid JSON ({e})"))
    })?;
    parse_json_value(value)
}

/// An OpenAI chat (`messages`) or completion (`prompt`) body, not MLflow input.
fn openai_body(
    headers: &HeaderMap,
    body: &Result<Bytes, BytesRejection>,
) -> Option<(super::openai_text::Api, Map<String, Value>)> {
    if media_type(headers).as_deref() != Some("application/json") {
        return None;
    }
    let document: Map<String, Value> = serde_json::from_slice(body.as_ref().ok()?).ok()?;
    if is_mlflow_input(&document) {
        return None;
    }
    if document.contains_key("messages") {
        Some((super::openai_text::Api::Chat, document))
    } else if document.contains_key("prompt") {
        Some((super::openai_text::Api::Completions, document))
    } else {
        None
    }
}

/// Whether a JSON object is in MLflow's input shape (one of its input keys).
pub fn is_mlflow_input(object: &Map<String, Value>) -> bool {
    INPUT_KEYS.iter().any(|k| object.contains_key(*k))
}

/// Turn a parsed `/invocations` JSON document into a request.
pub fn parse_json_value(value: Value) -> Result<PredictRequest, ApiError> {
    let Value::Object(mut object) = value else {
        return Err(ApiError::BadRequest(
            "Invalid input: the body must be a JSON object with one of dataframe_split, dataframe_records, instances, inputs".into(),
        ));
    };
    let params = match object.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(params)) => params,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "Invalid input: `params` must be an object".into(),
            ));
        }
    };
    let keys: Vec<&String> = object.keys().collect();
    let present: Vec<&str> = INPUT_KEYS
        .iter()
        .copied()
        .filter(|k| object.contains_key(*k))
        .collect();
    if present.len() != 1 || keys.len() != 1 {
        return Err(ApiError::BadRequest(format!(
            "Invalid input. The input must be a JSON dictionary with exactly one of the input fields {{{}}}. Received dictionary with input fields: {:?}",
            INPUT_KEYS.map(|k| format!("'{k}'")).join(", "),
            keys
        )));
    }
    let key = present[0];
    let value = &object[key];
    let frame = match key {
        "dataframe_split" => RawFrame::from_split(value)?,
        "dataframe_records" => match value {
            Value::Array(records) => RawFrame::from_records(key, records)?,
            _ => {
                return Err(ApiError::BadRequest(
                    "Invalid input: dataframe_records must be a list of records".into(),
                ));
            }
        },
        _ => RawFrame::from_instances(key, value)?,
    };
    Ok(PredictRequest {
        input: PredictInput::Frame(frame),
        params,
    })
}
