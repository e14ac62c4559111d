//! `transformer/config.json` of a FLUX model (diffusers' FluxTransformer2DModel).

use serde::Deserialize;

fn one() -> usize {
    1
}
fn in_channels() -> usize {
    64
}
fn layers() -> usize {
    19
}
fn single_layers() -> usize {
    38
}
fn head_dim() -> usize {
    128
}
fn heads() -> usize {
    24
}
fn joint_dim() -> usize {
    4096
}
fn pooled_dim() -> usize {
    768
}
fn axes() -> Vec<usize> {
    vec![16, 56, 56]
}

/// Sizes of a FLUX transformer; defaults are FLUX.1-dev's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    #[serde(default = "in_channels")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "layers")]
    pub num_layers: usize,
    #[serde(default = "single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "heads")]
    pub num_attention_heads: usize,
    #[serde(default = "joint_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "pooled_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "axes")]
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    /// Width of the transformer stream (heads × head size).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Hidden width of the MLPs (ratio 4).
    pub fn mlp_dim(&self) -> usize {
        self.inner_dim() * 4
    }

    pub fn out_dim(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Check internal consistency, naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.patch_size != 1 {
            return Err(format!(
                "patch_size {} is not supported (FLUX.1 uses 1)",
                self.patch_size
            ));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim {
            return Err(format!(
                "axes_dims_rope {:?} sums to {rope}, but attention_head_dim is {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "axes_dims_rope {:?} must all be even",
                self.axes_dims_rope
            ));
        }
        Ok(())
    }
}
