//! KServe: the Open Inference Protocol v2 REST API (server/model metadata, health,
//! `/infer` with JSON or binary tensors) and the v1 `:predict` API.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_pipelines::contract::InputSpec;
use kiln_pipelines::{PredictInput, PredictRequest, Prediction, RawFrame, Tensor};
use serde_json::{Map, Value, json};

use super::tensor_codec::{HEADER_LENGTH, decode_input, encode_output};
use super::{body_or_error, predict, prediction_json};
use crate::error::ApiError;
use crate::metrics::labelled;
use crate::state::{AppState, ServedModel};

/// Request parameters that steer the protocol rather than the model.
const PROTOCOL_PARAMETERS: [&str; 1] = ["binary_data_output"];

/// `GET /v2`.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "kiln",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// `GET /v2/health/live`: the process is up.
pub async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready`: every model loaded.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.ready();
    let mut body = json!({"ready": ready});
    let failures = state.failures();
    if !failures.is_empty() {
        body["failed_models"] = failures
            .into_iter()
            .map(|(name, error)| json!({"name": name, "error": error}))
            .collect();
    }
    (ready_status(ready), Json(body)).into_response()
}

fn versioned(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<ServedModel>, ApiError> {
    let model = state.model(name)?;
    match version {
        Some(v) if v != model.version_label() => {
            Err(ApiError::ModelNotFound(format!("{name} version {v}")))
        }
        _ => Ok(model),
    }
}

fn metadata(model: &ServedModel) -> Result<Value, ApiError> {
    let interface = model.interface_or_not_ready()?;
    let spec = |s: &kiln_pipelines::TensorSpec| json!({"name": s.name, "datatype": s.datatype, "shape": s.shape});
    if let InputSpec::Tensors(signature) = &interface.inputs {
        return Ok(json!({
            "name": model.name,
            "versions": [model.version_label()],
            "platform": format!("kiln/{}", interface.pipeline),
            "inputs": signature.inputs.iter().map(spec).collect::<Vec<_>>(),
            "outputs": signature.outputs.iter().map(spec).collect::<Vec<_>>(),
        }));
    }
    let inputs: Vec<Value> = match &interface.inputs {
        InputSpec::Columns(signature) => signature
            .inputs
            .iter()
            .map(|c| json!({"name": c.name, "datatype": c.column_type.protocol_datatype(), "shape": [-1]}))
            .collect(),
        InputSpec::Fields(schema) => schema
            .fields
            .iter()
            .map(|f| json!({"name": f.name, "datatype": "BYTES", "shape": [1]}))
            .collect(),
        InputSpec::Tensors(_) => Vec::new(),
    };
    let outputs: Vec<Value> = interface
        .outputs
        .inputs
        .iter()
        .map(|c| json!({"name": c.name, "datatype": c.column_type.protocol_datatype(), "shape": [-1]}))
        .collect();
    Ok(json!({
        "name": model.name,
        "versions": [model.version_label()],
        "platform": format!("kiln/{}", interface.pipeline),
        "inputs": inputs,
        "outputs": outputs,
    }))
}

/// `GET /v2/models/{name}`.
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Response {
    respond_metadata(&state, &name, None)
}

/// `GET /v2/models/{name}/versions/{version}`.
pub async fn version_metadata(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    respond_metadata(&state, &name, Some(&version))
}

fn respond_metadata(state: &AppState, name: &str, version: Option<&str>) -> Response {
    let result = versioned(state, name, version).and_then(|m| metadata(&m));
    match result {
        Ok(body) => labelled(Json(body).into_response(), name),
        Err(error) => error.kserve(),
    }
}

/// `GET /v2/models/{name}/ready`.
pub async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    respond_ready(&state, &name, None)
}

/// `GET /v2/models/{name}/versions/{version}/ready`.
pub async fn version_ready(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    respond_ready(&state, &name, Some(&version))
}

/// 200 for a ready model, 503 otherwise (KServe's readiness answer).
fn ready_status(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn respond_ready(state: &AppState, name: &str, version: Option<&str>) -> Response {
    match versioned(state, name, version) {
        Ok(model) => {
            let ready = model.is_ready();
            let status = ready_status(ready);
            let mut body = json!({"name": model.name, "ready": ready});
            if let Some(reason) = model.failure() {
                body["error"] = Value::String(reason);
            }
            labelled((status, Json(body)).into_response(), name)
        }
        Err(error) => error.kserve(),
    }
}

/// `POST /v2/models/{name}/infer`.
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond_infer(&state, &name, None, &headers, body).await
}

/// `POST /v2/models/{name}/versions/{version}/infer`.
pub async fn version_infer(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond_infer(&state, &name, Some(&version), &headers, body).await
}

async fn respond_infer(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let model = versioned(state, name, version)?;
        let body = body_or_error(state, body)?;
        let mut request = InferRequest::parse(headers, &body)?;
        // Tensor models take the tensors as sent; tabular and field models a frame.
        let tensor_model = model
            .interface()
            .is_some_and(|i| matches!(i.inputs, InputSpec::Tensors(_)));
        request.predict.input = if tensor_model {
            PredictInput::Tensors(std::mem::take(&mut request.tensors))
        } else {
            PredictInput::Frame(RawFrame::from_tensors(&request.tensors)?)
        };
        let prediction = predict(state, &model, request.predict).await?;
        request.outputs.render(&model, request.id, prediction)
    }
    .await;
    labelled(result.unwrap_or_else(ApiError::kserve), name)
}

/// Triton's generate-extension tensor names and the fields they stand for
/// (`text_input` → `prompt` in, `text` → `text_output` out).
const GENERATE_NAMES: &[(&str, &str)] = &[("text_input", "prompt")];
const GENERATE_OUTPUT: (&str, &str) = ("text", "text_output");

/// A text-generation result (or one per row) as BYTES tensors, one per field,
/// with Triton's `text_output` for the text; `None` for other JSON results.
fn generated_text_tensors(output: &Value) -> Option<Vec<Tensor>> {
    let rows: Vec<&Map<String, Value>> = match output {
        Value::Object(row) => vec![row],
        Value::Array(rows) => rows.iter().map(Value::as_object).collect::<Option<_>>()?,
        _ => return None,
    };
    let first = rows.first()?;
    if !first.get(GENERATE_OUTPUT.0).is_some_and(Value::is_string) {
        return None;
    }
    let cell = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
        None => Vec::new(),
    };
    Some(
        first
            .keys()
            .map(|key| Tensor {
                name: if key == GENERATE_OUTPUT.0 {
                    GENERATE_OUTPUT.1.to_string()
                } else {
                    key.clone()
                },
                dtype: kiln_pipelines::DataType::Bytes,
                shape: vec![rows.len()],
                data: kiln_pipelines::TensorData::Bytes(
                    rows.iter().map(|r| cell(r.get(key))).collect(),
                ),
            })
            .collect(),
    )
}

/// Which outputs the client asked for and how.
struct OutputSelection {
    /// Requested outputs (name, binary); empty = all, in `default_binary` form.
    requested: Vec<(String, bool)>,
    default_binary: bool,
}

struct InferRequest {
    id: Option<Value>,
    tensors: Vec<Tensor>,
    /// The request with its parameters; its input is set once the model's
    /// interface says how it takes tensors.
    predict: PredictRequest,
    outputs: OutputSelection,
}

impl InferRequest {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Self, ApiError> {
        let json_length = match headers.get(HEADER_LENGTH) {
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n <= body.len())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "{HEADER_LENGTH} must be a byte count within the body ({} bytes)",
                        body.len()
                    ))
                })?,
            None => body.len(),
        };
        let (json_part, mut blobs) = body.split_at(json_length);
        let value: Value = serde_json::from_slice(json_part).map_err(|e| {
            ApiError::BadRequest(format!("the inference request is not valid JSON: {e}"))
        })?;
        let inputs = value["inputs"]
            .as_array()
            .filter(|inputs| !inputs.is_empty())
            .ok_or_else(|| {
                ApiError::BadRequest("`inputs` must be a non-empty list of tensors".into())
            })?;
        let mut tensors = Vec::with_capacity(inputs.len());
        for spec in inputs {
            let binary_size = spec["parameters"]["binary_data_size"].as_u64();
            let blob = match binary_size {
                Some(size) => {
                    let size = size as usize;
                    if size > blobs.len() {
                        return Err(ApiError::BadRequest(format!(
                            "input {}: binary_data_size {size} exceeds the {} bytes left in the body",
                            spec["name"],
                            blobs.len()
                        )));
                    }
                    let (head, rest) = blobs.split_at(size);
                    blobs = rest;
                    Some(head)
                }
                None => None,
            };
            let mut tensor = decode_input(spec, blob)?;
            if let Some((_, ours)) = GENERATE_NAMES
                .iter()
                .find(|(triton, _)| *triton == tensor.name)
            {
                tensor.name = (*ours).to_string();
            }
            tensors.push(tensor);
        }
        let mut params = match &value["parameters"] {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            _ => {
                return Err(ApiError::BadRequest(
                    "`parameters` must be an object".into(),
                ));
            }
        };
        let default_binary = params
            .get("binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        for key in PROTOCOL_PARAMETERS {
            params.remove(key);
        }
        let requested = match &value["outputs"] {
            Value::Array(outputs) => outputs
                .iter()
                .map(|o| {
                    let name = o["name"].as_str().ok_or_else(|| {
                        ApiError::BadRequest("every requested output needs a `name`".into())
                    })?;
                    let binary = o["parameters"]["binary_data"]
                        .as_bool()
                        .unwrap_or(default_binary);
                    Ok((name.to_string(), binary))
                })
                .collect::<Result<Vec<_>, ApiError>>()?,
            _ => Vec::new(),
        };
        Ok(InferRequest {
            id: value.get("id").cloned(),
            tensors,
            predict: PredictRequest {
                input: PredictInput::Tensors(Vec::new()),
                params,
            },
            outputs: OutputSelection {
                requested,
                default_binary,
            },
        })
    }
}

impl OutputSelection {
    fn render(
        self,
        model: &ServedModel,
        id: Option<Value>,
        prediction: Prediction,
    ) -> Result<Response, ApiError> {
        let tensors = match prediction {
            Prediction::Tensors(tensors) => tensors,
            Prediction::Json(output) if generated_text_tensors(&output).is_some() => {
                generated_text_tensors(&output).unwrap_or_default()
            }
            json_output => vec![Tensor {
                name: "output".into(),
                dtype: kiln_pipelines::DataType::Bytes,
                shape: vec![1],
                data: kiln_pipelines::TensorData::Bytes(vec![
                    prediction_json(&json_output).to_string().into_bytes(),
                ]),
            }],
        };
        let selected: Vec<(&Tensor, bool)> = if self.requested.is_empty() {
            tensors.iter().map(|t| (t, self.default_binary)).collect()
        } else {
            self.requested
                .iter()
                .map(|(name, binary)| {
                    tensors
                        .iter()
                        .find(|t| &t.name == name)
                        .map(|t| (t, *binary))
                        .ok_or_else(|| {
                            let known: Vec<&str> =
                                tensors.iter().map(|t| t.name.as_str()).collect();
                            ApiError::BadRequest(format!(
                                "unknown output {name:?}; this model has: {}",
                                known.join(", ")
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        };
        let mut blobs = Vec::new();
        let outputs: Vec<Value> = selected
            .iter()
            .map(|(tensor, binary)| encode_output(tensor, *binary, &mut blobs))
            .collect();
        let mut body = json!({
            "model_name": model.name,
            "model_version": model.version_label(),
            "outputs": outputs,
        });
        if let Some(id) = id {
            body["id"] = id;
        }
        let json_bytes = body.to_string().into_bytes();
        if blobs.is_empty() {
            return Ok(([(header::CONTENT_TYPE, "application/json")], json_bytes).into_response());
        }
        let json_length = json_bytes.len();
        let mut payload = json_bytes;
        payload.extend_from_slice(&blobs);
        let mut response = Response::new(Body::from(payload));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(HEADER_LENGTH, HeaderValue::from(json_length));
        Ok(response)
    }
}

/// `GET /v1/models/{name}`: KServe v1's `{"name", "ready"}`, with OpenAI's
/// model fields (`id`, `object`, `created`, `owned_by`) beside them, since both
/// protocols claim this path (`client.models.retrieve` reads the latter).
pub async fn v1_model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.model(&name) {
        Ok(model) => {
            let ready = model.is_ready();
            let status = ready_status(ready);
            let body = json!({
                "name": model.name,
                "ready": ready,
                "id": model.name,
                "object": "model",
                "created": state.started_unix_ms() / 1000,
                "owned_by": "kiln",
            });
            labelled((status, Json(body)).into_response(), &name)
        }
        Err(error) => error.kserve(),
    }
}

/// `POST /v1/models/{name}:predict` (the `:predict` suffix is part of the segment).
pub async fn v1_predict(
    State(state): State<Arc<AppState>>,
    Path(segment): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(name) = segment.strip_suffix(":predict") else {
        return ApiError::BadRequest(format!(
            "unknown verb in {segment:?}; use /v1/models/<name>:predict"
        ))
        .kserve();
    };
    let result = async {
        let model = state.model(name)?;
        let body = body_or_error(&state, body)?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("the request is not valid JSON: {e}")))?;
        let instances = value
            .get("instances")
            .ok_or_else(|| ApiError::BadRequest("the body must have `instances`".into()))?;
        let params = match value.get("parameters") {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        };
        let request = PredictRequest {
            input: PredictInput::Frame(RawFrame::from_instances("instances", instances)?),
            params,
        };
        let prediction = predict(&state, &model, request).await?;
        Ok::<_, ApiError>(
            Json(json!({"predictions": prediction_json(&prediction)})).into_response(),
        )
    }
    .await;
    labelled(result.unwrap_or_else(ApiError::kserve), name)
}
