//! Loading helpers the text-to-image pipelines share: JSON configs, weight
//! folders, var builders over adapted (renamed/fused) weights, the device and
//! dtype from the environment, and the VAE decode to images.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kiln_engine::{AdaptedWeights, KeyAdapter, WeightFiles};
use serde::de::DeserializeOwned;

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    kiln_engine::json::from_str_lenient(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn var_builder(
    files: WeightFiles,
    adapter: KeyAdapter,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(AdaptedWeights::new(files, adapter)),
        dtype,
        device.clone(),
    )
}

pub(crate) fn open(path: &Path) -> Result<WeightFiles, String> {
    WeightFiles::open(path).map_err(|e| e.to_string())
}

/// Decode raw latents (already unscaled) to images (B, H, W, 3) in [0, 1],
/// in `tile`-pixel tiles when given (diffusers' postprocess: x/2 + 0.5, clamped).
pub(crate) fn decode_images(
    vae: &kiln_models::vae::AutoencoderKl,
    latents: &candle_core::Tensor,
    tile: Option<usize>,
) -> candle_core::Result<candle_core::Tensor> {
    let decoded = match tile {
        Some(tile) => vae.decode_tiled(latents, tile)?,
        None => vae.decode(latents)?,
    };
    ((decoded / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))
}
