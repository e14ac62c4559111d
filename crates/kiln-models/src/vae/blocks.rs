//! AutoencoderKL building blocks with diffusers' formulas and weight names:
//! ResnetBlock2D, Downsample2D (asymmetric pad), Upsample2D (nearest ×2), the
//! single-head mid-block attention and UNetMidBlock2D.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::activation;
use kiln_engine::conv::Conv2d;
use kiln_engine::group_norm::GroupNorm;
use kiln_engine::nn::{Linear, attention};

/// diffusers builds every VAE norm with this epsilon.
pub const NORM_EPS: f64 = 1e-6;

/// Queries per attention chunk in the mid block: bounds the score matrix at
/// `ATTENTION_CHUNK × tokens` (the mid block of a 1024² image has 16384 tokens).
const ATTENTION_CHUNK: usize = 4096;

/// A `kernel × kernel` convolution with bias, stride 1 unless told.
pub fn conv(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    Conv2d::load(&vb, in_channels, out_channels, kernel, stride, padding)
}

pub fn norm(vb: VarBuilder, groups: usize, channels: usize) -> Result<GroupNorm> {
    GroupNorm::load(&vb, groups, channels, NORM_EPS)
}

/// diffusers' `ResnetBlock2D`: norm1 → SiLU → conv1 → (+ `time_emb_proj` of
/// SiLU(time embedding), UNets only) → norm2 → SiLU → (dropout) → conv2, plus
/// the input (through a 1×1 `conv_shortcut` when the channel count changes);
/// output scale factor 1.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// A VAE block (no time embedding, norms with ε = 1e-6).
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
    ) -> Result<Self> {
        Self::load_with_time(vb, in_channels, out_channels, groups, NORM_EPS, None)
    }

    /// A block with norms of `eps` and, with `time_channels`, a time-embedding projection.
    pub fn load_with_time(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
        eps: f64,
        time_channels: Option<usize>,
    ) -> Result<Self> {
        let shortcut = if in_channels != out_channels {
            Some(conv(
                vb.pp("conv_shortcut"),
                in_channels,
                out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let time_emb_proj = time_channels
            .map(|channels| Linear::load(&vb.pp("time_emb_proj"), channels, out_channels, true))
            .transpose()?;
        Ok(ResnetBlock {
            norm1: GroupNorm::load(&vb.pp("norm1"), groups, in_channels, eps)?,
            conv1: conv(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(&vb.pp("norm2"), groups, out_channels, eps)?,
            conv2: conv(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            shortcut,
        })
    }
}

impl ResnetBlock {
    /// The block on `x` with the (un-activated) time embedding `time` (B, T).
    pub fn forward_with_time(&self, x: &Tensor, time: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        let mut h = self.conv1.forward(&h)?;
        if let (Some(projection), Some(time)) = (&self.time_emb_proj, time) {
            let t = projection.forward(&activation::silu(time)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.norm2.forward_silu(&h)?;
        let h = self.conv2.forward(&h)?;
        let residual = match &self.shortcut {
            Some(shortcut) => shortcut.forward(x)?,
            None => x.clone(),
        };
        residual + h
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_time(x, None)
    }
}

/// diffusers' `Downsample2D` with `padding=0`: pad right and bottom by one
/// (zeros), then a 3×3 stride-2 convolution.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Downsample {
            conv: conv(vb.pp("conv"), channels, channels, 3, 2, 0)?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&x)
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour ×2, then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Upsample {
            conv: conv(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }
}

impl Upsample {
    /// Nearest-neighbour to `(height, width)` (a UNet matching an odd-sized
    /// skip connection), then the convolution.
    pub fn forward_to(&self, x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        self.conv.forward(&x.upsample_nearest2d(height, width)?)
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.forward_to(x, 2 * h, 2 * w)
    }
}

/// A `channels × channels` projection stored either as a Linear weight
/// (diffusers, `(C, C)`) or as a 1×1 convolution (ldm/BFL, `(C, C, 1, 1)`).
fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    let weight = vb.get_unchecked("weight")?;
    let weight = match weight.dims() {
        [o, i] if *o == channels && *i == channels => weight,
        [o, i, 1, 1] if *o == channels && *i == channels => weight.reshape((channels, channels))?,
        found => candle_core::bail!(
            "tensor \"{}.weight\" has shape {found:?}, the model expects [{channels}, {channels}] \
             (or a [{channels}, {channels}, 1, 1] 1x1 convolution)",
            vb.prefix()
        ),
    };
    let bias = vb.get(channels, "bias")?;
    Linear::from_parts(weight, Some(bias))
}

/// The mid block's attention (diffusers `Attention` built from the deprecated
/// attention block): GroupNorm, every pixel a token, one head of width C
/// (scale 1/√C), output projection, residual; rescale factor 1.
#[derive(Debug, Clone)]
pub struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    pub fn load(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(MidAttention {
            group_norm: norm(vb.pp("group_norm"), groups, channels)?,
            to_q: projection(vb.pp("to_q"), channels)?,
            to_k: projection(vb.pp("to_k"), channels)?,
            to_v: projection(vb.pp("to_v"), channels)?,
            to_out: projection(vb.pp("to_out").pp("0"), channels)?,
        })
    }
}

impl Module for MidAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let heads = |t: Tensor| t.unsqueeze(1);
        let q = heads(self.to_q.forward(&tokens)?)?;
        let k = heads(self.to_k.forward(&tokens)?)?;
        let v = heads(self.to_v.forward(&tokens)?)?;
        let attended = attention(&q, &k, &v, Some(ATTENTION_CHUNK))?.squeeze(1)?;
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers' `UNetMidBlock2D` (one layer): resnet, [attention], resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    first: ResnetBlock,
    attention: Option<MidAttention>,
    second: ResnetBlock,
}

impl MidBlock {
    pub fn load(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        with_attention: bool,
    ) -> Result<Self> {
        let attention = if with_attention {
            Some(MidAttention::load(
                vb.pp("attentions").pp("0"),
                channels,
                groups,
            )?)
        } else {
            None
        };
        let resnets = vb.pp("resnets");
        Ok(MidBlock {
            first: ResnetBlock::load(resnets.pp("0"), channels, channels, groups)?,
            attention,
            second: ResnetBlock::load(resnets.pp("1"), channels, channels, groups)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h)?;
        }
        self.second.forward(&h)
    }
}
