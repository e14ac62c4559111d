//! AutoencoderKL (FLUX's 16-channel VAE and SDXL's 4-channel one): config, model
//! (encode to a latent posterior, decode, sliced and tiled decode) and the
//! ldm/BFL single-file key layout.

pub(crate) mod blocks;
mod config;
mod layout;
mod model;

pub use config::VaeConfig;
pub use layout::{VaeLayout, bfl_vae_adapter, detect_vae_layout};
pub use model::{AutoencoderKl, LatentDistribution};
