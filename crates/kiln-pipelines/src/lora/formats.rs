//! LoRA file formats, detected from tensor names and read into one shape: a list
//! of modules, each a down (A, rank × in) and up (B, out × rank) matrix, an
//! optional alpha, and the module's name in diffusers' or BFL's naming.
//!
//! - diffusers / PEFT: `transformer.<module>.lora_A.weight` / `lora_B` (older
//!   diffusers: `.lora.down.weight` / `.lora.up.weight`), optional `.alpha`;
//! - kohya (sd-scripts): `lora_unet_<bfl_module_with_underscores>.lora_down.weight`
//!   / `lora_up` / `alpha`;
//! - ai-toolkit / BFL: `diffusion_model.<bfl module>.lora_A.weight` / `lora_B`
//!   (or `lora_down` / `lora_up`);
//! - XLabs: `double_blocks.N.processor.qkv_lora1.down.weight` / `up`.
//!
//! Text-encoder modules (`text_encoder.`/`text_encoder_2.` in diffusers'
//! naming, `lora_te1_`/`lora_te2_` in kohya's) target the text encoders; SDXL
//! UNet modules come as `unet.` (diffusers) or kohya's underscored ldm names. diffusers' `lora_adapter_metadata`
//! header (PEFT's `lora_alpha`, `alpha_pattern`, `use_rslora`) sets the scale of
//! modules without an `.alpha` tensor, as diffusers does when it loads the file.
//!
//! LyCORIS (LoHa, LoKr) and DoRA files are recognised and refused with a clear
//! message rather than applied wrongly.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::LoraError;

/// How a file names its modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    Peft,
    Kohya,
    AiToolkit,
    XLabs,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Peft => "diffusers/PEFT",
            LoraFormat::Kohya => "kohya",
            LoraFormat::AiToolkit => "ai-toolkit/BFL",
            LoraFormat::XLabs => "XLabs",
        }
    }
}

/// Which model naming a module name is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// diffusers' names (`transformer_blocks.0.attn.to_q`), for the transformer.
    Diffusers,
    /// Black Forest Labs' names (`double_blocks.0.img_attn.qkv`).
    Bfl,
    /// The (first) CLIP text encoder; the name is diffusers' (dotted, PEFT) or
    /// kohya's (underscored): matched to layers through [`text_encoder_key`].
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP-bigG), named as `TextEncoder`.
    TextEncoder2,
    /// A kohya UNet module in ldm naming with underscores
    /// (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, SDXL).
    KohyaLdm,
    /// A component Kiln's FLUX LoRA support does not target (T5, a UNet).
    Other,
}

/// One adapted module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub name: String,
    pub naming: Naming,
    /// A: rank × in.
    pub down: Tensor,
    /// B: out × rank.
    pub up: Tensor,
    pub alpha: Option<f64>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// alpha / rank, or 1 without alpha (diffusers' default: alpha = rank).
    pub fn scale(&self) -> f64 {
        match self.alpha {
            Some(alpha) if self.rank() > 0 => alpha / self.rank() as f64,
            _ => 1.0,
        }
    }
}

/// The form in which a text-encoder module name and a CLIP layer name are
/// compared: without `text_model.`, dots as underscores.
pub fn text_encoder_key(name: &str) -> String {
    let name = name.replace('.', "_");
    name.strip_prefix("text_model_")
        .map(str::to_string)
        .unwrap_or(name)
}

/// A parsed LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub format: LoraFormat,
    pub modules: Vec<LoraModule>,
}

const DOWN: [&str; 4] = [
    ".lora_A.weight",
    ".lora_down.weight",
    ".lora.down.weight",
    ".down.weight",
];
const UP: [&str; 4] = [
    ".lora_B.weight",
    ".lora_up.weight",
    ".lora.up.weight",
    ".up.weight",
];

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

