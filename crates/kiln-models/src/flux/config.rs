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
    /// RoPE base (FLUX.1: 10000; diffusers' config names it where it differs).
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
}

fn rope_theta() -> f64 {
    10000.0
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

    /// Channels of the VAE latents the transformer sees packed in 2×2 patches
    /// (FLUX.1: 64 / 4 = 16).
    pub fn latent_channels(&self) -> usize {
        self.in_channels / 4
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
        if !self.in_channels.is_multiple_of(4) || self.in_channels == 0 {
            return Err(format!(
                "in_channels {} must be a positive multiple of 4 (2×2 packed latents)",
                self.in_channels
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!(
                "rope_theta {} must be a finite number above 1",
                self.rope_theta
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

#[cfg(test)]
mod rope_and_latent_tests {
    use super::*;

    #[test]
    fn rope_theta_and_latent_channels_come_from_the_config() {
        let flux1: FluxConfig = serde_json::from_str("{}").unwrap();
        assert_eq!((flux1.rope_theta, flux1.latent_channels()), (10000.0, 16));
        let other: FluxConfig = serde_json::from_str(
            r#"{"in_channels": 128, "rope_theta": 2000, "attention_head_dim": 128,
                "axes_dims_rope": [32, 32, 32, 32]}"#,
        )
        .unwrap();
        assert_eq!((other.rope_theta, other.latent_channels()), (2000.0, 32));
        other.validate().unwrap();
        let bad: FluxConfig = serde_json::from_str(r#"{"in_channels": 6}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("in_channels"));
    }

    #[test]
    fn rope_takes_as_many_coordinates_as_it_has_axes() {
        let device = candle_core::Device::Cpu;
        let four = vec![[0.0, 1.0, 2.0, 3.0]; 5];
        let rope = crate::flux::model::Rope::new(&four, &[4, 4, 4, 4], 2000.0, &device);
        assert!(rope.is_ok());
        let three = vec![[0.0, 1.0, 2.0]; 5];
        let err = crate::flux::model::Rope::new(&three, &[4, 4, 4, 4], 2000.0, &device)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("3 coordinates") && err.contains("4 axes"),
            "{err}"
        );
    }
}
