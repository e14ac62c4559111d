//! The SDXL UNet (`UNet2DConditionModel`) with diffusers' weight names, and
//! the ldm single-file layout mapped onto them.

pub mod config;
pub mod layout;
pub mod model;
pub mod transformer;

pub use config::UNetConfig;
pub use layout::{ldm_unet_adapter, ldm_unet_prefix};
pub use model::{AddedConditioning, UNet2DConditionModel};