fn detect(names: &[&String]) -> Result<LoraFormat, LoraError> {
    if names
        .iter()
        .any(|n| n.contains("hada_w1") || n.contains("hada_w2"))
    {
        return Err(LoraError::Unsupported(
            "this is a LyCORIS LoHa file; Kiln applies LoRA (low-rank A/B) adapters only".into(),
        ));
    }
    if names
        .iter()
        .any(|n| n.contains("lokr_w1") || n.contains("lokr_w2"))
    {
        return Err(LoraError::Unsupported(
            "this is a LyCORIS LoKr file; Kiln applies LoRA (low-rank A/B) adapters only".into(),
        ));
    }
    if names
        .iter()
        .any(|n| n.contains("dora_scale") || n.contains("lora_magnitude_vector"))
    {
        return Err(LoraError::Unsupported(
            "this is a DoRA file (it has magnitude vectors); Kiln applies plain LoRA adapters only"
                .into(),
        ));
    }
    if names
        .iter()
        .any(|n| n.starts_with("lora_unet_") || n.starts_with("lora_te"))
    {
        return Ok(LoraFormat::Kohya);
    }
    if names.iter().any(|n| n.contains(".processor.")) {
        return Ok(LoraFormat::XLabs);
    }
    if names
        .iter()
        .any(|n| n.starts_with("diffusion_model.") || n.starts_with("model.diffusion_model."))
    {
        return Ok(LoraFormat::AiToolkit);
    }
    if names.iter().any(|n| {
        ["transformer.", "unet.", "text_encoder.", "text_encoder_2."]
            .iter()
            .any(|p| n.starts_with(p))
    }) {
        return Ok(LoraFormat::Peft);
    }
    let sample: Vec<&str> = names.iter().take(3).map(|s| s.as_str()).collect();
    Err(LoraError::UnknownFormat(format!(
        "no known LoRA naming (diffusers/PEFT, kohya, ai-toolkit, XLabs) in tensors like {sample:?}"
    )))
}

/// A kohya module name (`double_blocks_0_img_attn_qkv`) in BFL's dotted naming.
fn kohya_to_bfl(name: &str) -> Option<String> {
    let block = |rest: &str, kind: &str| -> Option<String> {
        let (index, tail) = rest.split_once('_')?;
        index.parse::<usize>().ok()?;
        let tail = match tail {
            "img_attn_qkv" => "img_attn.qkv",
            "img_attn_proj" => "img_attn.proj",
            "img_mlp_0" => "img_mlp.0",
            "img_mlp_2" => "img_mlp.2",
            "img_mod_lin" => "img_mod.lin",
            "txt_attn_qkv" => "txt_attn.qkv",
            "txt_attn_proj" => "txt_attn.proj",
            "txt_mlp_0" => "txt_mlp.0",
            "txt_mlp_2" => "txt_mlp.2",
            "txt_mod_lin" => "txt_mod.lin",
            "linear1" => "linear1",
            "linear2" => "linear2",
            "modulation_lin" => "modulation.lin",
            _ => return None,
        };
        Some(format!("{kind}.{index}.{tail}"))
    };
    if let Some(rest) = name.strip_prefix("double_blocks_") {
        return block(rest, "double_blocks");
    }
    if let Some(rest) = name.strip_prefix("single_blocks_") {
        return block(rest, "single_blocks");
    }
    let top = match name {
        "img_in" => "img_in",
        "txt_in" => "txt_in",
        "time_in_in_layer" => "time_in.in_layer",
        "time_in_out_layer" => "time_in.out_layer",
        "vector_in_in_layer" => "vector_in.in_layer",
        "vector_in_out_layer" => "vector_in.out_layer",
        "guidance_in_in_layer" => "guidance_in.in_layer",
        "guidance_in_out_layer" => "guidance_in.out_layer",
        "final_layer_linear" => "final_layer.linear",
        "final_layer_adaLN_modulation_1" => "final_layer.adaLN_modulation.1",
        _ => return None,
    };
    Some(top.to_string())
}

/// An XLabs processor name in BFL's naming.
fn xlabs_to_bfl(module: &str) -> Option<String> {
    let (block, processor) = module.split_once(".processor.")?;
    let tail = match processor {
        "qkv_lora1" => "img_attn.qkv",
        "proj_lora1" => "img_attn.proj",
        "qkv_lora2" => "txt_attn.qkv",
        "proj_lora2" => "txt_attn.proj",
        "qkv_lora" => "linear1",
        "proj_lora" => "linear2",
        _ => return None,
    };
    Some(format!("{block}.{tail}"))
}

