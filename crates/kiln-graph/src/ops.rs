//! The operator set: each op's attributes, its name and arity (shape and
//! dtype inference is in `infer`).

use serde::{Deserialize, Serialize};

use crate::types::DType;

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
    pub(crate) fn float_only(self) -> bool {
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
}
