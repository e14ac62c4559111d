//! AutoencoderKL (FLUX's 16-channel VAE, SDXL's 4-channel one, and FLUX.2's
//! 32-channel `AutoencoderKLFlux2` with its latent BatchNorm): config, model
//! (encode to a latent posterior, decode, sliced and tiled decode), FLUX.2's
//! latent normalisation and the ldm/BFL single-file key layout.

pub(crate) mod blocks;
mod config;
mod latent_norm;
mod layout;
mod model;

pub use config::VaeConfig;
pub use latent_norm::{LatentNorm, patchify, unpatchify};
pub use layout::{VaeLayout, bfl_vae_adapter, detect_vae_layout};
pub use model::{AutoencoderKl, LatentDistribution};
