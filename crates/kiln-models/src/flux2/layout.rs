//! FLUX.2 weight layouts: diffusers' names are the model's own; Black Forest
//! Labs' single file (`flux-2-klein-*.safetensors`) fuses the double blocks'
//! q/k/v, names the rest its own way and orders the output modulation
//! (shift, scale) — mapped here as data, as diffusers'
//! `convert_flux2_transformer_checkpoint_to_diffusers` does.

use kiln_engine::{KeyAdapter, KeyRule, Source};

use super::config::Flux2Config;

/// Which naming a FLUX.2 transformer file uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flux2Layout {
    /// `transformer/diffusion_pytorch_model*.safetensors`.
    Diffusers,
    /// BFL's single file; `prefix` is e.g. `model.diffusion_model.` in
    /// checkpoints saved by other tools.
    Bfl { prefix: String },
}

/// A tensor only FLUX.2 has, in each layout (FLUX.1 modulates per block).
const BFL_MARKER: &str = "double_stream_modulation_img.lin.weight";
const DIFFUSERS_MARKER: &str = "double_stream_modulation_img.linear.weight";

impl Flux2Layout {
    /// Detect the layout from the tensor names in a file; `None` when the file
    /// is not a FLUX.2 transformer (a FLUX.1 one included).
    pub fn detect(names: &[String]) -> Option<Flux2Layout> {
        if let Some(name) = names.iter().find(|n| n.ends_with(BFL_MARKER)) {
            let prefix = name.trim_end_matches(BFL_MARKER).to_string();
            return Some(Flux2Layout::Bfl { prefix });
        }
        names
            .iter()
            .any(|n| n == DIFFUSERS_MARKER)
            .then_some(Flux2Layout::Diffusers)
    }

    pub fn adapter(&self, config: &Flux2Config) -> KeyAdapter {
        match self {
            Flux2Layout::Diffusers => KeyAdapter::default(),
            Flux2Layout::Bfl { prefix } => bfl_adapter(config, prefix),
        }
    }
}

/// The BFL → diffusers mapping for one FLUX.2 config (q/k/v offsets depend
/// on its width).
pub fn bfl_adapter(config: &Flux2Config, prefix: &str) -> KeyAdapter {
    let dim = config.inner_dim();
    let key = |name: &str| Source::Key(format!("{prefix}{name}"));
    let rows = |name: &str, start: usize, len: usize| Source::Rows {
        key: format!("{prefix}{name}"),
        start,
        len,
    };
    let mut rules = Vec::new();
    let mut rule = |pattern: &str, source: Source| {
        rules.push(KeyRule {
            pattern: pattern.to_string(),
            source,
        })
    };
    let renames: [(&str, &str); 24] = [
        ("x_embedder.weight", "img_in.weight"),
        ("context_embedder.weight", "txt_in.weight"),
        (
            "time_guidance_embed.timestep_embedder.linear_1.weight",
            "time_in.in_layer.weight",
        ),
        (
            "time_guidance_embed.timestep_embedder.linear_2.weight",
            "time_in.out_layer.weight",
        ),
        (
            "time_guidance_embed.guidance_embedder.linear_1.weight",
            "guidance_in.in_layer.weight",
        ),
        (
            "time_guidance_embed.guidance_embedder.linear_2.weight",
            "guidance_in.out_layer.weight",
        ),
        (
            "double_stream_modulation_img.linear.weight",
            "double_stream_modulation_img.lin.weight",
        ),
        (
            "double_stream_modulation_txt.linear.weight",
            "double_stream_modulation_txt.lin.weight",
        ),
        (
            "single_stream_modulation.linear.weight",
            "single_stream_modulation.lin.weight",
        ),
        ("proj_out.weight", "final_layer.linear.weight"),
        (
            "transformer_blocks.{i}.attn.norm_q.weight",
            "double_blocks.{i}.img_attn.norm.query_norm.scale",
        ),
        (
            "transformer_blocks.{i}.attn.norm_k.weight",
            "double_blocks.{i}.img_attn.norm.key_norm.scale",
        ),
        (
            "transformer_blocks.{i}.attn.to_out.0.weight",
            "double_blocks.{i}.img_attn.proj.weight",
        ),
        (
            "transformer_blocks.{i}.ff.linear_in.weight",
            "double_blocks.{i}.img_mlp.0.weight",
        ),
        (
            "transformer_blocks.{i}.ff.linear_out.weight",
            "double_blocks.{i}.img_mlp.2.weight",
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
            "transformer_blocks.{i}.attn.to_add_out.weight",
            "double_blocks.{i}.txt_attn.proj.weight",
        ),
        (
            "transformer_blocks.{i}.ff_context.linear_in.weight",
            "double_blocks.{i}.txt_mlp.0.weight",
        ),
        (
            "transformer_blocks.{i}.ff_context.linear_out.weight",
            "double_blocks.{i}.txt_mlp.2.weight",
        ),
        (
            "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight",
            "single_blocks.{i}.linear1.weight",
        ),
        (
            "single_transformer_blocks.{i}.attn.to_out.weight",
            "single_blocks.{i}.linear2.weight",
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
    for (ours, theirs) in renames {
        rule(ours, key(theirs));
    }
    let fused = [
        ("img_attn", ["to_q", "to_k", "to_v"]),
        ("txt_attn", ["add_q_proj", "add_k_proj", "add_v_proj"]),
    ];
    for (stream, names) in fused {
        for (index, name) in names.iter().enumerate() {
            rule(
                &format!("transformer_blocks.{{i}}.attn.{name}.weight"),
                rows(
                    &format!("double_blocks.{{i}}.{stream}.qkv.weight"),
                    index * dim,
                    dim,
                ),
            );
        }
    }
    // diffusers: (scale, shift); BFL: (shift, scale).
    let final_modulation = "final_layer.adaLN_modulation.1.weight";
    rule(
        "norm_out.linear.weight",
        Source::Concat(vec![
            rows(final_modulation, dim, dim),
            rows(final_modulation, 0, dim),
        ]),
    );
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
    fn bfl_names_map_to_diffusers_and_flux1_files_are_not_flux2() {
        let config: Flux2Config = serde_json::from_str(
            r#"{"num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": [4, 4, 4, 4]}"#,
        )
        .unwrap();
        let adapter = bfl_adapter(&config, "model.diffusion_model.");
        assert_eq!(
            adapter.source("transformer_blocks.1.attn.add_v_proj.weight"),
            Source::Rows {
                key: "model.diffusion_model.double_blocks.1.txt_attn.qkv.weight".into(),
                start: 64,
                len: 32
            }
        );
        assert_eq!(
            adapter.source("single_transformer_blocks.3.attn.to_qkv_mlp_proj.weight"),
            Source::Key("model.diffusion_model.single_blocks.3.linear1.weight".into())
        );
        let bfl = vec!["model.diffusion_model.double_stream_modulation_img.lin.weight".into()];
        assert_eq!(
            Flux2Layout::detect(&bfl),
            Some(Flux2Layout::Bfl {
                prefix: "model.diffusion_model.".into()
            })
        );
        let flux1 = vec![
            "double_blocks.0.img_attn.qkv.weight".to_string(),
            "double_blocks.0.img_mod.lin.weight".to_string(),
        ];
        assert_eq!(Flux2Layout::detect(&flux1), None);
    }
}
