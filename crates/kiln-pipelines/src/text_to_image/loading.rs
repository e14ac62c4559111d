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

/// Which parts quantize while they load (`[[models]] config = { quantize,
/// quantize_text_encoder }`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantization {
    /// The denoiser's (transformer's or UNet's) linear layers.
    pub denoiser: Option<kiln_engine::quant::QuantKind>,
    /// Also the sequence text encoder's (FLUX.1's T5).
    pub text_encoder: bool,
}

impl Quantization {
    pub fn from_settings(settings: &crate::settings::ModelSettings) -> Self {
        Quantization {
            denoiser: settings.quantize,
            text_encoder: settings.quantize_text_encoder,
        }
    }

    /// Run `load` with the denoiser's policy: `keep_dense` names the layers
    /// that stay in the compute dtype.
    pub(crate) fn denoiser<T>(&self, keep_dense: fn(&str) -> bool, load: impl FnOnce() -> T) -> T {
        let policy = self
            .denoiser
            .map(|kind| kiln_engine::quant::LoadPolicy { kind, keep_dense });
        kiln_engine::quant::while_loading(policy, load)
    }

    /// Run `load` with the text encoder's policy (every linear, when asked).
    pub(crate) fn text_encoder<T>(&self, load: impl FnOnce() -> T) -> T {
        let policy = match (self.denoiser, self.text_encoder) {
            (Some(kind), true) => Some(kiln_engine::quant::LoadPolicy {
                kind,
                keep_dense: |_| false,
            }),
            _ => None,
        };
        kiln_engine::quant::while_loading(policy, load)
    }
}

/// FLUX transformer layers (both generations) that stay dense when
/// quantizing, as diffusers' bitsandbytes path keeps them: the input
/// embedders, the timestep/guidance/text embedders, every modulation and norm
/// projection, and the output projection.
pub(crate) fn flux_keeps_dense(name: &str) -> bool {
    matches!(name, "x_embedder" | "context_embedder" | "proj_out")
        || name.starts_with("time_text_embed")
        || name.starts_with("time_guidance_embed")
        || name.contains("norm")
        || name.contains("modulation")
}

/// SDXL UNet linears that stay dense when quantizing: the time and added
/// (size/pooled-text) embeddings.
pub(crate) fn unet_keeps_dense(name: &str) -> bool {
    name.starts_with("time_embedding") || name.starts_with("add_embedding")
}
