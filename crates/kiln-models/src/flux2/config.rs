//! `transformer/config.json` of a FLUX.2 model (diffusers' Flux2Transformer2DModel).

use serde::Deserialize;

fn one() -> usize {
    1
}
fn in_channels() -> usize {
    128
}
fn layers() -> usize {
    8
}
fn single_layers() -> usize {
    48
}
fn head_dim() -> usize {
    128
}
fn heads() -> usize {
    48
}
fn joint_dim() -> usize {
    15360
}
fn timestep_channels() -> usize {
    256
}
fn mlp_ratio() -> f64 {
    3.0
}
fn axes() -> Vec<usize> {
    vec![32, 32, 32, 32]
}
fn rope_theta() -> f64 {
    2000.0
}
fn eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}

/// Sizes of a FLUX.2 transformer; defaults are diffusers' (FLUX.2-dev's).
/// FLUX.2-klein 4B: 24 heads, 5 double and 20 single blocks, text width
/// 7680; 9B: 32 heads, 8 and 24, 12288; both without a guidance embedding.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Flux2Config {
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
    #[serde(default = "timestep_channels")]
    pub timestep_guidance_channels: usize,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "axes")]
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    #[serde(default = "yes")]
    pub guidance_embeds: bool,
}

impl Flux2Config {
    /// Width of the transformer stream (heads × head size).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Hidden width of the SwiGLU feed-forwards (`int(dim · mlp_ratio)`; the
    /// input projection is twice as wide: gate and value).
    pub fn mlp_hidden_dim(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    pub fn out_dim(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Channels of the VAE latents the transformer sees as 2×2 patches
    /// (FLUX.2: 128 / 4 = 32).
    pub fn latent_channels(&self) -> usize {
        self.in_channels / 4
    }

    /// Check internal consistency, naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.patch_size != 1 {
            return Err(format!(
                "patch_size {} is not supported (FLUX.2 uses 1)",
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
        if self.axes_dims_rope.len() != 4 {
            return Err(format!(
                "axes_dims_rope {:?} must have 4 axes (time, row, column, token)",
                self.axes_dims_rope
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "axes_dims_rope {:?} must all be even",
                self.axes_dims_rope
            ));
        }
        if !self.in_channels.is_multiple_of(4) || self.in_channels == 0 {
            return Err(format!(
                "in_channels {} must be a positive multiple of 4 (2×2 patchified latents)",
                self.in_channels
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!(
                "rope_theta {} must be a finite number above 1",
                self.rope_theta
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden_dim() == 0 {
            return Err(format!(
                "mlp_ratio {} must be a positive number",
                self.mlp_ratio
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("eps {} must be a positive number", self.eps));
        }
        if self.timestep_guidance_channels == 0
            || !self.timestep_guidance_channels.is_multiple_of(2)
        {
            return Err(format!(
                "timestep_guidance_channels {} must be a positive even number",
                self.timestep_guidance_channels
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klein_sizes_read_from_config_json() {
        let klein: Flux2Config = serde_json::from_str(
            r#"{"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
                "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": false,
                "in_channels": 128, "joint_attention_dim": 7680, "mlp_ratio": 3.0,
                "num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20,
                "out_channels": null, "patch_size": 1, "rope_theta": 2000,
                "timestep_guidance_channels": 256}"#,
        )
        .unwrap();
        klein.validate().unwrap();
        assert_eq!(
            (
                klein.inner_dim(),
                klein.mlp_hidden_dim(),
                klein.latent_channels()
            ),
            (3072, 9216, 32)
        );
        let bad: Flux2Config = serde_json::from_str(r#"{"axes_dims_rope": [32, 32, 64]}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("axes_dims_rope"));
        let bad: Flux2Config = serde_json::from_str(r#"{"mlp_ratio": 0}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("mlp_ratio"));
    }
}
