//! Loading an SDXL model folder in the diffusers layout (`model_index.json`,
//! `unet/`, `text_encoder/` (CLIP-L), `text_encoder_2/` (OpenCLIP-bigG with
//! projection), `vae/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`). Every
//! failure names the file.

use std::path::Path;

use candle_core::{DType, Device};
use kiln_engine::KeyAdapter;
use kiln_models::clip::{ClipTextConfig, ClipTextModel};
use kiln_models::unet::{UNet2DConditionModel, UNetConfig};
use kiln_models::vae::{AutoencoderKl, VaeConfig, detect_vae_layout};

use crate::text_to_image::flux::PromptTokenizer;
use crate::text_to_image::loading::{open, read_json, var_builder};
use crate::text_to_image::schedulers::DiscreteConfig;

/// Everything an SDXL generation needs, loaded.
pub struct SdxlComponents {
    pub tokenizer: PromptTokenizer,
    pub tokenizer_2: PromptTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKl,
    pub scheduler: DiscreteConfig,
    /// An absent negative prompt means zero embeddings (SDXL base), not "".
    pub force_zeros_for_empty_prompt: bool,
    pub device: Device,
    pub dtype: DType,
}

/// Whether `dir` holds a diffusers SDXL pipeline.
pub fn is_sdxl_folder(dir: &Path) -> bool {
    let index: serde_json::Value = std::fs::read_to_string(dir.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    index["_class_name"]
        .as_str()
        .is_some_and(|name| name.starts_with("StableDiffusionXL"))
        || (dir.join("unet/config.json").is_file() && dir.join("text_encoder_2").is_dir())
}

fn clip(dir: &Path, dtype: DType, device: &Device) -> Result<ClipTextModel, String> {
    let config: ClipTextConfig = read_json(&dir.join("config.json"))?;
    ClipTextModel::load(
        var_builder(open(dir)?, KeyAdapter::default(), dtype, device),
        config,
    )
    .map_err(|e| format!("{}: {e}", dir.display()))
}

impl SdxlComponents {
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, String> {
        let index: serde_json::Value = read_json(&dir.join("model_index.json")).unwrap_or_default();
        let unet_dir = dir.join("unet");
        let unet_config = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let unet = UNet2DConditionModel::load(
            var_builder(open(&unet_dir)?, KeyAdapter::default(), dtype, device),
            unet_config,
        )
        .map_err(|e| format!("{}: {e}", unet_dir.display()))?;
        let vae_dir = dir.join("vae");
        let vae_config: VaeConfig = read_json(&vae_dir.join("config.json"))?;
        let files = open(&vae_dir)?;
        let adapter = detect_vae_layout(&files.names()).adapter(&vae_config);
        // The VAE runs in f32: SDXL's overflows in f16 (`force_upcast`).
        let vae = AutoencoderKl::load(var_builder(files, adapter, DType::F32, device), vae_config)
            .map_err(|e| format!("{}: {e}", vae_dir.display()))?;
        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let scheduler = if scheduler_path.is_file() {
            read_json(&scheduler_path)?
        } else {
            DiscreteConfig::default()
        };
        Ok(SdxlComponents {
            tokenizer: PromptTokenizer::load_clip(&dir.join("tokenizer"))?,
            tokenizer_2: PromptTokenizer::load_clip(&dir.join("tokenizer_2"))?,
            text_encoder: clip(&dir.join("text_encoder"), dtype, device)?,
            text_encoder_2: clip(&dir.join("text_encoder_2"), dtype, device)?,
            unet,
            vae,
            scheduler,
            force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"]
                .as_bool()
                .unwrap_or(true),
            device: device.clone(),
            dtype,
        })
    }
}
