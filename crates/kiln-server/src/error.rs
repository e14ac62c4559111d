//! One typed error for every HTTP route, rendered in each protocol's own error
//! shape and status code (MLflow/SageMaker `error_code`, KServe `{"error"}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_pipelines::{FieldProblem, PipelineError};
use serde_json::json;

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The input broke the model's schema or signature; every problem is listed.
    #[error("{}", describe_problems(.0))]
    InvalidInput(Vec<FieldProblem>),
    /// Request parameters (MLflow `params`, KServe `parameters`) were invalid.
    #[error("{}", describe_problems(.0))]
    InvalidParameters(Vec<FieldProblem>),
    /// The body could not be parsed or has the wrong structure.
    #[error("{0}")]
    BadRequest(String),
    #[error("unsupported content type {found:?}; use {expected}")]
    UnsupportedMediaType {
        found: String,
        expected: &'static str,
    },
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("model {0:?} is not served here")]
    ModelNotFound(String),
    #[error("model {0:?} is not ready yet")]
    ModelNotReady(String),
    #[error("model {model:?} failed to load: {message}")]
    ModelFailed { model: String, message: String },
    /// A failure that is not the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe_problems(problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<PipelineError> for ApiError {
    fn from(error: PipelineError) -> Self {
        match error {
            PipelineError::InvalidInput(problems) => ApiError::InvalidInput(problems),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    /// The HTTP status every protocol here agrees on.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidInput(_)
            | ApiError::InvalidParameters(_)
            | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::ModelNotReady(_) | ApiError::ModelFailed { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// MLflow's `{"error_code", "message"}` body.
    pub fn mlflow(self) -> Response {
        let code = match &self {
            ApiError::InvalidParameters(_) => "INVALID_PARAMETER_VALUE",
            ApiError::InvalidInput(_)
            | ApiError::BadRequest(_)
            | ApiError::UnsupportedMediaType { .. } => "BAD_REQUEST",
            ApiError::PayloadTooLarge { .. } => "REQUEST_LIMIT_EXCEEDED",
            ApiError::ModelNotFound(_) => "RESOURCE_DOES_NOT_EXIST",
            ApiError::ModelNotReady(_) | ApiError::ModelFailed { .. } => "TEMPORARILY_UNAVAILABLE",
            ApiError::Internal(_) => "INTERNAL_ERROR",
        };
        let message = match &self {
            ApiError::InvalidInput(_) => format!("Failed to enforce schema of data: {self}"),
            _ => self.to_string(),
        };
        (
            self.status(),
            axum::Json(json!({"error_code": code, "message": message})),
        )
            .into_response()
    }

    /// KServe / Open Inference Protocol `{"error": "..."}` body.
    pub fn kserve(self) -> Response {
        (
            self.status(),
            axum::Json(json!({"error": self.to_string()})),
        )
            .into_response()
    }
}
