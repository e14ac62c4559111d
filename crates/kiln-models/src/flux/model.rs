//! The FLUX transformer with diffusers' semantics: timestep/guidance/pooled-text
//! conditioning, double-stream blocks (separate image and text weights, joint
//! attention), single-stream blocks (fused attention + MLP), RoPE over 3-axis
//! position ids, and the adaptive output norm.

use candle_core::{D, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::activation;
use kiln_engine::nn::{Linear, RmsNorm, attention, layer_norm_plain, timestep_embedding};

use super::config::FluxConfig;

const NORM_EPS: f64 = 1e-6;

/// `linear_2(silu(linear_1(x)))`.
pub(crate) struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    pub(crate) fn load(vb: VarBuilder, in_dim: usize, dim: usize, bias: bool) -> Result<Self> {
        Ok(MlpEmbedder {
            linear_1: Linear::load(&vb.pp("linear_1"), in_dim, dim, bias)?,
            linear_2: Linear::load(&vb.pp("linear_2"), dim, dim, bias)?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&activation::silu(&self.linear_1.forward(x)?)?)
    }
}

/// RoPE tables: `cos`/`sin` of shape (seq, head_dim / 2), one angle per
/// interleaved pair, computed in f64 as diffusers does.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// From position ids (one row of as many coordinates as `axes` has per
    /// token: FLUX.1 three, FLUX.2 four), the RoPE base and per-axis dims.
    pub fn new<P: AsRef<[f64]>>(
        ids: &[P],
        axes: &[usize],
        theta: f64,
        device: &Device,
    ) -> Result<Self> {
        let half: usize = axes.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for position in ids {
            let position = position.as_ref();
            if position.len() != axes.len() {
                candle_core::bail!(
                    "a position id has {} coordinates, the RoPE has {} axes",
                    position.len(),
                    axes.len()
                );
            }
            for (axis, &dim) in axes.iter().enumerate() {
                for i in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                    let (s, c) = (position[axis] * freq).sin_cos();
                    cos.push(c as f32);
                    sin.push(s as f32);
                }
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (ids.len(), half), device)?,
            sin: Tensor::from_vec(sin, (ids.len(), half), device)?,
        })
    }

    /// Rotate interleaved pairs of `x` (batch, heads, seq, head_dim) with candle's
    /// fused kernel: `(x0·c − x1·s, x1·c + x0·s)`.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        candle_nn::rotary_emb::rope_i(
            &x.contiguous()?,
            &self.cos.to_dtype(dtype)?,
            &self.sin.to_dtype(dtype)?,
        )
    }
}

/// Position ids as FluxPipeline builds them: text ids all zero, image ids
/// `(0, row, col)` over the packed latent grid.
pub fn position_ids(text_len: usize, grid_h: usize, grid_w: usize) -> Vec<[f64; 3]> {
    let mut ids = vec![[0.0; 3]; text_len];
    for row in 0..grid_h {
        for col in 0..grid_w {
            ids.push([0.0, row as f64, col as f64]);
        }
    }
    ids
}

