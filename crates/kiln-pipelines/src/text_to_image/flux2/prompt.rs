//! FLUX.2's text encoding, as `Flux2KleinPipeline._get_qwen3_prompt_embeds`
//! does it: the prompt as one user turn through the tokenizer's chat template
//! (generation prompt on, `enable_thinking=False`), right-padded or truncated
//! to `max_sequence_length`, Qwen3 run with the attention mask, and the hidden
//! states of a few layers (9, 18, 27) side by side per token, pad positions
//! included.

use candle_core::{Device, Tensor};
use kiln_textgen::bundle::LanguageModel;
use serde_json::{Map, json};

use crate::error::PipelineError;
use crate::text_to_image::generation::{PromptConditioning, PromptEncoder, PromptOptions};

/// The pipeline's `hidden_states_layers`.
pub const DEFAULT_HIDDEN_LAYERS: [usize; 3] = [9, 18, 27];

/// A Qwen3 language model as FLUX.2's prompt encoder.
pub struct Qwen3PromptEncoder {
    lm: LanguageModel,
    layers: Vec<usize>,
    pad: u32,
}

fn failed(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Execution(format!("text encoder failed: {e}"))
}

impl Qwen3PromptEncoder {
    /// `layers` index transformers' `hidden_states` (0 = the embeddings);
    /// `pad` is the tokenizer's pad id. The model must have a chat template.
    pub fn new(lm: LanguageModel, layers: Vec<usize>, pad: u32) -> Result<Self, String> {
        let available = lm.model.config().num_layers;
        if let Some(bad) = layers.iter().find(|&&l| l > available) {
            return Err(format!(
                "hidden state layer {bad} does not exist: the text encoder has {available} layers"
            ));
        }
        if lm.template.is_none() {
            return Err("the text encoder's tokenizer has no chat template".into());
        }
        Ok(Qwen3PromptEncoder { lm, layers, pad })
    }

    /// From a diffusers FLUX.2 folder: the Qwen3 in `text_encoder/`, its
    /// tokenizer (pad token, chat template) in `tokenizer/`.
    pub fn load_folder(
        folder: &std::path::Path,
        layers: Vec<usize>,
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<Self, String> {
        let tokenizer_dir = folder.join("tokenizer");
        let lm =
            LanguageModel::load_split(&folder.join("text_encoder"), &tokenizer_dir, dtype, device)
                .map_err(|e| e.to_string())?;
        let config_path = tokenizer_dir.join("tokenizer_config.json");
        let config = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| kiln_engine::json::parse_lenient(&t).ok())
            .unwrap_or_default();
        let pad_token = match &config["pad_token"] {
            serde_json::Value::String(token) => Some(token.clone()),
            serde_json::Value::Object(token) => token
                .get("content")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
            _ => None,
        }
        .ok_or_else(|| "tokenizer/tokenizer_config.json names no pad_token".to_string())?;
        let pad = lm
            .tokenizer
            .token_id(&pad_token)
            .ok_or_else(|| format!("the pad token {pad_token:?} is not in the tokenizer"))?;
        Self::new(lm, layers, pad)
    }

    /// The ids the pipeline feeds and how many of them are real (the rest pads).
    pub fn ids(&self, prompt: &str, length: usize) -> Result<(Vec<u32>, usize), PipelineError> {
        let template = self
            .lm
            .template
            .as_ref()
            .ok_or_else(|| failed("no chat template"))?;
        let mut extra = Map::new();
        extra.insert("enable_thinking".into(), json!(false));
        let text = template
            .render(&[json!({"role": "user", "content": prompt})], true, &extra)
            .map_err(failed)?;
        let mut ids = self.lm.tokenizer.encode(&text, true).map_err(failed)?;
        ids.truncate(length);
        let valid = ids.len();
        ids.resize(length, self.pad);
        Ok((ids, valid))
    }
}

impl PromptEncoder for Qwen3PromptEncoder {
    fn condition(
        &self,
        prompt: &str,
        options: PromptOptions,
        _device: &Device,
    ) -> Result<PromptConditioning, PipelineError> {
        let (ids, valid) = self.ids(prompt, options.max_sequence_length)?;
        if valid == 0 {
            return Err(failed("the prompt rendered to no tokens"));
        }
        let states = self
            .lm
            .model
            .padded_hidden_states(&ids, valid)
            .map_err(failed)?;
        let picked: Vec<&Tensor> = self.layers.iter().map(|&l| &states[l]).collect();
        let stacked = Tensor::stack(&picked, 1).map_err(failed)?;
        let (tokens, n, hidden) = stacked.dims3().map_err(failed)?;
        let sequence = stacked.reshape((1, tokens, n * hidden)).map_err(failed)?;
        Ok(PromptConditioning {
            sequence,
            pooled: None,
        })
    }
}
