//! Protocol adapters: each turns its wire format into a `PredictRequest` and maps
//! the common `Prediction` and `ApiError` back to its own shapes.

pub mod cog;
pub mod databricks;
pub mod kserve;
pub mod mlflow;
pub mod openai;
pub mod openai_text;
pub mod runpod;
pub mod tensor_codec;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use kiln_pipelines::{
    InputSpec, ModelInterface, PipelineError, PredictInput, PredictRequest, Prediction, ProblemKind,
};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::jobs::{InputProblem, Job, LiveJob, Protocol};
use crate::state::{AppState, ServedModel};

/// The body, or 413 when it exceeded the configured limit.
pub fn body_or_error(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: state.body_limit,
            }
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {rejection}"))
        }
    })
}

/// The media type of a request without parameters, lowercased (`application/json`).
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// Validate params (as the protocol's parameter error), then predict off the async
/// executor so slow models never stall other requests.
pub async fn predict(
    state: &AppState,
    model: &Arc<ServedModel>,
    request: PredictRequest,
) -> Result<Prediction, ApiError> {
    let lease = state.lease(model, false).await?;
    let mut request = request;
    if let Err(PipelineError::InvalidInput(problems)) =
        lease.pipeline.interface().params.validate(&request.params)
    {
        // Parameters the model does not take are dropped with a warning, as
        // MLflow's scoring server does; a bad value of a known one is an error.
        let (unknown, known): (Vec<_>, Vec<_>) = problems
            .into_iter()
            .partition(|p| p.kind == ProblemKind::Unknown);
        if !known.is_empty() {
            return Err(ApiError::InvalidParameters(known));
        }
        for problem in unknown {
            tracing::warn!(model = %model.name, param = %problem.field, "ignoring a parameter the model does not take");
            request.params.remove(&problem.field);
        }
    }
    tokio::task::spawn_blocking(move || kiln_pipelines::predict_any(&*lease.pipeline, request))
        .await
        .map_err(|e| ApiError::Internal(format!("the prediction task failed: {e}")))?
        .map_err(ApiError::from)
}

/// A prediction as plain JSON: one tensor becomes its list of values, several
/// become a list of records keyed by tensor name.
pub fn prediction_json(prediction: &Prediction) -> Value {
    match prediction {
        Prediction::Json(value) => value.clone(),
        Prediction::Tensors(tensors) => match tensors.as_slice() {
            [single] => single.data.to_nested_json(&single.shape),
            many if many.iter().any(|t| t.shape.len() > 1) => {
                // Tensors of rank > 1: an object of nested lists per output,
                // as MLflow answers for dict-of-tensor models.
                Value::Object(
                    many.iter()
                        .map(|t| (t.name.clone(), t.data.to_nested_json(&t.shape)))
                        .collect(),
                )
            }
            many => {
                let rows = many.iter().map(|t| t.data.len()).max().unwrap_or(0);
                Value::Array(
                    (0..rows)
                        .map(|i| {
                            let mut record = Map::new();
                            for tensor in many {
                                if i < tensor.data.len() {
                                    record.insert(tensor.name.clone(), tensor.data.json_at(i));
                                }
                            }
                            Value::Object(record)
                        })
                        .collect(),
                )
            }
        },
    }
}

/// Schema problems with a job's input, when the model's interface is known and
/// takes fields (checked before queueing so clients hear of them at once).
pub fn validation_problems(model: &ServedModel, input: &Value) -> Option<Vec<InputProblem>> {
    let (Some(interface), Value::Object(fields)) = (model.interface(), input) else {
        return None;
    };
    let InputSpec::Fields(schema) = &interface.inputs else {
        return None;
    };
    match schema.validate(fields) {
        Err(PipelineError::InvalidInput(problems)) => Some(
            problems
                .iter()
                .map(InputProblem::from_field_problem)
                .collect(),
        ),
        _ => None,
    }
}

/// A job's JSON input as a request for this pipeline: an object of fields for
/// field-shaped pipelines; for tabular ones, an MLflow-style object
/// (`dataframe_split`, `dataframe_records`, `instances`, `inputs`), a list of
/// records, or one record.
pub fn request_from_json(
    interface: &ModelInterface,
    input: &Value,
) -> Result<PredictRequest, Vec<InputProblem>> {
    let malformed = |message: String| {
        vec![InputProblem::from_field_problem(
            &kiln_pipelines::FieldProblem::new("input", ProblemKind::Malformed, message),
        )]
    };
    match (&interface.inputs, input) {
        (InputSpec::Fields(_), Value::Object(fields)) => Ok(PredictRequest {
            input: PredictInput::Fields(fields.clone()),
            params: Map::new(),
        }),
        (InputSpec::Fields(_), _) => Err(malformed("input must be an object of fields".into())),
        (InputSpec::Columns(_) | InputSpec::Tensors(_), input) => {
            let tensors = matches!(interface.inputs, InputSpec::Tensors(_));
            let document = match input {
                Value::Object(object) if mlflow::is_mlflow_input(object) => input.clone(),
                // A tensor model's job input is `{name: batch-first nested list}`,
                // MLflow's `inputs` dict.
                Value::Object(_) if tensors => serde_json::json!({"inputs": input}),
                Value::Object(_) => serde_json::json!({"dataframe_records": [input]}),
                Value::Array(_) => serde_json::json!({"dataframe_records": input}),
                _ => return Err(malformed("input must be records or a table".into())),
            };
            mlflow::parse_json_value(document).map_err(|e| match e {
                ApiError::InvalidInput(problems) => problems
                    .iter()
                    .map(InputProblem::from_field_problem)
                    .collect(),
                other => malformed(other.to_string()),
            })
        }
    }
}

/// The body a job's webhook carries, in the protocol it came in through.
pub fn webhook_body(job: &Job, live: Option<&LiveJob>) -> Value {
    match job.protocol {
        Protocol::RunPod => runpod::status_body(job),
        Protocol::Cog => cog::prediction_body(job, live),
        Protocol::OpenAi => openai::job_body(job),
    }
}
