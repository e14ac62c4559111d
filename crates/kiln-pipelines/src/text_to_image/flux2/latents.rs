//! FLUX.2's latents as `Flux2KleinPipeline` prepares them: noise drawn
//! directly in the patchified shape (B, 4·C, H/16, W/16) from the seeded
//! generator, packed to one token per position, and 4-axis position ids
//! (T, H, W, L): image tokens at (0, row, column, 0), text tokens at
//! (0, 0, 0, index).

use candle_core::{Device, Result, Tensor};
use kiln_engine::TorchGenerator;

/// The patchified noise shape for an image of `height`×`width` pixels:
/// `(batch, 4·latent_channels, height/(2s), width/(2s))` for a VAE of scale
/// factor `s` (8 for FLUX.2's).
pub fn noise_shape(
    batch: usize,
    latent_channels: usize,
    (height, width): (usize, usize),
    vae_scale: usize,
) -> (usize, usize, usize, usize) {
    let step = 2 * vae_scale;
    (batch, 4 * latent_channels, height / step, width / step)
}

/// The pipeline's initial noise: one draw from the CPU generator in `shape`.
pub fn noise(
    generator: &mut TorchGenerator,
    shape: (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(generator.randn(n), shape, &Device::Cpu)?.to_device(device)
}

/// `(B, C, H, W)` → `(B, H·W, C)`: one token per position, row-major.
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    latents
        .reshape((b, c, h * w))?
        .transpose(1, 2)?
        .contiguous()
}

/// The inverse of [`pack`] for tokens in [`latent_ids`]' order.
pub fn unpack(tokens: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, n, c) = tokens.dims3()?;
    if n != height * width {
        candle_core::bail!("unpack: {n} tokens are not {height}×{width}");
    }
    tokens.transpose(1, 2)?.reshape((b, c, height, width))
}

/// Image token positions: (0, row, column, 0), row-major.
pub fn latent_ids(height: usize, width: usize) -> Vec<[f64; 4]> {
    (0..height)
        .flat_map(|row| (0..width).map(move |column| [0.0, row as f64, column as f64, 0.0]))
        .collect()
}

/// Text token positions: (0, 0, 0, index).
pub fn text_ids(len: usize) -> Vec<[f64; 4]> {
    (0..len).map(|i| [0.0, 0.0, 0.0, i as f64]).collect()
}
