//! ONNX import: decode a `.onnx` file (protobuf, external data included) and
//! translate its nodes, opsets 7–23 of the default domain, into a Kiln graph
//! and its weights. An operator Kiln does not implement is an error naming it
//! and its node.

mod ops;
pub mod proto;
mod tensor;

use std::collections::HashMap;
use std::path::Path;

use crate::compile::Weights;
use crate::error::{GraphError, Result};
use crate::graph::{Graph, Value};
use crate::types::{Dim, TensorType};

/// Integer initializers up to this many elements become graph constants
/// (shapes, axes, indices), so shape inference can read them.
const CONSTANT_INITIALIZER_LIMIT: usize = 1024;

/// Largest `.onnx` file read into memory (weights above 2 GB must be external
/// data by the ONNX spec anyway).
const MAX_MODEL_BYTES: u64 = 4 << 30;

/// The oldest and newest default-domain opsets Kiln reads.
pub const OPSETS: (i64, i64) = (7, 23);

/// An imported model: the graph and the weights it names.
#[derive(Debug, Clone)]
pub struct Imported {
    pub graph: Graph,
    pub weights: Weights,
    pub opset: i64,
    pub producer: String,
}

/// Import a `.onnx` file; external data is read from its folder.
pub fn import_file(path: &Path) -> Result<Imported> {
    let len = std::fs::metadata(path)
        .map_err(|e| GraphError::io(path, e))?
        .len();
    if len > MAX_MODEL_BYTES {
        return Err(GraphError::malformed(
            &path.display().to_string(),
            format!("is {len} bytes, more than the {MAX_MODEL_BYTES} Kiln reads"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| GraphError::io(path, e))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    import_bytes(&bytes, path.parent(), &name)
}

/// Import a model from its bytes; `dir` resolves external data.
pub fn import_bytes(bytes: &[u8], dir: Option<&Path>, name: &str) -> Result<Imported> {
    let model = proto::decode_model(bytes).map_err(|e| {
        GraphError::malformed(
            "ONNX model",
            format!("cannot decode the protobuf ({e}); the file is truncated or not an ONNX model"),
        )
    })?;
    let graph_proto = model
        .graph
        .as_ref()
        .ok_or_else(|| GraphError::malformed("ONNX model", "has no graph"))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(if model.opset_import.is_empty() {
            1
        } else {
            OPSETS.1
        });
    if !(OPSETS.0..=OPSETS.1).contains(&opset) {
        return Err(GraphError::malformed(
            "ONNX model",
            format!(
                "uses opset {opset}; Kiln reads opsets {} to {}",
                OPSETS.0, OPSETS.1
            ),
        ));
    }
    if !graph_proto.sparse_initializer.is_empty() {
        return Err(GraphError::malformed(
            "ONNX model",
            "sparse initializers are not supported",
        ));
    }
    let mut graph = Graph::new(if graph_proto.name.is_empty() {
        name
    } else {
        &graph_proto.name
    });
    let mut weights = Weights::new();
    let mut env: HashMap<String, Value> = HashMap::new();

    for init in &graph_proto.initializer {
        let (tensor, dtype) = tensor::read_tensor(init, dir)?;
        let value = if dtype.is_integer() && tensor.elem_count() <= CONSTANT_INITIALIZER_LIMIT
            || tensor.elem_count() == 1
        {
            graph.constant(tensor, dtype)?
        } else {
            let ty = TensorType::new(dtype, tensor.dims().iter().copied());
            let v = graph.weight(&init.name, ty)?;
            weights.insert(init.name.clone(), tensor);
            v
        };
        env.insert(init.name.clone(), value);
    }
    for input in &graph_proto.input {
        // Before IR 4, initializers were listed as inputs too.
        if env.contains_key(&input.name) {
            continue;
        }
        let ty = value_type(&input.name, input.r#type.as_ref())?;
        let v = graph.input(&input.name, ty)?;
        env.insert(input.name.clone(), v);
    }
    for node in &graph_proto.node {
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(GraphError::UnsupportedOperator {
                op_type: node.op_type.clone(),
                domain: node.domain.clone(),
                opset,
                node: node.name.clone(),
            });
        }
        let inputs: Vec<Option<Value>> = node
            .input
            .iter()
            .map(|name| {
                if name.is_empty() {
                    return Ok(None);
                }
                env.get(name).copied().map(Some).ok_or_else(|| GraphError::Import {
                    node: node.name.clone(),
                    op_type: node.op_type.clone(),
                    message: format!("input {name:?} is not produced by any earlier node, input or initializer"),
                })
            })
            .collect::<Result<_>>()?;
        let outputs = ops::convert(&mut graph, node, &inputs, opset, dir)?;
        for (name, value) in node.output.iter().zip(outputs) {
            if !name.is_empty() {
                env.insert(name.clone(), value);
            }
        }
    }
    for output in &graph_proto.output {
        let value = *env.get(&output.name).ok_or_else(|| {
            GraphError::malformed(
                "ONNX model",
                format!("output {:?} is not produced by the graph", output.name),
            )
        })?;
        // Outputs keep the names and symbolic dims the file declares where the
        // inferred type is less specific.
        if let Ok(declared) = value_type(&output.name, output.r#type.as_ref()) {
            let info = &mut graph.values[value.index()];
            if declared.dtype == info.ty.dtype && declared.rank() == info.ty.rank() {
                for (mine, theirs) in info.ty.dims.iter_mut().zip(declared.dims) {
                    if *mine == Dim::Unknown {
                        *mine = theirs;
                    }
                }
            }
        }
        graph.output(&output.name, value)?;
    }
    Ok(Imported {
        graph,
        weights,
        opset,
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
    })
}

fn value_type(name: &str, ty: Option<&proto::TypeProto>) -> Result<TensorType> {
    let tensor = ty.and_then(|t| t.tensor_type.as_ref()).ok_or_else(|| {
        GraphError::malformed("ONNX model", format!("value {name:?} is not a tensor"))
    })?;
    let dtype = tensor::dtype_of(tensor.elem_type).ok_or_else(|| {
        GraphError::malformed(
            "ONNX model",
            format!(
                "value {name:?} has element type {}, which Kiln does not support",
                tensor::onnx_type_name(tensor.elem_type)
            ),
        )
    })?;
    let shape = tensor.shape.as_ref().ok_or_else(|| {
        GraphError::malformed(
            "ONNX model",
            format!("value {name:?} has no shape (rank unknown)"),
        )
    })?;
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(proto::DimensionValue::DimValue(n)) if *n >= 0 => Dim::Static(*n as usize),
            Some(proto::DimensionValue::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p.clone()),
            _ => Dim::Unknown,
        })
        .collect();
    Ok(TensorType { dtype, dims })
}
