//! Pipeline errors: validation problems (each naming its field and rule) and
//! failures while loading or running a model.

use std::fmt;

/// What rule a field broke; protocol adapters may phrase each kind their own way.
#[derive(Debug, Clone, PartialEq)]
pub enum ProblemKind {
    /// A required field or column is absent.
    Missing,
    /// A field the schema does not know.
    Unknown,
    /// Wrong JSON type or a value that cannot be converted.
    Type { expected: String, found: String },
    /// Outside a numeric range, a length limit, or not one of the allowed choices.
    Constraint,
    /// Structurally invalid request (empty frame, ragged rows, ...).
    Malformed,
}

/// One problem with one field or column of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldProblem {
    pub field: String,
    pub kind: ProblemKind,
    pub message: String,
}

impl FieldProblem {
    pub fn new(field: impl Into<String>, kind: ProblemKind, message: impl Into<String>) -> Self {
        FieldProblem {
            field: field.into(),
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Errors from loading a pipeline or running a prediction.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request broke the input schema; every problem is listed.
    #[error("invalid input: {}", join_problems(.0))]
    InvalidInput(Vec<FieldProblem>),
    /// The model could not be loaded from its manifest and artifacts.
    #[error("cannot load model {model}: {message}")]
    Load { model: String, message: String },
    /// The manifest names a pipeline kind this build of Kiln does not have.
    #[error("unknown pipeline kind {0:?}")]
    UnknownPipeline(String),
    /// The computation itself failed (not the caller's fault).
    #[error("prediction failed: {0}")]
    Execution(String),
    /// The progress callback asked the pipeline to stop (cancellation or timeout).
    #[error("stopped before finishing")]
    Stopped,
    /// A remote host the request pointed at (a LoRA URL, the Hub, CivitAI)
    /// failed or did not answer in time: not the caller's mistake (502/504).
    #[error("{field}: {message}")]
    Upstream {
        field: String,
        message: String,
        timed_out: bool,
    },
}

impl PipelineError {
    /// A single-problem validation error.
    pub fn invalid(
        field: impl Into<String>,
        kind: ProblemKind,
        message: impl Into<String>,
    ) -> Self {
        PipelineError::InvalidInput(vec![FieldProblem::new(field, kind, message)])
    }
}

fn join_problems(problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
