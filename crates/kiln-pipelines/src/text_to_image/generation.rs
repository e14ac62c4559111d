//! What every text-to-image generation loop shares: the prompt-encoder seam
//! (a family's text encoders turn one prompt into its conditioning), per-stage
//! timings, and the per-step callback (progress, and cancellation when it
//! returns false).

use candle_core::{Device, Tensor};

use crate::error::PipelineError;

/// What one prompt becomes for a denoiser: hidden states per token
/// (1, tokens, width) and, for families that take one, a pooled vector
/// (1, width) (FLUX.1 and SDXL do; FLUX.2 does not).
pub struct PromptConditioning {
    pub sequence: Tensor,
    pub pooled: Option<Tensor>,
}

impl PromptConditioning {
    /// The pooled vector of a family that needs one.
    pub fn pooled(&self) -> Result<&Tensor, PipelineError> {
        self.pooled.as_ref().ok_or_else(|| {
            PipelineError::Execution("the text encoder gave no pooled output".into())
        })
    }
}

/// The request's knobs a family's encoders may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptOptions {
    /// Tokens of the sequence encoder (FLUX's T5; fixed-length CLIPs ignore it).
    pub max_sequence_length: usize,
    /// CLIP layers skipped from the end (SDXL's `clip_skip`).
    pub clip_skip: usize,
}

/// A family's text encoders, as the shared pipeline sees them.
pub trait PromptEncoder {
    fn condition(
        &self,
        prompt: &str,
        options: PromptOptions,
        device: &Device,
    ) -> Result<PromptConditioning, PipelineError>;
}

/// Per-stage wall time, reported with every result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub text_encoding_s: f64,
    pub denoising_s: f64,
    pub vae_s: f64,
}

/// Called after each denoising step with (step, total); returning false cancels.
pub type StepCallback<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

/// A model part for one stage: borrowed from resident components, or loaded
/// for this stage and freed when dropped.
pub enum Part<'a, T> {
    Resident(&'a T),
    Loaded(T),
}

impl<T> std::ops::Deref for Part<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            Part::Resident(part) => part,
            Part::Loaded(part) => part,
        }
    }
}
