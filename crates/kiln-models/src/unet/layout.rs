//! Where a UNet's tensors live: the diffusers folder (its own names), or a
//! single-file checkpoint in ldm/sgm naming (`model.diffusion_model.input_blocks…`,
//! as CivitAI and Illustrious ship SDXL), mapped onto diffusers' names as data.

use kiln_engine::KeyAdapter;

use super::config::UNetConfig;

/// The ldm name of the first convolution: marks the layout and its prefix.
const LDM_MARKER: &str = "input_blocks.0.0.weight";

/// The prefix of ldm-named UNet tensors in `names` (e.g. `model.diffusion_model.`),
/// if the file holds an ldm UNet.
pub fn ldm_unet_prefix(names: &[String]) -> Option<String> {
    names
        .iter()
        .find_map(|n| n.strip_suffix(LDM_MARKER).map(str::to_string))
}

/// Read an ldm/sgm UNet (tensors under `prefix`) under diffusers' names.
pub fn ldm_unet_adapter(config: &UNetConfig, prefix: &str) -> KeyAdapter {
    let mut renames: Vec<(String, String)> = Vec::new();
    let mut rename =
        |ours: String, theirs: String| renames.push((ours, format!("{prefix}{theirs}")));
    for (ours, theirs) in [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
    ] {
        rename(ours.into(), theirs.into());
    }
    let mut resnet = |ours: &str, theirs: &str| {
        for (a, b) in [
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("time_emb_proj", "emb_layers.1"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
            ("conv_shortcut", "skip_connection"),
        ] {
            renames.push((format!("{ours}.{a}."), format!("{prefix}{theirs}.{b}.")));
        }
    };
    let levels = config.block_out_channels.len();
    let layers = config.layers_per_block;
    for i in 0..levels {
        for j in 0..layers {
            resnet(
                &format!("down_blocks.{i}.resnets.{j}"),
                &format!("input_blocks.{}.0", 1 + i * (layers + 1) + j),
            );
        }
        for j in 0..=layers {
            resnet(
                &format!("up_blocks.{i}.resnets.{j}"),
                &format!("output_blocks.{}.0", i * (layers + 1) + j),
            );
        }
    }
    resnet("mid_block.resnets.0", "middle_block.0");
    resnet("mid_block.resnets.1", "middle_block.2");
    for i in 0..levels {
        let cross_down = config.down_block_types[i] == "CrossAttnDownBlock2D";
        let cross_up = config.up_block_types[i] == "CrossAttnUpBlock2D";
        for j in 0..layers {
            if cross_down {
                renames.push((
                    format!("down_blocks.{i}.attentions.{j}."),
                    format!("{prefix}input_blocks.{}.1.", 1 + i * (layers + 1) + j),
                ));
            }
        }
        for j in 0..=layers {
            if cross_up {
                renames.push((
                    format!("up_blocks.{i}.attentions.{j}."),
                    format!("{prefix}output_blocks.{}.1.", i * (layers + 1) + j),
                ));
            }
        }
        if i + 1 < levels {
            renames.push((
                format!("down_blocks.{i}.downsamplers.0.conv."),
                format!("{prefix}input_blocks.{}.0.op.", (i + 1) * (layers + 1)),
            ));
            let slot = if cross_up { 2 } else { 1 };
            renames.push((
                format!("up_blocks.{i}.upsamplers.0.conv."),
                format!(
                    "{prefix}output_blocks.{}.{slot}.conv.",
                    i * (layers + 1) + layers
                ),
            ));
        }
    }
    KeyAdapter {
        renames,
        prefix: prefix.to_string(),
        ..KeyAdapter::default()
    }
}
