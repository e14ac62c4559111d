//! FLUX.2 (klein and dev): the transformer, its config and weight layouts.
//! The VAE is `vae::AutoencoderKl` with FLUX.2's config and `vae::LatentNorm`.

pub mod config;
pub mod layout;
pub mod model;

pub use config::Flux2Config;
pub use layout::{Flux2Layout, bfl_adapter};
pub use model::Flux2Transformer;
