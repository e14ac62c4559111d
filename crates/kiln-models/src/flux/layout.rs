//! FLUX weight layouts: diffusers' names are the model's own; BFL's single file
//! (`flux1-dev.safetensors`) fuses q/k/v (and the single blocks' MLP input) and
//! orders the output modulation (shift, scale) — mapped here as data.

use kiln_engine::{KeyAdapter, KeyRule, Source};

use super::config::FluxConfig;

/// Which naming a FLUX transformer file uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FluxLayout {
    /// `transformer/diffusion_pytorch_model*.safetensors`.
    Diffusers,
    /// Black Forest Labs' single file; `prefix` is e.g. `model.diffusion_model.`
    /// in checkpoints saved by other tools.
    Bfl { prefix: String },
}

impl FluxLayout {
    /// Detect the layout from the tensor names in a file.
    pub fn detect(names: &[String]) -> Option<FluxLayout> {
        // FLUX.2 shares BFL's block names but modulates once per model.
        if names
            .iter()
            .any(|n| n.contains("double_stream_modulation_img."))
        {
            return None;
        }
        if let Some(name) = names
            .iter()
            .find(|n| n.ends_with("double_blocks.0.img_attn.qkv.weight"))
        {
            let prefix = name
                .trim_end_matches("double_blocks.0.img_attn.qkv.weight")
                .to_string();
            return Some(FluxLayout::Bfl { prefix });
        }
        if names.iter().any(|n| {
            n.starts_with("transformer_blocks.0.attn.to_q.weight") || n == "x_embedder.weight"
        }) {
            return Some(FluxLayout::Diffusers);
        }
        None
    }

    pub fn adapter(&self, config: &FluxConfig) -> KeyAdapter {
        match self {
            FluxLayout::Diffusers => KeyAdapter::default(),
            FluxLayout::Bfl { prefix } => bfl_adapter(config, prefix),
        }
    }
}

fn key(prefix: &str, name: &str) -> Source {
    Source::Key(format!("{prefix}{name}"))
}

fn rows(prefix: &str, name: &str, start: usize, len: usize) -> Source {
    Source::Rows {
        key: format!("{prefix}{name}"),
        start,
        len,
    }
}

