//! FLUX.2-klein, as diffusers' `Flux2KleinPipeline` runs it. Built so far: the
//! Qwen3 prompt encoder (the VAE and its latent normalisation live in
//! `kiln_models::vae`); the transformer and the pipeline are next (issue 16).

mod prompt;

pub use prompt::{DEFAULT_HIDDEN_LAYERS, Qwen3PromptEncoder};
