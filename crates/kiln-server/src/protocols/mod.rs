//! Protocol adapters: each turns its wire format into a `PredictRequest` and maps
//! the common `Prediction` and `ApiError` back to its own shapes.

pub mod kserve;
pub mod mlflow;
pub mod tensor_codec;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use kiln_pipelines::{PipelineError, PredictRequest, Prediction};
use serde_json::{Map, Value};

use crate::error::ApiError;
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
pub async fn predict(model: &ServedModel, request: PredictRequest) -> Result<Prediction, ApiError> {
    let pipeline = model.pipeline()?;
    if let Err(PipelineError::InvalidInput(problems)) =
        pipeline.interface().params.validate(&request.params)
    {
        return Err(ApiError::InvalidParameters(problems));
    }
    let pipeline = Arc::clone(&pipeline);
    tokio::task::spawn_blocking(move || kiln_pipelines::predict_any(&*pipeline, request))
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
            [single] => single.data.to_json(),
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
