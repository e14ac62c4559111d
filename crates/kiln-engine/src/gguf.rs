//! GGUF files (llama.cpp's format): the header and metadata parsed defensively
//! (candle's reader bounds every count and length by the file's size), typed
//! metadata look-ups whose errors name the key, and tensors loaded as quantized
//! tensors or dequantized to dense ones.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` starts with GGUF's magic bytes (false for unreadable files).
pub fn is_gguf_file(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == GGUF_MAGIC
}

/// An opened GGUF file: metadata in memory, tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and parse the header; a file that is not GGUF, or whose header is
    /// truncated or inconsistent, is refused with the reason.
    pub fn open(path: &Path) -> Result<Self> {
        let invalid = |message: String| EngineError::InvalidWeights {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|source| EngineError::Io {
            action: "open",
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let e = e.to_string();
            let hint = if e.contains("unknown dtype") {
                " (GGML tensor types Kiln reads: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K; IQ and TQ types are not supported)"
            } else {
                ""
            };
            invalid(format!("not a readable GGUF file: {e}{hint}"))
        })?;
        let file_size =
            reader
                .seek(std::io::SeekFrom::End(0))
                .map_err(|source| EngineError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                })?;
        // Every tensor must lie inside the file; checked up front so a bad file
        // fails at open (and at registration), not halfway through a load.
        for (name, info) in &content.tensor_infos {
            let elements = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elements.is_multiple_of(block) {
                return Err(invalid(format!(
                    "tensor {name:?}: {elements} elements is not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (elements / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_size {
                return Err(invalid(format!(
                    "tensor {name:?} ends at byte {end}, past the end of the file ({file_size} bytes): truncated?"
                )));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, message: String) -> EngineError {
        EngineError::InvalidWeights {
            path: self.path.clone(),
            message,
        }
    }

    /// A metadata value, if present.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A required metadata value.
    fn required(&self, key: &str) -> Result<&Value> {
        self.value(key)
            .ok_or_else(|| self.invalid(format!("metadata key {key:?} is missing")))
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<String> {
        self.required(key)?
            .to_string()
            .cloned()
            .map_err(|_| self.invalid(format!("metadata {key:?} must be a string")))
    }

    /// An optional string value.
    pub fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.value(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    /// An unsigned integer of any GGUF width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let value = self.required(key)?;
        let wide = match value {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        wide.and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.invalid(format!("metadata {key:?} must be a non-negative integer")))
    }

    /// An optional unsigned integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.value(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    /// A float (f32 or f64) value.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(f64::from(*v))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(_) => Err(self.invalid(format!("metadata {key:?} must be a number"))),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Bool(v)) => Ok(Some(*v)),
            Some(_) => Err(self.invalid(format!("metadata {key:?} must be a boolean"))),
        }
    }

    /// An array of strings (token lists, merges).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        let items = self
            .required(key)?
            .to_vec()
            .map_err(|_| self.invalid(format!("metadata {key:?} must be an array")))?;
        items
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.invalid(format!("metadata {key:?} must hold strings")))
            })
            .collect()
    }

    /// An array of integers (token types).
    pub fn integers(&self, key: &str) -> Result<Vec<i64>> {
        let items = self
            .required(key)?
            .to_vec()
            .map_err(|_| self.invalid(format!("metadata {key:?} must be an array")))?;
        items
            .iter()
            .map(|v| match v {
                Value::I32(x) => Ok(i64::from(*x)),
                Value::U32(x) => Ok(i64::from(*x)),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(i64::from(*x)),
                Value::I8(x) => Ok(i64::from(*x)),
                _ => Err(self.invalid(format!("metadata {key:?} must hold integers"))),
            })
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        names
    }

    /// A tensor's shape (rows first, as candle and transformers order it) and type.
    pub fn tensor_info(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: name.to_string(),
                    files: self.path.display().to_string(),
                })?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// Read `name` as stored (quantized or not).
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.contains(name) {
            return Err(EngineError::MissingTensor {
                name: name.to_string(),
                files: self.path.display().to_string(),
            });
        }
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| self.invalid("the file's reader lock is poisoned".into()))?;
        self.content
            .tensor(&mut *reader, name, device)
            .map_err(|e| self.invalid(format!("tensor {name:?}: {e}")))
    }

    /// Read `name` dequantized to a dense tensor of `dtype`.
    pub fn dense(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self
            .qtensor(name, device)?
            .dequantize(device)?
            .to_dtype(dtype)?)
    }

    /// The shape `name` had before a converter flattened it to rows of 256 to
    /// fit a block type (city96's ComfyUI-GGUF writes
    /// `comfy.gguf.orig_shape.NAME` for SDXL's convolutions).
    pub fn original_shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let key = format!("{ORIGINAL_SHAPE_PREFIX}{name}");
        if self.value(&key).is_none() {
            return Ok(None);
        }
        let dims = self
            .integers(&key)?
            .into_iter()
            .map(|d| {
                usize::try_from(d)
                    .map_err(|_| self.invalid(format!("{key:?}: negative dimension {d}")))
            })
            .collect::<Result<Vec<usize>>>()?;
        let (stored, _) = self.tensor_info(name)?;
        if dims.iter().product::<usize>() != stored.iter().product::<usize>() {
            return Err(self.invalid(format!(
                "{key:?} is {dims:?}, which does not hold the {stored:?} elements stored for {name:?}"
            )));
        }
        Ok(Some(dims))
    }

    /// The shape a model sees for `name`: its original shape when recorded.
    pub fn model_shape(&self, name: &str) -> Result<Vec<usize>> {
        match self.original_shape(name)? {
            Some(dims) => Ok(dims),
            None => Ok(self.tensor_info(name)?.0),
        }
    }

    /// `name` as a dense tensor of `dtype` in the shape the model sees.
    pub fn model_tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let dense = self.dense(name, dtype, device)?;
        match self.original_shape(name)? {
            Some(dims) => Ok(dense.reshape(dims)?),
            None => Ok(dense),
        }
    }

    /// `name` as stored when it is a 2-D tensor of a block type (Q8_0, Q4_K,
    /// …) a linear layer can keep quantized; `None` for float tensors and
    /// tensors reshaped to fit their blocks.
    pub fn block_matrix(&self, name: &str, device: &Device) -> Result<Option<QTensor>> {
        let (dims, dtype) = self.tensor_info(name)?;
        if dims.len() != 2 || is_float(dtype) || self.original_shape(name)?.is_some() {
            return Ok(None);
        }
        self.qtensor(name, device).map(Some)
    }
}

