//! Loading an SDXL model folder: the diffusers layout (`model_index.json`,
//! `unet/`, `text_encoder/` (CLIP-L), `text_encoder_2/` (OpenCLIP-bigG with
//! projection), `vae/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`), or a
//! single-file checkpoint as CivitAI and Illustrious ship it (one
//! `.safetensors` with `model.diffusion_model.*`, `conditioner.embedders.*`,
//! `first_stage_model.*`) beside `tokenizer/` and `tokenizer_2/`, with SDXL
//! base's configs unless the folder has its own. A checkpoint holding a
//! `v_pred` tensor (the community marker) is v-prediction, and one holding
//! `ztsnr` has zero-terminal-SNR betas. Every failure names the file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kiln_engine::{KeyAdapter, WeightFiles};
use kiln_models::clip::{ClipTextConfig, ClipTextModel, open_clip_adapter};
use kiln_models::unet::{UNet2DConditionModel, UNetConfig, ldm_unet_adapter, ldm_unet_prefix};
use kiln_models::vae::{AutoencoderKl, VaeConfig, detect_vae_layout};

use super::defaults;
use crate::text_to_image::loading::{
    Quantization, load_weights, open, read_json, unet_keeps_dense, var_builder,
};
use crate::text_to_image::schedulers::DiscreteConfig;
use crate::text_to_image::tokenizer::PromptTokenizer;

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
    /// The folder's safety checker (`safety_checker/`), if it has one.
    pub safety: Option<super::safety::SafetyFilter>,
    pub device: Device,
    pub dtype: DType,
    /// Bytes the loaded weights hold (quantized layers counted as stored).
    pub resident_bytes: u64,
}

impl SdxlComponents {
    /// Pixels per latent along each side, from the VAE's depth (diffusers'
    /// `vae_scale_factor`, 2^(len(block_out_channels) - 1); 8 for SDXL's VAE).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }
}

/// The OpenCLIP tensor that marks an SDXL single file, and its prefix there.
const OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";

/// The checkpoint of a single-file folder: the largest `.safetensors` at its root.
fn single_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
}

/// Whether `dir/unet` holds weights (the diffusers layout; a single-file folder
/// may still have `unet/config.json`).
fn has_unet_weights(dir: &Path) -> bool {
    WeightFiles::open(&dir.join("unet")).is_ok()
}

/// Whether `dir` holds an SDXL model: a diffusers pipeline or a single file.
pub fn is_sdxl_folder(dir: &Path) -> bool {
    let index: serde_json::Value = std::fs::read_to_string(dir.join("model_index.json"))
        .ok()
        .and_then(|t| kiln_engine::json::parse_lenient(&t).ok())
        .unwrap_or_default();
    if index["_class_name"]
        .as_str()
        .is_some_and(|name| name.starts_with("StableDiffusionXL"))
        || (has_unet_weights(dir) && dir.join("text_encoder_2").is_dir())
    {
        return true;
    }
    !has_unet_weights(dir)
        && single_file(dir)
            .and_then(|file| WeightFiles::open(&file).ok())
            .is_some_and(|files| files.contains(&format!("{OPEN_CLIP_PREFIX}positional_embedding")))
}

/// `dir/relative` parsed, or `fallback` (SDXL base's) when the file is absent.
fn config_or<T: serde::de::DeserializeOwned>(
    dir: &Path,
    relative: &str,
    fallback: &str,
) -> Result<T, String> {
    let path = dir.join(relative);
    if path.is_file() {
        read_json(&path)
    } else {
        serde_json::from_str(fallback).map_err(|e| format!("built-in {relative}: {e}"))
    }
}

fn clip(
    files: WeightFiles,
    adapter: KeyAdapter,
    config: ClipTextConfig,
    what: &Path,
    dtype: DType,
    device: &Device,
) -> Result<ClipTextModel, String> {
    ClipTextModel::load(var_builder(files, adapter, dtype, device), config)
        .map_err(|e| format!("{}: {e}", what.display()))
}

