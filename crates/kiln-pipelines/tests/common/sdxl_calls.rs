//! The tiny SDXL fixture's recorded diffusers calls as Kiln requests, shared by
//! the SDXL test binaries (included with `#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln_pipelines::text_to_image::image_io::{image_tensor, mask_tensor};
use kiln_pipelines::text_to_image::schedulers::SamplerKind;
use kiln_pipelines::text_to_image::sdxl::SdxlRequest;
use serde_json::Value;

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl/tiny-sdxl")
}

pub fn reference_image(file: &str) -> image::RgbImage {
    image::open(fixture().join("reference").join(file))
        .unwrap()
        .to_rgb8()
}

/// The request diffusers' recorded `call` made.
pub fn request_for(call: &Value) -> SdxlRequest {
    // Image-to-image calls take the init image's size (64×64).
    let (height, width) = (
        call["height"].as_u64().unwrap_or(64) as usize,
        call["width"].as_u64().unwrap_or(64) as usize,
    );
    SdxlRequest {
        prompt: call["prompt"].as_str().unwrap().into(),
        negative_prompt: call["negative_prompt"].as_str().map(str::to_string),
        width,
        height,
        steps: call["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: call["guidance_scale"].as_f64().unwrap(),
        guidance_rescale: call["guidance_rescale"].as_f64().unwrap_or(0.0),
        sampler: SamplerKind::parse(call["sampler"].as_str().unwrap()).unwrap(),
        seed: call["seed"].as_u64().unwrap(),
        num_outputs: 1,
        clip_skip: 0,
        original_size: (height, width),
        crop_top_left: (0, 0),
        target_size: (height, width),
        init_image: call["image"]
            .as_str()
            .map(|file| image_tensor(&reference_image(file), width, height).unwrap()),
        mask: call["mask"]
            .as_str()
            .map(|file| mask_tensor(&reference_image(file)).unwrap()),
        strength: call["strength"].as_f64().unwrap_or(1.0),
        vae_tile: None,
        adapters: None,
    }
}
