//! The `graph` pipeline: a computational graph (an ONNX file, or a Kiln JSON
//! graph with safetensors weights) compiled once and served with a typed tensor
//! signature over KServe v2, MLflow and the other protocols.

mod convert;

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use kiln_graph::{GraphError, InferenceSession, Model};
use kiln_registry::{Manifest, ResolvedModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contract::{
    InputSpec, ModelInterface, Pipeline, PredictInput, PredictRequest, Prediction,
};
use crate::error::{FieldProblem, PipelineError, ProblemKind};
use crate::frame::{ColumnSpec, ColumnType, RawFrame, Signature};
use crate::schema::InputSchema;
use crate::tensor::TensorSignature;

pub use convert::{frame_to_inputs, spec, wire_type};

pub const PIPELINE_KIND: &str = "graph";
/// The Kiln graph file a folder holds.
pub const GRAPH_FILE: &str = "graph.json";

/// Where the graph comes from, relative to the model's folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// An ONNX file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx: Option<String>,
    /// A Kiln JSON graph ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<String>,
    /// ... and the safetensors files holding its weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<String>,
}

fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// The `.onnx` files directly in a folder, sorted.
fn onnx_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && is_onnx(p))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// An `.onnx` file, or a folder holding a `graph.json` or an `.onnx` file
/// (KServe's `/mnt/models` layout).
pub fn is_graph_source(path: &Path) -> bool {
    if path.is_file() {
        return is_onnx(path);
    }
    path.join(GRAPH_FILE).is_file() || !onnx_files(path).is_empty()
}

fn file_name(path: &Path) -> Result<String, String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{}: not a file name", path.display()))
}

/// The config for a source: which file is the graph.
fn config_for(path: &Path) -> Result<GraphConfig, String> {
    if path.is_file() {
        return Ok(GraphConfig {
            onnx: Some(file_name(path)?),
            graph: None,
            weights: Vec::new(),
        });
    }
    if path.join(GRAPH_FILE).is_file() {
        let mut weights: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|p| file_name(&p))
            .collect::<Result<_, _>>()?;
        weights.sort();
        return Ok(GraphConfig {
            onnx: None,
            graph: Some(GRAPH_FILE.into()),
            weights,
        });
    }
    let files = onnx_files(path);
    let chosen = match files.as_slice() {
        [one] => one.clone(),
        many => many
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n == "model.onnx"))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "{} holds {} .onnx files and none is model.onnx; register one file",
                    path.display(),
                    many.len()
                )
            })?,
    };
    Ok(GraphConfig {
        onnx: Some(file_name(&chosen)?),
        graph: None,
        weights: Vec::new(),
    })
}

/// A file named by a manifest, confined to the model's folder.
fn confined(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let relative = Path::new(name);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!("{name:?} must be a file inside the model's folder"));
    }
    Ok(dir.join(relative))
}

/// A graph and its weights, read and imported.
struct Loaded {
    graph: kiln_graph::Graph,
    weights: kiln_graph::Weights,
    description: String,
}

