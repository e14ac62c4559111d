//! The graph as data (typed values, nodes in topological order, named inputs,
//! weights and outputs) and the builder API that adds ops with shape inference.

use candle_core::{Device, Tensor};

use crate::error::{GraphError, Result};
use crate::infer::{Inferred, Operand};
use crate::ops::{BinaryOp, CompareOp, Op, PoolKind, ReduceOp, UnaryOp};
use crate::types::{DType, Dim, TensorType, shape_text};

/// A value in a graph: a graph input, a weight, a constant or a node's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(pub(crate) usize);

impl Value {
    pub fn index(self) -> usize {
        self.0
    }
}

/// Where a value comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Input(String),
    /// A named weight, bound when the graph is loaded into a session.
    Weight(String),
    Constant(Tensor),
    /// Output `1` of node `0`.
    Node(usize, usize),
}

/// A value's type and origin.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    pub ty: TensorType,
    /// For shape-holding 1-D integer values, the dims they hold.
    pub shape_value: Option<Vec<Dim>>,
    pub source: Source,
}

/// One op applied to values.
#[derive(Debug, Clone)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
    /// Where the node came from (an ONNX node name), for messages.
    pub name: String,
}

/// Geometry of a square 2-D convolution for [`Graph::conv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for Conv2d {
    fn default() -> Self {
        Conv2d {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// A typed computational graph. Nodes are kept in topological order: a node
/// can only use values that exist when it is added.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    pub(crate) values: Vec<ValueInfo>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) inputs: Vec<Value>,
    pub(crate) outputs: Vec<(String, Value)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    pub fn value(&self, value: Value) -> &ValueInfo {
        &self.values[value.0]
    }

    pub fn ty(&self, value: Value) -> &TensorType {
        &self.values[value.0].ty
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn values(&self) -> impl Iterator<Item = (Value, &ValueInfo)> {
        self.values.iter().enumerate().map(|(i, v)| (Value(i), v))
    }

    /// Graph inputs with their names and types, in declaration order.
    pub fn inputs(&self) -> Vec<(&str, &TensorType)> {
        self.inputs
            .iter()
            .filter_map(|&v| match &self.values[v.0].source {
                Source::Input(name) => Some((name.as_str(), &self.values[v.0].ty)),
                _ => None,
            })
            .collect()
    }

    /// Graph outputs with their names and types.
    pub fn outputs(&self) -> Vec<(&str, &TensorType)> {
        self.outputs
            .iter()
            .map(|(name, v)| (name.as_str(), &self.values[v.0].ty))
            .collect()
    }

    pub(crate) fn output_values(&self) -> &[(String, Value)] {
        &self.outputs
    }

    /// Weights the graph expects, with their declared types.
    pub fn weights(&self) -> Vec<(&str, &TensorType)> {
        self.values
            .iter()
            .filter_map(|v| match &v.source {
                Source::Weight(name) => Some((name.as_str(), &v.ty)),
                _ => None,
            })
            .collect()
    }

    fn push_value(
        &mut self,
        ty: TensorType,
        shape_value: Option<Vec<Dim>>,
        source: Source,
    ) -> Value {
        self.values.push(ValueInfo {
            ty,
            shape_value,
            source,
        });
        Value(self.values.len() - 1)
    }

    fn check(&self, value: Value) -> Result<()> {
        if value.0 >= self.values.len() {
            return Err(GraphError::Invalid(format!(
                "value {} is not in graph {:?}",
                value.0, self.name
            )));
        }
        Ok(())
    }

    /// Declare a named input.
    pub fn input(&mut self, name: impl Into<String>, ty: TensorType) -> Result<Value> {
        let name = name.into();
        if self.inputs().iter().any(|(n, _)| *n == name) {
            return Err(GraphError::Invalid(format!(
                "input {name:?} is declared twice"
            )));
        }
        let v = self.push_value(ty, None, Source::Input(name));
        self.inputs.push(v);
        Ok(v)
    }

    /// Declare a named weight of a static type, bound at load.
    pub fn weight(&mut self, name: impl Into<String>, ty: TensorType) -> Result<Value> {
        let name = name.into();
        if ty.static_dims().is_none() {
            return Err(GraphError::Invalid(format!(
                "weight {name:?} must have a static shape, got {}",
                shape_text(&ty.dims)
            )));
        }
        if self.weights().iter().any(|(n, _)| *n == name) {
            return Err(GraphError::Invalid(format!(
                "weight {name:?} is declared twice"
            )));
        }
        Ok(self.push_value(ty, None, Source::Weight(name)))
    }

    /// A constant; its candle dtype must store `dtype`.
    pub fn constant(&mut self, tensor: Tensor, dtype: DType) -> Result<Value> {
        if tensor.dtype() != dtype.storage() {
            return Err(GraphError::Invalid(format!(
                "a {dtype} constant cannot hold {:?} data",
                tensor.dtype()
            )));
        }
        let ty = TensorType::new(dtype, tensor.dims().iter().copied());
        let shape_value = if dtype.is_integer() && tensor.rank() == 1 {
            let values = tensor.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?;
            Some(crate::infer::dims_of_shape_values(&values))
        } else {
            None
        };
        Ok(self.push_value(ty, shape_value, Source::Constant(tensor)))
    }

    /// A scalar constant of `dtype`.
    pub fn scalar(&mut self, value: f64, dtype: DType) -> Result<Value> {
        let t = Tensor::new(value, &Device::Cpu)?.to_dtype(dtype.storage())?;
        self.constant(t, dtype)
    }

    /// A 1-D i64 constant (shapes, axes).
    pub fn ints(&mut self, values: &[i64]) -> Result<Value> {
        let t = Tensor::from_slice(values, values.len(), &Device::Cpu)?;
        self.constant(t, DType::I64)
    }

    /// Name a value as a graph output.
    pub fn output(&mut self, name: impl Into<String>, value: Value) -> Result<()> {
        self.check(value)?;
        let name = name.into();
        if self.outputs.iter().any(|(n, _)| *n == name) {
            return Err(GraphError::Invalid(format!(
                "output {name:?} is declared twice"
            )));
        }
        self.outputs.push((name, value));
        Ok(())
    }

    /// Facts inference knows about a value.
    pub(crate) fn operand(&self, value: Value) -> Operand<'_> {
        let info = &self.values[value.0];
        Operand {
            ty: &info.ty,
            value: match &info.source {
                Source::Constant(t) => Some(t),
                _ => None,
            },
            shape_value: info.shape_value.as_deref(),
        }
    }

    /// Add a node, inferring its results' types (the error names the op).
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: &[Value],
        name: impl Into<String>,
    ) -> Result<Vec<Value>> {
        for &v in inputs {
            self.check(v)?;
        }
        let name = name.into();
        let inferred: Vec<Inferred> = {
            let operands: Vec<Operand> = inputs.iter().map(|&v| self.operand(v)).collect();
            op.infer(&operands)
                .map_err(|e| match (&e, name.is_empty()) {
                    (GraphError::Op { op, message }, false) => GraphError::Op {
                        op: format!("{op} (node {name:?})"),
                        message: message.clone(),
                    },
                    _ => e,
                })?
        };
        let node_index = self.nodes.len();
        let outputs: Vec<Value> = inferred
            .into_iter()
            .enumerate()
            .map(|(i, inf)| self.push_value(inf.ty, inf.shape_value, Source::Node(node_index, i)))
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            name,
        });
        Ok(outputs)
    }

    /// Add a one-result node.
    pub fn apply(&mut self, op: Op, inputs: &[Value]) -> Result<Value> {
        let outputs = self.add_node(op, inputs, "")?;
        Ok(outputs[0])
    }

    /// Cast both operands to their promoted dtype.
    fn promoted(&mut self, a: Value, b: Value) -> Result<(Value, Value)> {
        let (da, db) = (self.ty(a).dtype, self.ty(b).dtype);
        let common = DType::promote(da, db);
        let a = if da == common {
            a
        } else {
            self.cast(a, common)?
        };
        let b = if db == common {
            b
        } else {
            self.cast(b, common)?
        };
        Ok((a, b))
    }

    pub fn binary(&mut self, kind: BinaryOp, a: Value, b: Value) -> Result<Value> {
        let (a, b) = self.promoted(a, b)?;
        self.apply(Op::Binary { kind }, &[a, b])
    }

    pub fn add(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Add, a, b)
    }

    pub fn sub(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Sub, a, b)
    }

    pub fn mul(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Mul, a, b)
    }

    pub fn div(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Div, a, b)
    }

    pub fn pow(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Pow, a, b)
    }

    pub fn compare(&mut self, kind: CompareOp, a: Value, b: Value) -> Result<Value> {
        let (a, b) = self.promoted(a, b)?;
        self.apply(Op::Compare { kind }, &[a, b])
    }

    pub fn matmul(&mut self, a: Value, b: Value) -> Result<Value> {
        let (a, b) = self.promoted(a, b)?;
        self.apply(Op::MatMul, &[a, b])
    }

    pub fn unary(&mut self, kind: UnaryOp, x: Value) -> Result<Value> {
        self.apply(Op::Unary { kind }, &[x])
    }

    pub fn relu(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Relu, x)
    }

    pub fn gelu(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Gelu, x)
    }

    pub fn silu(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Silu, x)
    }

    pub fn tanh(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Tanh, x)
    }

    pub fn sigmoid(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Sigmoid, x)
    }

    pub fn softmax(&mut self, x: Value, axis: i64) -> Result<Value> {
        self.apply(Op::Softmax { axis }, &[x])
    }

    pub fn log_softmax(&mut self, x: Value, axis: i64) -> Result<Value> {
        self.apply(Op::LogSoftmax { axis }, &[x])
    }

    /// Reduce over `axes` (all axes when empty).
    pub fn reduce(
        &mut self,
        kind: ReduceOp,
        x: Value,
        axes: &[i64],
        keepdims: bool,
    ) -> Result<Value> {
        if axes.is_empty() {
            return self.apply(Op::Reduce { kind, keepdims }, &[x]);
        }
        let axes = self.ints(axes)?;
        self.apply(Op::Reduce { kind, keepdims }, &[x, axes])
    }

    pub fn argmax(&mut self, x: Value, axis: i64, keepdims: bool) -> Result<Value> {
        self.apply(Op::ArgMax { axis, keepdims }, &[x])
    }

    pub fn layer_norm(
        &mut self,
        x: Value,
        scale: Value,
        bias: Option<Value>,
        epsilon: f64,
    ) -> Result<Value> {
        let mut inputs = vec![x, scale];
        inputs.extend(bias);
        self.apply(Op::LayerNorm { axis: -1, epsilon }, &inputs)
    }

    pub fn rms_norm(&mut self, x: Value, scale: Value, epsilon: f64) -> Result<Value> {
        self.apply(Op::RmsNorm { epsilon }, &[x, scale])
    }

    pub fn batch_norm(&mut self, x: Value, params: [Value; 4], epsilon: f64) -> Result<Value> {
        self.apply(
            Op::BatchNorm { epsilon },
            &[x, params[0], params[1], params[2], params[3]],
        )
    }

    pub fn group_norm(
        &mut self,
        x: Value,
        scale: Value,
        bias: Value,
        groups: usize,
        epsilon: f64,
    ) -> Result<Value> {
        self.apply(Op::GroupNorm { groups, epsilon }, &[x, scale, bias])
    }

    /// A 2-D convolution with symmetric padding.
    pub fn conv2d(
        &mut self,
        x: Value,
        weight: Value,
        bias: Option<Value>,
        conv: Conv2d,
    ) -> Result<Value> {
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        self.apply(
            Op::Conv2d {
                strides: [conv.stride; 2],
                pads: [conv.padding; 4],
                dilations: [conv.dilation; 2],
                groups: conv.groups,
            },
            &inputs,
        )
    }

    pub fn pool2d(
        &mut self,
        kind: PoolKind,
        x: Value,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Value> {
        self.apply(
            Op::Pool2d {
                kind,
                kernel: [kernel; 2],
                strides: [stride; 2],
                pads: [padding; 4],
                count_include_pad: false,
                ceil_mode: false,
            },
            &[x],
        )
    }

    /// Reshape to `shape` (ONNX rules: 0 copies a dim, -1 is inferred).
    pub fn reshape(&mut self, x: Value, shape: &[i64]) -> Result<Value> {
        let shape = self.ints(shape)?;
        self.apply(Op::Reshape { allow_zero: false }, &[x, shape])
    }

    pub fn transpose(&mut self, x: Value, perm: &[usize]) -> Result<Value> {
        self.apply(
            Op::Transpose {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    pub fn concat(&mut self, values: &[Value], axis: i64) -> Result<Value> {
        self.apply(Op::Concat { axis }, values)
    }

    pub fn split(&mut self, x: Value, axis: i64, sizes: &[i64]) -> Result<Vec<Value>> {
        let outputs = sizes.len();
        let sizes = self.ints(sizes)?;
        self.add_node(Op::Split { axis, outputs }, &[x, sizes], "")
    }

    pub fn slice(
        &mut self,
        x: Value,
        axes: &[i64],
        starts: &[i64],
        ends: &[i64],
        steps: &[i64],
    ) -> Result<Value> {
        let starts = self.ints(starts)?;
        let ends = self.ints(ends)?;
        let axes = self.ints(axes)?;
        let steps = self.ints(steps)?;
        self.apply(Op::Slice, &[x, starts, ends, axes, steps])
    }

    pub fn gather(&mut self, data: Value, indices: Value, axis: i64) -> Result<Value> {
        self.apply(Op::Gather { axis }, &[data, indices])
    }

    pub fn unsqueeze(&mut self, x: Value, axes: &[i64]) -> Result<Value> {
        let axes = self.ints(axes)?;
        self.apply(Op::Unsqueeze, &[x, axes])
    }

    pub fn squeeze(&mut self, x: Value, axes: &[i64]) -> Result<Value> {
        let axes = self.ints(axes)?;
        self.apply(Op::Squeeze, &[x, axes])
    }

    pub fn expand(&mut self, x: Value, shape: &[i64]) -> Result<Value> {
        let shape = self.ints(shape)?;
        self.apply(Op::Expand, &[x, shape])
    }

    pub fn where_(&mut self, condition: Value, x: Value, y: Value) -> Result<Value> {
        let (x, y) = self.promoted(x, y)?;
        self.apply(Op::Where, &[condition, x, y])
    }

    pub fn cast(&mut self, x: Value, to: DType) -> Result<Value> {
        self.apply(Op::Cast { to }, &[x])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_shape_is_a_build_error_naming_the_op_and_shapes() {
        let mut g = Graph::new("mlp");
        let x = g
            .input(
                "x",
                TensorType::new(DType::F32, [Dim::sym("batch"), 4.into()]),
            )
            .unwrap();
        let w = g
            .weight("w", TensorType::new(DType::F32, [5usize, 8]))
            .unwrap();
        let err = g.matmul(x, w).unwrap_err().to_string();
        assert!(
            err.contains("matmul") && err.contains("[batch, 4]") && err.contains("[5, 8]"),
            "{err}"
        );
    }

    #[test]
    fn mixed_dtypes_promote_as_max_does() {
        let mut g = Graph::new("promote");
        let x = g.input("x", TensorType::new(DType::I64, [3usize])).unwrap();
        let y = g.input("y", TensorType::new(DType::F32, [3usize])).unwrap();
        let z = g.add(x, y).unwrap();
        assert_eq!(g.ty(z).dtype, DType::F32);
    }

    #[test]
    fn shapes_computed_from_symbolic_inputs_stay_symbolic() {
        let mut g = Graph::new("reshape");
        let x = g
            .input(
                "x",
                TensorType::new(DType::F32, [Dim::sym("batch"), Dim::sym("seq"), 8.into()]),
            )
            .unwrap();
        let shape = g
            .apply(
                Op::Shape {
                    start: 0,
                    end: Some(2),
                },
                &[x],
            )
            .unwrap();
        let tail = g.ints(&[2, 4]).unwrap();
        let target = g.concat(&[shape, tail], 0).unwrap();
        let y = g
            .apply(Op::Reshape { allow_zero: false }, &[x, target])
            .unwrap();
        assert_eq!(
            g.ty(y).dims,
            vec![Dim::sym("batch"), Dim::sym("seq"), 2.into(), 4.into()]
        );
    }
}
