//! A language model ready to generate: the network, its tokenizer, chat
//! template and generation defaults, loaded from a Hub folder (`config.json`,
//! `generation_config.json`, safetensors, `tokenizer.json`,
//! `tokenizer_config.json` / `chat_template.jinja`) or from one GGUF file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kiln_engine::WeightFiles;
use kiln_engine::gguf::{GgufFile, is_gguf_file};
use kiln_models::llm::{CausalLm, LlmConfig, LlmFamily, LlmWeights, RopeScaling};
use serde_json::Value;

use crate::error::TextGenError;
use crate::generation_config::GenerationDefaults;
use crate::template::ChatTemplate;
use crate::tokenizer::TextTokenizer;

/// Tokens llama.cpp treats as end of generation when a GGUF file's metadata
/// does not list them.
const END_OF_GENERATION_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end_of_text|>",
];

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Folder(PathBuf),
    Gguf(PathBuf),
}

impl ModelSource {
    /// A folder with `config.json`, a `.gguf` file, or a folder holding exactly
    /// one `.gguf` file and no `config.json`.
    pub fn detect(path: &Path) -> Option<ModelSource> {
        if path.is_file() {
            return is_gguf_file(path).then(|| ModelSource::Gguf(path.to_path_buf()));
        }
        if path.join("config.json").is_file() {
            let config: Value = std::fs::read_to_string(path.join("config.json"))
                .ok()
                .and_then(|t| kiln_engine::json::parse_lenient(&t).ok())?;
            return LlmConfig::from_json(&config)
                .ok()
                .map(|_| ModelSource::Folder(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf") && is_gguf_file(p))
            .collect();
        match ggufs.as_slice() {
            [one] => Some(ModelSource::Gguf(one.clone())),
            _ => None,
        }
    }

    /// Whether `path` is something this crate loads.
    /// Bytes of weights on disk (the GGUF file, or the folder's safetensors).
    pub fn weight_bytes(&self) -> u64 {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        match self {
            ModelSource::Gguf(file) => size(file),
            ModelSource::Folder(dir) => std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                        .map(|p| size(&p))
                        .sum()
                })
                .unwrap_or(0),
        }
    }

    pub fn is_language_model(path: &Path) -> bool {
        Self::detect(path).is_some()
    }

    /// Check everything that can be checked without loading the weights: the
    /// config, every weight file's header (tensor offsets inside the file,
    /// shapes against the config), the tokenizer and the chat template, so a
    /// broken model is refused at registration, naming the file and tensor.
    pub fn check(&self) -> Result<(), TextGenError> {
        match self {
            ModelSource::Gguf(path) => {
                let file = GgufFile::open(path).map_err(load_error)?;
                let config = config_from_gguf(&file)?;
                TextTokenizer::from_gguf(&file)?;
                if let Some(source) = file
                    .opt_string("tokenizer.chat_template")
                    .map_err(load_error)?
                {
                    ChatTemplate::new(&source, None, None)?;
                }
                let interleaved = (config.family == LlmFamily::Llama
                    || config.family == LlmFamily::Mistral)
                    .then_some((config.num_heads, config.num_kv_heads));
                let weights = LlmWeights::Gguf {
                    file,
                    interleaved_qk: interleaved,
                };
                check_shapes(&config, &weights)
            }
            ModelSource::Folder(dir) => {
                let config_json = read_json(&dir.join("config.json"))?.ok_or_else(|| {
                    TextGenError::Load(format!("{}: no config.json", dir.display()))
                })?;
                let config = LlmConfig::from_json(&config_json)
                    .map_err(|e| TextGenError::Load(format!("{}: {e}", dir.display())))?;
                TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
                let files = WeightFiles::open(dir).map_err(load_error)?;
                check_shapes(&config, &LlmWeights::Safetensors(files))
            }
        }
    }
}

/// Every tensor the model will read exists with the shape the config implies.
fn check_shapes(config: &LlmConfig, weights: &LlmWeights) -> Result<(), TextGenError> {
    for (name, shape) in kiln_models::llm::model::expected_tensors(config) {
        if name == "lm_head.weight" && config.tie_word_embeddings && !weights.contains(&name) {
            continue;
        }
        weights.check_shape(&name, &shape).map_err(load_error)?;
    }
    Ok(())
}

/// Everything needed to turn requests into tokens and tokens into text.
pub struct LanguageModel {
    pub model: CausalLm,
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    pub defaults: GenerationDefaults,
    /// Ids that end a generation.
    pub eos_token_ids: Vec<u32>,
    /// The context window in tokens.
    pub context_length: usize,
}

fn read_json(path: &Path) -> Result<Option<Value>, TextGenError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| TextGenError::Load(format!("{}: {e}", path.display())))?;
    kiln_engine::json::parse_lenient(&text)
        .map(Some)
        .map_err(|e| TextGenError::Load(format!("{}: invalid JSON: {e}", path.display())))
}

