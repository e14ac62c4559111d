//! The FLUX.2 transformer with diffusers' semantics (Flux2Transformer2DModel):
//! no biases anywhere; one image and one text modulation shared by every
//! double-stream block and one shared by every single-stream block, computed
//! once per forward; SwiGLU feed-forwards; single-stream blocks with one fused
//! q/k/v + MLP input projection; RoPE over 4-axis position ids.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::activation;
use kiln_engine::nn::{Linear, RmsNorm, attention, layer_norm_plain, timestep_embedding};

use super::config::Flux2Config;
use crate::flux::model::{
    MlpEmbedder, QkvProjection, Rope, Visit, joint_attention, merge_heads, modulate,
};

/// `silu(x[.., :h]) · x[.., h:]` for `x` of width 2h.
fn swiglu(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    activation::silu(&x.narrow(D::Minus1, 0, half)?)? * x.narrow(D::Minus1, half, half)?
}

/// `linear_out(swiglu(linear_in(x)))`.
struct FeedForward {
    linear_in: Linear,
    linear_out: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(FeedForward {
            linear_in: Linear::load(&vb.pp("linear_in"), dim, 2 * hidden, false)?,
            linear_out: Linear::load(&vb.pp("linear_out"), hidden, dim, false)?,
        })
    }

    fn visit(&mut self, f: Visit) -> Result<()> {
        f(&mut self.linear_in)?;
        f(&mut self.linear_out)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_out
            .forward(&swiglu(&self.linear_in.forward(x)?)?)
    }
}

/// `linear(silu(temb))`, split by the blocks into (shift, scale, gate) sets.
struct Modulation {
    linear: Linear,
    n: usize,
}

impl Modulation {
    fn load(vb: VarBuilder, dim: usize, sets: usize) -> Result<Self> {
        Ok(Modulation {
            linear: Linear::load(&vb.pp("linear"), dim, 3 * sets * dim, false)?,
            n: 3 * sets,
        })
    }

    /// The modulation vectors, each (B, dim).
    fn chunks(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear
            .forward(&activation::silu(temb)?)?
            .chunk(self.n, D::Minus1)
    }
}

/// A double-stream block: image and text have their own weights, attend jointly.
struct DoubleBlock {
    image: QkvProjection,
    text: QkvProjection,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
    eps: f64,
}

impl DoubleBlock {
    fn load(vb: VarBuilder, config: &Flux2Config) -> Result<Self> {
        let dim = config.inner_dim();
        let head_dim = config.attention_head_dim;
        let attn = vb.pp("attn");
        let norm = (false, config.eps);
        Ok(DoubleBlock {
            image: QkvProjection::load(
                &attn,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                head_dim,
                norm,
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
                norm,
            )?,
            to_out: Linear::load(&attn.pp("to_out.0"), dim, dim, false)?,
            to_add_out: Linear::load(&attn.pp("to_add_out"), dim, dim, false)?,
            ff: FeedForward::load(vb.pp("ff"), dim, config.mlp_hidden_dim())?,
            ff_context: FeedForward::load(vb.pp("ff_context"), dim, config.mlp_hidden_dim())?,
            heads: config.num_attention_heads,
            eps: config.eps,
        })
    }

    /// `m` and `c`: the shared image and text modulations (6 vectors each).
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        (m, c): (&[Tensor], &[Tensor]),
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let eps = self.eps;
        let img_normed = modulate(&layer_norm_plain(img, eps)?, &m[0], &m[1])?;
        let txt_normed = modulate(&layer_norm_plain(txt, eps)?, &c[0], &c[1])?;
        let (txt_attn, img_attn) = joint_attention(
            (&self.image, &img_normed),
            (&self.text, &txt_normed),
            self.heads,
            rope,
        )?;
        let gated = |x: Tensor, gate: &Tensor| x.broadcast_mul(&gate.unsqueeze(1)?);
        let img = (img + gated(self.to_out.forward(&img_attn)?, &m[2])?)?;
        let img_mlp_in = modulate(&layer_norm_plain(&img, eps)?, &m[3], &m[4])?;
        let img = (&img + gated(self.ff.forward(&img_mlp_in)?, &m[5])?)?;
        let txt = (txt + gated(self.to_add_out.forward(&txt_attn)?, &c[2])?)?;
        let txt_mlp_in = modulate(&layer_norm_plain(&txt, eps)?, &c[3], &c[4])?;
        let txt = (&txt + gated(self.ff_context.forward(&txt_mlp_in)?, &c[5])?)?;
        Ok((img, txt))
    }

    fn visit(&mut self, f: Visit) -> Result<()> {
        self.image.visit(f)?;
        self.text.visit(f)?;
        f(&mut self.to_out)?;
        f(&mut self.to_add_out)?;
        self.ff.visit(f)?;
        self.ff_context.visit(f)
    }
}

