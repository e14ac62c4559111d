//! diffusers' `AutoencoderKL`: the encoder (to a diagonal Gaussian over latents),
//! the decoder, and decoding a batch one sample at a time (slicing) or in
//! overlapping blended tiles (diffusers' `tiled_decode`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::conv::Conv2d;
use kiln_engine::group_norm::GroupNorm;

/// `count` ResnetBlocks (`resnets.0..`), the first taking `input` channels.
fn resnet_stack(
    vb: &VarBuilder,
    count: usize,
    input: usize,
    output: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock>> {
    (0..count)
        .map(|j| {
            ResnetBlock::load(
                vb.pp("resnets").pp(j),
                if j == 0 { input } else { output },
                output,
                groups,
            )
        })
        .collect()
}

use super::blocks::{Downsample, MidBlock, ResnetBlock, Upsample, conv, norm};
use super::config::VaeConfig;

/// diffusers' `tile_overlap_factor`.
const TILE_OVERLAP: f64 = 0.25;

/// One `DownEncoderBlock2D`: resnets, then (except the last level) a downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

/// One `UpDecoderBlock2D`: resnets, then (except the last level) an upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let levels = channels.len();
        let conv_in = conv(vb.pp("conv_in"), config.in_channels, channels[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(levels);
        let mut output = channels[0];
        for (i, &out) in channels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let resnets = resnet_stack(&vb, config.layers_per_block, output, out, groups)?;
            let downsample = if i + 1 < levels {
                Some(Downsample::load(vb.pp("downsamplers").pp("0"), out)?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            output = out;
        }
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::load(
                vb.pp("mid_block"),
                output,
                groups,
                config.mid_block_add_attention,
            )?,
            conv_norm_out: norm(vb.pp("conv_norm_out"), groups, output)?,
            conv_out: conv(
                vb.pp("conv_out"),
                output,
                2 * config.latent_channels,
                3,
                1,
                1,
            )?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h)?;
            }
            if let Some(downsample) = &block.downsample {
                h = downsample.forward(&h)?;
            }
        }
        h = self.mid_block.forward(&h)?;
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = config.decoder_channels().iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let levels = reversed.len();
        let top = reversed[0];
        let conv_in = conv(vb.pp("conv_in"), config.latent_channels, top, 3, 1, 1)?;
        let mid_block = MidBlock::load(
            vb.pp("mid_block"),
            top,
            groups,
            config.mid_block_add_attention,
        )?;
        let mut up_blocks = Vec::with_capacity(levels);
        let mut previous = top;
        for (i, &out) in reversed.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let resnets = resnet_stack(&vb, config.layers_per_block + 1, previous, out, groups)?;
            let upsample = if i + 1 < levels {
                Some(Upsample::load(vb.pp("upsamplers").pp("0"), out)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            previous = out;
        }
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: norm(vb.pp("conv_norm_out"), groups, previous)?,
            conv_out: conv(vb.pp("conv_out"), previous, config.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h)?;
            }
            if let Some(upsample) = &block.upsample {
                h = upsample.forward(&h)?;
            }
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// The encoder's posterior: a diagonal Gaussian per latent element.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    /// `exp(0.5 · clamp(logvar, −30, 20))`.
    pub std: Tensor,
}

impl LatentDistribution {
    /// A draw `mean + std · eps` for standard-normal `eps` of the mean's shape.
    pub fn sample(&self, eps: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std.mul(eps)?)
    }
}

/// diffusers' `AutoencoderKL` (FLUX's 16-channel VAE, SD/SDXL's 4-channel one).
/// Latents here are raw: scaling and shift (`config.scaling_factor`,
/// `config.shift_factor`) are the pipeline's business.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dtype: DType,
}

