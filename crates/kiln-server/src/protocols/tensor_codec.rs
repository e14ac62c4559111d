//! Open Inference Protocol tensors: JSON `data` (flat or nested) and the binary
//! tensor extension (`Inference-Header-Content-Length`, `binary_data_size`).

use kiln_pipelines::{DataType, Tensor, TensorData};
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Header carrying the length of the JSON part of a binary request/response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        scalar => out.push(scalar),
    }
}

fn integer_range(dtype: DataType) -> (i128, i128) {
    match dtype {
        DataType::U8 => (0, u8::MAX as i128),
        DataType::U16 => (0, u16::MAX as i128),
        DataType::U32 => (0, u32::MAX as i128),
        DataType::U64 => (0, u64::MAX as i128),
        DataType::I8 => (i8::MIN as i128, i8::MAX as i128),
        DataType::I16 => (i16::MIN as i128, i16::MAX as i128),
        DataType::I32 => (i32::MIN as i128, i32::MAX as i128),
        _ => (i64::MIN as i128, i64::MAX as i128),
    }
}

/// Parse one input tensor from its JSON description, taking binary data from `blob`
/// when the tensor has a `binary_data_size` parameter.
pub fn decode_input(spec: &Value, blob: Option<&[u8]>) -> Result<Tensor, ApiError> {
    let name = spec["name"]
        .as_str()
        .ok_or_else(|| bad("every input needs a string `name`".into()))?
        .to_string();
    let datatype = spec["datatype"]
        .as_str()
        .ok_or_else(|| bad(format!("input {name}: `datatype` is required")))?;
    let dtype = DataType::from_protocol_name(datatype).ok_or_else(|| {
        bad(format!(
            "input {name}: unknown datatype {datatype:?}; use one of {}",
            DataType::ALL.map(|d| d.protocol_name()).join(", ")
        ))
    })?;
    let shape: Vec<usize> = spec["shape"]
        .as_array()
        .ok_or_else(|| bad(format!("input {name}: `shape` must be a list of sizes")))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            bad(format!(
                "input {name}: `shape` entries must be non-negative integers"
            ))
        })?;
    let count: usize = shape.iter().product();
    let data = match blob {
        Some(bytes) => decode_binary(&name, dtype, count, bytes)?,
        None => decode_json(&name, dtype, &spec["data"])?,
    };
    if data.len() != count {
        return Err(bad(format!(
            "input {name}: shape {shape:?} needs {count} elements, got {}",
            data.len()
        )));
    }
    Ok(Tensor {
        name,
        dtype,
        shape,
        data,
    })
}

fn decode_json(name: &str, dtype: DataType, data: &Value) -> Result<TensorData, ApiError> {
    if data.is_null() {
        return Err(bad(format!(
            "input {name}: `data` is required (or binary data)"
        )));
    }
    let mut cells = Vec::new();
    flatten(data, &mut cells);
    let wrong = |i: usize, cell: &Value| {
        bad(format!(
            "input {name}: element {i} ({cell}) is not a valid {}",
            dtype.protocol_name()
        ))
    };
    Ok(match dtype {
        DataType::Bool => TensorData::Bool(
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| c.as_bool().ok_or_else(|| wrong(i, c)))
                .collect::<Result<_, _>>()?,
        ),
        DataType::F16 | DataType::F32 => TensorData::F32(
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| c.as_f64().map(|x| x as f32).ok_or_else(|| wrong(i, c)))
                .collect::<Result<_, _>>()?,
        ),
        DataType::F64 => TensorData::F64(
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| c.as_f64().ok_or_else(|| wrong(i, c)))
                .collect::<Result<_, _>>()?,
        ),
        DataType::Bytes => TensorData::Bytes(
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.as_str()
                        .map(|s| s.as_bytes().to_vec())
                        .ok_or_else(|| wrong(i, c))
                })
                .collect::<Result<_, _>>()?,
        ),
        integer => {
            let (low, high) = integer_range(integer);
            let values: Vec<i128> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.as_i64()
                        .map(i128::from)
                        .or_else(|| c.as_u64().map(i128::from))
                        .filter(|v| (low..=high).contains(v))
                        .ok_or_else(|| wrong(i, c))
                })
                .collect::<Result<_, _>>()?;
            if integer == DataType::U64 {
                TensorData::U64(values.into_iter().map(|v| v as u64).collect())
            } else {
                TensorData::I64(values.into_iter().map(|v| v as i64).collect())
            }
        }
    })
}

fn half_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = (bits >> 10) & 0x1f;
    let mantissa = f32::from(bits & 0x3ff);
    sign * match exponent {
        0 => mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + mantissa / 1024.0) * 2f32.powi(i32::from(e) - 15),
    }
}