/// The Hub repo whose tokenizers every SDXL fine-tune uses (diffusers'
/// `from_single_file` fetches them from there too).
pub const SDXL_BASE_REPO: &str = "stabilityai/stable-diffusion-xl-base-1.0";

fn has_tokenizer(folder: &Path) -> bool {
    folder.join("tokenizer.json").is_file()
        || (folder.join("vocab.json").is_file() && folder.join("merges.txt").is_file())
}

/// `name/` beside the model, else (single files carry no tokenizer) SDXL base's
/// from the HF cache (`$HF_HOME/hub`, by default `~/.cache/huggingface/hub`).
fn tokenizer(dir: &Path, name: &str) -> Result<PromptTokenizer, String> {
    let beside = dir.join(name);
    if has_tokenizer(&beside) {
        return PromptTokenizer::load_clip(&beside);
    }
    let cache = kiln_fetch::Hub::from_env().cache;
    let repo_dir = cache.join(format!("models--{}", SDXL_BASE_REPO.replace('/', "--")));
    let cached = kiln_registry::hf_cache_snapshot(&repo_dir).join(name);
    if has_tokenizer(&cached) {
        return PromptTokenizer::load_clip(&cached);
    }
    Err(format!(
        "{}: missing; single-file checkpoints carry no tokenizer: run `kiln models pull {SDXL_BASE_REPO} --only tokenizer,tokenizer_2` (into the HF cache at {}), or put SDXL's {name}/ folder beside the checkpoint",
        beside.display(),
        cache.display()
    ))
}

impl SdxlComponents {
    /// The layers LoRAs may target: the UNet's transformer linears (also under
    /// kohya's ldm names) and both text encoders' projections.
    pub fn lora_targets(&mut self) -> crate::lora::LoraTargets {
        let denoiser = self.unet.linear_names();
        let ldm = ldm_unet_adapter(self.unet.config(), "");
        let kohya_ldm = denoiser
            .iter()
            .filter_map(|name| {
                let source = ldm.source(&format!("{name}.weight"));
                let key = source
                    .keys()
                    .first()?
                    .strip_suffix(".weight")?
                    .replace('.', "_");
                Some((key, name.clone()))
            })
            .collect();
        let mut targets = crate::lora::LoraTargets {
            denoiser,
            text_encoder: self.text_encoder.linear_names(),
            text_encoder_2: self.text_encoder_2.linear_names(),
            kohya_ldm,
            ..Default::default()
        };
        let _ = self.unet.for_each_linear(&mut |linear| {
            targets.add_shape(linear);
            Ok(())
        });
        targets
    }

    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, String> {
        Self::load_quantized(dir, device, dtype, Quantization::default())
    }

