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

/// The device and dtype a pipeline loads on: `KILN_DEVICE` (cpu, cuda,
/// cuda:N, auto) and `KILN_DTYPE` (f32, f16, bf16; f32 when unset).
pub(crate) fn device_and_dtype_from_env() -> Result<(Device, DType), String> {
    let device =
        kiln_engine::device::select_device(&std::env::var("KILN_DEVICE").unwrap_or_default())
            .map_err(|e| e.to_string())?;
    let dtype = match std::env::var("KILN_DTYPE") {
        Ok(name) => kiln_engine::device::parse_dtype(&name).map_err(|e| e.to_string())?,
        Err(_) => DType::F32,
    };
    Ok((device, dtype))
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
