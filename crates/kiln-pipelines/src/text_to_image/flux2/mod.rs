//! FLUX.2-klein, as diffusers' `Flux2KleinPipeline` runs it. Built so far: the
//! Qwen3 prompt encoder and the latent preparation (noise, packing, position
//! ids); the VAE and its latent normalisation live in `kiln_models::vae`, the
//! schedule in `schedulers::empirical_mu`. The transformer and the pipeline
//! are next (issue 16).

pub mod latents;
mod prompt;

pub use prompt::{DEFAULT_HIDDEN_LAYERS, Qwen3PromptEncoder};
