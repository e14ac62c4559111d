//! The operator set: each op's attributes, its name, and its shape and dtype
//! inference (which is where a wrong shape becomes a build-time error).

use serde::{Deserialize, Serialize};

use crate::error::{GraphError, Result};
use crate::types::{DType, Dim, TensorType, broadcast, normalize_axis, shape_text};

/// Element-wise functions of one operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    Relu,
    /// GELU with the exact erf form.
    Gelu,
    /// GELU with the tanh approximation.
    GeluTanh,
    Silu,
    Tanh,
    Sigmoid,
    Exp,
    Log,
    Sqrt,
    Neg,
    Abs,
    Erf,
    Reciprocal,
    Floor,
    Ceil,
    Not,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Erf => "erf",
            UnaryOp::Reciprocal => "reciprocal",
            UnaryOp::Floor => "floor",
            UnaryOp::Ceil => "ceil",
            UnaryOp::Not => "not",
        }
    }

    /// Whether the function is defined on floats only.
    fn float_only(self) -> bool {
        !matches!(
            self,
            UnaryOp::Relu | UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Not
        )
    }
}

/// Element-wise functions of two broadcast operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
        }
    }
}

/// Element-wise comparisons (boolean result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
}

impl CompareOp {
    pub fn name(self) -> &'static str {
        match self {
            CompareOp::Equal => "equal",
            CompareOp::Less => "less",
            CompareOp::LessOrEqual => "less_or_equal",
            CompareOp::Greater => "greater",
            CompareOp::GreaterOrEqual => "greater_or_equal",
        }
    }
}

/// Reductions over axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Mean => "reduce_mean",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Min => "reduce_min",
        }
    }
}

/// Pooling windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    Max,
    Average,
}

/// One instruction of a fused element-wise program: registers are numbered in
/// order, the program's inputs first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Instr {
    Unary(UnaryOp, usize),
    Binary(BinaryOp, usize, usize),
    /// A scalar constant.
    Scalar(f64),
}

/// Operators. Parameters that ONNX passes as tensors (shapes, axes, slice
/// bounds) are inputs here too, so a computed shape works; the builder makes
/// constants of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Numpy matmul over the last two dims, batch dims broadcast. Rank ≥ 1.
    #[serde(rename = "matmul")]
    MatMul,
    Binary {
        kind: BinaryOp,
    },
    Compare {
        kind: CompareOp,
    },
    Unary {
        kind: UnaryOp,
    },
    /// `clamp(x, min, max)`; inputs x, min, max (scalars).
    Clip,
    Softmax {
        axis: i64,
    },
    LogSoftmax {
        axis: i64,
    },
    /// Inputs x and optionally a 1-D i64 tensor of axes (none = all axes).
    Reduce {
        kind: ReduceOp,
        keepdims: bool,
    },
    #[serde(rename = "argmax")]
    ArgMax {
        axis: i64,
        keepdims: bool,
    },
    /// Normalise over `axis..rank`; inputs x, scale, optional bias.
    LayerNorm {
        axis: i64,
        epsilon: f64,
    },
    /// Root-mean-square norm over the last axis; inputs x, scale.
    RmsNorm {
        epsilon: f64,
    },
    /// Inference batch norm over axis 1; inputs x, scale, bias, mean, var.
    BatchNorm {
        epsilon: f64,
    },
    /// Inputs x (N, C, ...), scale (C), bias (C).
    GroupNorm {
        groups: usize,
        epsilon: f64,
    },
    /// 2-D convolution, NCHW; inputs x, weight (O, C/groups, kh, kw), optional bias.
    /// `pads` = [top, left, bottom, right].
    Conv2d {
        strides: [usize; 2],
        pads: [usize; 4],
        dilations: [usize; 2],
        groups: usize,
    },
    Pool2d {
        kind: PoolKind,
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
        count_include_pad: bool,
        ceil_mode: bool,
    },
    /// Inputs x and a 1-D i64 shape (0 copies the input's dim unless `allow_zero`,
    /// -1 is inferred).
    Reshape {
        allow_zero: bool,
    },
    /// Collapse to 2-D at `axis`.
    Flatten {
        axis: i64,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Concat {
        axis: i64,
    },
    /// Inputs x and optionally 1-D i64 sizes; `outputs` equal parts otherwise.
    Split {
        axis: i64,
        outputs: usize,
    },
    /// Inputs x, starts, ends, and optionally axes and steps (1-D i64).
    Slice,
    /// Inputs data, indices (i64/i32; negative counts from the end).
    Gather {
        axis: i64,
    },
    /// Inputs x, 1-D i64 axes.
    Unsqueeze,
    /// Inputs x and optionally 1-D i64 axes (none = every 1-dim).
    Squeeze,
    /// Inputs x and a 1-D i64 shape, broadcast both ways.
    Expand,
    /// Inputs condition (bool), x, y.
    Where,
    Cast {
        to: DType,
    },
    /// The input's shape (dims `start..end`) as 1-D i64.
    Shape {
        start: i64,
        end: Option<i64>,
    },
    /// A tensor of the given 1-D i64 shape filled with `value`.
    ConstantOfShape {
        value: f64,
        dtype: DType,
    },
    /// Inputs start, limit, delta (scalars).
    Range,
    Identity,
    /// `act(a·b + bias)`, or `a·b + bias + residual` with a fourth input: a
    /// matmul whose epilogue the compiler fused.
    #[serde(rename = "matmul_bias")]
    MatMulBias {
        activation: Option<UnaryOp>,
    },
    /// A chain of element-wise ops on same-dtype float operands, in one pass.
    #[serde(rename = "fused_elementwise")]
    Fused {
        program: Vec<Instr>,
    },
}

