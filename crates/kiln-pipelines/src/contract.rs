//! The pipeline contract: what a served model exposes (its interface) and the one
//! trait every pipeline implements, plus the table that loads a pipeline by kind.

use std::sync::Arc;

use kiln_registry::ResolvedModel;
use serde_json::{Map, Value};

use crate::error::PipelineError;
use crate::frame::{RawFrame, Signature};
use crate::graph_model;
use crate::schema::InputSchema;
use crate::tabular::glm;
use crate::tensor::{Tensor, TensorSignature};
use crate::text_generation;
use crate::text_to_image::sdxl;
use crate::text_to_image::{flux, flux2};

/// How a model takes its input.
#[derive(Debug, Clone, PartialEq)]
pub enum InputSpec {
    /// Rows of named, typed columns (tabular models).
    Columns(Signature),
    /// One JSON object validated by a schema (generative models).
    Fields(InputSchema),
    /// Named tensors of given dtypes and shapes (graph and ONNX models).
    Tensors(TensorSignature),
}

/// Everything a protocol needs to describe a served model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInterface {
    /// Pipeline kind, e.g. `tabular/glm`.
    pub pipeline: String,
    pub inputs: InputSpec,
    /// Optional per-request parameters (MLflow `params`, KServe `parameters`).
    pub params: InputSchema,
    /// Output columns / tensors.
    pub outputs: Signature,
}

/// A request's input before validation.
#[derive(Debug, Clone, PartialEq)]
pub enum PredictInput {
    Frame(RawFrame),
    Fields(Map<String, Value>),
    /// Typed tensors as tensor protocols (KServe v2) carry them.
    Tensors(Vec<Tensor>),
}

/// One prediction request as every protocol adapter produces it.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictRequest {
    pub input: PredictInput,
    pub params: Map<String, Value>,
}

/// What a pipeline returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// Named tensors, one row per input row for tabular models.
    Tensors(Vec<Tensor>),
    /// A JSON document.
    Json(Value),
}

/// Progress of a long prediction: `step` of `total` steps done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
}

/// Receives progress; returning `false` asks the pipeline to stop (cancellation).
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress) -> bool;

/// A loaded model that validates its inputs and predicts.
pub trait Pipeline: Send + Sync {
    fn interface(&self) -> &ModelInterface;
    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError>;

    /// Predict, reporting progress between steps and stopping when told to.
    /// Pipelines without steps report nothing.
    fn predict_with_progress(
        &self,
        request: PredictRequest,
        _progress: ProgressFn,
    ) -> Result<Prediction, PipelineError> {
        self.predict(request)
    }

    /// Bytes the loaded model's weights hold in memory (quantized layers as
    /// stored), when the pipeline counted them at load; for reports and the
    /// server's memory budget.
    fn resident_bytes(&self) -> Option<u64> {
        None
    }

    /// The streaming text-generation engine behind this pipeline, for protocols
    /// that stream tokens (OpenAI chat and completions). `None` for other tasks.
    fn text_generation(&self) -> Option<Arc<dyn kiln_textgen::TextGeneration>> {
        None
    }
}

type LoadFn = fn(&ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError>;

/// Pipeline kinds this build knows, keyed by the manifest's `pipeline` field.
const PIPELINES: &[(&str, LoadFn)] = &[
    (glm::PIPELINE_KIND, glm::load),
    (flux::PIPELINE_KIND, flux::load),
    (flux2::PIPELINE_KIND, flux2::load),
    (sdxl::PIPELINE_KIND, sdxl::load),
    (text_generation::PIPELINE_KIND, text_generation::load),
    (graph_model::PIPELINE_KIND, graph_model::load),
];

/// Load the pipeline a resolved model's manifest names.
pub fn load_pipeline(model: &ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError> {
    let kind = model.manifest.pipeline.as_str();
    let (_, load) = PIPELINES
        .iter()
        .find(|(name, _)| *name == kind)
        .ok_or_else(|| PipelineError::UnknownPipeline(kind.to_string()))?;
    load(model)
}

/// The pipeline kinds this build can load.
pub fn known_pipelines() -> Vec<&'static str> {
    PIPELINES.iter().map(|(name, _)| *name).collect()
}

/// A manifest for a model folder that has none (a diffusers FLUX folder, an LLM
/// folder or GGUF file, ...), so
/// `kiln models register --from` can publish it. `None` when the folder is not
/// recognised.
pub fn describe_model_folder(
    dir: &std::path::Path,
) -> Result<Option<kiln_registry::Manifest>, String> {
    // SDXL first: its single-file folders also hold a root-level .safetensors.
    if sdxl::is_sdxl_folder(dir) {
        return sdxl::manifest_for_folder(dir).map(Some);
    }
    if flux2::is_flux2_folder(dir) {
        return flux2::manifest_for_folder(dir).map(Some);
    }
    if flux::is_flux_folder(dir) {
        return flux::manifest_for_folder(dir).map(Some);
    }
    if graph_model::is_graph_source(dir) {
        return graph_model::manifest_for_source(dir).map(Some);
    }
    if text_generation::is_llm_source(dir) {
        return text_generation::manifest_for_source(dir).map(Some);
    }
    Ok(None)
}
