//! The safety filter Cog's SDXL predictor runs: diffusers'
//! `StableDiffusionSafetyChecker` with its `CLIPImageProcessor` (resize the
//! shortest edge with bicubic filtering, centre crop, rescale, normalise),
//! loaded when the model folder has `safety_checker/` (and
//! `feature_extractor/`). Flagged images are dropped; a request whose every
//! image is flagged fails.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use kiln_engine::KeyAdapter;
use kiln_models::safety_checker::{SafetyChecker, SafetyCheckerConfig, SafetyVerdict};
use serde::Deserialize;

use crate::error::PipelineError;
use crate::text_to_image::loading::{open, read_json, var_builder};

/// `feature_extractor/preprocessor_config.json` (CLIPImageProcessor).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    pub size: serde_json::Value,
    pub crop_size: serde_json::Value,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    #[serde(default = "rescale")]
    pub rescale_factor: f32,
}

fn rescale() -> f32 {
    1.0 / 255.0
}

impl ImageProcessorConfig {
    fn shortest_edge(&self) -> u32 {
        self.size["shortest_edge"].as_u64().unwrap_or(224) as u32
    }

    fn crop(&self) -> (u32, u32) {
        (
            self.crop_size["height"].as_u64().unwrap_or(224) as u32,
            self.crop_size["width"].as_u64().unwrap_or(224) as u32,
        )
    }
}

/// A loaded checker and its preprocessing.
pub struct SafetyFilter {
    checker: SafetyChecker,
    processor: ImageProcessorConfig,
    device: Device,
}

fn run(e: candle_core::Error) -> PipelineError {
    PipelineError::Execution(e.to_string())
}

impl SafetyFilter {
    /// The filter of a model folder, when it has `safety_checker/`.
    pub fn load(dir: &Path, device: &Device) -> Result<Option<Self>, String> {
        let checker_dir = dir.join("safety_checker");
        if !checker_dir.is_dir() {
            return Ok(None);
        }
        let config: SafetyCheckerConfig = read_json(&checker_dir.join("config.json"))?;
        let checker = SafetyChecker::load(
            var_builder(
                open(&checker_dir)?,
                KeyAdapter::default(),
                DType::F32,
                device,
            ),
            config,
        )
        .map_err(|e| format!("{}: {e}", checker_dir.display()))?;
        let processor: ImageProcessorConfig =
            read_json(&dir.join("feature_extractor/preprocessor_config.json"))?;
        Ok(Some(SafetyFilter {
            checker,
            processor,
            device: device.clone(),
        }))
    }

    /// CLIP pixel values (B, 3, S, S) for `images`.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Tensor, PipelineError> {
        let edge = self.processor.shortest_edge();
        let (crop_h, crop_w) = self.processor.crop();
        let mut data = Vec::new();
        for image in images {
            let (w, h) = (image.width(), image.height());
            let (new_w, new_h) = if w <= h {
                (edge, ((edge as u64 * h as u64) / w.max(1) as u64) as u32)
            } else {
                (((edge as u64 * w as u64) / h.max(1) as u64) as u32, edge)
            };
            let resized = image::imageops::resize(
                image,
                new_w,
                new_h,
                image::imageops::FilterType::CatmullRom,
            );
            let top = new_h.saturating_sub(crop_h) / 2;
            let left = new_w.saturating_sub(crop_w) / 2;
            let cropped = image::imageops::crop_imm(&resized, left, top, crop_w, crop_h).to_image();
            for channel in 0..3 {
                let (mean, std) = (
                    self.processor.image_mean[channel],
                    self.processor.image_std[channel],
                );
                data.extend(cropped.pixels().map(|p| {
                    (f32::from(p.0[channel]) * self.processor.rescale_factor - mean) / std
                }));
            }
        }
        Tensor::from_vec(
            data,
            (images.len(), 3, crop_h as usize, crop_w as usize),
            &self.device,
        )
        .map_err(run)
    }

    /// The checker's verdict for each image.
    pub fn check(&self, images: &[RgbImage]) -> Result<Vec<SafetyVerdict>, PipelineError> {
        let pixels = self.preprocess(images)?;
        self.checker.check(&pixels).map_err(run)
    }

    pub fn checker(&self) -> &SafetyChecker {
        &self.checker
    }
}
