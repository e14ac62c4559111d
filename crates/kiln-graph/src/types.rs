//! Tensor types of graph values: element types, static/symbolic dimensions, and
//! the broadcasting and type-promotion rules every op's inference shares.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{GraphError, Result};

/// Element types a graph value can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bool,
    U8,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    pub fn is_integer(self) -> bool {
        matches!(self, DType::U8 | DType::I32 | DType::I64)
    }

    /// The candle type that stores it (booleans as u8).
    pub fn storage(self) -> candle_core::DType {
        match self {
            DType::Bool | DType::U8 => candle_core::DType::U8,
            DType::I32 => candle_core::DType::I32,
            DType::I64 => candle_core::DType::I64,
            DType::F16 => candle_core::DType::F16,
            DType::BF16 => candle_core::DType::BF16,
            DType::F32 => candle_core::DType::F32,
            DType::F64 => candle_core::DType::F64,
        }
    }

    /// Rank in the promotion order: bool < integers (by width) < floats (by width).
    fn promotion_rank(self) -> u8 {
        match self {
            DType::Bool => 0,
            DType::U8 => 1,
            DType::I32 => 2,
            DType::I64 => 3,
            DType::BF16 => 4,
            DType::F16 => 5,
            DType::F32 => 6,
            DType::F64 => 7,
        }
    }

    /// The common type of two operands: the wider one, floats winning over
    /// integers and integers over booleans. bf16 with f16 promotes to f32, the
    /// narrowest type holding both.
    pub fn promote(a: DType, b: DType) -> DType {
        if a == b {
            return a;
        }
        if matches!(
            (a, b),
            (DType::BF16, DType::F16) | (DType::F16, DType::BF16)
        ) {
            return DType::F32;
        }
        if a.promotion_rank() >= b.promotion_rank() {
            a
        } else {
            b
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: a number, a named symbol bound per execution (`batch`), or
/// unknown until run time (a shape computed from data).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Static(usize),
    Symbolic(String),
    Unknown,
}

impl Dim {
    pub fn sym(name: impl Into<String>) -> Self {
        Dim::Symbolic(name.into())
    }

    pub fn as_static(&self) -> Option<usize> {
        match self {
            Dim::Static(n) => Some(*n),
            _ => None,
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Self {
        Dim::Static(n)
    }
}

impl From<&str> for Dim {
    fn from(name: &str) -> Self {
        Dim::Symbolic(name.to_string())
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Static(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// Dimensions are written `[batch, 3, 224, 224]` in messages; `?` is unknown.
pub fn shape_text(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims.iter().map(Dim::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// A value's type: element type and shape (its rank is always known).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, dims: impl IntoIterator<Item = impl Into<Dim>>) -> Self {
        TensorType {
            dtype,
            dims: dims.into_iter().map(Into::into).collect(),
        }
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The dims when all are static.
    pub fn static_dims(&self) -> Option<Vec<usize>> {
        self.dims.iter().map(Dim::as_static).collect()
    }

    /// A negative axis counted from the end, checked against the rank.
    pub fn axis(&self, op: &str, axis: i64) -> Result<usize> {
        normalize_axis(op, axis, self.rank())
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, shape_text(&self.dims))
    }
}

/// `axis` in `-rank..rank` as an index.
pub fn normalize_axis(op: &str, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    // Rank-0 values accept axis 0/-1 the way numpy's reductions do.
    let bound = r.max(1);
    if axis < -bound || axis >= bound {
        return Err(GraphError::op(
            op,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(if axis < 0 { axis + bound } else { axis } as usize)
}

/// Numpy broadcasting of two shapes, right-aligned: equal dims, or one of them 1.
/// Symbolic and unknown dims broadcast with 1 and with an equal symbol; an unknown
/// dim against a known one is taken as the known one (checked at run time).
pub fn broadcast(op: &str, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            &a[i + a.len() - rank]
        } else {
            &Dim::Static(1)
        };
        let db = if i + b.len() >= rank {
            &b[i + b.len() - rank]
        } else {
            &Dim::Static(1)
        };
        let dim = match (da, db) {
            (x, y) if x == y => x.clone(),
            (Dim::Static(1), other) | (other, Dim::Static(1)) => other.clone(),
            (Dim::Unknown, other) | (other, Dim::Unknown) => match other {
                Dim::Static(_) | Dim::Symbolic(_) => other.clone(),
                Dim::Unknown => Dim::Unknown,
            },
            _ => {
                return Err(GraphError::op(
                    op,
                    format!(
                        "shapes {} and {} do not broadcast (dimension {} vs {})",
                        shape_text(a),
                        shape_text(b),
                        da,
                        db
                    ),
                ));
            }
        };
        out.push(dim);
    }
    Ok(out)
}

/// Concrete numpy broadcasting at run time.
pub fn broadcast_static(op: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let a: Vec<Dim> = a.iter().map(|&d| Dim::Static(d)).collect();
    let b: Vec<Dim> = b.iter().map(|&d| Dim::Static(d)).collect();
    Ok(broadcast(op, &a, &b)?
        .into_iter()
        .map(|d| d.as_static().unwrap_or(1))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(text: &[&str]) -> Vec<Dim> {
        text.iter()
            .map(|t| match t.parse::<usize>() {
                Ok(n) => Dim::Static(n),
                Err(_) if *t == "?" => Dim::Unknown,
                Err(_) => Dim::sym(*t),
            })
            .collect()
    }

    #[test]
    fn broadcasting_follows_numpy_with_symbols() {
        let out = broadcast("add", &dims(&["batch", "1", "4"]), &dims(&["3", "1"])).unwrap();
        assert_eq!(out, dims(&["batch", "3", "4"]));
        let out = broadcast("add", &dims(&["batch", "4"]), &dims(&["batch", "1"])).unwrap();
        assert_eq!(out, dims(&["batch", "4"]));
        let out = broadcast("add", &dims(&["?", "4"]), &dims(&["7", "4"])).unwrap();
        assert_eq!(out, dims(&["7", "4"]));
    }

    #[test]
    fn a_broadcasting_error_names_the_op_and_both_shapes() {
        let err = broadcast("add", &dims(&["2", "3"]), &dims(&["4"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("add"), "{text}");
        assert!(text.contains("[2, 3]") && text.contains("[4]"), "{text}");
        let err = broadcast("mul", &dims(&["batch"]), &dims(&["seq"])).unwrap_err();
        assert!(err.to_string().contains("batch vs seq"), "{err}");
    }

    #[test]
    fn promotion_prefers_floats_then_width() {
        assert_eq!(DType::promote(DType::I64, DType::F32), DType::F32);
        assert_eq!(DType::promote(DType::F32, DType::F64), DType::F64);
        assert_eq!(DType::promote(DType::Bool, DType::I32), DType::I32);
        assert_eq!(DType::promote(DType::BF16, DType::F16), DType::F32);
        assert_eq!(DType::promote(DType::U8, DType::I64), DType::I64);
    }

    #[test]
    fn negative_axes_count_from_the_end() {
        assert_eq!(normalize_axis("softmax", -1, 3).unwrap(), 2);
        assert!(normalize_axis("softmax", 3, 3).is_err());
    }
}
