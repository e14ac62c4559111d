//! Stable Diffusion XL: components, the diffusers-exact generation loop with
//! selectable samplers, and the `text_to_image/sdxl` pipeline.

pub mod components;
pub mod defaults;
pub mod generate;

pub use components::{SdxlComponents, is_sdxl_folder};
pub use generate::{SdxlGenerated, SdxlRequest, encode_prompt, generate};
pub mod pipeline;
pub mod safety;

pub use pipeline::{PIPELINE_KIND, SdxlPipeline, load, manifest_for_folder};