fn module_name(format: LoraFormat, module: &str) -> (String, Naming) {
    let other = || (module.to_string(), Naming::Other);
    match format {
        LoraFormat::Peft => {
            if let Some(name) = module
                .strip_prefix("transformer.")
                .or_else(|| module.strip_prefix("unet."))
            {
                (name.to_string(), Naming::Diffusers)
            } else if let Some(name) = module.strip_prefix("text_encoder_2.") {
                (name.to_string(), Naming::TextEncoder2)
            } else if let Some(name) = module.strip_prefix("text_encoder.") {
                (name.to_string(), Naming::TextEncoder)
            } else {
                other()
            }
        }
        LoraFormat::AiToolkit => {
            let name = module
                .strip_prefix("model.diffusion_model.")
                .or_else(|| module.strip_prefix("diffusion_model."));
            match name {
                Some(name) => (name.to_string(), Naming::Bfl),
                None => other(),
            }
        }
        LoraFormat::Kohya => {
            if let Some(name) = module.strip_prefix("lora_unet_") {
                match kohya_to_bfl(name) {
                    Some(bfl) => (bfl, Naming::Bfl),
                    None => (name.to_string(), Naming::KohyaLdm),
                }
            } else if let Some(name) = module.strip_prefix("lora_te1_") {
                (name.to_string(), Naming::TextEncoder)
            } else if let Some(name) = module.strip_prefix("lora_te2_") {
                (name.to_string(), Naming::TextEncoder2)
            } else {
                other()
            }
        }
        LoraFormat::XLabs => match xlabs_to_bfl(module) {
            Some(name) => (name, Naming::Bfl),
            None => other(),
        },
    }
}

/// The alpha diffusers' adapter metadata gives a PEFT module without an
/// `.alpha` tensor (`component.rest`, e.g. `transformer.x.to_q`): the
/// component's `alpha_pattern` entry matching the module's name (equal, or a
/// dotted suffix of it), else its `lora_alpha`; with `use_rslora` the scale is
/// alpha/sqrt(rank), expressed here as an alpha over rank.
fn metadata_alpha(
    metadata: &serde_json::Value,
    module: &str,
    rank: usize,
) -> Result<Option<f64>, LoraError> {
    let Some((component, rest)) = module.split_once('.') else {
        return Ok(None);
    };
    let get = |key: &str| metadata.get(format!("{component}.{key}"));
    if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        return Err(LoraError::Unsupported(
            "this is a DoRA adapter (use_dora in its metadata); Kiln applies plain LoRA adapters only"
                .into(),
        ));
    }
    let pattern = get("alpha_pattern")
        .and_then(|p| p.as_object())
        .and_then(|patterns| {
            patterns
                .iter()
                .find(|(key, _)| rest == key.as_str() || rest.ends_with(&format!(".{key}")))
                .and_then(|(_, v)| v.as_f64())
        });
    let Some(alpha) = pattern.or_else(|| get("lora_alpha").and_then(|v| v.as_f64())) else {
        return Ok(None);
    };
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(LoraError::Malformed(format!(
            "{component}.lora_alpha in the adapter metadata is not a positive number"
        )));
    }
    let rslora = get("use_rslora").and_then(|v| v.as_bool()) == Some(true);
    Ok(Some(if rslora {
        alpha * (rank as f64).sqrt()
    } else {
        alpha
    }))
}

/// Group a file's tensors into modules.
pub fn parse(tensors: BTreeMap<String, Tensor>) -> Result<LoraFile, LoraError> {
    parse_with_metadata(tensors, None)
}