/// What inference knows about one operand.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    pub ty: &'a TensorType,
    /// The value when it is a constant known at build time.
    pub value: Option<&'a candle_core::Tensor>,
    /// For a 1-D integer value that holds a shape (from `Shape`, constants,
    /// gathers and concats of them): its entries as dims, symbols included.
    pub shape_value: Option<&'a [Dim]>,
}

/// What inference learns about one result.
#[derive(Debug, Clone, PartialEq)]
pub struct Inferred {
    pub ty: TensorType,
    pub shape_value: Option<Vec<Dim>>,
}

impl From<TensorType> for Inferred {
    fn from(ty: TensorType) -> Self {
        Inferred {
            ty,
            shape_value: None,
        }
    }
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::MatMul => "matmul",
            Op::Binary { kind } => kind.name(),
            Op::Compare { kind } => kind.name(),
            Op::Unary { kind } => kind.name(),
            Op::Clip => "clip",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::Reduce { kind, .. } => kind.name(),
            Op::ArgMax { .. } => "argmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::BatchNorm { .. } => "batch_norm",
            Op::GroupNorm { .. } => "group_norm",
            Op::Conv2d { .. } => "conv2d",
            Op::Pool2d {
                kind: PoolKind::Max,
                ..
            } => "max_pool2d",
            Op::Pool2d {
                kind: PoolKind::Average,
                ..
            } => "avg_pool2d",
            Op::Reshape { .. } => "reshape",
            Op::Flatten { .. } => "flatten",
            Op::Transpose { .. } => "transpose",
            Op::Concat { .. } => "concat",
            Op::Split { .. } => "split",
            Op::Slice => "slice",
            Op::Gather { .. } => "gather",
            Op::Unsqueeze => "unsqueeze",
            Op::Squeeze => "squeeze",
            Op::Expand => "expand",
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::Shape { .. } => "shape",
            Op::ConstantOfShape { .. } => "constant_of_shape",
            Op::Range => "range",
            Op::Identity => "identity",
            Op::MatMulBias { .. } => "matmul_bias",
            Op::Fused { .. } => "fused_elementwise",
        }
    }

    /// How many inputs the op takes (inclusive range).
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::MatMul | Op::Binary { .. } | Op::Compare { .. } | Op::Gather { .. } => (2, 2),
            Op::Unary { .. }
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::ArgMax { .. }
            | Op::Flatten { .. }
            | Op::Transpose { .. }
            | Op::Cast { .. }
            | Op::Shape { .. }
            | Op::Identity
            | Op::Pool2d { .. }
            | Op::ConstantOfShape { .. } => (1, 1),
            Op::Clip | Op::Where | Op::Range => (3, 3),
            Op::Reduce { .. } | Op::Squeeze | Op::Split { .. } => (1, 2),
            Op::LayerNorm { .. } => (2, 3),
            Op::RmsNorm { .. } | Op::Reshape { .. } | Op::Unsqueeze | Op::Expand => (2, 2),
            Op::BatchNorm { .. } => (5, 5),
            Op::GroupNorm { .. } => (3, 3),
            Op::Conv2d { .. } => (2, 3),
            Op::Concat { .. } => (1, usize::MAX),
            Op::Slice => (3, 5),
            Op::MatMulBias { .. } => (3, 4),
            Op::Fused { .. } => (1, usize::MAX),
        }
    }

    /// Number of results.
    pub fn output_count(&self) -> usize {
        match self {
            Op::Split { outputs, .. } => *outputs,
            _ => 1,
        }
    }

    /// Whether the op's result depends only on its inputs (so equal nodes can be
    /// merged and constant ones folded). Every op here is pure.
    pub fn is_pure(&self) -> bool {
        true
    }

    /// Result types from operand facts; the error names the op and the shapes.
    pub fn infer(&self, operands: &[Operand]) -> Result<Vec<Inferred>> {
        let name = self.name();
        let (lo, hi) = self.arity();
        if operands.len() < lo || operands.len() > hi {
            return Err(GraphError::op(
                name,
                format!(
                    "takes {} inputs, got {}",
                    if lo == hi {
                        lo.to_string()
                    } else if hi == usize::MAX {
                        format!("at least {lo}")
                    } else {
                        format!("{lo} to {hi}")
                    },
                    operands.len()
                ),
            ));
        }
        let t = |i: usize| operands[i].ty;
        let one = |ty: TensorType| Ok(vec![Inferred::from(ty)]);
        match self {
            Op::MatMul => one(infer_matmul(name, t(0), t(1))?),
            Op::MatMulBias { .. } => {
                let product = infer_matmul(name, t(0), t(1))?;
                same_dtype(name, &product, t(2))?;
                let mut dims = broadcast(name, &product.dims, &t(2).dims)?;
                if let Some(residual) = operands.get(3) {
                    same_dtype(name, &product, residual.ty)?;
                    dims = broadcast(name, &dims, &residual.ty.dims)?;
                }
                one(TensorType {
                    dtype: product.dtype,
                    dims,
                })
            }
            Op::Binary { .. } => {
                same_dtype(name, t(0), t(1))?;
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: broadcast(name, &t(0).dims, &t(1).dims)?,
                })
            }
            Op::Compare { .. } => {
                same_dtype(name, t(0), t(1))?;
                one(TensorType {
                    dtype: DType::Bool,
                    dims: broadcast(name, &t(0).dims, &t(1).dims)?,
                })
            }
            Op::Unary { kind } => {
                if kind.float_only() && !t(0).dtype.is_float() {
                    return Err(GraphError::op(
                        name,
                        format!("needs a float input, got {}", t(0)),
                    ));
                }
                if *kind == UnaryOp::Not && t(0).dtype != DType::Bool {
                    return Err(GraphError::op(
                        name,
                        format!("needs a bool input, got {}", t(0)),
                    ));
                }
                one(t(0).clone())
            }
            Op::Clip => {
                for i in 1..3 {
                    same_dtype(name, t(0), t(i))?;
                    if t(i).rank() != 0 {
                        return Err(GraphError::op(
                            name,
                            format!("min and max must be scalars, got {}", t(i)),
                        ));
                    }
                }
                one(t(0).clone())
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => {
                float_input(name, t(0))?;
                t(0).axis(name, *axis)?;
                one(t(0).clone())
            }
            Op::Reduce { keepdims, .. } => {
                let axes = match operands.get(1) {
                    None => Some((0..t(0).rank()).collect()),
                    Some(a) => int_list(a.value)?
                        .map(|axes| axes_of(name, &axes, t(0).rank()))
                        .transpose()?,
                };
                match axes {
                    Some(axes) => one(reduced(t(0), &axes, *keepdims)),
                    None => one(TensorType {
                        dtype: t(0).dtype,
                        dims: vec![Dim::Unknown; if *keepdims { t(0).rank() } else { 0 }],
                    }),
                }
            }
            Op::ArgMax { axis, keepdims } => {
                let axis = t(0).axis(name, *axis)?;
                let mut ty = reduced(t(0), &[axis], *keepdims);
                ty.dtype = DType::I64;
                one(ty)
            }
            Op::LayerNorm { axis, .. } => {
                float_input(name, t(0))?;
                let axis = t(0).axis(name, *axis)?;
                let normalized = &t(0).dims[axis..];
                for i in 1..operands.len() {
                    same_dtype(name, t(0), t(i))?;
                    broadcast(name, normalized, &t(i).dims)?;
                }
                one(t(0).clone())
            }
            Op::RmsNorm { .. } => {
                float_input(name, t(0))?;
                same_dtype(name, t(0), t(1))?;
                let last = t(0).dims.last().cloned().unwrap_or(Dim::Static(1));
                broadcast(name, &[last], &t(1).dims)?;
                one(t(0).clone())
            }
            Op::BatchNorm { .. } | Op::GroupNorm { .. } => {
                float_input(name, t(0))?;
                if t(0).rank() < 2 {
                    return Err(GraphError::op(
                        name,
                        format!("needs an (N, C, ...) input, got {}", t(0)),
                    ));
                }
                let channels = &t(0).dims[1];
                for i in 1..operands.len() {
                    same_dtype(name, t(0), t(i))?;
                    if t(i).rank() != 1 || !dims_compatible(&t(i).dims[0], channels) {
                        return Err(GraphError::op(
                            name,
                            format!(
                                "parameter {} must be 1-D of {channels} channels, got {}",
                                i,
                                shape_text(&t(i).dims)
                            ),
                        ));
                    }
                }
                if let (Op::GroupNorm { groups, .. }, Some(c)) = (self, channels.as_static())
                    && (*groups == 0 || c % groups != 0)
                {
                    return Err(GraphError::op(
                        name,
                        format!("{c} channels do not split into {groups} groups"),
                    ));
                }
                one(t(0).clone())
            }
            Op::Conv2d {
                strides,
                pads,
                dilations,
                groups,
            } => infer_conv(name, operands, *strides, *pads, *dilations, *groups)
                .map(|t| vec![t.into()]),
            Op::Pool2d {
                kernel,
                strides,
                pads,
                ceil_mode,
                ..
            } => {
                float_input(name, t(0))?;
                if t(0).rank() != 4 {
                    return Err(GraphError::op(
                        name,
                        format!("needs an NCHW input, got {}", shape_text(&t(0).dims)),
                    ));
                }
                let mut dims = t(0).dims.clone();
                for i in 0..2 {
                    dims[2 + i] = match t(0).dims[2 + i].as_static() {
                        Some(size) => Dim::Static(window_count(
                            name,
                            size,
                            kernel[i],
                            strides[i],
                            1,
                            pads[i] + pads[i + 2],
                            *ceil_mode,
                        )?),
                        None => Dim::Unknown,
                    };
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Reshape { allow_zero } => {
                let target = shape_operand(name, &operands[1])?;
                let dims = match target {
                    Some(target) => reshaped(name, &t(0).dims, &target, *allow_zero)?,
                    None => vec![Dim::Unknown; operand_length(name, t(1))?],
                };
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Flatten { axis } => {
                let rank = t(0).rank();
                let axis = normalize_axis(name, *axis, rank + 1)?;
                let dims = vec![product(&t(0).dims[..axis]), product(&t(0).dims[axis..])];
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Transpose { perm } => {
                let rank = t(0).rank();
                let mut seen = vec![false; rank];
                if perm.len() != rank
                    || perm
                        .iter()
                        .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
                {
                    return Err(GraphError::op(
                        name,
                        format!("{perm:?} is not a permutation of {rank} axes"),
                    ));
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: perm.iter().map(|&p| t(0).dims[p].clone()).collect(),
                })
            }
            Op::Concat { axis } => {
                let rank = t(0).rank();
                let axis = normalize_axis(name, *axis, rank)?;
                let mut dims = t(0).dims.clone();
                let mut total = Some(0usize);
                let mut symbolic = Vec::new();
                for op in operands {
                    same_dtype(name, t(0), op.ty)?;
                    if op.ty.rank() != rank {
                        return Err(GraphError::op(
                            name,
                            format!(
                                "inputs of different ranks: {} and {}",
                                shape_text(&t(0).dims),
                                shape_text(&op.ty.dims)
                            ),
                        ));
                    }
                    for (d, (a, b)) in dims.iter_mut().zip(&op.ty.dims).enumerate() {
                        if d == axis {
                            continue;
                        }
                        if !dims_compatible(a, b) {
                            return Err(GraphError::op(
                                name,
                                format!(
                                    "shapes {} and {} differ outside axis {axis}",
                                    shape_text(&t(0).dims),
                                    shape_text(&op.ty.dims)
                                ),
                            ));
                        }
                        if *a == Dim::Unknown {
                            *a = b.clone();
                        }
                    }
                    match &op.ty.dims[axis] {
                        Dim::Static(n) => total = total.map(|t| t + n),
                        other => {
                            total = None;
                            symbolic.push(other.clone());
                        }
                    }
                }
                dims[axis] = match total {
                    Some(n) => Dim::Static(n),
                    None if operands.len() == 1 => symbolic.remove(0),
                    None => Dim::Unknown,
                };
                // Concatenated shape values stay known (`[batch, -1, 64]`).
                let shape_value = if rank == 1 {
                    operands
                        .iter()
                        .map(|o| o.shape_value.map(<[Dim]>::to_vec))
                        .collect::<Option<Vec<_>>>()
                        .map(|parts| parts.concat())
                } else {
                    None
                };
                Ok(vec![Inferred {
                    ty: TensorType {
                        dtype: t(0).dtype,
                        dims,
                    },
                    shape_value,
                }])
            }
            Op::Split { axis, outputs } => {
                let axis = t(0).axis(name, *axis)?;
                let sizes: Option<Vec<i64>> = match operands.get(1) {
                    Some(o) => int_list(o.value)?,
                    None => t(0).dims[axis].as_static().map(|n| {
                        let part = n.div_ceil((*outputs).max(1));
                        (0..*outputs)
                            .map(|i| part.min(n.saturating_sub(i * part)) as i64)
                            .collect()
                    }),
                };
                if let Some(sizes) = &sizes {
                    if sizes.len() != *outputs || sizes.iter().any(|&s| s < 0) {
                        return Err(GraphError::op(
                            name,
                            format!("split sizes {sizes:?} do not give {outputs} parts"),
                        ));
                    }
                    if let Some(n) = t(0).dims[axis].as_static()
                        && sizes.iter().sum::<i64>() != n as i64
                    {
                        return Err(GraphError::op(
                            name,
                            format!("split sizes {sizes:?} do not add up to {n}"),
                        ));
                    }
                }
                Ok((0..*outputs)
                    .map(|i| {
                        let mut dims = t(0).dims.clone();
                        dims[axis] = match &sizes {
                            Some(s) => Dim::Static(s[i] as usize),
                            None => Dim::Unknown,
                        };
                        TensorType {
                            dtype: t(0).dtype,
                            dims,
                        }
                        .into()
                    })
                    .collect())
            }
            Op::Slice => infer_slice(name, operands).map(|t| vec![t]),
            Op::Gather { axis } => {
                let axis = t(0).axis(name, *axis)?;
                if !t(1).dtype.is_integer() {
                    return Err(GraphError::op(
                        name,
                        format!("indices must be integers, got {}", t(1)),
                    ));
                }
                let mut dims = t(0).dims[..axis].to_vec();
                dims.extend(t(1).dims.iter().cloned());
                dims.extend(t(0).dims[axis + 1..].iter().cloned());
                // Gathering from a known shape keeps it known.
                let shape_value = match (operands[0].shape_value, int_list(operands[1].value)?) {
                    (Some(values), Some(indices)) if t(0).rank() == 1 => indices
                        .iter()
                        .map(|&i| {
                            let i = if i < 0 { i + values.len() as i64 } else { i };
                            values.get(i as usize).cloned()
                        })
                        .collect(),
                    _ => None,
                };
                Ok(vec![Inferred {
                    ty: TensorType {
                        dtype: t(0).dtype,
                        dims,
                    },
                    shape_value,
                }])
            }
            Op::Unsqueeze => {
                let axes = int_list(operands[1].value)?
                    .ok_or_else(|| GraphError::op(name, "axes must be a constant"))?;
                let rank = t(0).rank() + axes.len();
                let axes = axes_of(name, &axes, rank)?;
                let mut rest = t(0).dims.iter();
                let dims = (0..rank)
                    .map(|d| {
                        if axes.contains(&d) {
                            Dim::Static(1)
                        } else {
                            rest.next().cloned().unwrap_or(Dim::Unknown)
                        }
                    })
                    .collect();
                let shape_value = match operands[0].shape_value {
                    Some(v) if t(0).rank() == 0 => Some(v.to_vec()),
                    _ => None,
                };
                Ok(vec![Inferred {
                    ty: TensorType {
                        dtype: t(0).dtype,
                        dims,
                    },
                    shape_value,
                }])
            }
            Op::Squeeze => {
                let axes = match operands.get(1) {
                    Some(o) => {
                        let axes = int_list(o.value)?
                            .ok_or_else(|| GraphError::op(name, "axes must be a constant"))?;
                        axes_of(name, &axes, t(0).rank())?
                    }
                    None => {
                        let axes: Vec<usize> = (0..t(0).rank())
                            .filter(|&d| t(0).dims[d] == Dim::Static(1))
                            .collect();
                        if t(0).dims.iter().any(|d| d.as_static().is_none()) {
                            return Err(GraphError::op(
                                name,
                                format!(
                                    "without axes needs a static shape, got {}",
                                    shape_text(&t(0).dims)
                                ),
                            ));
                        }
                        axes
                    }
                };
                for &a in &axes {
                    if matches!(t(0).dims[a], Dim::Static(n) if n != 1) {
                        return Err(GraphError::op(
                            name,
                            format!("axis {a} of {} is not 1", shape_text(&t(0).dims)),
                        ));
                    }
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: (0..t(0).rank())
                        .filter(|d| !axes.contains(d))
                        .map(|d| t(0).dims[d].clone())
                        .collect(),
                })
            }
            Op::Expand => {
                let dims = match shape_operand(name, &operands[1])? {
                    Some(target) => broadcast(name, &t(0).dims, &target)?,
                    None => {
                        let len = operand_length(name, t(1))?;
                        vec![Dim::Unknown; len.max(t(0).rank())]
                    }
                };
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Where => {
                if t(0).dtype != DType::Bool {
                    return Err(GraphError::op(
                        name,
                        format!("condition must be bool, got {}", t(0)),
                    ));
                }
                same_dtype(name, t(1), t(2))?;
                let dims = broadcast(name, &t(0).dims, &t(1).dims)?;
                let dims = broadcast(name, &dims, &t(2).dims)?;
                one(TensorType {
                    dtype: t(1).dtype,
                    dims,
                })
            }
            Op::Cast { to } => one(TensorType {
                dtype: *to,
                dims: t(0).dims.clone(),
            }),
            Op::Shape { start, end } => {
                let rank = t(0).rank() as i64;
                let clamp = |i: i64| (if i < 0 { i + rank } else { i }).clamp(0, rank) as usize;
                let (s, e) = (clamp(*start), clamp(end.unwrap_or(rank)));
                let values: Vec<Dim> = if s < e {
                    t(0).dims[s..e].to_vec()
                } else {
                    Vec::new()
                };
                Ok(vec![Inferred {
                    ty: TensorType::new(DType::I64, [values.len()]),
                    shape_value: Some(values),
                }])
            }
            Op::ConstantOfShape { dtype, .. } => {
                let dims = match shape_operand(name, &operands[0])? {
                    Some(dims) => dims,
                    None => vec![Dim::Unknown; operand_length(name, t(0))?],
                };
                one(TensorType {
                    dtype: *dtype,
                    dims,
                })
            }
            Op::Range => {
                for i in 0..3 {
                    same_dtype(name, t(0), t(i))?;
                    if t(i).rank() != 0 {
                        return Err(GraphError::op(name, format!("needs scalars, got {}", t(i))));
                    }
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: vec![Dim::Unknown],
                })
            }
            Op::Identity => Ok(vec![Inferred {
                ty: t(0).clone(),
                shape_value: operands[0].shape_value.map(<[Dim]>::to_vec),
            }]),
            Op::Fused { .. } => {
                let mut dims = t(0).dims.clone();
                for o in &operands[1..] {
                    same_dtype(name, t(0), o.ty)?;
                    dims = broadcast(name, &dims, &o.ty.dims)?;
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
        }
    }
}

fn same_dtype(op: &str, a: &TensorType, b: &TensorType) -> Result<()> {
    if a.dtype != b.dtype {
        return Err(GraphError::op(
            op,
            format!("operands have different dtypes: {a} and {b}"),
        ));
    }
    Ok(())
}

fn float_input(op: &str, a: &TensorType) -> Result<()> {
    if !a.dtype.is_float() {
        return Err(GraphError::op(op, format!("needs a float input, got {a}")));
    }
    Ok(())
}

/// Two dims that may be equal at run time.
fn dims_compatible(a: &Dim, b: &Dim) -> bool {
    match (a, b) {
        (Dim::Unknown, _) | (_, Dim::Unknown) => true,
        _ => a == b,
    }
}

fn product(dims: &[Dim]) -> Dim {
    let mut n = 1usize;
    for d in dims {
        match d {
            Dim::Static(k) => n *= k,
            _ if dims.len() == 1 => return d.clone(),
            _ => return Dim::Unknown,
        }
    }
    Dim::Static(n)
}

fn infer_matmul(op: &str, a: &TensorType, b: &TensorType) -> Result<TensorType> {
    same_dtype(op, a, b)?;
    if a.rank() == 0 || b.rank() == 0 {
        return Err(GraphError::op(
            op,
            format!("needs rank ≥ 1 operands, got {a} and {b}"),
        ));
    }
    let mut ad = a.dims.clone();
    let mut bd = b.dims.clone();
    let a_vector = ad.len() == 1;
    let b_vector = bd.len() == 1;
    if a_vector {
        ad.insert(0, Dim::Static(1));
    }
    if b_vector {
        bd.push(Dim::Static(1));
    }
    let (k1, k2) = (&ad[ad.len() - 1], &bd[bd.len() - 2]);
    if !dims_compatible(k1, k2) {
        return Err(GraphError::op(
            op,
            format!(
                "inner dimensions differ: {} · {} ({k1} vs {k2})",
                shape_text(&a.dims),
                shape_text(&b.dims)
            ),
        ));
    }
    let batch = broadcast(op, &ad[..ad.len() - 2], &bd[..bd.len() - 2])?;
    let mut dims = batch;
    if !a_vector {
        dims.push(ad[ad.len() - 2].clone());
    }
    if !b_vector {
        dims.push(bd[bd.len() - 1].clone());
    }
    Ok(TensorType {
        dtype: a.dtype,
        dims,
    })
}

fn infer_conv(
    op: &str,
    operands: &[Operand],
    strides: [usize; 2],
    pads: [usize; 4],
    dilations: [usize; 2],
    groups: usize,
) -> Result<TensorType> {
    let (x, w) = (operands[0].ty, operands[1].ty);
    float_input(op, x)?;
    same_dtype(op, x, w)?;
    if x.rank() != 4 || w.rank() != 4 {
        return Err(GraphError::op(
            op,
            format!(
                "needs an NCHW input and an (O, C/groups, kh, kw) weight, got {} and {}",
                shape_text(&x.dims),
                shape_text(&w.dims)
            ),
        ));
    }
    if groups == 0 || strides.contains(&0) || dilations.contains(&0) {
        return Err(GraphError::op(
            op,
            "groups, strides and dilations must be ≥ 1",
        ));
    }
    if let (Some(c), Some(wc)) = (x.dims[1].as_static(), w.dims[1].as_static())
        && c != wc * groups
    {
        return Err(GraphError::op(
            op,
            format!(
                "input {} has {c} channels; weight {} with {groups} groups expects {}",
                shape_text(&x.dims),
                shape_text(&w.dims),
                wc * groups
            ),
        ));
    }
    if let Some(o) = w.dims[0].as_static()
        && o % groups != 0
    {
        return Err(GraphError::op(
            op,
            format!("{o} output channels do not split into {groups} groups"),
        ));
    }
    if let Some(bias) = operands.get(2) {
        same_dtype(op, x, bias.ty)?;
        if bias.ty.rank() != 1 || !dims_compatible(&bias.ty.dims[0], &w.dims[0]) {
            return Err(GraphError::op(
                op,
                format!(
                    "bias {} does not match {} output channels",
                    shape_text(&bias.ty.dims),
                    w.dims[0]
                ),
            ));
        }
    }
    let mut dims = vec![x.dims[0].clone(), w.dims[0].clone()];
    for i in 0..2 {
        dims.push(
            match (x.dims[2 + i].as_static(), w.dims[2 + i].as_static()) {
                (Some(size), Some(k)) => Dim::Static(window_count(
                    op,
                    size,
                    k,
                    strides[i],
                    dilations[i],
                    pads[i] + pads[i + 2],
                    false,
                )?),
                _ => Dim::Unknown,
            },
        );
    }
    Ok(TensorType {
        dtype: x.dtype,
        dims,
    })
}

/// Output positions of a sliding window.
pub fn window_count(
    op: &str,
    size: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    total_pad: usize,
    ceil_mode: bool,
) -> Result<usize> {
    let span = dilation * (kernel.max(1) - 1) + 1;
    let padded = size + total_pad;
    if padded < span || stride == 0 {
        return Err(GraphError::op(
            op,
            format!("a window of {span} does not fit {size} (+{total_pad} padding)"),
        ));
    }
    let steps = padded - span;
    let mut count = if ceil_mode {
        steps.div_ceil(stride) + 1
    } else {
        steps / stride + 1
    };
    // A ceil-mode window must start inside the input or its left padding.
    if ceil_mode && (count - 1) * stride >= size + total_pad / 2 {
        count -= 1;
    }
    Ok(count)
}

fn reduced(x: &TensorType, axes: &[usize], keepdims: bool) -> TensorType {
    let dims = x
        .dims
        .iter()
        .enumerate()
        .filter_map(|(d, dim)| match (axes.contains(&d), keepdims) {
            (true, true) => Some(Dim::Static(1)),
            (true, false) => None,
            (false, _) => Some(dim.clone()),
        })
        .collect();
    TensorType {
        dtype: x.dtype,
        dims,
    }
}

/// The entries of a constant 1-D (or scalar) integer tensor.
pub fn int_list(value: Option<&candle_core::Tensor>) -> Result<Option<Vec<i64>>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let flat = value.flatten_all()?.to_dtype(candle_core::DType::I64)?;
    Ok(Some(flat.to_vec1::<i64>()?))
}

fn axes_of(op: &str, axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let a = normalize_axis(op, a, rank)?;
        if out.contains(&a) {
            return Err(GraphError::op(op, format!("axis {a} is repeated")));
        }
        out.push(a);
    }
    Ok(out)
}

