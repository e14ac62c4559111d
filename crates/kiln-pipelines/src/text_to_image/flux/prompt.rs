//! Prompt encoding as FluxPipeline does it: CLIP ids padded/truncated to 77 with
//! the end-of-text id (pooled output), T5 ids padded with 0 to
//! `max_sequence_length` (every hidden state; no attention mask, as diffusers).

use candle_core::{Device, Tensor};
use kiln_models::clip::ClipTextModel;
use kiln_models::t5::T5Encoder;

use crate::error::PipelineError;
use crate::text_to_image::generation::{PromptConditioning, PromptEncoder, PromptOptions};
use crate::text_to_image::tokenizer::{CLIP_LENGTH, PromptTokenizer};

/// The two text conditionings FLUX takes: T5 hidden states
/// (1, max_sequence_length, joint_dim) and CLIP's pooled output.
pub type PromptEmbeddings = PromptConditioning;

/// Both text encoders with their tokenizers.
pub struct TextEncoders {
    pub clip_tokenizer: PromptTokenizer,
    pub clip: ClipTextModel,
    pub t5_tokenizer: PromptTokenizer,
    pub t5: T5Encoder,
}

impl TextEncoders {
    /// Encode one prompt.
    pub fn encode(
        &self,
        prompt: &str,
        max_sequence_length: usize,
        device: &Device,
    ) -> Result<PromptEmbeddings, PipelineError> {
        let run =
            |e: candle_core::Error| PipelineError::Execution(format!("text encoder failed: {e}"));
        let clip_ids = self.clip_tokenizer.ids(prompt, CLIP_LENGTH)?;
        let clip_ids = Tensor::from_vec(clip_ids, (1, CLIP_LENGTH), device).map_err(run)?;
        let pooled = self
            .clip
            .forward(&clip_ids, self.clip.eos_token_id())
            .map_err(run)?
            .pooled;
        let t5_ids = self.t5_tokenizer.ids(prompt, max_sequence_length)?;
        let t5_ids = Tensor::from_vec(t5_ids, (1, max_sequence_length), device).map_err(run)?;
        let sequence = self.t5.forward(&t5_ids).map_err(run)?;
        Ok(PromptEmbeddings {
            sequence,
            pooled: Some(pooled),
        })
    }
}

impl PromptEncoder for TextEncoders {
    fn condition(
        &self,
        prompt: &str,
        options: PromptOptions,
        device: &Device,
    ) -> Result<PromptConditioning, PipelineError> {
        self.encode(prompt, options.max_sequence_length, device)
    }
}
