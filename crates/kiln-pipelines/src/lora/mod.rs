//! LoRA support: reading adapter files defensively (safetensors only, size
//! limited), detecting their format, and mapping their modules onto a model's
//! layers, splitting updates aimed at BFL's fused layers (q|k|v, q|k|v|mlp)
//! into the separate layers Kiln's FLUX uses. Adapters then apply at runtime
//! (`kiln_engine::lora`), leaving base weights untouched.

pub mod formats;
pub mod request;
pub mod sources;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kiln_engine::KeyAdapter;
use kiln_engine::Source;
use kiln_engine::lora::{AdapterSet, LowRank};
use kiln_models::flux::{FluxConfig, bfl_adapter};
use kiln_models::flux2::Flux2Config;

pub use formats::{LoraFile, LoraFormat, LoraModule, Naming, parse, parse_with_metadata};

/// Largest LoRA file read (bytes).
pub const MAX_LORA_BYTES: u64 = 2 << 30;

/// Why a LoRA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("cannot read LoRA {path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("unknown LoRA format: {0}")]
    UnknownFormat(String),
    #[error("malformed LoRA: {0}")]
    Malformed(String),
    #[error("the LoRA matches no layer of this model ({0})")]
    NoMatch(String),
    #[error("LoRA module {module} does not fit the model: {message}")]
    Shape { module: String, message: String },
}

/// Read a LoRA file: safetensors only (pickle checkpoints are refused), at most
/// [`MAX_LORA_BYTES`].
pub fn read(path: &Path) -> Result<LoraFile, LoraError> {
    // Named by file name only: a downloaded LoRA lives in the server's cache,
    // whose location is no business of the client's.
    let shown = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unreadable = |message: String| LoraError::Unreadable {
        path: shown.clone(),
        message,
    };
    if kiln_engine::weights::has_pickle_extension(path) {
        return Err(LoraError::Unsupported(format!(
            "{shown} is a pickle checkpoint; Kiln reads only .safetensors (pickle can run code)"
        )));
    }
    let size = std::fs::metadata(path)
        .map_err(|e| unreadable(e.to_string()))?
        .len();
    if size > MAX_LORA_BYTES {
        return Err(unreadable(format!(
            "{size} bytes is over the {MAX_LORA_BYTES}-byte limit"
        )));
    }
    // Decide by parsing: a safetensors file whose header length starts with
    // byte 0x80 is still safetensors. Only a file that does not parse is
    // looked at for pickle's (0x80, protocol 2-5) or torch.save's zip magic.
    let tensors = match kiln_engine::weights::load_all(path, &Device::Cpu) {
        Ok(tensors) => tensors,
        Err(e) => {
            let mut magic = [0u8; 4];
            if let Ok(mut file) = std::fs::File::open(path) {
                use std::io::Read;
                let _ = file.read(&mut magic);
            }
            let pickle = magic[0] == 0x80 && (2..=5).contains(&magic[1]);
            if pickle || magic == *b"PK\x03\x04" {
                return Err(LoraError::Unsupported(format!(
                    "{shown} is a pickle (torch.save) checkpoint; Kiln reads only safetensors (pickle can run code)"
                )));
            }
            return Err(unreadable(format!("not a valid safetensors file ({e})")));
        }
    };
    let metadata = adapter_metadata(path).map_err(unreadable)?;
    parse_with_metadata(
        tensors.into_iter().collect::<BTreeMap<_, _>>(),
        metadata.as_ref(),
    )
}

/// diffusers' `lora_adapter_metadata` from a safetensors header (a JSON string
/// under `__metadata__`), decoded; `None` when absent.
fn adapter_metadata(path: &Path) -> Result<Option<serde_json::Value>, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|e| e.to_string())?;
    let length = u64::from_le_bytes(length);
    // The tensors were already read, so the header is sound; bound it anyway.
    if length > 100 << 20 {
        return Err(format!("a {length}-byte safetensors header is too large"));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("bad safetensors header: {e}"))?;
    let Some(raw) = header["__metadata__"]["lora_adapter_metadata"].as_str() else {
        return Ok(None);
    };
    serde_json::from_str(raw)
        .map(Some)
        .map_err(|e| format!("lora_adapter_metadata is not JSON: {e}"))
}

