//! FLUX.2-klein text-to-image and image editing, as diffusers'
//! `Flux2KleinPipeline` runs it: the Qwen3 prompt encoder, latent
//! preparation (noise, packing, position ids), folder loading, the sampling
//! loop and the served pipeline. The transformer lives in
//! `kiln_models::flux2`; the VAE and its latent normalisation in
//! `kiln_models::vae`; the schedule in `schedulers::empirical_mu`.

mod components;
mod generate;
pub mod latents;
mod pipeline;
mod prompt;
mod reference;

pub use components::{
    Flux2Components, Flux2Facts, Flux2Parts, Flux2Vae, OffloadedFlux2, is_flux2_folder,
};
pub use generate::{Flux2Request, Generated, generate};
pub use pipeline::{
    DEFAULT_MAX_PIXELS, Flux2Defaults, Flux2Pipeline, PIPELINE_KIND, input_schema, load,
    manifest_for_folder, realistic_character,
};
pub use prompt::{DEFAULT_HIDDEN_LAYERS, Qwen3PromptEncoder};
pub use reference::{check_reference_size, reference_size, reference_tensor};