/// A token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The default chat template: a string, or the one named "default" in a list.
fn template_source(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn load_error(e: impl std::fmt::Display) -> TextGenError {
    TextGenError::Load(e.to_string())
}

impl LanguageModel {
    /// Load from either layout on `device`; `dtype` applies to dense weights
    /// (GGUF models compute in f32 over their quantized blocks).
    pub fn load(source: &ModelSource, dtype: DType, device: &Device) -> Result<Self, TextGenError> {
        match source {
            ModelSource::Folder(dir) => Self::load_folder(dir, dtype, device),
            ModelSource::Gguf(file) => Self::load_gguf(file, device),
        }
    }

    fn load_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Self, TextGenError> {
        Self::load_split(dir, dir, dtype, device)
    }

    /// A model whose weights and config sit in `model_dir` and whose
    /// tokenizer files (tokenizer.json, tokenizer_config.json, the chat
    /// template) sit in `tokenizer_dir`, as diffusers pipelines lay out a text
    /// encoder (`text_encoder/` and `tokenizer/`).
    pub fn load_split(
        model_dir: &Path,
        tokenizer_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TextGenError> {
        let dir = model_dir;
        let config_path = dir.join("config.json");
        let config_json = read_json(&config_path)?
            .ok_or_else(|| TextGenError::Load(format!("{}: no config.json", dir.display())))?;
        let config = LlmConfig::from_json(&config_json)
            .map_err(|e| TextGenError::Load(format!("{}: {e}", dir.display())))?;
        let defaults = read_json(&dir.join("generation_config.json"))?
            .map(|g| GenerationDefaults::from_json(&g))
            .unwrap_or_default();
        let tokenizer = TextTokenizer::from_file(&tokenizer_dir.join("tokenizer.json"))?;
        let tokenizer_config =
            read_json(&tokenizer_dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let bos = token_text(tokenizer_config.get("bos_token"));
        let eos = token_text(tokenizer_config.get("eos_token"));
        let jinja = tokenizer_dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| TextGenError::Load(format!("{}: {e}", jinja.display())))?,
            )
        } else {
            template_source(tokenizer_config.get("chat_template"))
        };
        let template = source
            .map(|s| ChatTemplate::new(&s, bos.clone(), eos.clone()))
            .transpose()?;
        let mut eos_token_ids = defaults.eos_token_ids.clone();
        if eos_token_ids.is_empty() {
            eos_token_ids.extend(eos.as_deref().and_then(|t| tokenizer.token_id(t)));
        }
        if eos_token_ids.is_empty() {
            eos_token_ids = GenerationDefaults::from_json(&config_json).eos_token_ids;
        }
        let files = WeightFiles::open(dir).map_err(load_error)?;
        let context_length = config.max_position_embeddings;
        let model = CausalLm::load(config, &LlmWeights::Safetensors(files), dtype, device)
            .map_err(load_error)?;
        Ok(LanguageModel {
            model,
            tokenizer,
            template,
            defaults,
            eos_token_ids,
            context_length,
        })
    }

    fn load_gguf(path: &Path, device: &Device) -> Result<Self, TextGenError> {
        let file = GgufFile::open(path).map_err(load_error)?;
        let config = config_from_gguf(&file)?;
        let tokenizer = TextTokenizer::from_gguf(&file)?;
        let id = |key: &str| file.opt_usize(key).map_err(load_error);
        let bos_id = id("tokenizer.ggml.bos_token_id")?.map(|v| v as u32);
        let eos_id = id("tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
        let eot_id = id("tokenizer.ggml.eot_token_id")?.map(|v| v as u32);
        let mut eos_token_ids: Vec<u32> = eos_id.into_iter().chain(eot_id).collect();
        for name in END_OF_GENERATION_TOKENS {
            if let Some(t) = tokenizer.token_id(name)
                && !eos_token_ids.contains(&t)
            {
                eos_token_ids.push(t);
            }
        }
        let name_of = |id: Option<u32>| id.and_then(|i| tokenizer.token(i));
        let template = file
            .opt_string("tokenizer.chat_template")
            .map_err(load_error)?
            .map(|s| ChatTemplate::new(&s, name_of(bos_id), name_of(eos_id)))
            .transpose()?;
        let interleaved_qk = (config.family == LlmFamily::Llama
            || config.family == LlmFamily::Mistral)
            .then_some((config.num_heads, config.num_kv_heads));
        let context_length = config.max_position_embeddings;
        let weights = LlmWeights::Gguf {
            file,
            interleaved_qk,
        };
        let model = CausalLm::load(config, &weights, DType::F32, device).map_err(load_error)?;
        Ok(LanguageModel {
            model,
            tokenizer,
            template,
            defaults: GenerationDefaults {
                eos_token_ids: eos_token_ids.clone(),
                bos_token_id: bos_id,
                ..GenerationDefaults::default()
            },
            eos_token_ids,
            context_length,
        })
    }
}

/// The model config llama.cpp's metadata describes.
fn config_from_gguf(file: &GgufFile) -> Result<LlmConfig, TextGenError> {
    let arch = file.string("general.architecture").map_err(load_error)?;
    let family = LlmFamily::from_model_type(&arch).ok_or_else(|| {
        let image_model = match arch.as_str() {
            "flux" => Some("a FLUX transformer: put it in the transformer/ folder of a diffusers FLUX pipeline (beside its config.json) and register the folder"),
            "sdxl" | "sd1" => Some("a UNet: put it in the unet/ folder of a diffusers SDXL pipeline (beside its config.json) and register the folder"),
            _ => None,
        };
        TextGenError::Load(match image_model {
            Some(hint) => format!("{}: this GGUF holds only {hint}", file.path().display()),
            None => format!(
                "{}: GGUF architecture {arch:?} is not supported (llama, qwen2, qwen3, mistral)",
                file.path().display()
            ),
        })
    })?;
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| file.usize(&key(k)).map_err(load_error);
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    let num_kv_heads = file
        .opt_usize(&key("attention.head_count_kv"))
        .map_err(load_error)?
        .unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(TextGenError::Load(format!(
            "{}: {num_heads} attention heads cannot share {num_kv_heads} key/value heads",
            file.path().display()
        )));
    }
    let head_dim = file
        .opt_usize(&key("attention.key_length"))
        .map_err(load_error)?
        .unwrap_or(hidden_size / num_heads);
    let num_layers = need("block_count")?;
    let (vocab_size, _) = {
        let (shape, dtype) = file.tensor_info("token_embd.weight").map_err(load_error)?;
        (shape.first().copied().unwrap_or(0), dtype)
    };
    let rope_scaling = if file.contains("rope_freqs.weight") {
        let factors = file
            .dense("rope_freqs.weight", DType::F32, &Device::Cpu)
            .and_then(|t| t.flatten_all().map_err(Into::into))
            .and_then(|t| t.to_vec1::<f32>().map_err(Into::into))
            .map_err(load_error)?;
        RopeScaling::Factors(factors)
    } else {
        match file
            .opt_string(&key("rope.scaling.type"))
            .map_err(load_error)?
            .as_deref()
        {
            Some("linear") => RopeScaling::Linear {
                factor: file
                    .opt_f64(&key("rope.scaling.factor"))
                    .map_err(load_error)?
                    .unwrap_or(1.0),
            },
            None | Some("none") => RopeScaling::None,
            Some(other) => {
                return Err(TextGenError::Load(format!(
                    "{}: rope scaling {other:?} is not supported",
                    file.path().display()
                )));
            }
        }
    };
    let window = file
        .opt_usize(&key("attention.sliding_window"))
        .map_err(load_error)?;
    Ok(LlmConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: file
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))
            .map_err(load_error)?
            .unwrap_or(1e-5),
        rope_theta: file
            .opt_f64(&key("rope.freq_base"))
            .map_err(load_error)?
            .unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: need("context_length")?,
        tie_word_embeddings: !file.contains("output.weight"),
        attention_bias: file.contains("blk.0.attn_q.bias"),
        qk_norm: file.contains("blk.0.attn_q_norm.weight"),
        sliding_windows: vec![
            if family == LlmFamily::Mistral {
                window
            } else {
                None
            };
            num_layers
        ],
    })
}