/// What applying a set of LoRAs did, for logs and response metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraReport {
    /// Model layers that received at least one update.
    pub layers: usize,
    /// File modules applied / not matching any layer.
    pub matched: usize,
    pub unmatched: Vec<String>,
}

/// Where each BFL module's rows go among the model's (diffusers-named) layers.
fn bfl_targets(layers: &[String], adapter: &KeyAdapter) -> HashMap<String, Vec<(String, Source)>> {
    let mut targets: HashMap<String, Vec<(String, Source)>> = HashMap::new();
    for layer in layers {
        let source = adapter.source(&format!("{layer}.weight"));
        let key = source.keys().first().map(|key| key.to_string());
        if let Some(module) = key.as_deref().and_then(|k| k.strip_suffix(".weight")) {
            targets
                .entry(module.to_string())
                .or_default()
                .push((layer.clone(), source));
        }
    }
    targets
}

/// The rows of a fused module's B that one layer takes.
fn select_rows(up: &Tensor, source: &Source) -> candle_core::Result<Option<Tensor>> {
    let rows = up.dims()[0];
    match source {
        Source::Key(_) => Ok(Some(up.clone())),
        Source::Rows { start, len, .. } => {
            if start + len > rows {
                // e.g. an XLabs q|k|v update on a q|k|v|mlp layer: no rows for mlp.
                return Ok(None);
            }
            up.narrow(0, *start, *len).map(Some)
        }
        Source::Concat(pieces) => {
            let mut parts = Vec::with_capacity(pieces.len());
            for piece in pieces {
                match select_rows(up, piece)? {
                    Some(part) => parts.push(part),
                    None => return Ok(None),
                }
            }
            Tensor::cat(&parts, 0).map(Some)
        }
        Source::Transposed(_) => Ok(None),
    }
}

/// The layers of a model LoRAs may target, by name.
#[derive(Debug, Clone, Default)]
pub struct LoraTargets {
    /// The denoiser's linear layers in diffusers' names (FLUX transformer or SDXL UNet).
    pub denoiser: Vec<String>,
    /// The (first) CLIP text encoder's (`ClipTextModel::linear_names`).
    pub text_encoder: Vec<String>,
    /// SDXL's second text encoder's.
    pub text_encoder_2: Vec<String>,
    /// kohya's underscored ldm name → denoiser layer (SDXL UNets).
    pub kohya_ldm: HashMap<String, String>,
    /// (in, out) of each layer, where the model reported it: updates that do
    /// not fit are refused when the adapters are built, naming the module.
    pub shapes: HashMap<String, (usize, usize)>,
}

impl LoraTargets {
    /// Note a layer's shape (see [`LoraTargets::shapes`]).
    pub fn add_shape(&mut self, linear: &kiln_engine::nn::Linear) {
        if let Some(name) = linear.name() {
            self.shapes
                .insert(name.to_string(), (linear.in_dim(), linear.out_dim()));
        }
    }
}

/// A FLUX generation, for refusing a LoRA trained for the other one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxGeneration {
    Flux1,
    Flux2,
}