/// The length of a 1-D shape operand.
fn operand_length(op: &str, shape: &TensorType) -> Result<usize> {
    match shape.dims.as_slice() {
        [Dim::Static(n)] if shape.dtype.is_integer() => Ok(*n),
        _ => Err(GraphError::op(
            op,
            format!("the shape operand must be a 1-D integer tensor of static length, got {shape}"),
        )),
    }
}

/// Shape entries as dims: negative entries (`-1`, inferred) are unknown.
pub fn dims_of_shape_values(values: &[i64]) -> Vec<Dim> {
    values
        .iter()
        .map(|&v| {
            if v < 0 {
                Dim::Unknown
            } else {
                Dim::Static(v as usize)
            }
        })
        .collect()
}

/// A shape operand's entries as dims, where known: from a constant (`-1` and `0`
/// kept as Static markers for the caller) or a tracked shape value.
fn shape_operand(op: &str, operand: &Operand) -> Result<Option<Vec<Dim>>> {
    operand_length(op, operand.ty)?;
    if let Some(values) = int_list(operand.value)? {
        return Ok(Some(dims_of_shape_values(&values)));
    }
    Ok(operand.shape_value.map(<[Dim]>::to_vec))
}

/// ONNX Reshape semantics over possibly symbolic dims. Unknown entries of the
/// target (a `-1`) are inferred when the rest is static.
fn reshaped(op: &str, input: &[Dim], target: &[Dim], allow_zero: bool) -> Result<Vec<Dim>> {
    let mut dims: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Static(0) if !allow_zero => input.get(i).cloned().unwrap_or(Dim::Unknown),
            other => other.clone(),
        })
        .collect();
    if dims.iter().filter(|d| **d == Dim::Unknown).count() == 1
        && let (Some(total), Some(known)) = (
            input.iter().map(Dim::as_static).product::<Option<usize>>(),
            dims.iter()
                .filter(|d| **d != Dim::Unknown)
                .map(Dim::as_static)
                .product::<Option<usize>>(),
        )
    {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(GraphError::op(
                op,
                format!(
                    "cannot reshape {} into {}",
                    shape_text(input),
                    shape_text(target)
                ),
            ));
        }
        for d in dims.iter_mut() {
            if *d == Dim::Unknown {
                *d = Dim::Static(total / known);
            }
        }
    }
    if let (Some(total), Some(new_total)) = (
        input.iter().map(Dim::as_static).product::<Option<usize>>(),
        dims.iter().map(Dim::as_static).product::<Option<usize>>(),
    ) && total != new_total
    {
        return Err(GraphError::op(
            op,
            format!(
                "cannot reshape {} ({total} elements) into {} ({new_total})",
                shape_text(input),
                shape_text(&dims)
            ),
        ));
    }
    Ok(dims)
}