/// A single-stream block over [text; image]: one projection gives q, k, v and
/// the MLP's gate and value; one projection maps [attention; MLP] back.
struct SingleBlock {
    to_qkv_mlp_proj: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    to_out: Linear,
    heads: usize,
    inner: usize,
    eps: f64,
}

impl SingleBlock {
    fn load(vb: VarBuilder, config: &Flux2Config) -> Result<Self> {
        let dim = config.inner_dim();
        let mlp = config.mlp_hidden_dim();
        let attn = vb.pp("attn");
        Ok(SingleBlock {
            to_qkv_mlp_proj: Linear::load(
                &attn.pp("to_qkv_mlp_proj"),
                dim,
                3 * dim + 2 * mlp,
                false,
            )?,
            norm_q: RmsNorm::load(&attn.pp("norm_q"), config.attention_head_dim, config.eps)?,
            norm_k: RmsNorm::load(&attn.pp("norm_k"), config.attention_head_dim, config.eps)?,
            to_out: Linear::load(&attn.pp("to_out"), dim + mlp, dim, false)?,
            heads: config.num_attention_heads,
            inner: dim,
            eps: config.eps,
        })
    }

    /// `m`: the shared single-stream modulation (shift, scale, gate).
    fn forward(&self, x: &Tensor, m: &[Tensor], rope: &Rope) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let normed = modulate(&layer_norm_plain(x, self.eps)?, &m[0], &m[1])?;
        let projected = self.to_qkv_mlp_proj.forward(&normed)?;
        let inner = self.inner;
        let heads = |start: usize| -> Result<Tensor> {
            projected
                .narrow(D::Minus1, start, inner)?
                .reshape((b, s, self.heads, ()))?
                .transpose(1, 2)
        };
        let q = rope.apply(&self.norm_q.forward(&heads(0)?)?)?;
        let k = rope.apply(&self.norm_k.forward(&heads(inner)?)?)?;
        let v = heads(2 * inner)?;
        let attn = merge_heads(&attention(&q, &k, &v, None)?)?;
        let mlp_width = projected.dim(D::Minus1)? - 3 * inner;
        let mlp = swiglu(&projected.narrow(D::Minus1, 3 * inner, mlp_width)?)?;
        let out = self
            .to_out
            .forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        x + out.broadcast_mul(&m[2].unsqueeze(1)?)?
    }

    fn visit(&mut self, f: Visit) -> Result<()> {
        f(&mut self.to_qkv_mlp_proj)?;
        f(&mut self.to_out)
    }
}

