//! An LLM's weights from either file layout, looked up by transformers' names:
//! Hub safetensors (single or sharded) or one GGUF file, whose names, Q/K row
//! order and quantized blocks are translated here. Every shape is checked
//! against the config before use.

use candle_core::{DType, Device, Tensor};
use kiln_engine::gguf::{GgufFile, permute_rows};
use kiln_engine::nn::Linear;
use kiln_engine::qlinear::AnyLinear;
use kiln_engine::{EngineError, WeightFiles};

use super::layout::{gguf_name, unpermute_rows};

/// Where the tensors come from.
pub enum LlmWeights {
    Safetensors(WeightFiles),
    Gguf {
        file: GgufFile,
        /// `(query heads, key/value heads)` when Q/K rows are stored interleaved
        /// (llama.cpp's `llama` architecture).
        interleaved_qk: Option<(usize, usize)>,
    },
}

fn shape_error(name: &str, files: String, expected: &[usize], found: Vec<usize>) -> EngineError {
    EngineError::ShapeMismatch {
        name: name.to_string(),
        files,
        expected: expected.to_vec(),
        found,
    }
}

impl LlmWeights {
    fn gguf_key(name: &str, file: &GgufFile) -> Result<String, EngineError> {
        gguf_name(name).ok_or_else(|| EngineError::MissingTensor {
            name: name.to_string(),
            files: file.path().display().to_string(),
        })
    }

    /// Whether the tensor `name` (transformers naming) is present.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            LlmWeights::Safetensors(files) => files.contains(name),
            LlmWeights::Gguf { file, .. } => gguf_name(name).is_some_and(|n| file.contains(&n)),
        }
    }

    /// The row order to apply for `name`, when its rows are stored interleaved.
    fn row_order(&self, name: &str, rows: usize) -> Option<Vec<usize>> {
        let LlmWeights::Gguf {
            interleaved_qk: Some((heads, kv_heads)),
            ..
        } = self
        else {
            return None;
        };
        let heads = if name.contains(".q_proj.") {
            *heads
        } else if name.contains(".k_proj.") {
            *kv_heads
        } else {
            return None;
        };
        Some(unpermute_rows(heads, rows))
    }

    /// Fail unless `name` is stored with `shape` (reads only the header).
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<(), EngineError> {
        let (found, files) = match self {
            LlmWeights::Safetensors(files) => (files.shape(name)?, name.to_string()),
            LlmWeights::Gguf { file, .. } => {
                let key = Self::gguf_key(name, file)?;
                (file.tensor_info(&key)?.0, file.path().display().to_string())
            }
        };
        if found != shape {
            return Err(shape_error(name, files, shape, found));
        }
        Ok(())
    }

    /// A dense tensor of `shape`, dequantized if it is stored quantized.
    pub fn dense(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, EngineError> {
        let tensor = match self {
            LlmWeights::Safetensors(files) => {
                let found = files.shape(name)?;
                if found != shape {
                    return Err(shape_error(name, name.to_string(), shape, found));
                }
                files.load(name, dtype, device)?
            }
            LlmWeights::Gguf { file, .. } => {
                let key = Self::gguf_key(name, file)?;
                let (found, _) = file.tensor_info(&key)?;
                if found != shape {
                    return Err(shape_error(
                        &key,
                        file.path().display().to_string(),
                        shape,
                        found,
                    ));
                }
                let mut q = file.qtensor(&key, device)?;
                if let Some(order) = self.row_order(name, shape[0]) {
                    q = permute_rows(&q, &order)?;
                }
                q.dequantize(device)?.to_dtype(dtype)?
            }
        };
        kiln_engine::resident::record(kiln_engine::resident::tensor_bytes(&tensor));
        Ok(tensor)
    }

    /// The linear layer `prefix.weight` (out × in) with `prefix.bias` when `bias`;
    /// quantized GGUF weights stay quantized.
    pub fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<AnyLinear, EngineError> {
        let weight_name = format!("{prefix}.weight");
        let bias = if bias {
            let name = format!("{prefix}.bias");
            let b = self.dense(&name, &[out_dim], DType::F32, device)?;
            let b = match self.row_order(&name, out_dim) {
                Some(order) => {
                    let index =
                        Tensor::new(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), device)?;
                    b.index_select(&index, 0)?
                }
                None => b,
            };
            Some(b.to_dtype(dtype)?)
        } else {
            None
        };
        match self {
            LlmWeights::Safetensors(_) => {
                let weight = self.dense(&weight_name, &[out_dim, in_dim], dtype, device)?;
                // Quantized when a load policy asks (FLUX.2's Qwen3 text encoder
                // with `quantize_text_encoder`).
                Ok(AnyLinear::Dense(Linear::from_loaded(prefix, weight, bias)?))
            }
            LlmWeights::Gguf { file, .. } => {
                let key = Self::gguf_key(&weight_name, file)?;
                let (found, _) = file.tensor_info(&key)?;
                if found != [out_dim, in_dim] {
                    return Err(shape_error(
                        &key,
                        file.path().display().to_string(),
                        &[out_dim, in_dim],
                        found,
                    ));
                }
                let mut q = file.qtensor(&key, device)?;
                if let Some(order) = self.row_order(&weight_name, out_dim) {
                    q = permute_rows(&q, &order)?;
                }
                kiln_engine::resident::record(q.storage_size_in_bytes() as i64);
                Ok(AnyLinear::quantized(q, bias)?)
            }
        }
    }
}
