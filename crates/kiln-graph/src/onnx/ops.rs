//! ONNX operators onto graph ops, one arm per `op_type`, with the attribute
//! and input changes between opsets (axes moving from attributes to inputs).

use std::path::Path;

use candle_core::{Device, Tensor};

use super::proto::{AttributeProto, NodeProto};
use super::tensor::{dtype_of, onnx_type_name, read_tensor};
use crate::error::{GraphError, Result};
use crate::graph::{Graph, Value};
use crate::ops::{BinaryOp, CompareOp, Op, PoolKind, ReduceOp, UnaryOp};
use crate::types::{DType, Dim};

/// A node's attributes, read with its name in every error.
struct Attributes<'a> {
    node: &'a NodeProto,
}

impl<'a> Attributes<'a> {
    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    fn error(&self, message: impl Into<String>) -> GraphError {
        GraphError::Import {
            node: self.node.name.clone(),
            op_type: self.node.op_type.clone(),
            message: message.into(),
        }
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map(|a| a.i).unwrap_or(default)
    }

    fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map(|a| a.f).unwrap_or(default)
    }

    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }

    fn string(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    fn usizes(&self, name: &str, len: usize, default: usize) -> Result<Vec<usize>> {
        match self.ints(name) {
            None => Ok(vec![default; len]),
            Some(v) if v.len() == len && v.iter().all(|&x| x >= 0) => {
                Ok(v.into_iter().map(|x| x as usize).collect())
            }
            Some(v) => Err(self.error(format!(
                "attribute {name} {v:?} must hold {len} non-negative values"
            ))),
        }
    }
}

fn required(attrs: &Attributes, inputs: &[Option<Value>], i: usize) -> Result<Value> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| attrs.error(format!("input {i} is required")))
}

