//! VAE weight layouts: diffusers' names are the model's own; the original
//! ldm/BFL layout (FLUX's `ae.safetensors`, SD single files under
//! `first_stage_model.`) is mapped here as data. Its decoder levels are numbered
//! in reverse, and its attention projections are 1×1 convolutions (reshaped by
//! the attention loader, not here).

use kiln_engine::{KeyAdapter, KeyRule, Source};

use super::config::VaeConfig;

/// Which naming a VAE weight file uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaeLayout {
    /// `vae/diffusion_pytorch_model*.safetensors`; `prefix` is e.g. `vae.` in
    /// files holding more than the VAE, usually empty.
    Diffusers { prefix: String },
    /// ldm / Black Forest Labs names (`encoder.down.0.block.0.norm1`, …);
    /// `prefix` is e.g. `first_stage_model.` in SD single-file checkpoints.
    Bfl { prefix: String },
}

/// Name endings that only the ldm/BFL layout has.
const BFL_MARKERS: [&str; 4] = [
    "encoder.down.0.block.0.conv1.weight",
    "decoder.up.0.block.0.conv1.weight",
    "encoder.mid.block_1.conv1.weight",
    "decoder.mid.block_1.conv1.weight",
];

/// Name endings that only the diffusers layout has.
const DIFFUSERS_MARKERS: [&str; 4] = [
    "encoder.down_blocks.0.resnets.0.conv1.weight",
    "decoder.up_blocks.0.resnets.0.conv1.weight",
    "encoder.mid_block.resnets.0.conv1.weight",
    "decoder.mid_block.resnets.0.conv1.weight",
];

fn find_prefix(names: &[String], markers: &[&str]) -> Option<String> {
    markers.iter().find_map(|marker| {
        names
            .iter()
            .find(|n| n.ends_with(marker))
            .map(|n| n[..n.len() - marker.len()].to_string())
    })
}

/// Detect the layout from a file's tensor names. Files without any BFL name are
/// taken as diffusers (loading then names the first missing tensor).
pub fn detect_vae_layout(names: &[String]) -> VaeLayout {
    if let Some(prefix) = find_prefix(names, &BFL_MARKERS) {
        return VaeLayout::Bfl { prefix };
    }
    let prefix = find_prefix(names, &DIFFUSERS_MARKERS).unwrap_or_default();
    VaeLayout::Diffusers { prefix }
}

impl VaeLayout {
    /// The key adapter that reads this layout under diffusers' names.
    pub fn adapter(&self, config: &VaeConfig) -> KeyAdapter {
        match self {
            VaeLayout::Diffusers { prefix } => KeyAdapter {
                rules: Vec::new(),
                prefix: prefix.clone(),
                ..KeyAdapter::default()
            },
            VaeLayout::Bfl { prefix } => bfl_vae_adapter(config, prefix),
        }
    }
}

/// The ldm/BFL → diffusers mapping for one VAE config (the decoder's level
/// numbers depend on the number of levels).
pub fn bfl_vae_adapter(config: &VaeConfig, prefix: &str) -> KeyAdapter {
    let levels = config.levels();
    let mut rules = Vec::new();
    let mut rule = |ours: String, theirs: String| {
        rules.push(KeyRule {
            pattern: ours,
            source: Source::Key(format!("{prefix}{theirs}")),
        })
    };
    let resnet_parts = [
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("conv_shortcut", "nin_shortcut"),
    ];
    for suffix in ["weight", "bias"] {
        for (ours, theirs) in resnet_parts {
            rule(
                format!("encoder.down_blocks.{{i}}.resnets.{{i}}.{ours}.{suffix}"),
                format!("encoder.down.{{i}}.block.{{i}}.{theirs}.{suffix}"),
            );
            for part in ["encoder", "decoder"] {
                for (index, block) in ["block_1", "block_2"].iter().enumerate() {
                    rule(
                        format!("{part}.mid_block.resnets.{index}.{ours}.{suffix}"),
                        format!("{part}.mid.{block}.{theirs}.{suffix}"),
                    );
                }
            }
            // The ldm decoder numbers levels from the full-resolution end.
            for level in 0..levels {
                let original = levels - 1 - level;
                rule(
                    format!("decoder.up_blocks.{level}.resnets.{{i}}.{ours}.{suffix}"),
                    format!("decoder.up.{original}.block.{{i}}.{theirs}.{suffix}"),
                );
            }
        }
        rule(
            format!("encoder.down_blocks.{{i}}.downsamplers.0.conv.{suffix}"),
            format!("encoder.down.{{i}}.downsample.conv.{suffix}"),
        );
        for level in 0..levels {
            let original = levels - 1 - level;
            rule(
                format!("decoder.up_blocks.{level}.upsamplers.0.conv.{suffix}"),
                format!("decoder.up.{original}.upsample.conv.{suffix}"),
            );
        }
        let attention_parts = [
            ("group_norm", "norm"),
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "proj_out"),
        ];
        for part in ["encoder", "decoder"] {
            rule(
                format!("{part}.conv_norm_out.{suffix}"),
                format!("{part}.norm_out.{suffix}"),
            );
            for (ours, theirs) in attention_parts {
                rule(
                    format!("{part}.mid_block.attentions.0.{ours}.{suffix}"),
                    format!("{part}.mid.attn_1.{theirs}.{suffix}"),
                );
            }
        }
    }
    // conv_in, conv_out, quant_conv and post_quant_conv keep their names.
    KeyAdapter {
        rules,
        prefix: prefix.to_string(),
        ..KeyAdapter::default()
    }
}
