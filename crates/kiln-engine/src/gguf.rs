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
        let content = Content::read(&mut reader)
            .map_err(|e| invalid(format!("not a readable GGUF file: {e}")))?;
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
}

/// Reorder the rows (dimension 0) of a 2-D quantized tensor without
/// dequantizing: each row is a whole number of quantization blocks, so rows move
/// as byte ranges. `order[i]` is the source row of row `i`.
pub fn permute_rows(tensor: &QTensor, order: &[usize]) -> candle_core::Result<QTensor> {
    let (rows, cols) = tensor.shape().dims2()?;
    if order.len() != rows || order.iter().any(|&r| r >= rows) {
        candle_core::bail!("row order of length {} for {rows} rows", order.len());
    }
    let dtype = tensor.dtype();
    if !cols.is_multiple_of(dtype.block_size()) {
        candle_core::bail!("{cols} columns are not a whole number of {dtype:?} blocks");
    }
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = tensor.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &source in order {
        out.extend_from_slice(&data[source * row_bytes..(source + 1) * row_bytes]);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(out),
        &tensor.device(),
        dtype,
    )?;
    QTensor::new(storage, (rows, cols))
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