    /// As [`SdxlComponents::load`], quantizing the UNet's linear layers (its
    /// transformer blocks; the convolutions stay dense) as `quantization` says.
    pub fn load_quantized(
        dir: &Path,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<Self, String> {
        let (loaded, bytes) = kiln_engine::resident::count_loaded(|| {
            Self::load_uncounted(dir, device, dtype, quantization)
        });
        let mut components = loaded?;
        components.resident_bytes = bytes;
        Ok(components)
    }

    fn load_uncounted(
        dir: &Path,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<Self, String> {
        let index: serde_json::Value = read_json(&dir.join("model_index.json")).unwrap_or_default();
        let unet_config: UNetConfig = config_or(dir, "unet/config.json", defaults::UNET)?;
        unet_config
            .validate()
            .map_err(|e| format!("{}: {e}", dir.join("unet/config.json").display()))?;
        let clip_config: ClipTextConfig =
            config_or(dir, "text_encoder/config.json", defaults::TEXT_ENCODER)?;
        let clip2_config: ClipTextConfig =
            config_or(dir, "text_encoder_2/config.json", defaults::TEXT_ENCODER_2)?;
        let vae_config: VaeConfig = config_or(dir, "vae/config.json", defaults::VAE)?;
        let mut scheduler: DiscreteConfig =
            config_or(dir, "scheduler/scheduler_config.json", "{}")?;

        let single = if has_unet_weights(dir) {
            None
        } else {
            Some(single_file(dir).ok_or_else(|| {
                format!(
                    "{}: neither a diffusers SDXL folder (unet/) nor a single-file checkpoint (*.safetensors)",
                    dir.display()
                )
            })?)
        };
        let (unet, text_encoder, text_encoder_2, vae_files, vae_path) = match &single {
            None => {
                let unet_dir = dir.join("unet");
                crate::text_to_image::loading::check_saved_quantization(
                    &unet_dir.join("config.json"),
                )?;
                let files = open(&unet_dir)?;
                // A GGUF UNet (city96's, stable-diffusion.cpp's) keeps ldm names.
                let adapter = match ldm_unet_prefix(&files.names()) {
                    Some(prefix) => ldm_unet_adapter(&unet_config, &prefix),
                    None => KeyAdapter::default(),
                };
                let unet = quantization
                    .denoiser(unet_keeps_dense, || {
                        load_weights(files, adapter, dtype, device, |vb| {
                            UNet2DConditionModel::load(vb, unet_config)
                        })
                    })
                    .map_err(|e| format!("{}: {e}", unet_dir.display()))?;
                let te = dir.join("text_encoder");
                let te2 = dir.join("text_encoder_2");
                (
                    unet,
                    clip(
                        open(&te)?,
                        KeyAdapter::default(),
                        clip_config,
                        &te,
                        dtype,
                        device,
                    )?,
                    clip(
                        open(&te2)?,
                        KeyAdapter::default(),
                        clip2_config,
                        &te2,
                        dtype,
                        device,
                    )?,
                    open(&dir.join("vae"))?,
                    dir.join("vae"),
                )
            }
            Some(file) => {
                let files = open(file)?;
                let names = files.names();
                let prefix = ldm_unet_prefix(&names).ok_or_else(|| {
                    format!(
                        "{}: no SDXL UNet (model.diffusion_model.*) in the file",
                        file.display()
                    )
                })?;
                if files.contains("v_pred") {
                    scheduler.prediction_type = "v_prediction".into();
                }
                if files.contains("ztsnr") {
                    scheduler.rescale_betas_zero_snr = true;
                }
                let adapter = ldm_unet_adapter(&unet_config, &prefix);
                let unet = quantization
                    .denoiser(unet_keeps_dense, || {
                        UNet2DConditionModel::load(
                            var_builder(files, adapter, dtype, device),
                            unet_config,
                        )
                    })
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                let clip_l = KeyAdapter {
                    prefix: CLIP_L_PREFIX.into(),
                    ..KeyAdapter::default()
                };
                let open_clip = open_clip_adapter(&clip2_config, OPEN_CLIP_PREFIX);
                (
                    unet,
                    clip(open(file)?, clip_l, clip_config, file, dtype, device)?,
                    clip(open(file)?, open_clip, clip2_config, file, dtype, device)?,
                    open(file)?,
                    file.clone(),
                )
            }
        };
        let adapter = detect_vae_layout(&vae_files.names()).adapter(&vae_config);
        // The VAE runs in f32: SDXL's overflows in f16 (`force_upcast`).
        let vae = AutoencoderKl::load(
            var_builder(vae_files, adapter, DType::F32, device),
            vae_config,
        )
        .map_err(|e| format!("{}: {e}", vae_path.display()))?;
        Ok(SdxlComponents {
            resident_bytes: 0,
            tokenizer: tokenizer(dir, "tokenizer")?,
            tokenizer_2: tokenizer(dir, "tokenizer_2")?,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            scheduler,
            force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"]
                .as_bool()
                .unwrap_or(true),
            safety: super::safety::SafetyFilter::load(dir, device)?,
            device: device.clone(),
            dtype,
        })
    }
}
