//! diffusers' `UNet2DConditionModel` as SDXL uses it: sinusoidal time
//! embedding through `time_embedding`, SDXL's added conditioning (pooled text
//! and `add_time_proj` of the six size/crop numbers, through `add_embedding`),
//! down blocks (resnets, optional spatial transformers, stride-2 conv), the
//! cross-attention mid block, and up blocks consuming the skip connections.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::activation;
use kiln_engine::conv::Conv2d;
use kiln_engine::group_norm::GroupNorm;
use kiln_engine::nn::{Linear, timestep_embedding};

use super::config::UNetConfig;
use super::transformer::{Transformer2D, TransformerSpec};
use crate::vae::blocks::{ResnetBlock, Upsample};

/// `linear_2(silu(linear_1(x)))`.
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn load(vb: VarBuilder, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::load(&vb.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&activation::silu(&self.linear_1.forward(x)?)?)
    }
}

/// One level: resnets, each followed by a transformer in cross-attention
/// blocks, then a sampler (down: stride-2 conv; up: nearest ×2 + conv).
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
    upsample: Option<Upsample>,
}

/// The SDXL conditioning beside the text: pooled text embeddings and the six
/// size numbers (original h, w, crop top, left, target h, w) per image.
pub struct AddedConditioning<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a Tensor,
}

pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down: Vec<Level>,
    mid_resnets: Vec<ResnetBlock>,
    mid_attention: Transformer2D,
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn load(vb: VarBuilder, config: UNetConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let channels = &config.block_out_channels;
        let levels = channels.len();
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let time_dim = config.time_embed_dim();
        let resnet = |vb: VarBuilder, i: usize, o: usize| {
            ResnetBlock::load_with_time(vb, i, o, groups, eps, Some(time_dim))
        };
        let spec = |block: usize, channels: usize, layers: usize| TransformerSpec {
            channels,
            heads: config.heads(block),
            layers,
            context_dim: config.cross_attention_dim,
            groups,
            eps,
            linear_projection: config.use_linear_projection,
        };
        let conv3 = |vb: VarBuilder, i: usize, o: usize, stride: usize| {
            Conv2d::load(&vb, i, o, 3, stride, 1)
        };

        let mut down = Vec::with_capacity(levels);
        let mut in_channels = channels[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let out = channels[i];
            let cross = kind == "CrossAttnDownBlock2D";
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
                downsample: None,
                upsample: None,
            };
            for j in 0..config.layers_per_block {
                let input = if j == 0 { in_channels } else { out };
                level
                    .resnets
                    .push(resnet(vb.pp("resnets").pp(j), input, out)?);
                if cross {
                    let layers = config.transformer_layers_per_block.get(i);
                    level.attentions.push(Transformer2D::load(
                        vb.pp("attentions").pp(j),
                        &spec(i, out, layers),
                    )?);
                }
            }
            if i + 1 < levels {
                level.downsample = Some(conv3(vb.pp("downsamplers.0.conv"), out, out, 2)?);
            }
            down.push(level);
            in_channels = out;
        }

        let top = channels[levels - 1];
        let mid = vb.pp("mid_block");
        let mid_layers = config.transformer_layers_per_block.get(levels - 1);
        let mid_resnets = vec![
            resnet(mid.pp("resnets.0"), top, top)?,
            resnet(mid.pp("resnets.1"), top, top)?,
        ];
        let mid_attention =
            Transformer2D::load(mid.pp("attentions.0"), &spec(levels - 1, top, mid_layers))?;

        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(levels);
        let mut previous = reversed[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let out = reversed[i];
            let skip_in = reversed[(i + 1).min(levels - 1)];
            let block = levels - 1 - i;
            let cross = kind == "CrossAttnUpBlock2D";
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
                downsample: None,
                upsample: None,
            };
            for j in 0..=config.layers_per_block {
                let skip = if j == config.layers_per_block {
                    skip_in
                } else {
                    out
                };
                let input = if j == 0 { previous } else { out };
                level
                    .resnets
                    .push(resnet(vb.pp("resnets").pp(j), input + skip, out)?);
                if cross {
                    let layers = config.transformer_layers_per_block.get(block);
                    level.attentions.push(Transformer2D::load(
                        vb.pp("attentions").pp(j),
                        &spec(block, out, layers),
                    )?);
                }
            }
            if i + 1 < levels {
                level.upsample = Some(Upsample::load(vb.pp("upsamplers.0"), out)?);
            }
            up.push(level);
            previous = out;
        }

        let add_embedding = if config.has_text_time() {
            let input = config.projection_class_embeddings_input_dim.unwrap_or(0);
            Some(TimestepEmbedding::load(
                vb.pp("add_embedding"),
                input,
                time_dim,
            )?)
        } else {
            None
        };
        Ok(UNet2DConditionModel {
            conv_in: conv3(vb.pp("conv_in"), config.in_channels, channels[0], 1)?,
            time_embedding: TimestepEmbedding::load(
                vb.pp("time_embedding"),
                channels[0],
                time_dim,
            )?,
            add_embedding,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), groups, channels[0], eps)?,
            conv_out: conv3(vb.pp("conv_out"), channels[0], config.out_channels, 1)?,
            config,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The time embedding plus (SDXL) the added conditioning.
    fn embedding(
        &self,
        timestep: &Tensor,
        batch: usize,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let t = timestep.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let t = if t.elem_count() == 1 {
            t.broadcast_as(batch)?.contiguous()?
        } else {
            t
        };
        let dtype = self.conv_in.dtype();
        let t_emb = timestep_embedding(&t, self.config.block_out_channels[0])?.to_dtype(dtype)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        match (&self.add_embedding, added) {
            (Some(add_embedding), Some(added)) => {
                let dim = self.config.addition_time_embed_dim.unwrap_or(0);
                let ids = added.time_ids.flatten_all()?;
                let sizes = timestep_embedding(&ids, dim)?.reshape((batch, ()))?;
                let input = Tensor::cat(
                    &[added.text_embeds.to_dtype(dtype)?, sizes.to_dtype(dtype)?],
                    1,
                )?;
                emb + add_embedding.forward(&input)?
            }
            (Some(_), None) => candle_core::bail!(
                "this UNet needs SDXL's added conditioning (pooled text embeddings and time ids)"
            ),
            (None, _) => Ok(emb),
        }
    }

    /// Predict noise (or v) for `sample` (B, C, H, W) at `timestep` given the
    /// text `context` (B, T, cross_attention_dim).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let emb = self.embedding(timestep, batch, added)?;
        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                x = resnet.forward_with_time(&x, Some(&emb))?;
                if let Some(attention) = level.attentions.get(j) {
                    x = attention.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(downsample) = &level.downsample {
                x = downsample.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward_with_time(&x, Some(&emb))?;
        x = self.mid_attention.forward(&x, context)?;
        x = self.mid_resnets[1].forward_with_time(&x, Some(&emb))?;
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::msg("UNet skip connections ran out"))?;
                x = resnet.forward_with_time(&Tensor::cat(&[&x, &skip], 1)?, Some(&emb))?;
                if let Some(attention) = level.attentions.get(j) {
                    x = attention.forward(&x, context)?;
                }
            }
            if let Some(upsample) = &level.upsample {
                // The next skip sets the size (odd sizes round up going down).
                let (h, w) = match skips.last() {
                    Some(next) => (next.dim(2)?, next.dim(3)?),
                    None => (2 * x.dim(2)?, 2 * x.dim(3)?),
                };
                x = upsample.forward_to(&x, h, w)?;
            }
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }

    /// The spatial transformers' linear layers by name (LoRA targets).
    pub fn linear_names(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        let _ = self.for_each_linear(&mut |linear| {
            names.extend(linear.name().map(str::to_string));
            Ok(())
        });
        names
    }

    /// Call `f` on every linear layer of the spatial transformers (LoRA targets).
    pub fn for_each_linear(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        for level in self.down.iter_mut().chain(self.up.iter_mut()) {
            for attention in &mut level.attentions {
                attention.for_each_linear(f)?;
            }
        }
        self.mid_attention.for_each_linear(f)
    }
}