fn infer_slice(op: &str, operands: &[Operand]) -> Result<Inferred> {
    let x = operands[0].ty;
    let lists: Vec<Option<Vec<i64>>> = operands[1..]
        .iter()
        .map(|o| int_list(o.value))
        .collect::<Result<_>>()?;
    let rank = x.rank();
    let (Some(starts), Some(ends)) = (&lists[0], &lists[1]) else {
        let mut dims = x.dims.clone();
        // Without constant bounds, only the sliced axes are unknown.
        match lists.get(2).cloned().flatten() {
            Some(axes) => {
                for a in axes_of(op, &axes, rank)? {
                    dims[a] = Dim::Unknown;
                }
            }
            None => dims.iter_mut().for_each(|d| *d = Dim::Unknown),
        }
        return Ok(TensorType {
            dtype: x.dtype,
            dims,
        }
        .into());
    };
    let axes = match lists.get(2).cloned().flatten() {
        Some(axes) => axes_of(op, &axes, rank)?,
        None => (0..starts.len()).collect(),
    };
    let steps = lists
        .get(3)
        .cloned()
        .flatten()
        .unwrap_or_else(|| vec![1; starts.len()]);
    if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(GraphError::op(
            op,
            "starts, ends, axes and steps must have the same length",
        ));
    }
    let mut dims = x.dims.clone();
    for (i, &axis) in axes.iter().enumerate() {
        dims[axis] = match x.dims[axis].as_static() {
            Some(n) => Dim::Static(slice_range(op, n, starts[i], ends[i], steps[i])?.len()),
            None => Dim::Unknown,
        };
    }
    // Slicing a known shape value keeps it known.
    let shape_value = match (operands[0].shape_value, axes.as_slice()) {
        (Some(values), [0]) => {
            let idx = slice_range(op, values.len(), starts[0], ends[0], steps[0])?;
            Some(idx.iter().map(|&i| values[i].clone()).collect())
        }
        _ => None,
    };
    Ok(Inferred {
        ty: TensorType {
            dtype: x.dtype,
            dims,
        },
        shape_value,
    })
}

