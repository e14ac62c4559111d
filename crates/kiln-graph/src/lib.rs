//! Kiln's Graph API: build a typed computational graph (static and symbolic
//! dims, shape inference at build time), compile it once in an
//! [`InferenceSession`] (constant folding, CSE, fusion, buffer planning) and
//! execute the resulting [`Model`] many times; graphs serialize to a versioned
//! JSON format and import from ONNX.

pub mod compile;
mod elementwise;
pub mod error;
mod exec;
pub mod graph;
pub mod infer;
mod linear;
mod norm;
pub mod onnx;
pub mod ops;
mod pool;
pub mod serial;
pub mod session;
pub mod types;

pub use compile::{CompileReport, Weights};
pub use error::{GraphError, InputProblem, Result};
pub use graph::{Graph, Node, Source, Value};
pub use ops::{BinaryOp, CompareOp, Op, PoolKind, ReduceOp, UnaryOp};
pub use session::{InferenceSession, Model, SessionOptions, Signature, load_safetensors};
pub use types::{DType, Dim, TensorType};