/// The BFL → diffusers mapping for one FLUX config (offsets depend on its sizes).
pub fn bfl_adapter(config: &FluxConfig, prefix: &str) -> KeyAdapter {
    let dim = config.inner_dim();
    let mlp = config.mlp_dim();
    let mut rules = Vec::new();
    let mut rule = |pattern: String, source: Source| rules.push(KeyRule { pattern, source });
    for suffix in ["weight", "bias"] {
        let renames: [(&str, &str); 18] = [
            ("x_embedder", "img_in"),
            ("context_embedder", "txt_in"),
            (
                "time_text_embed.timestep_embedder.linear_1",
                "time_in.in_layer",
            ),
            (
                "time_text_embed.timestep_embedder.linear_2",
                "time_in.out_layer",
            ),
            (
                "time_text_embed.guidance_embedder.linear_1",
                "guidance_in.in_layer",
            ),
            (
                "time_text_embed.guidance_embedder.linear_2",
                "guidance_in.out_layer",
            ),
            (
                "time_text_embed.text_embedder.linear_1",
                "vector_in.in_layer",
            ),
            (
                "time_text_embed.text_embedder.linear_2",
                "vector_in.out_layer",
            ),
            ("proj_out", "final_layer.linear"),
            (
                "transformer_blocks.{i}.norm1.linear",
                "double_blocks.{i}.img_mod.lin",
            ),
            (
                "transformer_blocks.{i}.norm1_context.linear",
                "double_blocks.{i}.txt_mod.lin",
            ),
            (
                "transformer_blocks.{i}.attn.to_out.0",
                "double_blocks.{i}.img_attn.proj",
            ),
            (
                "transformer_blocks.{i}.attn.to_add_out",
                "double_blocks.{i}.txt_attn.proj",
            ),
            (
                "transformer_blocks.{i}.ff.net.0.proj",
                "double_blocks.{i}.img_mlp.0",
            ),
            (
                "transformer_blocks.{i}.ff.net.2",
                "double_blocks.{i}.img_mlp.2",
            ),
            (
                "transformer_blocks.{i}.ff_context.net.0.proj",
                "double_blocks.{i}.txt_mlp.0",
            ),
            (
                "transformer_blocks.{i}.ff_context.net.2",
                "double_blocks.{i}.txt_mlp.2",
            ),
            (
                "single_transformer_blocks.{i}.proj_out",
                "single_blocks.{i}.linear2",
            ),
        ];
        for (ours, theirs) in renames {
            rule(
                format!("{ours}.{suffix}"),
                key(prefix, &format!("{theirs}.{suffix}")),
            );
        }
        rule(
            format!("single_transformer_blocks.{{i}}.norm.linear.{suffix}"),
            key(
                prefix,
                &format!("single_blocks.{{i}}.modulation.lin.{suffix}"),
            ),
        );
        for (index, name) in ["to_q", "to_k", "to_v"].iter().enumerate() {
            rule(
                format!("transformer_blocks.{{i}}.attn.{name}.{suffix}"),
                rows(
                    prefix,
                    &format!("double_blocks.{{i}}.img_attn.qkv.{suffix}"),
                    index * dim,
                    dim,
                ),
            );
            let added = ["add_q_proj", "add_k_proj", "add_v_proj"][index];
            rule(
                format!("transformer_blocks.{{i}}.attn.{added}.{suffix}"),
                rows(
                    prefix,
                    &format!("double_blocks.{{i}}.txt_attn.qkv.{suffix}"),
                    index * dim,
                    dim,
                ),
            );
            rule(
                format!("single_transformer_blocks.{{i}}.attn.{name}.{suffix}"),
                rows(
                    prefix,
                    &format!("single_blocks.{{i}}.linear1.{suffix}"),
                    index * dim,
                    dim,
                ),
            );
        }
        rule(
            format!("single_transformer_blocks.{{i}}.proj_mlp.{suffix}"),
            rows(
                prefix,
                &format!("single_blocks.{{i}}.linear1.{suffix}"),
                3 * dim,
                mlp,
            ),
        );
        // diffusers: (scale, shift); BFL: (shift, scale).
        rule(
            format!("norm_out.linear.{suffix}"),
            Source::Concat(vec![
                rows(
                    prefix,
                    &format!("final_layer.adaLN_modulation.1.{suffix}"),
                    dim,
                    dim,
                ),
                rows(
                    prefix,
                    &format!("final_layer.adaLN_modulation.1.{suffix}"),
                    0,
                    dim,
                ),
            ]),
        );
    }
    let norms = [
        (
            "transformer_blocks.{i}.attn.norm_q.weight",
            "double_blocks.{i}.img_attn.norm.query_norm.scale",
        ),
        (
            "transformer_blocks.{i}.attn.norm_k.weight",
            "double_blocks.{i}.img_attn.norm.key_norm.scale",
        ),
        (
            "transformer_blocks.{i}.attn.norm_added_q.weight",
            "double_blocks.{i}.txt_attn.norm.query_norm.scale",
        ),
        (
            "transformer_blocks.{i}.attn.norm_added_k.weight",
            "double_blocks.{i}.txt_attn.norm.key_norm.scale",
        ),
        (
            "single_transformer_blocks.{i}.attn.norm_q.weight",
            "single_blocks.{i}.norm.query_norm.scale",
        ),
        (
            "single_transformer_blocks.{i}.attn.norm_k.weight",
            "single_blocks.{i}.norm.key_norm.scale",
        ),
    ];
    for (ours, theirs) in norms {
        rule(ours.to_string(), key(prefix, theirs));
    }
    KeyAdapter {
        rules,
        prefix: prefix.to_string(),
        ..KeyAdapter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_single_block_input_splits_into_q_k_v_and_mlp() {
        let config: FluxConfig = serde_json::from_str(
            r#"{"num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6]}"#,
        )
        .unwrap();
        let adapter = bfl_adapter(&config, "model.diffusion_model.");
        assert_eq!(
            adapter.source("single_transformer_blocks.3.proj_mlp.weight"),
            Source::Rows {
                key: "model.diffusion_model.single_blocks.3.linear1.weight".into(),
                start: 96,
                len: 128
            }
        );
        assert_eq!(
            adapter.source("transformer_blocks.0.attn.norm_added_k.weight"),
            Source::Key(
                "model.diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale".into()
            )
        );
        let names = vec!["model.diffusion_model.double_blocks.0.img_attn.qkv.weight".to_string()];
        assert_eq!(
            FluxLayout::detect(&names),
            Some(FluxLayout::Bfl {
                prefix: "model.diffusion_model.".into()
            })
        );
    }
}
