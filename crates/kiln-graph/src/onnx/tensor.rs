//! ONNX tensors to candle tensors: element types, typed and raw data, and
//! external data files confined to the model's folder.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::proto::TensorProto;
use crate::error::{GraphError, Result};
use crate::types::DType;

/// The graph dtype of an ONNX `TensorProto.DataType`.
pub fn dtype_of(code: i32) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 => DType::U8,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        16 => DType::BF16,
        _ => return None,
    })
}

/// ONNX's name of a data type code, for messages.
pub fn onnx_type_name(code: i32) -> &'static str {
    match code {
        1 => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        8 => "STRING",
        9 => "BOOL",
        10 => "FLOAT16",
        11 => "DOUBLE",
        12 => "UINT32",
        13 => "UINT64",
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        16 => "BFLOAT16",
        _ => "an unknown type",
    }
}

/// Largest tensor Kiln reads from a model file or its external data (16 GiB).
const MAX_TENSOR_BYTES: u64 = 16 << 30;

/// Read a tensor; `dir` is the model's folder, for external data.
pub fn read_tensor(proto: &TensorProto, dir: Option<&Path>) -> Result<(Tensor, DType)> {
    let what = format!("tensor {:?}", proto.name);
    let dtype = dtype_of(proto.data_type).ok_or_else(|| {
        GraphError::malformed(
            &what,
            format!(
                "element type {} is not supported",
                onnx_type_name(proto.data_type)
            ),
        )
    })?;
    let mut dims = Vec::with_capacity(proto.dims.len());
    let mut count: u64 = 1;
    for &d in &proto.dims {
        if d < 0 {
            return Err(GraphError::malformed(
                &what,
                format!("negative dimension {d}"),
            ));
        }
        count = count
            .checked_mul(d as u64)
            .filter(|&c| c <= MAX_TENSOR_BYTES)
            .ok_or_else(|| GraphError::malformed(&what, "is too large"))?;
        dims.push(d as usize);
    }
    let count = count as usize;
    let size = dtype.storage().size_in_bytes();
    let external;
    let raw: Option<&[u8]> = if proto.data_location == 1 {
        external = read_external(proto, dir, count * size, &what)?;
        Some(&external)
    } else if !proto.raw_data.is_empty() {
        Some(&proto.raw_data)
    } else {
        None
    };
    let device = &Device::Cpu;
    let tensor = match raw {
        Some(bytes) => {
            if bytes.len() != count * size {
                return Err(GraphError::malformed(
                    &what,
                    format!(
                        "holds {} bytes, {count} {} elements need {}",
                        bytes.len(),
                        dtype,
                        count * size
                    ),
                ));
            }
            Tensor::from_raw_buffer(bytes, dtype.storage(), &dims, device)?
        }
        None => typed_data(proto, dtype, count, &dims, &what)?,
    };
    Ok((tensor, dtype))
}

fn check_len(len: usize, count: usize, what: &str) -> Result<()> {
    if len != count {
        return Err(GraphError::malformed(
            what,
            format!("holds {len} values, its shape needs {count}"),
        ));
    }
    Ok(())
}

fn typed_data(
    proto: &TensorProto,
    dtype: DType,
    count: usize,
    dims: &[usize],
    what: &str,
) -> Result<Tensor> {
    let device = &Device::Cpu;
    Ok(match dtype {
        DType::F32 => {
            check_len(proto.float_data.len(), count, what)?;
            Tensor::from_slice(&proto.float_data, dims, device)?
        }
        DType::F64 => {
            check_len(proto.double_data.len(), count, what)?;
            Tensor::from_slice(&proto.double_data, dims, device)?
        }
        DType::I64 => {
            check_len(proto.int64_data.len(), count, what)?;
            Tensor::from_slice(&proto.int64_data, dims, device)?
        }
        DType::I32 => {
            check_len(proto.int32_data.len(), count, what)?;
            Tensor::from_slice(&proto.int32_data, dims, device)?
        }
        DType::U8 | DType::Bool => {
            check_len(proto.int32_data.len(), count, what)?;
            let bytes: Vec<u8> = proto.int32_data.iter().map(|&v| v as u8).collect();
            Tensor::from_vec(bytes, dims, device)?
        }
        DType::F16 | DType::BF16 => {
            // 16-bit floats travel as their bit patterns in int32_data.
            check_len(proto.int32_data.len(), count, what)?;
            let bytes: Vec<u8> = proto
                .int32_data
                .iter()
                .flat_map(|&v| (v as u16).to_le_bytes())
                .collect();
            Tensor::from_raw_buffer(&bytes, dtype.storage(), dims, device)?
        }
    })
}

/// External data: `location` relative to the model's folder (never outside
/// it), `offset` and `length` in bytes.
fn read_external(
    proto: &TensorProto,
    dir: Option<&Path>,
    expected: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let dir = dir.ok_or_else(|| {
        GraphError::malformed(
            what,
            "uses external data, but the model was not read from a file",
        )
    })?;
    let entry = |key: &str| {
        proto
            .external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let location = entry("location")
        .ok_or_else(|| GraphError::malformed(what, "external data has no location"))?;
    let relative = Path::new(location);
    if relative.is_absolute()
        || relative.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
    {
        return Err(GraphError::malformed(
            what,
            format!("external data location {location:?} must be a path inside the model's folder"),
        ));
    }
    let parse = |key: &str| -> Result<Option<u64>> {
        entry(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    GraphError::malformed(
                        what,
                        format!("external data {key} {v:?} is not a byte count"),
                    )
                })
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?.unwrap_or(expected as u64);
    if length != expected as u64 {
        return Err(GraphError::malformed(
            what,
            format!(
                "external data length {length} does not match the {expected} bytes its shape needs"
            ),
        ));
    }
    let path = dir.join(relative);
    let canonical_dir = dir.canonicalize().map_err(|e| GraphError::io(dir, e))?;
    let canonical = path.canonicalize().map_err(|e| GraphError::io(&path, e))?;
    if !canonical.starts_with(&canonical_dir) {
        return Err(GraphError::malformed(
            what,
            format!("external data {location:?} resolves outside the model's folder"),
        ));
    }
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(&canonical).map_err(|e| GraphError::io(&canonical, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| GraphError::io(&canonical, e))?
        .len();
    if offset.checked_add(length).is_none_or(|end| end > file_len) {
        return Err(GraphError::malformed(
            what,
            format!(
                "external data {location:?} has {file_len} bytes, the tensor needs {length} at offset {offset}"
            ),
        ));
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| GraphError::io(&canonical, e))?;
    let mut bytes = vec![0u8; length as usize];
    file.read_exact(&mut bytes)
        .map_err(|e| GraphError::io(&canonical, e))?;
    Ok(bytes)
}
