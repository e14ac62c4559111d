//! FLUX.2's latent normalisation: the VAE's latents are patchified 2×2 (4×
//! the channels, half the size) and standardised by the running statistics of
//! the VAE's BatchNorm (`bn.running_mean`, `bn.running_var` + `batch_norm_eps`),
//! as `Flux2KleinPipeline` prepares image latents and undoes before decoding.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// `(B, C, H, W)` → `(B, 4C, H/2, W/2)`, channel-major within each 2×2 patch.
pub fn patchify(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("patchify: latents {h}×{w} are not even");
    }
    latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * 4, h / 2, w / 2))
}

/// The inverse of [`patchify`].
pub fn unpatchify(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if c % 4 != 0 {
        candle_core::bail!("unpatchify: {c} channels are not a multiple of 4");
    }
    latents
        .reshape((b, c / 4, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c / 4, h * 2, w * 2))
}

/// The BatchNorm's running statistics, as the pipeline uses them.
#[derive(Debug, Clone)]
pub struct LatentNorm {
    /// `(1, 4C, 1, 1)`.
    mean: Tensor,
    /// `sqrt(running_var + eps)`, `(1, 4C, 1, 1)`.
    std: Tensor,
}

impl LatentNorm {
    /// From `bn.running_mean` / `bn.running_var` of a `latent_channels` VAE.
    pub fn load(vb: VarBuilder, latent_channels: usize, eps: f64) -> Result<Self> {
        let channels = 4 * latent_channels;
        let device = vb.device().clone();
        let stat = |name: &str| -> Result<Tensor> {
            vb.pp("bn")
                .get(channels, name)?
                .to_dtype(DType::F32)?
                .reshape((1, channels, 1, 1))
        };
        let mean = stat("running_mean")?;
        let std = (stat("running_var")? + eps)?.sqrt()?;
        Ok(LatentNorm {
            mean: mean.to_device(&device)?,
            std: std.to_device(&device)?,
        })
    }

    /// Patchified VAE latents → the transformer's standardised latents.
    pub fn normalize(&self, patchified: &Tensor) -> Result<Tensor> {
        let dtype = patchified.dtype();
        patchified
            .to_dtype(DType::F32)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?
            .to_dtype(dtype)
    }

    /// The transformer's latents → patchified VAE latents.
    pub fn denormalize(&self, normalized: &Tensor) -> Result<Tensor> {
        let dtype = normalized.dtype();
        normalized
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.std)?
            .broadcast_add(&self.mean)?
            .to_dtype(dtype)
    }

    pub fn device(&self) -> &Device {
        self.mean.device()
    }
}