/// `(B, C, H, W)` latents → `(B, H/2·W/2, 4C)` tokens (2×2 patches).
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack_latents`] for a latent grid of `h × w`.
pub fn unpack_latents(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, d) = tokens.dims3()?;
    let c = d / 4;
    tokens
        .reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}

/// `x * (1 + scale) + shift` with per-sample modulation vectors.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `linear(silu(emb))` chunked into `n` modulation vectors.
struct Modulation {
    linear: Linear,
    n: usize,
}

impl Modulation {
    fn load(vb: VarBuilder, dim: usize, n: usize) -> Result<Self> {
        Ok(Modulation {
            linear: Linear::load(&vb.pp("linear"), dim, n * dim, true)?,
            n,
        })
    }

    fn chunks(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear
            .forward(&activation::silu(temb)?)?
            .chunk(self.n, D::Minus1)
    }
}

/// GELU(tanh) MLP: `net.0.proj` then `net.2`.
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(FeedForward {
            proj_in: Linear::load(&vb.pp("net.0.proj"), dim, hidden, true)?,
            proj_out: Linear::load(&vb.pp("net.2"), hidden, dim, true)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out
            .forward(&activation::gelu_tanh(&self.proj_in.forward(x)?)?)
    }
}

/// Query/key/value projections with per-head RMS norms.
pub(crate) struct QkvProjection {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl QkvProjection {
    pub(crate) fn load(
        vb: &VarBuilder,
        names: [&str; 5],
        dim: usize,
        head_dim: usize,
        (bias, eps): (bool, f64),
    ) -> Result<Self> {
        Ok(QkvProjection {
            q: Linear::load(&vb.pp(names[0]), dim, dim, bias)?,
            k: Linear::load(&vb.pp(names[1]), dim, dim, bias)?,
            v: Linear::load(&vb.pp(names[2]), dim, dim, bias)?,
            norm_q: RmsNorm::load(&vb.pp(names[3]), head_dim, eps)?,
            norm_k: RmsNorm::load(&vb.pp(names[4]), head_dim, eps)?,
        })
    }

    /// (B, S, dim) → three (B, heads, S, head_dim) tensors, q and k normalised.
    pub(crate) fn project(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, heads, ())).map(|t| t.transpose(1, 2));
        let q = self.norm_q.forward(&split(self.q.forward(x)?)??)?;
        let k = self.norm_k.forward(&split(self.k.forward(x)?)??)?;
        let v = split(self.v.forward(x)?)??;
        Ok((q, k, v))
    }
}

pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// A double-stream block's attention: image and text projected with their own
/// weights, attended jointly as [text; image] under RoPE, and split back into
/// (text, image) outputs of shape (B, S, heads · head_dim).
pub(crate) fn joint_attention(
    (image, img): (&QkvProjection, &Tensor),
    (text, txt): (&QkvProjection, &Tensor),
    heads: usize,
    rope: &Rope,
) -> Result<(Tensor, Tensor)> {
    let (iq, ik, iv) = image.project(img, heads)?;
    let (tq, tk, tv) = text.project(txt, heads)?;
    let q = rope.apply(&Tensor::cat(&[tq, iq], 2)?)?;
    let k = rope.apply(&Tensor::cat(&[tk, ik], 2)?)?;
    let v = Tensor::cat(&[tv, iv], 2)?;
    let joint = merge_heads(&attention(&q, &k, &v, None)?)?;
    let text_len = txt.dim(1)?;
    Ok((
        joint.narrow(1, 0, text_len)?,
        joint.narrow(1, text_len, joint.dim(1)? - text_len)?,
    ))
}

/// A double-stream block: image and text have their own weights, attend jointly.
struct DoubleBlock {
    norm1: Modulation,
    norm1_context: Modulation,
    image: QkvProjection,
    text: QkvProjection,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl DoubleBlock {
    fn load(vb: VarBuilder, config: &FluxConfig) -> Result<Self> {
        let dim = config.inner_dim();
        let head_dim = config.attention_head_dim;
        let attn = vb.pp("attn");
        Ok(DoubleBlock {
            norm1: Modulation::load(vb.pp("norm1"), dim, 6)?,
            norm1_context: Modulation::load(vb.pp("norm1_context"), dim, 6)?,
            image: QkvProjection::load(
                &attn,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                head_dim,
                (true, NORM_EPS),
            )?,
            text: QkvProjection::load(
                &attn,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                dim,
                head_dim,
                (true, NORM_EPS),
            )?,
            to_out: Linear::load(&attn.pp("to_out.0"), dim, dim, true)?,
            to_add_out: Linear::load(&attn.pp("to_add_out"), dim, dim, true)?,
            ff: FeedForward::load(vb.pp("ff"), dim, config.mlp_dim())?,
            ff_context: FeedForward::load(vb.pp("ff_context"), dim, config.mlp_dim())?,
            heads: config.num_attention_heads,
        })
    }

    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.norm1.chunks(temb)?;
        let c = self.norm1_context.chunks(temb)?;
        let img_normed = modulate(&layer_norm_plain(img, NORM_EPS)?, &m[0], &m[1])?;
        let txt_normed = modulate(&layer_norm_plain(txt, NORM_EPS)?, &c[0], &c[1])?;
        let (txt_attn, img_attn) = joint_attention(
            (&self.image, &img_normed),
            (&self.text, &txt_normed),
            self.heads,
            rope,
        )?;

        let img = (img
            + self
                .to_out
                .forward(&img_attn)?
                .broadcast_mul(&m[2].unsqueeze(1)?)?)?;
        let img_mlp_in = modulate(&layer_norm_plain(&img, NORM_EPS)?, &m[3], &m[4])?;
        let img = (&img
            + self
                .ff
                .forward(&img_mlp_in)?
                .broadcast_mul(&m[5].unsqueeze(1)?)?)?;

        let txt = (txt
            + self
                .to_add_out
                .forward(&txt_attn)?
                .broadcast_mul(&c[2].unsqueeze(1)?)?)?;
        let txt_mlp_in = modulate(&layer_norm_plain(&txt, NORM_EPS)?, &c[3], &c[4])?;
        let txt = (&txt
            + self
                .ff_context
                .forward(&txt_mlp_in)?
                .broadcast_mul(&c[5].unsqueeze(1)?)?)?;
        Ok((img, txt))
    }
}

/// A single-stream block over the concatenated [text; image] sequence.
struct SingleBlock {
    norm: Modulation,
    qkv: QkvProjection,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    fn load(vb: VarBuilder, config: &FluxConfig) -> Result<Self> {
        let dim = config.inner_dim();
        Ok(SingleBlock {
            norm: Modulation::load(vb.pp("norm"), dim, 3)?,
            qkv: QkvProjection::load(
                &vb.pp("attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                config.attention_head_dim,
                (true, NORM_EPS),
            )?,
            proj_mlp: Linear::load(&vb.pp("proj_mlp"), dim, config.mlp_dim(), true)?,
            proj_out: Linear::load(&vb.pp("proj_out"), dim + config.mlp_dim(), dim, true)?,
            heads: config.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        let m = self.norm.chunks(temb)?;
        let normed = modulate(&layer_norm_plain(x, NORM_EPS)?, &m[0], &m[1])?;
        let mlp = activation::gelu_tanh(&self.proj_mlp.forward(&normed)?)?;
        let (q, k, v) = self.qkv.project(&normed, self.heads)?;
        let attn = merge_heads(&attention(&rope.apply(&q)?, &rope.apply(&k)?, &v, None)?)?;
        let out = self
            .proj_out
            .forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        x + out.broadcast_mul(&m[2].unsqueeze(1)?)?
    }
}

/// The FLUX.1 transformer.
pub struct FluxTransformer {
    config: FluxConfig,
    x_embedder: Linear,
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
    context_embedder: Linear,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    /// Load with diffusers' names from `vb` (use a key adapter for other layouts).
    pub fn load(vb: VarBuilder, config: FluxConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let dim = config.inner_dim();
        let embed = vb.pp("time_text_embed");
        let guidance_embedder = if config.guidance_embeds {
            Some(MlpEmbedder::load(
                embed.pp("guidance_embedder"),
                256,
                dim,
                true,
            )?)
        } else {
            None
        };
        Ok(FluxTransformer {
            x_embedder: Linear::load(&vb.pp("x_embedder"), config.in_channels, dim, true)?,
            timestep_embedder: MlpEmbedder::load(embed.pp("timestep_embedder"), 256, dim, true)?,
            guidance_embedder,
            text_embedder: MlpEmbedder::load(
                embed.pp("text_embedder"),
                config.pooled_projection_dim,
                dim,
                true,
            )?,
            context_embedder: Linear::load(
                &vb.pp("context_embedder"),
                config.joint_attention_dim,
                dim,
                true,
            )?,
            double_blocks: (0..config.num_layers)
                .map(|i| DoubleBlock::load(vb.pp("transformer_blocks").pp(i), &config))
                .collect::<Result<_>>()?,
            single_blocks: (0..config.num_single_layers)
                .map(|i| SingleBlock::load(vb.pp("single_transformer_blocks").pp(i), &config))
                .collect::<Result<_>>()?,
            norm_out: Linear::load(&vb.pp("norm_out.linear"), dim, 2 * dim, true)?,
            proj_out: Linear::load(&vb.pp("proj_out"), dim, config.out_dim(), true)?,
            config,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Predict the flow velocity for packed image tokens.
    ///
    /// `timestep` is sigma in [0, 1] per sample (scaled by 1000 inside, as diffusers
    /// does after the pipeline divides by 1000); `guidance` is required for models
    /// with a guidance embedding and ignored otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        ids: &[[f64; 3]],
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let dtype = img.dtype();
        let mut temb = self
            .timestep_embedder
            .forward(&timestep_embedding(&(timestep * 1000.0)?, 256)?.to_dtype(dtype)?)?;
        if let Some(embedder) = &self.guidance_embedder {
            let guidance = guidance
                .ok_or_else(|| candle_core::Error::msg("this FLUX model needs a guidance value"))?;
            temb = (temb
                + embedder
                    .forward(&timestep_embedding(&(guidance * 1000.0)?, 256)?.to_dtype(dtype)?)?)?;
        }
        let temb = (temb + self.text_embedder.forward(pooled)?)?;
        let rope = Rope::new(
            ids,
            &self.config.axes_dims_rope,
            self.config.rope_theta,
            img.device(),
        )?;
        let mut img = self.x_embedder.forward(img)?;
        let mut txt = self.context_embedder.forward(txt)?;
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &temb, &rope)?;
        }
        let text_len = txt.dim(1)?;
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            joint = block.forward(&joint, &temb, &rope)?;
        }
        let img = joint.narrow(1, text_len, joint.dim(1)? - text_len)?;
        let out = self
            .norm_out
            .forward(&activation::silu(&temb)?)?
            .chunk(2, D::Minus1)?;
        let (scale, shift) = (&out[0], &out[1]);
        self.proj_out
            .forward(&modulate(&layer_norm_plain(&img, NORM_EPS)?, shift, scale)?)
    }
}

/// Visits every linear layer, mutably (fused LoRA merge and unmerge).
pub(crate) type Visit<'a> = &'a mut dyn FnMut(&mut Linear) -> Result<()>;

impl MlpEmbedder {
    pub(crate) fn visit(&mut self, f: Visit) -> Result<()> {
        f(&mut self.linear_1)?;
        f(&mut self.linear_2)
    }
}

impl FeedForward {
    fn visit(&mut self, f: Visit) -> Result<()> {
        f(&mut self.proj_in)?;
        f(&mut self.proj_out)
    }
}

impl QkvProjection {
    pub(crate) fn visit(&mut self, f: Visit) -> Result<()> {
        f(&mut self.q)?;
        f(&mut self.k)?;
        f(&mut self.v)
    }
}

impl DoubleBlock {
    fn visit(&mut self, f: Visit) -> Result<()> {
        f(&mut self.norm1.linear)?;
        f(&mut self.norm1_context.linear)?;
        self.image.visit(f)?;
        self.text.visit(f)?;
        f(&mut self.to_out)?;
        f(&mut self.to_add_out)?;
        self.ff.visit(f)?;
        self.ff_context.visit(f)
    }
}

impl SingleBlock {
    fn visit(&mut self, f: Visit) -> Result<()> {
        f(&mut self.norm.linear)?;
        self.qkv.visit(f)?;
        f(&mut self.proj_mlp)?;
        f(&mut self.proj_out)
    }
}

impl FluxTransformer {
    /// The (diffusers) names of every linear layer: what LoRA adapters target.
    pub fn linear_names(&mut self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        self.for_each_linear(&mut |linear| {
            names.extend(linear.name().map(str::to_string));
            Ok(())
        })?;
        Ok(names)
    }

    /// Call `f` on every linear layer (for fused LoRAs: merge, then unmerge).
    pub fn for_each_linear(&mut self, f: Visit) -> Result<()> {
        f(&mut self.x_embedder)?;
        self.timestep_embedder.visit(f)?;
        if let Some(guidance) = &mut self.guidance_embedder {
            guidance.visit(f)?;
        }
        self.text_embedder.visit(f)?;
        f(&mut self.context_embedder)?;
        for block in &mut self.double_blocks {
            block.visit(f)?;
        }
        for block in &mut self.single_blocks {
            block.visit(f)?;
        }
        f(&mut self.norm_out)?;
        f(&mut self.proj_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips() {
        let device = Device::Cpu;
        let latents = Tensor::arange(0f32, 2.0 * 16.0 * 4.0 * 6.0, &device)
            .unwrap()
            .reshape((2, 16, 4, 6))
            .unwrap();
        let packed = pack_latents(&latents).unwrap();
        assert_eq!(packed.dims(), &[2, 6, 64]);
        let back = unpack_latents(&packed, 4, 6).unwrap();
        let diff = (back - latents)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn position_ids_put_text_first_then_the_image_grid() {
        let ids = position_ids(2, 2, 3);
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[0], [0.0, 0.0, 0.0]);
        assert_eq!(ids[2 + 4], [0.0, 1.0, 1.0]);
    }
}
