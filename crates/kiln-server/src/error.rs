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
    /// The model's queue is at its bound.
    #[error("the queue for model {model:?} is full ({limit} jobs); retry later")]
    QueueFull { model: String, limit: usize },
    /// No or a wrong API key.
    #[error("a valid API key is required (Authorization: Bearer <key>)")]
    Unauthorized,
    /// An unknown or expired job.
    #[error("job {0:?} does not exist (unknown id, or its results have expired)")]
    JobNotFound(String),
    /// A host the request pointed at failed (502) or timed out (504).
    #[error("{message}")]
    Upstream { message: String, timed_out: bool },
    /// The model cannot serve now (its pipeline failed to load).
    #[error("{0}")]
    Unavailable(String),
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
            PipelineError::Upstream {
                field,
                message,
                timed_out,
            } => ApiError::Upstream {
                message: format!("{field}: {message}"),
                timed_out,
            },
            PipelineError::Load { model, message } => ApiError::ModelFailed { model, message },
            other @ PipelineError::UnknownPipeline(_) => ApiError::Unavailable(other.to_string()),
            other @ (PipelineError::Execution(_) | PipelineError::Stopped) => {
                ApiError::Internal(other.to_string())
            }
        }
    }
}

impl From<crate::jobs::StoreError> for ApiError {
    /// An unreachable shared queue is 503 (retry later); anything else in the
    /// store is an internal fault.
    fn from(e: crate::jobs::StoreError) -> Self {
        if e.is_unreachable() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<crate::jobs::SubmitError> for ApiError {
    fn from(error: crate::jobs::SubmitError) -> Self {
        use crate::jobs::SubmitError;
        match error {
            SubmitError::QueueFull { model, limit } => ApiError::QueueFull { model, limit },
            SubmitError::Duplicate(id) => {
                ApiError::BadRequest(format!("a job with id {id:?} already exists"))
            }
            SubmitError::UnknownModel(model) => ApiError::ModelNotFound(model),
            SubmitError::Store(e) => ApiError::from(e),
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
            ApiError::ModelNotReady(_)
            | ApiError::ModelFailed { .. }
            | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream {
                timed_out: true, ..
            } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::JobNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before retrying a 429.
    pub const RETRY_AFTER_SECONDS: u64 = 5;

    /// Add `Retry-After` to 429 responses.
    pub fn with_retry_after(&self, mut response: Response) -> Response {
        if matches!(self, ApiError::QueueFull { .. }) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(Self::RETRY_AFTER_SECONDS),
            );
        }
        response
    }

    /// MLflow's `{"error_code", "message"}` body.
    pub fn mlflow(self) -> Response {
        let code = match &self {
            ApiError::InvalidParameters(_) => "INVALID_PARAMETER_VALUE",
            // MLflow's schema enforcement calls a missing column a bad parameter.
            ApiError::InvalidInput(problems)
                if problems
                    .iter()
                    .any(|p| p.kind == kiln_pipelines::ProblemKind::Missing) =>
            {
                "INVALID_PARAMETER_VALUE"
            }
            ApiError::InvalidInput(_)
            | ApiError::BadRequest(_)
            | ApiError::UnsupportedMediaType { .. } => "BAD_REQUEST",
            ApiError::PayloadTooLarge { .. } | ApiError::QueueFull { .. } => {
                "REQUEST_LIMIT_EXCEEDED"
            }
            ApiError::Unauthorized => "UNAUTHENTICATED",
            ApiError::JobNotFound(_) => "RESOURCE_DOES_NOT_EXIST",
            ApiError::ModelNotFound(_) => "RESOURCE_DOES_NOT_EXIST",
            ApiError::ModelNotReady(_)
            | ApiError::ModelFailed { .. }
            | ApiError::Unavailable(_)
            | ApiError::Upstream { .. } => "TEMPORARILY_UNAVAILABLE",
            ApiError::Internal(_) => "INTERNAL_ERROR",
        };
        let message = match &self {
            ApiError::InvalidInput(_) => format!("Failed to enforce schema of data: {self}"),
            _ => self.to_string(),
        };
        let response = (
            self.status(),
            axum::Json(json!({"error_code": code, "message": message})),
        )
            .into_response();
        self.with_retry_after(response)
    }

    /// KServe / Open Inference Protocol `{"error": "..."}` body.
    pub fn kserve(self) -> Response {
        self.simple()
    }

    /// A plain `{"error": "..."}` body (KServe, RunPod).
    pub fn simple(self) -> Response {
        let response = (
            self.status(),
            axum::Json(json!({"error": self.to_string()})),
        )
            .into_response();
        self.with_retry_after(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_errors_keep_their_kind_up_to_the_status_code() {
        let status = |e: PipelineError| ApiError::from(e).status();
        assert_eq!(
            status(PipelineError::invalid(
                "x",
                kiln_pipelines::ProblemKind::Missing,
                "m"
            )),
            StatusCode::BAD_REQUEST
        );
        let upstream = |timed_out| PipelineError::Upstream {
            field: "loras[0]".into(),
            message: "network error".into(),
            timed_out,
        };
        assert_eq!(status(upstream(false)), StatusCode::BAD_GATEWAY);
        assert_eq!(status(upstream(true)), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            status(PipelineError::Load {
                model: "m".into(),
                message: "corrupt".into()
            }),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(PipelineError::Execution("nan".into())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