impl FluxGeneration {
    fn name(self) -> &'static str {
        match self {
            FluxGeneration::Flux1 => "FLUX.1",
            FluxGeneration::Flux2 => "FLUX.2",
        }
    }

    /// Module-name pieces only this generation's transformer has, in the
    /// diffusers and BFL (ai-toolkit, kohya) namings.
    fn markers(self) -> &'static [&'static str] {
        match self {
            FluxGeneration::Flux1 => &[
                "norm1.linear",
                "norm1_context.linear",
                "ff.net.",
                "ff_context.net.",
                "proj_mlp",
                "time_text_embed",
                "img_mod.lin",
                "txt_mod.lin",
                "modulation.lin",
                "vector_in",
            ],
            FluxGeneration::Flux2 => &[
                "double_stream_modulation",
                "single_stream_modulation",
                "to_qkv_mlp_proj",
                "linear_in",
                "linear_out",
                "time_guidance_embed",
            ],
        }
    }

    /// The first module of `file` that only the other generation has, if any.
    fn foreign_module(self, file: &LoraFile) -> Option<&str> {
        let other = match self {
            FluxGeneration::Flux1 => FluxGeneration::Flux2,
            FluxGeneration::Flux2 => FluxGeneration::Flux1,
        };
        file.modules
            .iter()
            .map(|m| m.name.as_str())
            // `double_stream_modulation_img.lin` holds FLUX.1's `modulation.lin`.
            .find(|name| {
                other.markers().iter().any(|m| name.contains(m))
                    && !self.markers().iter().any(|m| name.contains(m))
            })
    }

    /// A shape misfit, with the likely cause: a LoRA for the other
    /// generation (same names, other widths) or another model size.
    fn explain(self, error: LoraError) -> LoraError {
        match error {
            LoraError::Shape { module, message } => LoraError::Shape {
                module,
                message: format!(
                    "{message}; this model is {}: is the LoRA for another FLUX generation or model size?",
                    self.name()
                ),
            },
            other => other,
        }
    }

    /// Refuse LoRAs trained for the other generation, naming a module that shows it.
    pub fn check(self, loras: &[(&LoraFile, f64)]) -> Result<(), LoraError> {
        for (file, _) in loras {
            if let Some(module) = self.foreign_module(file) {
                let other = if self == FluxGeneration::Flux1 {
                    FluxGeneration::Flux2
                } else {
                    FluxGeneration::Flux1
                };
                return Err(LoraError::Unsupported(format!(
                    "this LoRA was trained for {} (it targets {module:?}, which only {} has); this model is {}",
                    other.name(),
                    other.name(),
                    self.name()
                )));
            }
        }
        Ok(())
    }
}

/// Adapters for a FLUX model (its LoRA targets and transformer config) from
/// LoRA files with user scales.
pub fn flux_adapters(
    loras: &[(&LoraFile, f64)],
    targets: &LoraTargets,
    config: &FluxConfig,
    dtype: DType,
) -> Result<(AdapterSet, LoraReport), LoraError> {
    FluxGeneration::Flux1.check(loras)?;
    adapters(loras, targets, Some(&bfl_adapter(config, "")), dtype)
        .map_err(|e| FluxGeneration::Flux1.explain(e))
}

/// Adapters for a FLUX.2 model: as [`flux_adapters`], with FLUX.2's BFL
/// names (ai-toolkit's fused `qkv` split onto q/k/v, `linear1` onto the
/// fused `to_qkv_mlp_proj`).
pub fn flux2_adapters(
    loras: &[(&LoraFile, f64)],
    targets: &LoraTargets,
    config: &Flux2Config,
    dtype: DType,
) -> Result<(AdapterSet, LoraReport), LoraError> {
    FluxGeneration::Flux2.check(loras)?;
    adapters(
        loras,
        targets,
        Some(&kiln_models::flux2::bfl_adapter(config, "")),
        dtype,
    )
    .map_err(|e| FluxGeneration::Flux2.explain(e))
}

