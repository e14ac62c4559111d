//! The FLUX.1 rectified-flow transformer (dev and schnell): config, model and the
//! BFL single-file key layout.

mod config;
mod layout;
pub(crate) mod model;

pub use config::FluxConfig;
pub use layout::{FluxLayout, bfl_adapter};
pub use model::{FluxTransformer, pack_latents, position_ids, unpack_latents};