impl AutoencoderKl {
    /// Load every weight under diffusers' names (map other layouts with a key
    /// adapter, see [`super::VaeLayout`]); all sizes come from `config`.
    pub fn load(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(format!("VAE config: {e}")))?;
        let latent = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0)?)
        } else {
            None
        };
        Ok(AutoencoderKl {
            encoder: Encoder::load(vb.pp("encoder"), &config)?,
            decoder: Decoder::load(vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            dtype: vb.dtype(),
            config,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype the weights were loaded in; inputs are cast to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn check_input(&self, x: &Tensor, channels: usize, what: &str) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != channels {
            candle_core::bail!(
                "VAE {what}: expected {channels} channels, got shape {:?}",
                x.dims()
            );
        }
        x.to_dtype(self.dtype)
    }

    /// Encode images `(B, in_channels, H, W)` in [−1, 1] to the latent posterior
    /// (`(B, latent_channels, H/f, W/f)` mean and std, f = 2^(levels−1)).
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let image = self.check_input(image, self.config.in_channels, "encode")?;
        let mut moments = self.encoder.forward(&image)?;
        if let Some(quant_conv) = &self.quant_conv {
            moments = quant_conv.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent)?.contiguous()?;
        let logvar = moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDistribution { mean, std })
    }

    /// Decode raw latents `(B, latent_channels, h, w)` (no scaling or shift) to
    /// `(B, out_channels, h·f, w·f)`, without clamping.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = self.check_input(latents, self.config.latent_channels, "decode")?;
        self.decode_raw(&latents)
    }

    fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.post_quant_conv {
            Some(post_quant_conv) => self.decoder.forward(&post_quant_conv.forward(latents)?),
            None => self.decoder.forward(latents),
        }
    }

    /// diffusers' slicing: decode one batch element at a time (same result as
    /// [`Self::decode`], lower peak memory).
    pub fn decode_sliced(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = self.check_input(latents, self.config.latent_channels, "decode")?;
        let batch = latents.dim(0)?;
        if batch <= 1 {
            return self.decode_raw(&latents);
        }
        let slices = (0..batch)
            .map(|b| self.decode_raw(&latents.narrow(0, b, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&slices, 0)
    }

    /// diffusers' `tiled_decode` with `tile_sample_min_size = tile_sample_size`
    /// (diffusers' default is `config.sample_size`): latent tiles of
    /// `tile_sample_size / f` with overlap factor 0.25, each decoded alone, then
    /// blended linearly with the tile above and to the left and cropped. As in
    /// diffusers, latents that fit in one tile are decoded plainly. The result
    /// approximates [`Self::decode`]; it is not identical. `tile_sample_size`
    /// must be a multiple of `4·f` pixels (diffusers' 1024 or 512 are).
    pub fn decode_tiled(&self, latents: &Tensor, tile_sample_size: usize) -> Result<Tensor> {
        let latents = self.check_input(latents, self.config.latent_channels, "decode")?;
        let tile_latent = tile_sample_size / self.config.downscale_factor();
        let (_, _, height, width) = latents.dims4()?;
        if height <= tile_latent && width <= tile_latent {
            return self.decode_raw(&latents);
        }
        // Python's int(): truncation of the f64 products.
        let stride = (tile_latent as f64 * (1.0 - TILE_OVERLAP)) as usize;
        let blend_extent = (tile_sample_size as f64 * TILE_OVERLAP) as usize;
        let row_limit = tile_sample_size - blend_extent;
        if stride == 0 {
            candle_core::bail!(
                "VAE tiled decode: tile size {tile_sample_size} gives latent tiles of \
                 {tile_latent}, too small to overlap (needs at least {} pixels)",
                2 * self.config.downscale_factor()
            );
        }
        // Other sizes make diffusers' crops overlap or leave gaps (its output then
        // has the wrong size), e.g. 40 or 48 px with f = 8.
        if stride * self.config.downscale_factor() != row_limit {
            candle_core::bail!(
                "VAE tiled decode: tile size {tile_sample_size} does not tile evenly; use a \
                 multiple of {} pixels",
                4 * self.config.downscale_factor()
            );
        }
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..height).step_by(stride) {
            let mut row = Vec::new();
            for j in (0..width).step_by(stride) {
                let tile = latents.narrow(2, i, tile_latent.min(height - i))?.narrow(
                    3,
                    j,
                    tile_latent.min(width - j),
                )?;
                row.push(self.decode_raw(&tile)?);
            }
            rows.push(row);
        }
        // diffusers blends in place, so each tile blends with the already blended
        // tiles above and to its left; replacing tiles in the same order matches.
        let mut result_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let mut result_row = Vec::with_capacity(rows[i].len());
            for j in 0..rows[i].len() {
                let mut tile = rows[i][j].clone();
                if i > 0 {
                    tile = blend(&rows[i - 1][j], &tile, blend_extent, 2)?;
                }
                if j > 0 {
                    tile = blend(&rows[i][j - 1], &tile, blend_extent, 3)?;
                }
                let (_, _, h, w) = tile.dims4()?;
                result_row.push(tile.narrow(2, 0, row_limit.min(h))?.narrow(
                    3,
                    0,
                    row_limit.min(w),
                )?);
                rows[i][j] = tile;
            }
            result_rows.push(Tensor::cat(&result_row, 3)?);
        }
        Tensor::cat(&result_rows, 2)
    }
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `extent`
/// rows (columns) of `b` become `a_tail · (1 − y/extent) + b · (y/extent)`,
/// with `a_tail` the last `extent` rows (columns) of `a`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    // Weights computed in f64 and rounded once, as torch does with Python floats.
    let ratio = |y: usize| y as f64 / extent as f64;
    let keep_b: Vec<f32> = (0..extent).map(|y| ratio(y) as f32).collect();
    let keep_a: Vec<f32> = (0..extent).map(|y| (1.0 - ratio(y)) as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let weights = |w: Vec<f32>| Tensor::from_vec(w, &shape[..], b.device())?.to_dtype(b.dtype());
    let a_tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let b_head = b.narrow(dim, 0, extent)?;
    let blended =
        (a_tail.broadcast_mul(&weights(keep_a)?)? + b_head.broadcast_mul(&weights(keep_b)?)?)?;
    let rest = b.dim(dim)? - extent;
    if rest == 0 {
        return Ok(blended);
    }
    Tensor::cat(&[&blended, &b.narrow(dim, extent, rest)?], dim)
}
