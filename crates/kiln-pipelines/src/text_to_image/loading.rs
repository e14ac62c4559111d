//! Loading helpers the text-to-image pipelines share: JSON configs, weight
//! folders, var builders over adapted (renamed/fused) weights, the device and
//! dtype from the environment, and the VAE decode to images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kiln_engine::{AdaptedWeights, KeyAdapter, SharedWeights, WeightFiles};
use serde::de::DeserializeOwned;

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    kiln_engine::json::from_str_lenient(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn var_builder(
    files: WeightFiles,
    adapter: KeyAdapter,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(AdaptedWeights::new(files, adapter)),
        dtype,
        device.clone(),
    )
}

/// Run `load` over a var builder on `files`; when they hold quantized weights
/// (a GGUF file, a bitsandbytes 8-bit save), those reach the linear layers as
/// stored (never dequantized to a dense copy at load).
pub(crate) fn load_weights<T>(
    files: WeightFiles,
    adapter: KeyAdapter,
    dtype: DType,
    device: &Device,
    load: impl FnOnce(VarBuilder<'static>) -> T,
) -> T {
    if !files.holds_quantized() {
        return load(var_builder(files, adapter, dtype, device));
    }
    let weights = Arc::new(AdaptedWeights::new(files, adapter));
    let vb = VarBuilder::from_backend(
        Box::new(SharedWeights(weights.clone())),
        dtype,
        device.clone(),
    );
    let stored: Arc<dyn kiln_engine::quant::StoredQuantized> = weights;
    kiln_engine::quant::while_reading_quantized(Some(stored), || load(vb))
}

/// A transformer's weights: the `transformer/` folder (diffusers, or a BFL
/// or GGUF file inside), or else the first root-level `.safetensors` or
/// `.gguf` file that is not one of `skip` (BFL's `ae.safetensors`).
pub(crate) fn transformer_weights(
    dir: &Path,
    family: &str,
    skip: &[&str],
) -> Result<PathBuf, String> {
    let folder = dir.join("transformer");
    if folder.is_dir() {
        return Ok(folder);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            (name.ends_with(".safetensors") || name.ends_with(".gguf"))
                && !skip.contains(&name.as_str())
        })
        .collect();
    candidates.sort();
    candidates.into_iter().next().ok_or_else(|| {
        format!(
            "{}: no transformer/ folder and no {family} .safetensors or .gguf file",
            dir.display()
        )
    })
}

/// A BFL single file's tensor shapes and names (BFL and GGUF FLUX files ship
/// no config), for reading a transformer's sizes off them.
pub(crate) struct BflShapes<'a> {
    pub files: &'a WeightFiles,
    pub names: Vec<String>,
    pub prefix: String,
    pub path: &'a Path,
}

impl BflShapes<'_> {
    /// The stored shape of `name` (under the file's prefix).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, String> {
        self.files
            .shape(&format!("{}{name}", self.prefix))
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// The (rows, columns) of matrix `name`.
    pub fn dims2(&self, name: &str) -> Result<(usize, usize), String> {
        match self.shape(name)?.as_slice() {
            [rows, columns] => Ok((*rows, *columns)),
            other => Err(format!(
                "{}: {name} has shape {other:?}, expected a matrix",
                self.path.display()
            )),
        }
    }

    /// The length of vector `name`.
    pub fn dims1(&self, name: &str) -> Result<usize, String> {
        match self.shape(name)?.as_slice() {
            [len] => Ok(*len),
            other => Err(format!(
                "{}: {name} has shape {other:?}, expected a vector",
                self.path.display()
            )),
        }
    }

    /// How many numbered blocks `block.N.` the file holds.
    pub fn count(&self, block: &str) -> usize {
        let start = format!("{}{block}.", self.prefix);
        self.names
            .iter()
            .filter_map(|n| n.strip_prefix(&start))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |last| last + 1)
    }

    /// Whether any tensor name contains `fragment`.
    pub fn has(&self, fragment: &str) -> bool {
        self.names.iter().any(|n| n.contains(fragment))
    }
}

/// A component config's `quantization_config` (diffusers' `save_pretrained`
/// of a quantized model): bitsandbytes 8-bit saves are read (their int8 rows
/// load as stored); every other method is refused, naming it, rather than
/// misread as dense weights.
pub(crate) fn check_saved_quantization(config_path: &Path) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(config_path) else {
        return Ok(());
    };
    let Ok(config) = kiln_engine::json::parse_lenient(&text) else {
        return Ok(());
    };
    let saved = &config["quantization_config"];
    if saved.is_null() {
        return Ok(());
    }
    let method = saved["quant_method"]
        .as_str()
        .unwrap_or("an unnamed method");
    match method {
        "bitsandbytes" if saved["load_in_8bit"].as_bool() == Some(true) => Ok(()),
        "bitsandbytes" => Err(format!(
            "{}: bitsandbytes 4-bit weights ({}) are not supported: serve the dense weights with quantize = \"q4_k\", or a GGUF Q4_K file",
            config_path.display(),
            saved["bnb_4bit_quant_type"].as_str().unwrap_or("4-bit")
        )),
        other => Err(format!(
            "{}: weights saved quantized with {other:?} are not supported: Kiln reads bitsandbytes 8-bit saves and GGUF files, or quantizes dense weights at load (quantize = \"int8\", \"q8_0\", \"q4_k\")",
            config_path.display()
        )),
    }
}

