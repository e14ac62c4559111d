//! FLUX.1 [dev] and [schnell] text-to-image and image-to-image.

mod components;
mod generate;
mod pipeline;
mod prompt;

pub use crate::text_to_image::tokenizer::PromptTokenizer;
pub use components::{FluxComponents, OffloadedFlux, is_flux_folder};
pub use generate::{
    FluxModels, FluxParts, Generated, GenerationRequest, Part, StepCallback, Timings, generate,
};
pub use pipeline::{
    ASPECT_RATIOS, FluxPipeline, PIPELINE_KIND, VariantDefaults, input_schema, load,
    manifest_for_folder, size_for, size_for_aspect_ratio,
};
pub use prompt::{PromptEmbeddings, TextEncoders};
