//! `unet/config.json` of a diffusers `UNet2DConditionModel`, with the sizes
//! each block takes and a check that refuses options Kiln does not implement
//! (naming the key) instead of computing something else.

use serde::Deserialize;

/// A number per block, or one number for all (diffusers accepts both).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, block: usize) -> usize {
        match self {
            PerBlock::One(n) => *n,
            PerBlock::Each(values) => values.get(block).or(values.last()).copied().unwrap_or(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    /// diffusers uses this as the number of heads when `num_attention_heads` is null.
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default)]
    pub act_fn: Option<String>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}

impl UNetConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let config: UNetConfig = kiln_engine::json::from_str_lenient(&text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Attention heads in block `block` (down order).
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(block)
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// Whether the model takes SDXL's pooled-text + size conditioning.
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    pub fn validate(&self) -> Result<(), String> {
        let levels = self.block_out_channels.len();
        if levels == 0
            || self.down_block_types.len() != levels
            || self.up_block_types.len() != levels
        {
            return Err("block_out_channels, down_block_types and up_block_types must have one entry per level".into());
        }
        let unsupported = |key: &str, value: String| Err(format!("unsupported {key} {value}"));
        for kind in &self.down_block_types {
            if !matches!(kind.as_str(), "DownBlock2D" | "CrossAttnDownBlock2D") {
                return unsupported("down_block_types entry", kind.clone());
            }
        }
        for kind in &self.up_block_types {
            if !matches!(kind.as_str(), "UpBlock2D" | "CrossAttnUpBlock2D") {
                return unsupported("up_block_types entry", kind.clone());
            }
        }
        if let Some(kind) = &self.mid_block_type
            && kind != "UNetMidBlock2DCrossAttn"
        {
            return unsupported("mid_block_type", kind.clone());
        }
        if self.act_fn.as_deref().is_some_and(|a| a != "silu") {
            return unsupported("act_fn", format!("{:?}", self.act_fn));
        }
        if self
            .resnet_time_scale_shift
            .as_deref()
            .is_some_and(|s| s != "default")
        {
            return unsupported(
                "resnet_time_scale_shift",
                format!("{:?}", self.resnet_time_scale_shift),
            );
        }
        if let Some(kind) = &self.addition_embed_type
            && kind != "text_time"
        {
            return unsupported("addition_embed_type", kind.clone());
        }
        if self.has_text_time()
            && (self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none())
        {
            return Err("text_time conditioning needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
        }
        if self.class_embed_type.is_some()
            || self.center_input_sample
            || self.dual_cross_attention
            || self.time_cond_proj_dim.is_some()
            || self.encoder_hid_dim_type.is_some()
            || self.only_cross_attention.as_bool() == Some(true)
            || !self.flip_sin_to_cos
            || self.freq_shift != 0
        {
            return Err("unsupported UNet options (class embeddings, centred input, dual or cross-only attention, time conditioning projection, encoder_hid_dim_type, or a timestep embedding other than flip_sin_to_cos with freq_shift 0)".into());
        }
        for (i, channels) in self.block_out_channels.iter().enumerate() {
            if channels % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {channels} is not a multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            if channels % self.heads(i) != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {channels} is not a multiple of its {} attention heads",
                    self.heads(i)
                ));
            }
        }
        Ok(())
    }
}
