//! The graph crate's one error type.

use std::fmt;

/// One problem with one execution input (several are reported at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputProblem {
    /// The input's name.
    pub input: String,
    pub message: String,
}

impl fmt::Display for InputProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.input, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// An op cannot be built or run with these operands.
    #[error("{op}: {message}")]
    Op { op: String, message: String },

    /// An ONNX node uses an operator this build does not implement.
    #[error(
        "unsupported ONNX operator {op_type} (domain {domain:?}, opset {opset}) at node {node:?}"
    )]
    UnsupportedOperator {
        op_type: String,
        domain: String,
        opset: i64,
        node: String,
    },

    /// An ONNX node is supported but used in a way Kiln cannot import.
    #[error("ONNX node {node:?} ({op_type}): {message}")]
    Import {
        node: String,
        op_type: String,
        message: String,
    },

    /// A model or graph file that cannot be read.
    #[error("malformed {what}: {message}")]
    Malformed { what: String, message: String },

    /// A graph's reference to a value, weight or input that is not there.
    #[error("{0}")]
    Invalid(String),

    /// Execution inputs that do not match the graph's signature, every problem.
    #[error("invalid inputs: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Inputs(Vec<InputProblem>),

    #[error(transparent)]
    Engine(#[from] kiln_engine::EngineError),

    #[error("{0}")]
    Tensor(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl GraphError {
    pub fn op(op: &str, message: impl Into<String>) -> Self {
        GraphError::Op {
            op: op.to_string(),
            message: message.into(),
        }
    }

    pub fn malformed(what: &str, message: impl Into<String>) -> Self {
        GraphError::Malformed {
            what: what.to_string(),
            message: message.into(),
        }
    }

    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        GraphError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub type Result<T, E = GraphError> = std::result::Result<T, E>;
