//! `vae/config.json` of an AutoencoderKL (diffusers' names and defaults).

use std::path::Path;

use serde::{Deserialize, Deserializer};

fn three() -> usize {
    3
}
fn down_blocks() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn up_blocks() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn channels() -> Vec<usize> {
    vec![64]
}
fn one() -> usize {
    1
}
fn silu() -> String {
    "silu".into()
}
fn four() -> usize {
    4
}
fn groups() -> usize {
    32
}
fn sample_size() -> usize {
    32
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// `sample_size` is an int or an `[h, w]` list in diffusers; tiling uses the first.
fn first_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Many(Vec<usize>),
    }
    match Size::deserialize(deserializer)? {
        Size::One(size) => Ok(size),
        Size::Many(sizes) => sizes
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

/// Sizes of an AutoencoderKL; defaults are diffusers' constructor defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// Image size the VAE was trained on; diffusers' default tile size.
    #[serde(default = "sample_size", deserialize_with = "first_size")]
    pub sample_size: usize,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    /// FLUX: 0.1159; `null` for SD/SDXL.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// The decoder's widths when they differ from the encoder's
    /// (`AutoencoderKLFlux2`'s `decoder_block_out_channels`).
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<usize>>,
    /// FLUX.2's latent BatchNorm epsilon (`AutoencoderKLFlux2`).
    #[serde(default = "batch_norm_eps")]
    pub batch_norm_eps: f64,
}

fn batch_norm_eps() -> f64 {
    1e-4
}

impl VaeConfig {
    /// Read and validate a `config.json`.
    pub fn from_file(path: &Path) -> candle_core::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("read {}: {e}", path.display())))?;
        let config: VaeConfig = kiln_engine::json::from_str_lenient(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// The decoder's widths, top level last (as `block_out_channels`).
    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }

    /// Number of resolution levels (one per entry of `block_out_channels`).
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Pixels per latent along each side: `2^(levels - 1)` (8 for SD/SDXL/FLUX).
    pub fn downscale_factor(&self) -> usize {
        1 << self.levels().saturating_sub(1)
    }

    /// Check internal consistency, naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let levels = self.levels();
        if levels == 0 {
            return Err("block_out_channels is empty".into());
        }
        if levels > 16 {
            return Err(format!(
                "block_out_channels has {levels} levels (at most 16)"
            ));
        }
        if let Some(decoder) = &self.decoder_block_out_channels
            && decoder.len() != levels
        {
            return Err(format!(
                "decoder_block_out_channels has {} entries, block_out_channels {levels}",
                decoder.len()
            ));
        }
        if !(self.batch_norm_eps.is_finite() && self.batch_norm_eps > 0.0) {
            return Err(format!(
                "batch_norm_eps {} must be positive",
                self.batch_norm_eps
            ));
        }
        if self.down_block_types.len() != levels {
            return Err(format!(
                "down_block_types has {} entries, block_out_channels {levels}",
                self.down_block_types.len()
            ));
        }
        if self.up_block_types.len() != levels {
            return Err(format!(
                "up_block_types has {} entries, block_out_channels {levels}",
                self.up_block_types.len()
            ));
        }
        if let Some(kind) = self
            .down_block_types
            .iter()
            .find(|k| k.as_str() != "DownEncoderBlock2D")
        {
            return Err(format!(
                "down_block_types: {kind:?} is not supported (only DownEncoderBlock2D)"
            ));
        }
        if let Some(kind) = self
            .up_block_types
            .iter()
            .find(|k| k.as_str() != "UpDecoderBlock2D")
        {
            return Err(format!(
                "up_block_types: {kind:?} is not supported (only UpDecoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn {:?} is not supported (only silu)",
                self.act_fn
            ));
        }
        if self.layers_per_block == 0 {
            return Err("layers_per_block must be at least 1".into());
        }
        for (name, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if let Some(channels) = self
            .block_out_channels
            .iter()
            .find(|c| **c == 0 || !c.is_multiple_of(self.norm_num_groups))
        {
            return Err(format!(
                "block_out_channels: {channels} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(format!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            ));
        }
        Ok(())
    }
}