/// Group a file's tensors into modules, with diffusers' `lora_adapter_metadata`
/// (already decoded) when the file has it.
pub fn parse_with_metadata(
    tensors: BTreeMap<String, Tensor>,
    metadata: Option<&serde_json::Value>,
) -> Result<LoraFile, LoraError> {
    let names: Vec<&String> = tensors.keys().collect();
    if names.is_empty() {
        return Err(LoraError::UnknownFormat("the file holds no tensors".into()));
    }
    let format = detect(&names)?;
    let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
    for (name, tensor) in tensors {
        if let Some((module, _)) = DOWN
            .iter()
            .find_map(|s| name.strip_suffix(s).map(|m| (m.to_string(), *s)))
        {
            modules.entry(module).or_default().down = Some(tensor);
        } else if let Some(module) = UP.iter().find_map(|s| name.strip_suffix(s)) {
            modules.entry(module.to_string()).or_default().up = Some(tensor);
        } else if let Some(module) = name.strip_suffix(".alpha") {
            let alpha = tensor
                .to_dtype(candle_core::DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .ok()
                .and_then(|v| v.first().copied())
                .filter(|a| a.is_finite() && *a > 0.0)
                .ok_or_else(|| LoraError::Malformed(format!("{name} is not a positive scalar")))?;
            modules.entry(module.to_string()).or_default().alpha = Some(alpha);
        }
        // Other tensors (e.g. dora_scale, bias) are ignored; unmatched modules are reported.
    }
    let mut out = Vec::with_capacity(modules.len());
    for (module, parts) in modules {
        let (Some(down), Some(up)) = (parts.down, parts.up) else {
            return Err(LoraError::Malformed(format!(
                "module {module} lacks its {} matrix",
                "down (A) or up (B)"
            )));
        };
        let (rank, _) = down
            .dims2()
            .map_err(|_| LoraError::Malformed(format!("{module}: A must be a matrix")))?;
        let (_, up_rank) = up
            .dims2()
            .map_err(|_| LoraError::Malformed(format!("{module}: B must be a matrix")))?;
        if rank != up_rank || rank == 0 {
            return Err(LoraError::Malformed(format!(
                "{module}: A has rank {rank} but B has rank {up_rank}"
            )));
        }
        let alpha = match (parts.alpha, metadata, format) {
            (Some(alpha), _, _) => Some(alpha),
            (None, Some(metadata), LoraFormat::Peft) => metadata_alpha(metadata, &module, rank)?,
            _ => None,
        };
        let (name, naming) = module_name(format, &module);
        out.push(LoraModule {
            name,
            naming,
            down,
            up,
            alpha,
        });
    }
    Ok(LoraFile {
        format,
        modules: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(rows: usize, cols: usize) -> Tensor {
        Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn formats_are_detected_and_named() {
        let kohya = BTreeMap::from([
            (
                "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight".to_string(),
                t(2, 8),
            ),
            (
                "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight".to_string(),
                t(24, 2),
            ),
            (
                "lora_unet_double_blocks_3_img_attn_qkv.alpha".to_string(),
                Tensor::new(4f32, &Device::Cpu).unwrap(),
            ),
        ]);
        let file = parse(kohya).unwrap();
        assert_eq!(file.format, LoraFormat::Kohya);
        assert_eq!(file.modules[0].name, "double_blocks.3.img_attn.qkv");
        assert_eq!(file.modules[0].naming, Naming::Bfl);
        assert_eq!(file.modules[0].scale(), 2.0);

        let peft = BTreeMap::from([
            (
                "transformer.single_transformer_blocks.0.proj_out.lora_A.weight".to_string(),
                t(2, 8),
            ),
            (
                "transformer.single_transformer_blocks.0.proj_out.lora_B.weight".to_string(),
                t(4, 2),
            ),
        ]);
        let file = parse(peft).unwrap();
        assert_eq!(file.format, LoraFormat::Peft);
        assert_eq!(file.modules[0].name, "single_transformer_blocks.0.proj_out");
        assert_eq!(file.modules[0].scale(), 1.0);

        let xlabs = BTreeMap::from([
            (
                "double_blocks.1.processor.qkv_lora2.down.weight".to_string(),
                t(2, 8),
            ),
            (
                "double_blocks.1.processor.qkv_lora2.up.weight".to_string(),
                t(24, 2),
            ),
        ]);
        assert_eq!(
            parse(xlabs).unwrap().modules[0].name,
            "double_blocks.1.txt_attn.qkv"
        );
    }

    #[test]
    fn adapter_metadata_sets_alpha_like_peft() {
        let peft = || {
            BTreeMap::from([
                ("transformer.a.to_q.lora_A.weight".to_string(), t(4, 8)),
                ("transformer.a.to_q.lora_B.weight".to_string(), t(8, 4)),
                ("transformer.a.to_k.lora_A.weight".to_string(), t(4, 8)),
                ("transformer.a.to_k.lora_B.weight".to_string(), t(8, 4)),
                (
                    "text_encoder.text_model.fc1.lora_A.weight".to_string(),
                    t(4, 8),
                ),
                (
                    "text_encoder.text_model.fc1.lora_B.weight".to_string(),
                    t(8, 4),
                ),
            ])
        };
        let metadata = serde_json::json!({
            "transformer.r": 4, "transformer.lora_alpha": 8,
            "transformer.alpha_pattern": {"a.to_k": 2},
        });
        let file = parse_with_metadata(peft(), Some(&metadata)).unwrap();
        let scale = |name: &str| {
            file.modules
                .iter()
                .find(|m| m.name == name)
                .unwrap()
                .scale()
        };
        assert_eq!(scale("a.to_q"), 2.0);
        assert_eq!(scale("a.to_k"), 0.5);
        // No metadata for the text encoder: diffusers' default alpha = rank.
        assert_eq!(scale("text_model.fc1"), 1.0);
        assert_eq!(
            file.modules
                .iter()
                .find(|m| m.name == "text_model.fc1")
                .unwrap()
                .naming,
            Naming::TextEncoder
        );
        let rslora =
            serde_json::json!({"transformer.lora_alpha": 8, "transformer.use_rslora": true});
        let file = parse_with_metadata(peft(), Some(&rslora)).unwrap();
        let to_q = file.modules.iter().find(|m| m.name == "a.to_q").unwrap();
        assert_eq!(to_q.scale(), 4.0);
        let dora = serde_json::json!({"transformer.lora_alpha": 8, "transformer.use_dora": true});
        assert!(
            matches!(parse_with_metadata(peft(), Some(&dora)), Err(LoraError::Unsupported(m)) if m.contains("DoRA"))
        );
    }

    #[test]
    fn text_encoder_names_compare_across_namings() {
        assert_eq!(
            text_encoder_key("text_model.encoder.layers.0.self_attn.q_proj"),
            text_encoder_key("text_model_encoder_layers_0_self_attn_q_proj")
        );
        assert_eq!(
            text_encoder_key("encoder.layers.3.mlp.fc1"),
            text_encoder_key("text_model_encoder_layers_3_mlp_fc1")
        );
    }

    #[test]
    fn lycoris_unknown_and_broken_files_are_refused() {
        let dora = BTreeMap::from([
            ("transformer.x.lora_A.weight".to_string(), t(2, 2)),
            ("transformer.x.lora_B.weight".to_string(), t(2, 2)),
            ("transformer.x.lora_magnitude_vector".to_string(), t(1, 2)),
        ]);
        assert!(matches!(parse(dora), Err(LoraError::Unsupported(m)) if m.contains("DoRA")));
        let loha = BTreeMap::from([("lora_unet_x.hada_w1_a".to_string(), t(2, 2))]);
        assert!(matches!(parse(loha), Err(LoraError::Unsupported(m)) if m.contains("LoHa")));
        let unknown = BTreeMap::from([("model.weight".to_string(), t(2, 2))]);
        assert!(matches!(parse(unknown), Err(LoraError::UnknownFormat(_))));
        let half = BTreeMap::from([("transformer.x.lora_A.weight".to_string(), t(2, 2))]);
        assert!(matches!(parse(half), Err(LoraError::Malformed(_))));
        let ranks = BTreeMap::from([
            ("transformer.x.lora_A.weight".to_string(), t(2, 2)),
            ("transformer.x.lora_B.weight".to_string(), t(2, 3)),
        ]);
        assert!(matches!(parse(ranks), Err(LoraError::Malformed(m)) if m.contains("rank")));
    }
}