fn decode_binary(
    name: &str,
    dtype: DataType,
    count: usize,
    bytes: &[u8],
) -> Result<TensorData, ApiError> {
    let Some(size) = dtype.element_size() else {
        // BYTES: each element is a 4-byte little-endian length, then the bytes.
        let mut items = Vec::with_capacity(count);
        let mut at = 0usize;
        while at < bytes.len() {
            let header = bytes.get(at..at + 4).ok_or_else(|| {
                bad(format!(
                    "input {name}: truncated BYTES length prefix at byte {at}"
                ))
            })?;
            let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let item = bytes.get(at + 4..at + 4 + length).ok_or_else(|| {
                bad(format!(
                    "input {name}: BYTES element at byte {at} runs past the data"
                ))
            })?;
            items.push(item.to_vec());
            at += 4 + length;
        }
        return Ok(TensorData::Bytes(items));
    };
    if bytes.len() != count * size {
        return Err(bad(format!(
            "input {name}: {} binary bytes for {count} {} elements (expected {})",
            bytes.len(),
            dtype.protocol_name(),
            count * size
        )));
    }
    let chunks = bytes.chunks_exact(size);
    let array = |c: &[u8]| {
        let mut a = [0u8; 8];
        a[..c.len()].copy_from_slice(c);
        a
    };
    Ok(match dtype {
        DataType::Bool => TensorData::Bool(bytes.iter().map(|b| *b != 0).collect()),
        DataType::U8 | DataType::U16 | DataType::U32 => TensorData::I64(
            chunks
                .map(|c| u64::from_le_bytes(array(c)) as i64)
                .collect(),
        ),
        DataType::U64 => TensorData::U64(chunks.map(|c| u64::from_le_bytes(array(c))).collect()),
        DataType::I8 => TensorData::I64(chunks.map(|c| i64::from(c[0] as i8)).collect()),
        DataType::I16 => TensorData::I64(
            chunks
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DataType::I32 => TensorData::I64(
            chunks
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        DataType::I64 => TensorData::I64(chunks.map(|c| i64::from_le_bytes(array(c))).collect()),
        DataType::F16 => TensorData::F32(
            chunks
                .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DataType::F32 => TensorData::F32(
            chunks
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DataType::F64 => TensorData::F64(chunks.map(|c| f64::from_le_bytes(array(c))).collect()),
        DataType::Bytes => TensorData::Bytes(Vec::new()),
    })
}

/// Little-endian bytes of a tensor for the binary extension.
pub fn encode_binary(tensor: &Tensor) -> Vec<u8> {
    match &tensor.data {
        TensorData::Bool(v) => v.iter().map(|b| u8::from(*b)).collect(),
        TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::Bytes(items) => items
            .iter()
            .flat_map(|item| {
                (item.len() as u32)
                    .to_le_bytes()
                    .into_iter()
                    .chain(item.iter().copied())
            })
            .collect(),
    }
}

/// The JSON description of an output tensor; `binary` puts its data in the blob part.
pub fn encode_output(tensor: &Tensor, binary: bool, blobs: &mut Vec<u8>) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), json!(tensor.name));
    out.insert("datatype".into(), json!(tensor.dtype.protocol_name()));
    out.insert("shape".into(), json!(tensor.shape));
    if binary {
        let bytes = encode_binary(tensor);
        out.insert(
            "parameters".into(),
            json!({"binary_data_size": bytes.len()}),
        );
        blobs.extend_from_slice(&bytes);
    } else {
        out.insert("data".into(), tensor.data.to_json());
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_binary_decode_to_the_same_tensor() {
        let spec =
            json!({"name": "x", "datatype": "FP64", "shape": [2, 1], "data": [[1.5], [2.5]]});
        let from_json = decode_input(&spec, None).unwrap();
        let bytes: Vec<u8> = [1.5f64, 2.5].iter().flat_map(|x| x.to_le_bytes()).collect();
        let from_binary = decode_input(&spec, Some(&bytes)).unwrap();
        assert_eq!(from_json, from_binary);
        assert_eq!(encode_binary(&from_json), bytes);
    }

    #[test]
    fn bytes_tensors_use_length_prefixes() {
        let tensor = Tensor {
            name: "s".into(),
            dtype: DataType::Bytes,
            shape: vec![2],
            data: TensorData::Bytes(vec![b"north".to_vec(), b"".to_vec()]),
        };
        let bytes = encode_binary(&tensor);
        assert_eq!(bytes.len(), 4 + 5 + 4);
        let spec = json!({"name": "s", "datatype": "BYTES", "shape": [2]});
        assert_eq!(decode_input(&spec, Some(&bytes)).unwrap(), tensor);
    }

    #[test]
    fn every_integer_type_is_range_checked() {
        let spec = json!({"name": "i", "datatype": "UINT8", "shape": [1], "data": [256]});
        let err = decode_input(&spec, None).unwrap_err().to_string();
        assert!(err.contains("not a valid UINT8"), "{err}");
        let spec = json!({"name": "i", "datatype": "INT16", "shape": [2], "data": [-5, 7]});
        assert_eq!(
            decode_input(&spec, None).unwrap().data,
            TensorData::I64(vec![-5, 7])
        );
        let spec = json!({"name": "h", "datatype": "FP16", "shape": [1]});
        let half = decode_input(&spec, Some(&0x3e00u16.to_le_bytes())).unwrap();
        assert_eq!(half.data, TensorData::F32(vec![1.5]));
    }

    #[test]
    fn shape_and_element_count_must_agree() {
        let spec = json!({"name": "x", "datatype": "INT64", "shape": [3], "data": [1, 2]});
        let err = decode_input(&spec, None).unwrap_err().to_string();
        assert!(err.contains("needs 3 elements, got 2"), "{err}");
    }
}