/// Translate one node; returns a value per ONNX output (optional trailing
/// outputs Kiln does not compute are refused if the graph uses them).
pub fn convert(
    graph: &mut Graph,
    node: &NodeProto,
    inputs: &[Option<Value>],
    opset: i64,
    dir: Option<&Path>,
) -> Result<Vec<Value>> {
    let attrs = Attributes { node };
    let name = node.name.clone();
    let x = |i: usize| required(&attrs, inputs, i);
    let add = |graph: &mut Graph, op: Op, ins: &[Value]| -> Result<Value> {
        Ok(graph.add_node(op, ins, name.clone())?[0])
    };
    let binary = |graph: &mut Graph, kind: BinaryOp| -> Result<Vec<Value>> {
        Ok(vec![add(graph, Op::Binary { kind }, &[x(0)?, x(1)?])?])
    };
    let compare = |graph: &mut Graph, kind: CompareOp| -> Result<Vec<Value>> {
        Ok(vec![add(graph, Op::Compare { kind }, &[x(0)?, x(1)?])?])
    };
    let unary = |graph: &mut Graph, kind: UnaryOp| -> Result<Vec<Value>> {
        Ok(vec![add(graph, Op::Unary { kind }, &[x(0)?])?])
    };
    let single_output = |count: usize| -> Result<()> {
        if node.output.iter().skip(count).any(|o| !o.is_empty()) {
            return Err(attrs.error(format!(
                "only the first {count} output(s) are supported (inference mode)"
            )));
        }
        Ok(())
    };
    // Axes given as an attribute (older opsets) or an optional input (newer).
    let axes_input = |graph: &mut Graph, index: usize| -> Result<Option<Value>> {
        match inputs.get(index).copied().flatten() {
            Some(v) => Ok(Some(v)),
            None => match attrs.ints("axes") {
                Some(axes) => Ok(Some(graph.ints(&axes)?)),
                None => Ok(None),
            },
        }
    };
    let op_type = node.op_type.as_str();
    let outputs = match op_type {
        "Add" | "Sum" if inputs.len() == 2 => binary(graph, BinaryOp::Add)?,
        "Sub" => binary(graph, BinaryOp::Sub)?,
        "Mul" => binary(graph, BinaryOp::Mul)?,
        "Div" => binary(graph, BinaryOp::Div)?,
        "Pow" => {
            let (base, exponent) = (x(0)?, x(1)?);
            let exponent = if graph.ty(exponent).dtype != graph.ty(base).dtype {
                add(
                    graph,
                    Op::Cast {
                        to: graph.ty(base).dtype,
                    },
                    &[exponent],
                )?
            } else {
                exponent
            };
            vec![add(
                graph,
                Op::Binary {
                    kind: BinaryOp::Pow,
                },
                &[base, exponent],
            )?]
        }
        "Max" | "Min" | "Sum" | "Mean" => {
            let kind = match op_type {
                "Max" => BinaryOp::Max,
                "Min" => BinaryOp::Min,
                _ => BinaryOp::Add,
            };
            let mut acc = x(0)?;
            for i in 1..inputs.len() {
                acc = add(graph, Op::Binary { kind }, &[acc, x(i)?])?;
            }
            if op_type == "Mean" {
                let n = graph.scalar(inputs.len() as f64, graph.ty(acc).dtype)?;
                acc = add(
                    graph,
                    Op::Binary {
                        kind: BinaryOp::Div,
                    },
                    &[acc, n],
                )?;
            }
            vec![acc]
        }
        "Equal" => compare(graph, CompareOp::Equal)?,
        "Less" => compare(graph, CompareOp::Less)?,
        "LessOrEqual" => compare(graph, CompareOp::LessOrEqual)?,
        "Greater" => compare(graph, CompareOp::Greater)?,
        "GreaterOrEqual" => compare(graph, CompareOp::GreaterOrEqual)?,
        "Relu" => unary(graph, UnaryOp::Relu)?,
        "Tanh" => unary(graph, UnaryOp::Tanh)?,
        "Sigmoid" => unary(graph, UnaryOp::Sigmoid)?,
        "Exp" => unary(graph, UnaryOp::Exp)?,
        "Log" => unary(graph, UnaryOp::Log)?,
        "Sqrt" => unary(graph, UnaryOp::Sqrt)?,
        "Neg" => unary(graph, UnaryOp::Neg)?,
        "Abs" => unary(graph, UnaryOp::Abs)?,
        "Erf" => unary(graph, UnaryOp::Erf)?,
        "Reciprocal" => unary(graph, UnaryOp::Reciprocal)?,
        "Floor" => unary(graph, UnaryOp::Floor)?,
        "Ceil" => unary(graph, UnaryOp::Ceil)?,
        "Not" => unary(graph, UnaryOp::Not)?,
        "Gelu" => match attrs.string("approximate").as_deref() {
            None | Some("none") => unary(graph, UnaryOp::Gelu)?,
            Some("tanh") => unary(graph, UnaryOp::GeluTanh)?,
            Some(other) => {
                return Err(attrs.error(format!("approximate={other:?} is not one of none, tanh")));
            }
        },
        "LeakyRelu" => {
            let v = x(0)?;
            let dtype = graph.ty(v).dtype;
            let alpha = graph.scalar(f64::from(attrs.float("alpha", 0.01)), dtype)?;
            let zero = graph.scalar(0.0, dtype)?;
            let negative = add(
                graph,
                Op::Binary {
                    kind: BinaryOp::Min,
                },
                &[v, zero],
            )?;
            let positive = add(
                graph,
                Op::Binary {
                    kind: BinaryOp::Max,
                },
                &[v, zero],
            )?;
            let scaled = add(
                graph,
                Op::Binary {
                    kind: BinaryOp::Mul,
                },
                &[negative, alpha],
            )?;
            vec![add(
                graph,
                Op::Binary {
                    kind: BinaryOp::Add,
                },
                &[positive, scaled],
            )?]
        }
        "Clip" => {
            let v = x(0)?;
            let dtype = graph.ty(v).dtype;
            let bound =
                |graph: &mut Graph, index: usize, attr: &str, default: f64| -> Result<Value> {
                    match inputs.get(index).copied().flatten() {
                        Some(b) if opset >= 11 => Ok(b),
                        _ => graph.scalar(
                            attrs.get(attr).map(|a| f64::from(a.f)).unwrap_or(default),
                            dtype,
                        ),
                    }
                };
            let lo = bound(graph, 1, "min", f64::NEG_INFINITY)?;
            let hi = bound(graph, 2, "max", f64::INFINITY)?;
            vec![add(graph, Op::Clip, &[v, lo, hi])?]
        }
        "MatMul" => vec![add(graph, Op::MatMul, &[x(0)?, x(1)?])?],
        "Gemm" => {
            let (mut a, mut b) = (x(0)?, x(1)?);
            if attrs.int("transA", 0) != 0 {
                a = add(graph, Op::Transpose { perm: vec![1, 0] }, &[a])?;
            }
            if attrs.int("transB", 0) != 0 {
                b = add(graph, Op::Transpose { perm: vec![1, 0] }, &[b])?;
            }
            let dtype = graph.ty(a).dtype;
            let mut y = add(graph, Op::MatMul, &[a, b])?;
            let alpha = attrs.float("alpha", 1.0);
            if alpha != 1.0 {
                let s = graph.scalar(f64::from(alpha), dtype)?;
                y = add(
                    graph,
                    Op::Binary {
                        kind: BinaryOp::Mul,
                    },
                    &[y, s],
                )?;
            }
            if let Some(c) = inputs.get(2).copied().flatten() {
                let beta = attrs.float("beta", 1.0);
                let c = if beta != 1.0 {
                    let s = graph.scalar(f64::from(beta), dtype)?;
                    add(
                        graph,
                        Op::Binary {
                            kind: BinaryOp::Mul,
                        },
                        &[c, s],
                    )?
                } else {
                    c
                };
                y = add(
                    graph,
                    Op::Binary {
                        kind: BinaryOp::Add,
                    },
                    &[y, c],
                )?;
            }
            vec![y]
        }
        "Softmax" | "LogSoftmax" => {
            let v = x(0)?;
            let log = op_type == "LogSoftmax";
            let make = |axis| {
                if log {
                    Op::LogSoftmax { axis }
                } else {
                    Op::Softmax { axis }
                }
            };
            if opset >= 13 {
                vec![add(graph, make(attrs.int("axis", -1)), &[v])?]
            } else {
                // Before opset 13 the input is coerced to 2-D at `axis`.
                let axis = attrs.int("axis", 1);
                let flat = add(graph, Op::Flatten { axis }, &[v])?;
                let y = add(graph, make(-1), &[flat])?;
                let shape = add(
                    graph,
                    Op::Shape {
                        start: 0,
                        end: None,
                    },
                    &[v],
                )?;
                vec![add(graph, Op::Reshape { allow_zero: false }, &[y, shape])?]
            }
        }
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" => {
            let kind = match op_type {
                "ReduceSum" => ReduceOp::Sum,
                "ReduceMean" => ReduceOp::Mean,
                "ReduceMax" => ReduceOp::Max,
                _ => ReduceOp::Min,
            };
            let keepdims = attrs.int("keepdims", 1) != 0;
            let v = x(0)?;
            match axes_input(graph, 1)? {
                Some(axes) => vec![add(graph, Op::Reduce { kind, keepdims }, &[v, axes])?],
                None if attrs.int("noop_with_empty_axes", 0) != 0 => {
                    vec![add(graph, Op::Identity, &[v])?]
                }
                None => vec![add(graph, Op::Reduce { kind, keepdims }, &[v])?],
            }
        }
        "ArgMax" => {
            if attrs.int("select_last_index", 0) != 0 {
                return Err(attrs.error("select_last_index=1 is not supported"));
            }
            let keepdims = attrs.int("keepdims", 1) != 0;
            vec![add(
                graph,
                Op::ArgMax {
                    axis: attrs.int("axis", 0),
                    keepdims,
                },
                &[x(0)?],
            )?]
        }
        "LayerNormalization" => {
            single_output(1)?;
            let mut ins = vec![x(0)?, x(1)?];
            ins.extend(inputs.get(2).copied().flatten());
            let op = Op::LayerNorm {
                axis: attrs.int("axis", -1),
                epsilon: f64::from(attrs.float("epsilon", 1e-5)),
            };
            vec![add(graph, op, &ins)?]
        }
        "RMSNormalization" => {
            if attrs.int("axis", -1) != -1 {
                return Err(attrs.error("only axis=-1 is supported"));
            }
            let op = Op::RmsNorm {
                epsilon: f64::from(attrs.float("epsilon", 1e-5)),
            };
            vec![add(graph, op, &[x(0)?, x(1)?])?]
        }
        "BatchNormalization" => {
            single_output(1)?;
            if attrs.int("training_mode", 0) != 0 {
                return Err(attrs.error("training_mode=1 is not supported (inference only)"));
            }
            let op = Op::BatchNorm {
                epsilon: f64::from(attrs.float("epsilon", 1e-5)),
            };
            vec![add(graph, op, &[x(0)?, x(1)?, x(2)?, x(3)?, x(4)?])?]
        }
        "GroupNormalization" => {
            if opset < 21 {
                return Err(attrs.error(
                    "opset 18's per-group scale and bias are not supported; export with opset 21",
                ));
            }
            let groups = attrs.int("num_groups", 0);
            if groups <= 0 {
                return Err(attrs.error("num_groups must be positive"));
            }
            let op = Op::GroupNorm {
                groups: groups as usize,
                epsilon: f64::from(attrs.float("epsilon", 1e-5)),
            };
            vec![add(graph, op, &[x(0)?, x(1)?, x(2)?])?]
        }
        "Conv" => {
            let (v, w) = (x(0)?, x(1)?);
            let spatial = graph.ty(w).rank().saturating_sub(2);
            if spatial != 2 {
                return Err(attrs.error(format!(
                    "only 2-D convolutions are supported, this one is {spatial}-D"
                )));
            }
            let pads = conv_pads(&attrs, graph, v, w)?;
            let op = Op::Conv2d {
                strides: two(&attrs.usizes("strides", 2, 1)?),
                pads,
                dilations: two(&attrs.usizes("dilations", 2, 1)?),
                groups: attrs.int("group", 1).max(1) as usize,
            };
            let mut ins = vec![v, w];
            ins.extend(inputs.get(2).copied().flatten());
            vec![add(graph, op, &ins)?]
        }
        "MaxPool" | "AveragePool" => {
            single_output(1)?;
            let kernel = attrs
                .ints("kernel_shape")
                .ok_or_else(|| attrs.error("kernel_shape is required"))?;
            if kernel.len() != 2 {
                return Err(attrs.error(format!(
                    "only 2-D pooling is supported, kernel_shape is {kernel:?}"
                )));
            }
            if attrs.usizes("dilations", 2, 1)? != [1, 1] {
                return Err(attrs.error("dilated pooling is not supported"));
            }
            if attrs.int("storage_order", 0) != 0 {
                return Err(attrs.error("storage_order=1 is not supported"));
            }
            let kernel = two(&attrs.usizes("kernel_shape", 2, 1)?);
            let strides = two(&attrs.usizes("strides", 2, 1)?);
            let pads = match attrs.string("auto_pad").as_deref() {
                None | Some("NOTSET") | Some("VALID") | Some("") => {
                    four(&attrs.usizes("pads", 4, 0)?)
                }
                Some(other) => {
                    return Err(attrs.error(format!(
                        "auto_pad={other} is not supported; export with explicit pads"
                    )));
                }
            };
            let op = Op::Pool2d {
                kind: if op_type == "MaxPool" {
                    PoolKind::Max
                } else {
                    PoolKind::Average
                },
                kernel,
                strides,
                pads,
                count_include_pad: attrs.int("count_include_pad", 0) != 0,
                ceil_mode: attrs.int("ceil_mode", 0) != 0,
            };
            vec![add(graph, op, &[x(0)?])?]
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let v = x(0)?;
            let rank = graph.ty(v).rank() as i64;
            let axes: Vec<i64> = (2..rank).collect();
            let axes = graph.ints(&axes)?;
            let kind = if op_type == "GlobalMaxPool" {
                ReduceOp::Max
            } else {
                ReduceOp::Mean
            };
            vec![add(
                graph,
                Op::Reduce {
                    kind,
                    keepdims: true,
                },
                &[v, axes],
            )?]
        }
        "Reshape" => {
            let op = Op::Reshape {
                allow_zero: attrs.int("allowzero", 0) != 0,
            };
            vec![add(graph, op, &[x(0)?, x(1)?])?]
        }
        "Flatten" => vec![add(
            graph,
            Op::Flatten {
                axis: attrs.int("axis", 1),
            },
            &[x(0)?],
        )?],
        "Transpose" => {
            let v = x(0)?;
            let rank = graph.ty(v).rank();
            let perm = match attrs.ints("perm") {
                Some(p) => p
                    .into_iter()
                    .map(|i| {
                        usize::try_from(i)
                            .map_err(|_| attrs.error(format!("perm entry {i} is negative")))
                    })
                    .collect::<Result<Vec<_>>>()?,
                None => (0..rank).rev().collect(),
            };
            vec![add(graph, Op::Transpose { perm }, &[v])?]
        }
        "Concat" => {
            let ins: Vec<Value> = (0..inputs.len()).map(x).collect::<Result<_>>()?;
            vec![add(
                graph,
                Op::Concat {
                    axis: attrs.int("axis", 0),
                },
                &ins,
            )?]
        }
        "Split" => {
            let outputs = node.output.len();
            let axis = attrs.int("axis", 0);
            let sizes = match inputs.get(1).copied().flatten() {
                Some(s) => Some(s),
                None => attrs.ints("split").map(|s| graph.ints(&s)).transpose()?,
            };
            let mut ins = vec![x(0)?];
            ins.extend(sizes);
            graph.add_node(Op::Split { axis, outputs }, &ins, name.clone())?
        }
        "Slice" => {
            let v = x(0)?;
            if opset < 10 {
                let starts = attrs
                    .ints("starts")
                    .ok_or_else(|| attrs.error("starts is required"))?;
                let ends = attrs
                    .ints("ends")
                    .ok_or_else(|| attrs.error("ends is required"))?;
                let axes = attrs
                    .ints("axes")
                    .unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = vec![1; starts.len()];
                vec![graph.slice(v, &axes, &starts, &ends, &steps)?]
            } else {
                let starts = x(1)?;
                let ends = x(2)?;
                let len = graph.ty(starts).dims.first().and_then(Dim::as_static);
                let axes = match inputs.get(3).copied().flatten() {
                    Some(a) => a,
                    None => {
                        let len =
                            len.ok_or_else(|| attrs.error("starts must have a static length"))?;
                        graph.ints(&(0..len as i64).collect::<Vec<_>>())?
                    }
                };
                let steps = match inputs.get(4).copied().flatten() {
                    Some(s) => s,
                    None => {
                        let len =
                            len.ok_or_else(|| attrs.error("starts must have a static length"))?;
                        graph.ints(&vec![1; len])?
                    }
                };
                vec![add(graph, Op::Slice, &[v, starts, ends, axes, steps])?]
            }
        }
        "Gather" => vec![add(
            graph,
            Op::Gather {
                axis: attrs.int("axis", 0),
            },
            &[x(0)?, x(1)?],
        )?],
        "Unsqueeze" => {
            let axes = axes_input(graph, 1)?.ok_or_else(|| attrs.error("axes are required"))?;
            vec![add(graph, Op::Unsqueeze, &[x(0)?, axes])?]
        }
        "Squeeze" => {
            let mut ins = vec![x(0)?];
            ins.extend(axes_input(graph, 1)?);
            vec![add(graph, Op::Squeeze, &ins)?]
        }
        "Expand" => vec![add(graph, Op::Expand, &[x(0)?, x(1)?])?],
        "Where" => vec![add(graph, Op::Where, &[x(0)?, x(1)?, x(2)?])?],
        "Cast" => {
            let code = attrs.int("to", 0) as i32;
            let to = dtype_of(code).ok_or_else(|| {
                attrs.error(format!("cast to {} is not supported", onnx_type_name(code)))
            })?;
            vec![add(graph, Op::Cast { to }, &[x(0)?])?]
        }
        "CastLike" => {
            let to = graph.ty(x(1)?).dtype;
            vec![add(graph, Op::Cast { to }, &[x(0)?])?]
        }
        "Shape" => {
            let end = attrs.get("end").map(|a| a.i);
            vec![add(
                graph,
                Op::Shape {
                    start: attrs.int("start", 0),
                    end,
                },
                &[x(0)?],
            )?]
        }
        "Size" => {
            let shape = add(
                graph,
                Op::Shape {
                    start: 0,
                    end: None,
                },
                &[x(0)?],
            )?;
            let axes = graph.ints(&[0])?;
            let ones = graph.ints(&[1])?;
            // Product of the dims: exp(sum(log)) would lose exactness; multiply instead.
            let rank = graph.ty(x(0)?).rank();
            let mut acc = graph.ints(&[1])?;
            for d in 0..rank as i64 {
                let start = graph.ints(&[d])?;
                let end = graph.ints(&[d + 1])?;
                let dim = add(graph, Op::Slice, &[shape, start, end, axes, ones])?;
                acc = add(
                    graph,
                    Op::Binary {
                        kind: BinaryOp::Mul,
                    },
                    &[acc, dim],
                )?;
            }
            let zero = graph.ints(&[0])?;
            vec![add(graph, Op::Squeeze, &[acc, zero])?]
        }
        "ConstantOfShape" => {
            let (value, dtype) = match attrs.get("value").and_then(|a| a.t.as_ref()) {
                Some(t) => {
                    let (tensor, dtype) = read_tensor(t, dir)?;
                    let v = tensor
                        .flatten_all()?
                        .to_dtype(candle_core::DType::F64)?
                        .to_vec1::<f64>()?;
                    (v.first().copied().unwrap_or(0.0), dtype)
                }
                None => (0.0, DType::F32),
            };
            vec![add(graph, Op::ConstantOfShape { value, dtype }, &[x(0)?])?]
        }
        "Range" => vec![add(graph, Op::Range, &[x(0)?, x(1)?, x(2)?])?],
        "Identity" => vec![add(graph, Op::Identity, &[x(0)?])?],
        "Dropout" => {
            single_output(1)?;
            vec![add(graph, Op::Identity, &[x(0)?])?]
        }
        "Constant" => vec![constant(graph, &attrs, dir)?],
        _ => {
            return Err(GraphError::UnsupportedOperator {
                op_type: node.op_type.clone(),
                domain: if node.domain.is_empty() {
                    "ai.onnx".into()
                } else {
                    node.domain.clone()
                },
                opset,
                node: node.name.clone(),
            });
        }
    };
    Ok(outputs)
}

