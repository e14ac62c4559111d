//! The SDXL UNet (`UNet2DConditionModel`) with diffusers' weight names.

pub mod config;
pub mod model;
pub mod transformer;

pub use config::UNetConfig;
pub use model::{AddedConditioning, UNet2DConditionModel};