/// The FLUX.2 transformer.
pub struct Flux2Transformer {
    config: Flux2Config,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    modulation_img: Modulation,
    modulation_txt: Modulation,
    modulation_single: Modulation,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl Flux2Transformer {
    /// Load with diffusers' names from `vb` (use a key adapter for BFL's).
    pub fn load(vb: VarBuilder, config: Flux2Config) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let dim = config.inner_dim();
        let channels = config.timestep_guidance_channels;
        let embed = vb.pp("time_guidance_embed");
        let guidance_embedder = if config.guidance_embeds {
            Some(MlpEmbedder::load(
                embed.pp("guidance_embedder"),
                channels,
                dim,
                false,
            )?)
        } else {
            None
        };
        Ok(Flux2Transformer {
            x_embedder: Linear::load(&vb.pp("x_embedder"), config.in_channels, dim, false)?,
            context_embedder: Linear::load(
                &vb.pp("context_embedder"),
                config.joint_attention_dim,
                dim,
                false,
            )?,
            timestep_embedder: MlpEmbedder::load(
                embed.pp("timestep_embedder"),
                channels,
                dim,
                false,
            )?,
            guidance_embedder,
            modulation_img: Modulation::load(vb.pp("double_stream_modulation_img"), dim, 2)?,
            modulation_txt: Modulation::load(vb.pp("double_stream_modulation_txt"), dim, 2)?,
            modulation_single: Modulation::load(vb.pp("single_stream_modulation"), dim, 1)?,
            double_blocks: (0..config.num_layers)
                .map(|i| DoubleBlock::load(vb.pp("transformer_blocks").pp(i), &config))
                .collect::<Result<_>>()?,
            single_blocks: (0..config.num_single_layers)
                .map(|i| SingleBlock::load(vb.pp("single_transformer_blocks").pp(i), &config))
                .collect::<Result<_>>()?,
            norm_out: Linear::load(&vb.pp("norm_out.linear"), dim, 2 * dim, false)?,
            proj_out: Linear::load(&vb.pp("proj_out"), dim, config.out_dim(), false)?,
            config,
        })
    }

    pub fn config(&self) -> &Flux2Config {
        &self.config
    }

    /// Predict the flow velocity for image tokens `img` (B, N, in_channels)
    /// under text `txt` (B, T, joint_attention_dim).
    ///
    /// `ids` are the 4-axis positions of the text tokens, then the image
    /// tokens; `timestep` is sigma in [0, 1] per sample (scaled by 1000
    /// inside, as diffusers does); `guidance` is used only by models with a
    /// guidance embedding (FLUX.2-klein has none; its pipeline passes none).
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        ids: &[[f64; 4]],
        timestep: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = img.dtype();
        let channels = self.config.timestep_guidance_channels;
        let embed = |t: &Tensor| -> Result<Tensor> {
            timestep_embedding(&(t.to_dtype(dtype)? * 1000.0)?, channels)?.to_dtype(dtype)
        };
        let mut temb = self.timestep_embedder.forward(&embed(timestep)?)?;
        if let (Some(embedder), Some(guidance)) = (&self.guidance_embedder, guidance) {
            temb = (temb + embedder.forward(&embed(guidance)?)?)?;
        }
        let m = self.modulation_img.chunks(&temb)?;
        let c = self.modulation_txt.chunks(&temb)?;
        let single = self.modulation_single.chunks(&temb)?;
        let rope = Rope::new(
            ids,
            &self.config.axes_dims_rope,
            self.config.rope_theta,
            img.device(),
        )?;
        let mut img = self.x_embedder.forward(img)?;
        let mut txt = self.context_embedder.forward(txt)?;
        if ids.len() != img.dim(1)? + txt.dim(1)? {
            candle_core::bail!(
                "{} position ids for {} text and {} image tokens",
                ids.len(),
                txt.dim(1)?,
                img.dim(1)?
            );
        }
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, (&m, &c), &rope)?;
        }
        let text_len = txt.dim(1)?;
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            joint = block.forward(&joint, &single, &rope)?;
        }
        let img = joint.narrow(1, text_len, joint.dim(1)? - text_len)?;
        let out = self
            .norm_out
            .forward(&activation::silu(&temb)?)?
            .chunk(2, D::Minus1)?;
        let (scale, shift) = (&out[0], &out[1]);
        self.proj_out.forward(&modulate(
            &layer_norm_plain(&img, self.config.eps)?,
            shift,
            scale,
        )?)
    }

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
        f(&mut self.context_embedder)?;
        self.timestep_embedder.visit(f)?;
        if let Some(guidance) = &mut self.guidance_embedder {
            guidance.visit(f)?;
        }
        f(&mut self.modulation_img.linear)?;
        f(&mut self.modulation_txt.linear)?;
        f(&mut self.modulation_single.linear)?;
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