fn two(v: &[usize]) -> [usize; 2] {
    [v[0], v[1]]
}

fn four(v: &[usize]) -> [usize; 4] {
    [v[0], v[1], v[2], v[3]]
}

/// Explicit pads, or SAME_UPPER/SAME_LOWER computed from static sizes.
fn conv_pads(attrs: &Attributes, graph: &Graph, x: Value, w: Value) -> Result<[usize; 4]> {
    match attrs.string("auto_pad").as_deref() {
        None | Some("NOTSET") | Some("") => Ok(four(&attrs.usizes("pads", 4, 0)?)),
        Some("VALID") => Ok([0; 4]),
        Some(mode @ ("SAME_UPPER" | "SAME_LOWER")) => {
            let strides = attrs.usizes("strides", 2, 1)?;
            let dilations = attrs.usizes("dilations", 2, 1)?;
            let mut pads = [0usize; 4];
            for i in 0..2 {
                let size = graph.ty(x).dims[2 + i].as_static();
                let k = graph.ty(w).dims[2 + i].as_static();
                let (Some(size), Some(k)) = (size, k) else {
                    return Err(attrs.error(
                        "auto_pad SAME needs static spatial sizes; export with explicit pads",
                    ));
                };
                let out = size.div_ceil(strides[i]);
                let span = dilations[i] * (k - 1) + 1;
                let total = ((out - 1) * strides[i] + span).saturating_sub(size);
                let (small, large) = (total / 2, total - total / 2);
                let (begin, end) = if mode == "SAME_UPPER" {
                    (small, large)
                } else {
                    (large, small)
                };
                pads[i] = begin;
                pads[i + 2] = end;
            }
            Ok(pads)
        }
        Some(other) => Err(attrs.error(format!("auto_pad={other} is not supported"))),
    }
}

fn constant(graph: &mut Graph, attrs: &Attributes, dir: Option<&Path>) -> Result<Value> {
    let device = &Device::Cpu;
    if let Some(t) = attrs.get("value").and_then(|a| a.t.as_ref()) {
        let (tensor, dtype) = read_tensor(t, dir)?;
        return graph.constant(tensor, dtype);
    }
    if let Some(a) = attrs.get("value_float") {
        return graph.constant(Tensor::new(a.f, device)?, DType::F32);
    }
    if let Some(a) = attrs.get("value_floats") {
        return graph.constant(
            Tensor::from_slice(&a.floats, a.floats.len(), device)?,
            DType::F32,
        );
    }
    if let Some(a) = attrs.get("value_int") {
        return graph.constant(Tensor::new(a.i, device)?, DType::I64);
    }
    if let Some(a) = attrs.get("value_ints") {
        return graph.ints(&a.ints);
    }
    Err(attrs.error("only value, value_float(s) and value_int(s) constants are supported"))
}