/// The indices ONNX's Slice takes along one axis of `n` (clamped as numpy does).
pub fn slice_range(op: &str, n: usize, start: i64, end: i64, step: i64) -> Result<Vec<usize>> {
    if step == 0 {
        return Err(GraphError::op(op, "slice step must not be 0"));
    }
    let n = n as i64;
    let norm = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let (start, end) = (norm(start), norm(end));
    let mut out = Vec::new();
    if step > 0 {
        let (s, e) = (start.clamp(0, n), end.clamp(0, n));
        let mut i = s;
        while i < e {
            out.push(i as usize);
            i += step;
        }
    } else {
        let (s, e) = (start.clamp(-1, n - 1), end.clamp(-1, n - 1));
        let mut i = s;
        while i > e {
            out.push(i as usize);
            i += step;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operand(ty: &TensorType) -> Operand<'_> {
        Operand {
            ty,
            value: None,
            shape_value: None,
        }
    }

    #[test]
    fn matmul_broadcasts_batches_and_names_mismatched_inner_dims() {
        let a = TensorType::new(
            DType::F32,
            [Dim::sym("batch"), 1.into(), 3.into(), 4.into()],
        );
        let b = TensorType::new(DType::F32, [5usize, 4, 6]);
        let out = Op::MatMul.infer(&[operand(&a), operand(&b)]).unwrap();
        assert_eq!(
            out[0].ty,
            TensorType::new(
                DType::F32,
                [Dim::sym("batch"), 5.into(), 3.into(), 6.into()]
            )
        );
        let bad = TensorType::new(DType::F32, [5usize, 3]);
        let err = Op::MatMul.infer(&[operand(&a), operand(&bad)]).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("matmul"), "{text}");
        assert!(
            text.contains("[batch, 1, 3, 4]") && text.contains("[5, 3]"),
            "{text}"
        );
    }

    #[test]
    fn conv_and_pool_output_sizes_follow_torch() {
        assert_eq!(window_count("conv2d", 32, 3, 2, 1, 2, false).unwrap(), 16);
        assert_eq!(window_count("max_pool2d", 7, 2, 2, 1, 0, false).unwrap(), 3);
        assert_eq!(window_count("max_pool2d", 7, 2, 2, 1, 0, true).unwrap(), 4);
        assert_eq!(window_count("conv2d", 10, 3, 1, 2, 0, false).unwrap(), 6);
    }

    #[test]
    fn slice_ranges_clamp_like_numpy() {
        assert_eq!(slice_range("slice", 5, 1, i64::MAX, 2).unwrap(), vec![1, 3]);
        assert_eq!(
            slice_range("slice", 5, -1, i64::MIN, -1).unwrap(),
            vec![4, 3, 2, 1, 0]
        );
        assert_eq!(slice_range("slice", 5, -2, 10, 1).unwrap(), vec![3, 4]);
        assert!(slice_range("slice", 5, 0, 1, 0).is_err());
    }
}