fn read(dir: &Path, config: &GraphConfig) -> Result<Loaded, String> {
    match (&config.onnx, &config.graph) {
        (Some(onnx), None) => {
            let path = confined(dir, onnx)?;
            let imported = kiln_graph::onnx::import_file(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let producer = if imported.producer.is_empty() {
                "unknown producer".into()
            } else {
                imported.producer.clone()
            };
            Ok(Loaded {
                graph: imported.graph,
                weights: imported.weights,
                description: format!("ONNX model ({producer}, opset {})", imported.opset),
            })
        }
        (None, Some(graph)) => {
            let path = confined(dir, graph)?;
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let graph = kiln_graph::serial::from_json(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let files: Vec<PathBuf> = config
                .weights
                .iter()
                .map(|w| confined(dir, w))
                .collect::<Result<_, _>>()?;
            let weights = kiln_graph::load_safetensors(&files).map_err(|e| e.to_string())?;
            Ok(Loaded {
                graph,
                weights,
                description: "Kiln graph".into(),
            })
        }
        _ => Err("the config must name exactly one of `onnx` or `graph`".into()),
    }
}

fn signature(model: &Model) -> TensorSignature {
    let sig = model.signature();
    TensorSignature {
        inputs: sig.inputs.iter().map(|(n, t)| spec(n, t)).collect(),
        outputs: sig.outputs.iter().map(|(n, t)| spec(n, t)).collect(),
    }
}

/// A manifest for an ONNX file or graph folder, after importing and compiling
/// it (so a broken model fails at registration), with its tensor signature.
pub fn manifest_for_source(path: &Path) -> Result<Manifest, String> {
    let config = config_for(path)?;
    let dir = if path.is_file() {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    };
    let loaded = read(dir, &config)?;
    let model = InferenceSession::default()
        .load(&loaded.graph, &loaded.weights)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut manifest = Manifest::new(PIPELINE_KIND);
    manifest.description = loaded.description;
    manifest.signature = serde_json::to_value(signature(&model)).map_err(|e| e.to_string())?;
    manifest.config = serde_json::to_value(&config).map_err(|e| e.to_string())?;
    Ok(manifest)
}

/// A compiled graph serving requests.
pub struct GraphPipeline {
    model: Model,
    interface: ModelInterface,
    resident_bytes: u64,
}

fn column_type(datatype: &str) -> ColumnType {
    match datatype {
        "FP64" => ColumnType::Double,
        "INT64" | "INT32" | "UINT8" => ColumnType::Long,
        "BOOL" => ColumnType::Boolean,
        _ => ColumnType::Float,
    }
}

/// Load a registered graph model.
pub fn load(model: &ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError> {
    let load_error = |message: String| PipelineError::Load {
        model: model.display_name(),
        message,
    };
    let config: GraphConfig = serde_json::from_value(model.manifest.config.clone())
        .map_err(|e| load_error(format!("manifest config is not a graph config: {e}")))?;
    let loaded = read(&model.dir, &config).map_err(load_error)?;
    let resident_bytes = loaded
        .weights
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    let compiled = InferenceSession::default()
        .load(&loaded.graph, &loaded.weights)
        .map_err(|e| load_error(e.to_string()))?;
    let tensors = signature(&compiled);
    let label = config.onnx.clone().unwrap_or_else(|| model.display_name());
    tracing::info!(model = %label, report = ?compiled.report(), "compiled graph");
    let outputs = Signature {
        inputs: tensors
            .outputs
            .iter()
            .map(|s| ColumnSpec {
                name: s.name.clone(),
                column_type: column_type(&s.datatype),
                required: true,
            })
            .collect(),
        outputs: vec![],
    };
    Ok(Arc::new(GraphPipeline {
        interface: ModelInterface {
            pipeline: PIPELINE_KIND.into(),
            inputs: InputSpec::Tensors(tensors),
            params: InputSchema { fields: vec![] },
            outputs,
        },
        model: compiled,
        resident_bytes,
    }))
}

fn graph_error(error: GraphError) -> PipelineError {
    match error {
        GraphError::Inputs(problems) => PipelineError::InvalidInput(
            problems
                .into_iter()
                .map(|p| {
                    let kind = if p.message.starts_with("is missing") {
                        ProblemKind::Missing
                    } else if p.message.starts_with("is not an input") {
                        ProblemKind::Unknown
                    } else {
                        ProblemKind::Constraint
                    };
                    FieldProblem::new(p.input, kind, p.message)
                })
                .collect(),
        ),
        // Shapes that pass the signature but not an op (a dynamic reshape of
        // sizes the model cannot take) are the inputs' fault.
        GraphError::Op { .. } => PipelineError::invalid(
            "inputs",
            ProblemKind::Constraint,
            format!("the model cannot run on these inputs: {error}"),
        ),
        other => PipelineError::Execution(other.to_string()),
    }
}

impl GraphPipeline {
    fn inputs(
        &self,
        input: PredictInput,
    ) -> Result<HashMap<String, candle_core::Tensor>, PipelineError> {
        let declared = &self.model.signature().inputs;
        match input {
            PredictInput::Tensors(tensors) => {
                let mut out = HashMap::new();
                let mut problems = Vec::new();
                for tensor in &tensors {
                    let Some((_, ty)) = declared.iter().find(|(n, _)| *n == tensor.name) else {
                        let known: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
                        problems.push(FieldProblem::new(
                            &tensor.name,
                            ProblemKind::Unknown,
                            format!(
                                "is not an input of this model (inputs: {})",
                                known.join(", ")
                            ),
                        ));
                        continue;
                    };
                    match convert::wire_to_input(tensor, ty.dtype) {
                        Ok(t) => {
                            out.insert(tensor.name.clone(), t);
                        }
                        Err(p) => problems.push(p),
                    }
                }
                if problems.is_empty() {
                    Ok(out)
                } else {
                    Err(PipelineError::InvalidInput(problems))
                }
            }
            PredictInput::Frame(frame) => frame_to_inputs(&frame, declared),
            PredictInput::Fields(fields) => frame_to_inputs(&fields_frame(fields), declared),
        }
    }
}

/// `{"name": [rows...]}` as a frame of one column per input.
fn fields_frame(fields: Map<String, Value>) -> RawFrame {
    RawFrame {
        columns: fields
            .into_iter()
            .map(|(name, value)| match value {
                Value::Array(rows) => (name, rows),
                scalar => (name, vec![scalar]),
            })
            .collect(),
        positional: false,
    }
}

impl Pipeline for GraphPipeline {
    fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    fn resident_bytes(&self) -> Option<u64> {
        Some(self.resident_bytes)
    }

    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        let inputs = self.inputs(request.input)?;
        let outputs = self.model.execute(&inputs).map_err(graph_error)?;
        let dtypes: HashMap<&str, kiln_graph::DType> = self
            .model
            .signature()
            .outputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.dtype))
            .collect();
        let tensors = outputs
            .iter()
            .map(|(name, tensor)| {
                let dtype = dtypes
                    .get(name.as_str())
                    .copied()
                    .unwrap_or(kiln_graph::DType::F32);
                convert::output_to_wire(name, tensor, dtype)
            })
            .collect::<Result<_, _>>()?;
        Ok(Prediction::Tensors(tensors))
    }
}
