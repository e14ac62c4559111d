//! Typed, row-major tensors as pipelines return them and tensor protocols carry them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Element types, named as the Open Inference Protocol names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    /// The Open Inference Protocol name (`FP64`, `INT64`, `BYTES`, ...).
    pub fn protocol_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn from_protocol_name(name: &str) -> Option<Self> {
        DataType::ALL
            .into_iter()
            .find(|d| d.protocol_name() == name)
    }

    /// Bytes per element in the binary tensor encoding; `None` for BYTES.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

/// Tensor elements. Integer types are widened to i64/u64 and FP16/FP32 kept as f32
/// in memory; `dtype` on the tensor keeps the wire type.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

impl TensorData {
    /// The elements as nested JSON lists of `shape` (flat for rank ≤ 1).
    pub fn to_nested_json(&self, shape: &[usize]) -> Value {
        fn nest(data: &TensorData, shape: &[usize], offset: usize) -> Value {
            match shape {
                [] => data.json_at(offset),
                [n] => Value::Array((offset..offset + n).map(|i| data.json_at(i)).collect()),
                [n, rest @ ..] => {
                    let stride: usize = rest.iter().product();
                    Value::Array(
                        (0..*n)
                            .map(|i| nest(data, rest, offset + i * stride))
                            .collect(),
                    )
                }
            }
        }
        if shape.iter().product::<usize>() != self.len() || shape.len() <= 1 {
            return self.to_json();
        }
        nest(self, shape, 0)
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a JSON value (BYTES as UTF-8 text when valid, else lossy).
    pub fn json_at(&self, i: usize) -> Value {
        match self {
            TensorData::Bool(v) => Value::Bool(v[i]),
            TensorData::I64(v) => Value::from(v[i]),
            TensorData::U64(v) => Value::from(v[i]),
            TensorData::F32(v) => json_float(f64::from(v[i])),
            TensorData::F64(v) => json_float(v[i]),
            TensorData::Bytes(v) => Value::String(String::from_utf8_lossy(&v[i]).into_owned()),
        }
    }

    /// All elements as a flat JSON array.
    pub fn to_json(&self) -> Value {
        Value::Array((0..self.len()).map(|i| self.json_at(i)).collect())
    }
}

/// JSON has no NaN/inf: they become `null`.
pub fn json_float(x: f64) -> Value {
    serde_json::Number::from_f64(x)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// A tensor a model takes or returns: name, wire datatype and shape, `-1` for
/// a dimension that varies per request (KServe's convention).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    /// The Open Inference Protocol name (`FP32`, `INT64`, ...).
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// A tensor model's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A named tensor with its wire datatype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// A one-dimensional FP64 tensor.
    pub fn f64_vector(name: impl Into<String>, values: Vec<f64>) -> Self {
        Tensor {
            name: name.into(),
            dtype: DataType::F64,
            shape: vec![values.len()],
            data: TensorData::F64(values),
        }
    }
}