pub(crate) fn open(path: &Path) -> Result<WeightFiles, String> {
    WeightFiles::open(path).map_err(|e| e.to_string())
}

/// Decode raw latents (already unscaled) to images (B, H, W, 3) in [0, 1],
/// in `tile`-pixel tiles when given (diffusers' postprocess: x/2 + 0.5, clamped).
pub(crate) fn decode_images(
    vae: &kiln_models::vae::AutoencoderKl,
    latents: &candle_core::Tensor,
    tile: Option<usize>,
) -> candle_core::Result<candle_core::Tensor> {
    let decoded = match tile {
        Some(tile) => vae.decode_tiled(latents, tile)?,
        None => vae.decode(latents)?,
    };
    ((decoded / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))
}

/// Which parts quantize while they load (`[[models]] config = { quantize,
/// quantize_text_encoder }`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantization {
    /// The denoiser's (transformer's or UNet's) linear layers.
    pub denoiser: Option<kiln_engine::quant::QuantKind>,
    /// Also the sequence text encoder's (FLUX.1's T5, FLUX.2's Qwen3).
    pub text_encoder: bool,
}

impl Quantization {
    pub fn from_settings(settings: &crate::settings::ModelSettings) -> Self {
        Quantization {
            denoiser: settings.quantize,
            text_encoder: settings.quantize_text_encoder,
        }
    }

    /// Run `load` with the denoiser's policy: `keep_dense` names the layers
    /// that stay in the compute dtype.
    pub(crate) fn denoiser<T>(&self, keep_dense: fn(&str) -> bool, load: impl FnOnce() -> T) -> T {
        let policy = self
            .denoiser
            .map(|kind| kiln_engine::quant::LoadPolicy { kind, keep_dense });
        kiln_engine::quant::while_loading(policy, load)
    }

    /// Run `load` (a FLUX VAE's) with bf16 products when the denoiser loads
    /// in bf16 (a CPU's `dtype = bf16`): diffusers runs FLUX's VAE in the
    /// pipeline's dtype. SDXL's VAE stays f32, as its `force_upcast` asks.
    pub(crate) fn flux_vae<T>(&self, load: impl FnOnce() -> T) -> T {
        let policy = (self.denoiser == Some(kiln_engine::quant::QuantKind::Bf16)).then_some(
            kiln_engine::quant::LoadPolicy {
                kind: kiln_engine::quant::QuantKind::Bf16,
                keep_dense: |_| false,
            },
        );
        kiln_engine::quant::while_loading(policy, load)
    }

    /// Run `load` with the text encoder's policy (every linear, when asked).
    pub(crate) fn text_encoder<T>(&self, load: impl FnOnce() -> T) -> T {
        let policy = match (self.denoiser, self.text_encoder) {
            (Some(kind), true) => Some(kiln_engine::quant::LoadPolicy {
                kind,
                keep_dense: |_| false,
            }),
            _ => None,
        };
        kiln_engine::quant::while_loading(policy, load)
    }
}

/// FLUX transformer layers (both generations) that stay dense when
/// quantizing, as llama.cpp's FLUX recipe (city96's GGUF files) keeps them in
/// the base precision: the input embedders, the timestep/guidance/text
/// embedders and the final layer (`norm_out.linear`, `proj_out`), about 1% of
/// the weights. The per-block modulation projections are quantized, as
/// bitsandbytes and llama.cpp quantize them: they are 27% of FLUX.1-dev's
/// linear weights, and keeping them dense would hold int8 at 0.64× of bf16.
pub(crate) fn flux_keeps_dense(name: &str) -> bool {
    matches!(
        name,
        "x_embedder" | "context_embedder" | "proj_out" | "norm_out.linear"
    ) || name.starts_with("time_text_embed")
        || name.starts_with("time_guidance_embed")
}

/// SDXL UNet linears that stay dense when quantizing: the time and added
/// (size/pooled-text) embeddings.
pub(crate) fn unet_keeps_dense(name: &str) -> bool {
    name.starts_with("time_embedding") || name.starts_with("add_embedding")
}
