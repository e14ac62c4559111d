//! The UNet's spatial transformer with diffusers' names and formulas:
//! `Transformer2DModel` (GroupNorm, linear or 1×1-conv projections in and
//! out) over `BasicTransformerBlock`s (LayerNorm → self-attention, LayerNorm →
//! cross-attention on the text, LayerNorm → GEGLU feed-forward with exact GELU,
//! each residual).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::activation;
use kiln_engine::conv::Conv2d;
use kiln_engine::group_norm::GroupNorm;
use kiln_engine::nn::{LayerNorm, Linear, attention};

/// Queries per attention chunk: bounds the score matrix of large images.
const ATTENTION_CHUNK: usize = 4096;

/// diffusers' `Attention` (no bias on q/k/v, bias on `to_out.0`).
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Attention {
            to_q: Linear::load(&vb.pp("to_q"), dim, dim, false)?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::load(&vb.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, s, dim) = x.dims3()?;
        let head_dim = dim / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            let len = t.dim(1)?;
            t.reshape((b, len, self.heads, head_dim))?.transpose(1, 2)
        };
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(context)?)?;
        let v = split(self.to_v.forward(context)?)?;
        let out = attention(&q, &k, &v, Some(ATTENTION_CHUNK))?
            .transpose(1, 2)?
            .reshape((b, s, dim))?;
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward: `net.2(h · gelu(gate))` where `(h, gate) = net.0.proj(x)`.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::load(&vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(x)?;
        let half = projected.dim(candle_core::D::Minus1)? / 2;
        let hidden = projected.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = projected.narrow(candle_core::D::Minus1, half, half)?;
        self.out.forward(&(hidden * activation::gelu_erf(&gate)?)?)
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, eps)?,
            attn1: Attention::load(vb.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, eps)?,
            attn2: Attention::load(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, eps)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let normed = self.norm1.forward(x)?;
        let x = (x + self.attn1.forward(&normed, &normed)?)?;
        let x = (&x + self.attn2.forward(&self.norm2.forward(&x)?, context)?)?;
        &x + self.ff.forward(&self.norm3.forward(&x)?)?
    }
}

/// Projection in or out of the transformer: Linear (SDXL) or 1×1 conv (SD 1.x).
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel` for continuous inputs.
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// What a spatial transformer is built from.
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub eps: f64,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn load(vb: VarBuilder, spec: &TransformerSpec) -> Result<Self> {
        let c = spec.channels;
        let projection = |name: &str| -> Result<Projection> {
            if spec.linear_projection {
                Ok(Projection::Linear(Linear::load(&vb.pp(name), c, c, true)?))
            } else {
                Ok(Projection::Conv(Conv2d::load(&vb.pp(name), c, c, 1, 1, 0)?))
            }
        };
        Ok(Transformer2D {
            // diffusers builds this norm with ε = 1e-6 whatever the config says.
            norm: GroupNorm::load(&vb.pp("norm"), spec.groups, c, 1e-6)?,
            proj_in: projection("proj_in")?,
            blocks: (0..spec.layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        vb.pp("transformer_blocks").pp(i),
                        c,
                        spec.context_dim,
                        spec.heads,
                        spec.eps,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let tokens =
            |t: Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let mut hidden = match &self.proj_in {
            Projection::Linear(linear) => linear.forward(&tokens(normed)?)?,
            Projection::Conv(conv) => tokens(conv.forward(&normed)?)?,
        };
        for block in &self.blocks {
            hidden = block.forward(&hidden, context)?;
        }
        let image = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            Projection::Linear(linear) => image(linear.forward(&hidden)?)?,
            Projection::Conv(conv) => conv.forward(&image(hidden)?)?,
        };
        out + x
    }

    /// Call `f` on every linear layer (LoRA targets).
    pub fn for_each_linear(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        for projection in [&mut self.proj_in, &mut self.proj_out] {
            if let Projection::Linear(linear) = projection {
                f(linear)?;
            }
        }
        for block in &mut self.blocks {
            for attn in [&mut block.attn1, &mut block.attn2] {
                for linear in [
                    &mut attn.to_q,
                    &mut attn.to_k,
                    &mut attn.to_v,
                    &mut attn.to_out,
                ] {
                    f(linear)?;
                }
            }
            f(&mut block.ff.proj)?;
            f(&mut block.ff.out)?;
        }
        Ok(())
    }
}
