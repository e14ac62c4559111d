//! The versioned JSON graph format (`kiln-graph` v1, documented in
//! docs/graph-format.md): inputs, weights by name (their data lives in
//! safetensors beside the graph), small constants inline, nodes with their op
//! attributes, and outputs. Reading rebuilds the graph through the builder, so
//! a file gets the same shape checks as code does.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{GraphError, Result};
use crate::graph::{Graph, Source, Value};
use crate::ops::Op;
use crate::types::{DType, Dim, TensorType};

pub const FORMAT: &str = "kiln-graph";
pub const VERSION: u32 = 1;

/// A dim in JSON: a number or a symbol name (`"batch"`); `"?"` is unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum DimJson {
    Static(usize),
    Named(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedName {
    name: String,
    dtype: DType,
    shape: Vec<DimJson>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstantJson {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// Flat, row-major; non-finite floats as `"inf"`, `"-inf"`, `"nan"`.
    data: Vec<Json>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeJson {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(flatten)]
    op: Op,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    name: String,
    value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphJson {
    format: String,
    version: u32,
    name: String,
    inputs: Vec<TypedName>,
    #[serde(default)]
    weights: Vec<TypedName>,
    #[serde(default)]
    constants: Vec<ConstantJson>,
    nodes: Vec<NodeJson>,
    outputs: Vec<OutputJson>,
}

fn dims_json(dims: &[Dim]) -> Vec<DimJson> {
    dims.iter()
        .map(|d| match d {
            Dim::Static(n) => DimJson::Static(*n),
            Dim::Symbolic(s) => DimJson::Named(s.clone()),
            Dim::Unknown => DimJson::Named("?".into()),
        })
        .collect()
}

fn dims_of(dims: &[DimJson]) -> Vec<Dim> {
    dims.iter()
        .map(|d| match d {
            DimJson::Static(n) => Dim::Static(*n),
            DimJson::Named(s) if s == "?" => Dim::Unknown,
            DimJson::Named(s) => Dim::Symbolic(s.clone()),
        })
        .collect()
}

fn number(x: f64) -> Json {
    if x.is_nan() {
        Json::String("nan".into())
    } else if x.is_infinite() {
        Json::String(if x > 0.0 { "inf" } else { "-inf" }.into())
    } else {
        serde_json::Number::from_f64(x)
            .map(Json::Number)
            .unwrap_or(Json::Null)
    }
}

fn constant_data(tensor: &Tensor, dtype: DType) -> Result<Vec<Json>> {
    let flat = tensor.flatten_all()?;
    Ok(if dtype.is_integer() || dtype == DType::Bool {
        flat.to_dtype(candle_core::DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(Json::from)
            .collect()
    } else {
        flat.to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(number)
            .collect()
    })
}

/// Write a graph (weights by name, constants inline) as JSON.
pub fn to_json(graph: &Graph) -> Result<String> {
    let mut names: HashMap<Value, String> = HashMap::new();
    let mut doc = GraphJson {
        format: FORMAT.into(),
        version: VERSION,
        name: graph.name.clone(),
        inputs: Vec::new(),
        weights: Vec::new(),
        constants: Vec::new(),
        nodes: Vec::new(),
        outputs: Vec::new(),
    };
    for (value, info) in graph.values() {
        match &info.source {
            Source::Input(name) => {
                names.insert(value, name.clone());
                doc.inputs.push(TypedName {
                    name: name.clone(),
                    dtype: info.ty.dtype,
                    shape: dims_json(&info.ty.dims),
                });
            }
            Source::Weight(name) => {
                names.insert(value, name.clone());
                doc.weights.push(TypedName {
                    name: name.clone(),
                    dtype: info.ty.dtype,
                    shape: dims_json(&info.ty.dims),
                });
            }
            Source::Constant(tensor) => {
                let name = format!("%c{}", value.index());
                names.insert(value, name.clone());
                doc.constants.push(ConstantJson {
                    name,
                    dtype: info.ty.dtype,
                    shape: tensor.dims().to_vec(),
                    data: constant_data(tensor, info.ty.dtype)?,
                });
            }
            Source::Node(..) => {
                names.insert(value, format!("%{}", value.index()));
            }
        }
    }
    let name_of = |v: &Value| names.get(v).cloned().unwrap_or_default();
    for node in graph.nodes() {
        doc.nodes.push(NodeJson {
            name: node.name.clone(),
            op: node.op.clone(),
            inputs: node.inputs.iter().map(name_of).collect(),
            outputs: node.outputs.iter().map(name_of).collect(),
        });
    }
    for (name, value) in graph.output_values() {
        doc.outputs.push(OutputJson {
            name: name.clone(),
            value: name_of(value),
        });
    }
    serde_json::to_string_pretty(&doc).map_err(|e| GraphError::Invalid(e.to_string()))
}

fn parse_number(v: &Json, what: &str) -> Result<f64> {
    match v {
        Json::Number(n) => n
            .as_f64()
            .ok_or_else(|| GraphError::malformed(what, "bad number")),
        Json::Bool(b) => Ok(f64::from(u8::from(*b))),
        Json::String(s) => match s.as_str() {
            "inf" | "Infinity" => Ok(f64::INFINITY),
            "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
            "nan" | "NaN" => Ok(f64::NAN),
            other => Err(GraphError::malformed(
                what,
                format!("{other:?} is not a number"),
            )),
        },
        other => Err(GraphError::malformed(
            what,
            format!("{other} is not a number"),
        )),
    }
}

fn constant_tensor(c: &ConstantJson) -> Result<Tensor> {
    let what = format!("constant {:?}", c.name);
    let count: usize = c.shape.iter().product();
    if c.data.len() != count {
        return Err(GraphError::malformed(
            &what,
            format!(
                "holds {} values, shape {:?} needs {count}",
                c.data.len(),
                c.shape
            ),
        ));
    }
    let device = &Device::Cpu;
    let tensor = if c.dtype.is_integer() || c.dtype == DType::Bool {
        let values: Vec<i64> = c
            .data
            .iter()
            .map(|v| match v {
                Json::Number(n) => n
                    .as_i64()
                    .ok_or_else(|| GraphError::malformed(&what, format!("{n} is not an integer"))),
                Json::Bool(b) => Ok(i64::from(*b)),
                other => Err(GraphError::malformed(
                    &what,
                    format!("{other} is not an integer"),
                )),
            })
            .collect::<Result<_>>()?;
        Tensor::from_vec(values, c.shape.as_slice(), device)?
    } else {
        let values: Vec<f64> = c
            .data
            .iter()
            .map(|v| parse_number(v, &what))
            .collect::<Result<_>>()?;
        Tensor::from_vec(values, c.shape.as_slice(), device)?
    };
    Ok(tensor.to_dtype(c.dtype.storage())?)
}

/// Read a graph written by [`to_json`] (or by hand), checking every node.
pub fn from_json(text: &str) -> Result<Graph> {
    let doc: GraphJson = serde_json::from_str(text)
        .map_err(|e| GraphError::malformed("graph JSON", e.to_string()))?;
    if doc.format != FORMAT {
        return Err(GraphError::malformed(
            "graph JSON",
            format!("format is {:?}, expected {FORMAT:?}", doc.format),
        ));
    }
    if doc.version != VERSION {
        return Err(GraphError::malformed(
            "graph JSON",
            format!(
                "version {} is not supported (this build reads version {VERSION})",
                doc.version
            ),
        ));
    }
    let mut graph = Graph::new(doc.name);
    let mut env: HashMap<String, Value> = HashMap::new();
    let bind = |env: &mut HashMap<String, Value>, name: &str, value: Value| -> Result<()> {
        if env.insert(name.to_string(), value).is_some() {
            return Err(GraphError::malformed(
                "graph JSON",
                format!("value {name:?} is defined twice"),
            ));
        }
        Ok(())
    };
    for input in &doc.inputs {
        let v = graph.input(
            &input.name,
            TensorType {
                dtype: input.dtype,
                dims: dims_of(&input.shape),
            },
        )?;
        bind(&mut env, &input.name, v)?;
    }
    for weight in &doc.weights {
        let v = graph.weight(
            &weight.name,
            TensorType {
                dtype: weight.dtype,
                dims: dims_of(&weight.shape),
            },
        )?;
        bind(&mut env, &weight.name, v)?;
    }
    for c in &doc.constants {
        let v = graph.constant(constant_tensor(c)?, c.dtype)?;
        bind(&mut env, &c.name, v)?;
    }
    for (i, node) in doc.nodes.iter().enumerate() {
        let label = if node.name.is_empty() {
            format!("#{i}")
        } else {
            node.name.clone()
        };
        let inputs: Vec<Value> = node
            .inputs
            .iter()
            .map(|n| {
                env.get(n).copied().ok_or_else(|| {
                    GraphError::malformed(
                        "graph JSON",
                        format!(
                            "node {label} ({}) uses {n:?} before it is defined",
                            node.op.name()
                        ),
                    )
                })
            })
            .collect::<Result<_>>()?;
        if node.outputs.len() != node.op.output_count() {
            return Err(GraphError::malformed(
                "graph JSON",
                format!(
                    "node {label} ({}) names {} outputs, the op has {}",
                    node.op.name(),
                    node.outputs.len(),
                    node.op.output_count()
                ),
            ));
        }
        let outputs = graph
            .add_node(node.op.clone(), &inputs, node.name.clone())
            .map_err(|e| match e {
                GraphError::Op { op, message } if node.name.is_empty() => GraphError::Op {
                    op: format!("{op} (node {label})"),
                    message,
                },
                other => other,
            })?;
        for (name, v) in node.outputs.iter().zip(outputs) {
            bind(&mut env, name, v)?;
        }
    }
    for out in &doc.outputs {
        let v = *env.get(&out.value).ok_or_else(|| {
            GraphError::malformed(
                "graph JSON",
                format!("output {:?} names unknown value {:?}", out.name, out.value),
            )
        })?;
        graph.output(&out.name, v)?;
    }
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::BinaryOp;

    #[test]
    fn a_graph_round_trips_with_symbols_and_infinities() {
        let mut g = Graph::new("clamp");
        let x = g
            .input(
                "x",
                TensorType::new(DType::F32, [Dim::sym("batch"), 3.into()]),
            )
            .unwrap();
        let w = g
            .weight("w", TensorType::new(DType::F32, [3usize, 2]))
            .unwrap();
        let lo = g
            .constant(
                Tensor::new(&[f32::NEG_INFINITY, 0.0], &Device::Cpu).unwrap(),
                DType::F32,
            )
            .unwrap();
        let y = g.matmul(x, w).unwrap();
        let z = g.binary(BinaryOp::Max, y, lo).unwrap();
        g.output("z", z).unwrap();
        let text = to_json(&g).unwrap();
        assert!(
            text.contains("\"-inf\"") && text.contains("\"batch\""),
            "{text}"
        );
        let back = from_json(&text).unwrap();
        assert_eq!(to_json(&back).unwrap(), text);
        assert_eq!(
            back.outputs()[0].1,
            &TensorType::new(DType::F32, [Dim::sym("batch"), 2.into()])
        );
    }

    #[test]
    fn a_file_with_a_wrong_shape_fails_naming_the_node() {
        let text = r#"{"format": "kiln-graph", "version": 1, "name": "bad",
            "inputs": [{"name": "x", "dtype": "f32", "shape": ["batch", 4]}],
            "weights": [{"name": "w", "dtype": "f32", "shape": [5, 2]}],
            "nodes": [{"name": "fc", "op": "matmul", "inputs": ["x", "w"], "outputs": ["y"]}],
            "outputs": [{"name": "y", "value": "y"}]}"#;
        let err = from_json(text).unwrap_err().to_string();
        assert!(
            err.contains("fc") && err.contains("[batch, 4]") && err.contains("[5, 2]"),
            "{err}"
        );
        let err = from_json(&text.replace("\"version\": 1", "\"version\": 9"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 9"), "{err}");
    }
}
