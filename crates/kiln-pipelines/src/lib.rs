//! Kiln's pipeline contract and the pipelines behind it.
//!
//! A pipeline is the only thing that knows both a task's inputs and the models
//! that serve it. Protocol adapters turn wire formats into a [`PredictRequest`];
//! a [`Pipeline`] validates it against its [`ModelInterface`] and predicts.

pub mod contract;
pub mod error;
pub mod frame;
pub mod graph_model;
pub mod lora;
pub mod pull;
pub mod rows;
pub mod schema;
pub mod settings;
pub mod tabular;
pub mod tensor;
pub mod text_generation;
pub mod text_to_image;
pub mod weight_check;

pub use contract::{
    InputSpec, ModelInterface, Pipeline, PredictInput, PredictRequest, Prediction, Progress,
    ProgressFn, describe_model_folder, load_pipeline,
};
pub use error::{FieldProblem, PipelineError, ProblemKind};
pub use frame::{ColumnSpec, ColumnType, Frame, RawFrame, Signature};
pub use rows::predict_any;
pub use schema::{FieldKind, FieldSpec, InputSchema};
pub use tensor::{DataType, Tensor, TensorData, TensorSignature, TensorSpec};