/// Adapters for a model's `targets` (with `bfl`, the model's BFL → diffusers
/// key adapter, BFL-named modules are split onto its layers) from LoRA files
/// with user scales.
pub fn adapters(
    loras: &[(&LoraFile, f64)],
    targets: &LoraTargets,
    bfl: Option<&KeyAdapter>,
    dtype: DType,
) -> Result<(AdapterSet, LoraReport), LoraError> {
    let linear_names = &targets.denoiser;
    let targets_shapes = &targets.shapes;
    let layers: HashSet<&String> = linear_names.iter().collect();
    let keyed = |names: &[String]| -> HashMap<String, String> {
        names
            .iter()
            .map(|name| (formats::text_encoder_key(name), name.clone()))
            .collect()
    };
    let text_encoder = keyed(&targets.text_encoder);
    let text_encoder_2 = keyed(&targets.text_encoder_2);
    let bfl = bfl
        .map(|adapter| bfl_targets(linear_names, adapter))
        .unwrap_or_default();
    let mut set = AdapterSet::default();
    let mut report = LoraReport::default();
    for (file, user_scale) in loras {
        let mut matched_here = 0;
        for module in &file.modules {
            let scale = module.scale() * user_scale;
            let fit = |e: candle_core::Error| LoraError::Shape {
                module: module.name.clone(),
                message: e.to_string(),
            };
            let targets: Vec<(String, Tensor)> = match module.naming {
                Naming::Diffusers if layers.contains(&module.name) => {
                    vec![(module.name.clone(), module.up.clone())]
                }
                Naming::TextEncoder | Naming::TextEncoder2 => {
                    let encoder = if module.naming == Naming::TextEncoder {
                        &text_encoder
                    } else {
                        &text_encoder_2
                    };
                    encoder
                        .get(&formats::text_encoder_key(&module.name))
                        .map(|layer| vec![(layer.clone(), module.up.clone())])
                        .unwrap_or_default()
                }
                Naming::KohyaLdm => targets
                    .kohya_ldm
                    .get(&module.name)
                    .map(|layer| vec![(layer.clone(), module.up.clone())])
                    .unwrap_or_default(),
                Naming::Bfl => match bfl.get(&module.name) {
                    Some(targets) => {
                        let mut out = Vec::new();
                        for (layer, source) in targets {
                            if let Some(up) = select_rows(&module.up, source).map_err(fit)? {
                                out.push((layer.clone(), up));
                            }
                        }
                        out
                    }
                    None => Vec::new(),
                },
                _ => Vec::new(),
            };
            if targets.is_empty() {
                report.unmatched.push(module.name.clone());
                continue;
            }
            for (layer, up) in &targets {
                if let Some(&(in_dim, out_dim)) = targets_shapes.get(layer) {
                    let (rows, columns) = (up.dims()[0], module.down.dims()[1]);
                    if (rows, columns) != (out_dim, in_dim) {
                        return Err(LoraError::Shape {
                            module: module.name.clone(),
                            message: format!(
                                "its update is {rows}×{columns}, this model's {layer} is {out_dim}×{in_dim}"
                            ),
                        });
                    }
                }
            }
            for (layer, up) in targets {
                set.add(
                    layer,
                    LowRank::new(&module.down, &up, scale, dtype).map_err(fit)?,
                );
            }
            matched_here += 1;
        }
        if matched_here == 0 {
            let sample: Vec<&str> = file
                .modules
                .iter()
                .take(3)
                .map(|m| m.name.as_str())
                .collect();
            return Err(LoraError::NoMatch(format!(
                "{} file with modules like {sample:?}",
                file.format.name()
            )));
        }
        report.matched += matched_here;
    }
    report.layers = set.layer_count();
    Ok((set, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file whose 8-byte header length is `len` (padded with
    /// spaces, as the format allows).
    fn safetensors_with_header_length(len: usize) -> Vec<u8> {
        let mut header = br#"{"lora_unet_x.lora_down.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}"#.to_vec();
        header.resize(len, b' ');
        let mut bytes = (len as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&1f32.to_le_bytes());
        bytes
    }

    #[test]
    fn a_header_length_starting_with_0x80_is_safetensors_not_pickle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("style.safetensors");
        let bytes = safetensors_with_header_length(0x180);
        assert_eq!(bytes[0], 0x80);
        std::fs::write(&path, &bytes).unwrap();
        match read(&path) {
            Err(LoraError::Unsupported(message)) => panic!("refused as pickle: {message}"),
            Err(LoraError::Unreadable { message, .. }) => panic!("not parsed: {message}"),
            // Parsed: whatever the tensor names mean, it was read as safetensors.
            Ok(_) | Err(_) => {}
        }
        // A real pickle header (protocol 4) that does not parse is still refused.
        std::fs::write(&path, b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}").unwrap();
        assert!(matches!(read(&path), Err(LoraError::Unsupported(m)) if m.contains("pickle")));
    }
}