/// Metadata prefix under which converters record a tensor's original shape.
pub const ORIGINAL_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// Whether a GGML type stores plain floats (no blocks).
pub fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Rows `start..start + len` of each part, stacked, as one quantized tensor of
/// the parts' common type, without dequantizing: each row is a whole number
/// of blocks, so rows move as byte ranges (for fused q/k/v split into
/// separate layers, or halves reordered).
pub fn take_rows(parts: &[(&QTensor, usize, usize)]) -> candle_core::Result<QTensor> {
    let Some((first, ..)) = parts.first() else {
        candle_core::bail!("no rows to take");
    };
    let dtype = first.dtype();
    let device = first.device();
    let (_, cols) = first.shape().dims2()?;
    if !cols.is_multiple_of(dtype.block_size()) {
        candle_core::bail!("{cols} columns are not a whole number of {dtype:?} blocks");
    }
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let mut out = Vec::new();
    let mut total_rows = 0;
    // Off the CPU `data()` copies the tensor to the host: once per tensor.
    let mut held: Option<(*const QTensor, std::borrow::Cow<'_, [u8]>)> = None;
    for &(tensor, start, len) in parts {
        let (rows, part_cols) = tensor.shape().dims2()?;
        if tensor.dtype() != dtype || part_cols != cols {
            candle_core::bail!(
                "rows of {:?} ({part_cols} columns) cannot join rows of {dtype:?} ({cols} columns)",
                tensor.dtype()
            );
        }
        if start + len > rows {
            candle_core::bail!("rows {start}..{} of a {rows}-row tensor", start + len);
        }
        let same = held
            .as_ref()
            .is_some_and(|(ptr, _)| std::ptr::eq(*ptr, tensor));
        if !same {
            held = Some((tensor as *const QTensor, tensor.data()?));
        }
        if let Some((_, data)) = &held {
            out.extend_from_slice(&data[start * row_bytes..(start + len) * row_bytes]);
        }
        total_rows += len;
    }
    let storage =
        candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(out), &device, dtype)?;
    QTensor::new(storage, (total_rows, cols))
}

/// Reorder the rows (dimension 0) of a 2-D quantized tensor without
/// dequantizing. `order[i]` is the source row of row `i`.
pub fn permute_rows(tensor: &QTensor, order: &[usize]) -> candle_core::Result<QTensor> {
    let (rows, _) = tensor.shape().dims2()?;
    if order.len() != rows {
        candle_core::bail!("row order of length {} for {rows} rows", order.len());
    }
    let parts: Vec<(&QTensor, usize, usize)> = order.iter().map(|&r| (tensor, r, 1)).collect();
    take_rows(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permuting_quantized_rows_moves_whole_rows() {
        let device = Device::Cpu;
        let values: Vec<f32> = (0..4 * 64).map(|i| (i / 64) as f32 + 1.0).collect();
        let dense = Tensor::from_vec(values, (4, 64), &device).unwrap();
        let q = QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap();
        let moved = permute_rows(&q, &[2, 0, 3, 1]).unwrap();
        let rows = moved.dequantize(&device).unwrap().to_vec2::<f32>().unwrap();
        let firsts: Vec<f32> = rows.iter().map(|r| r[0].round()).collect();
        assert_eq!(firsts, vec![3.0, 1.0, 4.0, 2.0]);
    }

    #[test]
    fn non_gguf_bytes_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"GGUF\x03\x00\x00\x00\xff\xff").unwrap();
        let error = GgufFile::open(&path).unwrap_err().to_string();
        assert!(error.contains("model.gguf"), "{error}");
        assert!(error.contains("GGUF"), "{error}");
        assert!(is_gguf_file(&path));
        std::fs::write(&path, b"{\"not\": \"gguf\"}").unwrap();
        assert!(!is_gguf_file(&path));
        assert!(GgufFile::open(&path).is_err());
    }
}
