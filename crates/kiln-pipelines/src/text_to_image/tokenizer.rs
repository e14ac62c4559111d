//! Prompt tokenizers as the diffusers pipelines use them: `tokenizer.json`
//! (or CLIP's `vocab.json` + `merges.txt`), padded and truncated to a fixed
//! length with the pipeline's own pad and end ids. Shared by every
//! text-to-image family.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::PipelineError;

/// CLIP's fixed context length.
pub const CLIP_LENGTH: usize = 77;

/// A tokenizer with the pipeline's padding and truncation rules.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    pad: u32,
    eos: u32,
}

impl PromptTokenizer {
    /// Load `tokenizer.json` from a folder; `pad`/`eos` are the ids to pad and end with.
    pub fn load(folder: &Path, pad: u32, eos: u32) -> Result<Self, String> {
        let path = folder.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(PromptTokenizer {
            tokenizer,
            pad,
            eos,
        })
    }

    /// A CLIP tokenizer folder: ends with `<|endoftext|>` and pads with the
    /// `pad_token` of its `tokenizer_config.json` (SDXL's second tokenizer pads
    /// with "!"), else with `<|endoftext|>`.
    pub fn load_clip(folder: &Path) -> Result<Self, String> {
        let path = folder.join("tokenizer.json");
        let tokenizer = if path.is_file() {
            Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))?
        } else if folder.join("vocab.json").is_file() && folder.join("merges.txt").is_file() {
            super::clip_bpe::from_vocab_and_merges(folder)?
        } else {
            return Err(format!(
                "{}: no tokenizer.json, nor vocab.json with merges.txt",
                folder.display()
            ));
        };
        let eos = tokenizer
            .token_to_id("<|endoftext|>")
            .ok_or_else(|| format!("{}: no <|endoftext|> token", folder.display()))?;
        let config: serde_json::Value =
            std::fs::read_to_string(folder.join("tokenizer_config.json"))
                .ok()
                .and_then(|text| kiln_engine::json::parse_lenient(&text).ok())
                .unwrap_or_default();
        let pad_token = match &config["pad_token"] {
            serde_json::Value::String(token) => Some(token.clone()),
            serde_json::Value::Object(token) => token
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let pad = pad_token
            .and_then(|token| tokenizer.token_to_id(&token))
            .unwrap_or(eos);
        Ok(PromptTokenizer {
            tokenizer,
            pad,
            eos,
        })
    }

    /// Token ids of exactly `length`: special tokens added, truncated keeping the
    /// final end token, padded with `pad`.
    pub fn ids(&self, text: &str, length: usize) -> Result<Vec<u32>, PipelineError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| PipelineError::Execution(format!("tokenizer failed: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > length {
            ids.truncate(length - 1);
            ids.push(self.eos);
        }
        ids.resize(length, self.pad);
        Ok(ids)
    }
}
