//! Loading a FLUX model folder: the diffusers layout (`model_index.json`,
//! `transformer/`, `text_encoder/`, `text_encoder_2/`, `vae/`, `tokenizer/`,
//! `tokenizer_2/`, `scheduler/`), where the transformer may instead be a BFL single
//! file (`flux1-*.safetensors`, in the root or `transformer/`) and the VAE BFL's
//! `ae.safetensors`. Every failure names the file. Loaded resident, or
//! offloaded: each part loaded onto the accelerator for its stage only.

use std::path::{Path, PathBuf};

use super::generate::{FluxModels, FluxParts, Part};
use super::prompt::TextEncoders;
use crate::error::PipelineError;
use crate::text_to_image::loading::{
    self, Quantization, flux_keeps_dense, open, read_json, var_builder,
};
use crate::text_to_image::schedulers::FlowMatchEulerConfig;
use crate::text_to_image::tokenizer::PromptTokenizer;
use candle_core::{DType, Device};
use kiln_engine::KeyAdapter;
use kiln_models::clip::{ClipTextConfig, ClipTextModel};
use kiln_models::flux::{FluxConfig, FluxLayout, FluxTransformer};
use kiln_models::t5::{T5Config, T5Encoder};
use kiln_models::vae::{AutoencoderKl, VaeConfig, detect_vae_layout};

/// Everything a FLUX generation needs, loaded.
pub struct FluxComponents {
    pub text: TextEncoders,
    pub transformer: FluxTransformer,
    pub vae: AutoencoderKl,
    pub scheduler: FlowMatchEulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// Bytes the loaded weights hold (quantized layers counted as stored).
    pub resident_bytes: u64,
}

fn transformer_weights(dir: &Path) -> Result<PathBuf, String> {
    loading::transformer_weights(dir, "FLUX", &["ae.safetensors"])
}

impl FluxComponents {
    /// The layers LoRAs may target: the transformer's and CLIP's linears.
    pub fn lora_targets(&mut self) -> crate::lora::LoraTargets {
        let mut targets = crate::lora::LoraTargets {
            denoiser: self.transformer.linear_names().unwrap_or_default(),
            text_encoder: self.text.clip.linear_names(),
            ..Default::default()
        };
        let _ = self.transformer.for_each_linear(&mut |linear| {
            targets.add_shape(linear);
            Ok(())
        });
        targets
    }

    /// Call `f` on every layer LoRAs may target (fused LoRAs merge here).
    pub fn for_each_lora_linear(
        &mut self,
        f: &mut dyn FnMut(&mut kiln_engine::nn::Linear) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        self.transformer.for_each_linear(f)?;
        self.text.clip.for_each_linear(f)
    }

    /// Borrow the parts the sampling loop needs.
    pub fn models(&self) -> FluxModels<'_> {
        FluxModels {
            text: &self.text,
            transformer: &self.transformer,
            vae: &self.vae,
            scheduler: &self.scheduler,
            device: &self.device,
            dtype: self.dtype,
        }
    }

    /// Load every component of the model folder at `dir`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, String> {
        Self::load_quantized(dir, device, dtype, Quantization::default())
    }

    /// Load every component, quantizing as `quantization` says while loading.
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
        let transformer =
            quantization.denoiser(flux_keeps_dense, || load_transformer(dir, device, dtype))?;
        let vae = quantization.flux_vae(|| load_vae(dir, device))?;
        let text = load_text_encoders(dir, device, dtype, quantization)?;
        let scheduler = load_scheduler(dir, transformer.config().guidance_embeds)?;
        Ok(FluxComponents {
            resident_bytes: 0,
            text,
            transformer,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
        })
    }
}

/// Model CPU offload (diffusers' `enable_model_cpu_offload`): no weights stay
/// on the accelerator between stages. Each part (text encoders, transformer,
/// VAE) is loaded onto it from the memory-mapped files, which stay in host
/// memory, for its stage only and freed after, so the accelerator holds one
/// part at a time. Costs a host-to-device copy of every part per generation.
pub struct OffloadedFlux {
    dir: PathBuf,
    config: FluxConfig,
    scheduler: FlowMatchEulerConfig,
    device: Device,
    dtype: DType,
    /// Applied at every stage's load: quantized parts re-quantize from the
    /// dense file each time (a GGUF file's blocks are read as stored).
    quantization: Quantization,
}

impl OffloadedFlux {
    /// Check the folder by loading every part once into host memory (so a bad
    /// file fails here, naming it), keep nothing on `device`, and return the
    /// layers LoRAs may target.
    pub fn open(
        dir: &Path,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<(Self, crate::lora::LoraTargets), String> {
        let mut checked = FluxComponents::load_quantized(dir, &Device::Cpu, dtype, quantization)?;
        let targets = checked.lora_targets();
        let offloaded = OffloadedFlux {
            dir: dir.to_path_buf(),
            config: checked.transformer.config().clone(),
            scheduler: checked.scheduler.clone(),
            device: device.clone(),
            dtype,
            quantization,
        };
        Ok((offloaded, targets))
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

fn stage_error(e: String) -> PipelineError {
    PipelineError::Execution(format!("loading a model part for its stage: {e}"))
}

impl FluxParts for OffloadedFlux {
    fn text(&self) -> Result<Part<'_, TextEncoders>, PipelineError> {
        load_text_encoders(&self.dir, &self.device, self.dtype, self.quantization)
            .map(Part::Loaded)
            .map_err(stage_error)
    }

    fn transformer(&self) -> Result<Part<'_, FluxTransformer>, PipelineError> {
        self.quantization
            .denoiser(flux_keeps_dense, || {
                load_transformer(&self.dir, &self.device, self.dtype)
            })
            .map(Part::Loaded)
            .map_err(stage_error)
    }

    fn vae(&self) -> Result<Part<'_, AutoencoderKl>, PipelineError> {
        self.quantization
            .flux_vae(|| load_vae(&self.dir, &self.device))
            .map(Part::Loaded)
            .map_err(stage_error)
    }

    fn scheduler(&self) -> &FlowMatchEulerConfig {
        &self.scheduler
    }

    fn config(&self) -> &FluxConfig {
        OffloadedFlux::config(self)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

fn load_transformer(dir: &Path, device: &Device, dtype: DType) -> Result<FluxTransformer, String> {
    let transformer_path = transformer_weights(dir)?;
    let files = open(&transformer_path)?;
    let layout = FluxLayout::detect(&files.names()).ok_or_else(|| {
        format!(
            "{}: not a FLUX transformer (unknown tensor names)",
            transformer_path.display()
        )
    })?;
    let config_path = dir.join("transformer/config.json");
    loading::check_saved_quantization(&config_path)?;
    let config: FluxConfig = match &layout {
        _ if config_path.is_file() => read_json(&config_path)?,
        FluxLayout::Bfl { prefix } => config_from_shapes(&files, prefix, &transformer_path)?,
        // FLUX.1-dev's sizes, as diffusers defaults them.
        FluxLayout::Diffusers => serde_json::from_str("{}").map_err(|e| e.to_string())?,
    };
    config
        .validate()
        .map_err(|e| format!("{}: {e}", transformer_path.display()))?;
    let adapter = layout.adapter(&config);
    loading::load_weights(files, adapter, dtype, device, |vb| {
        FluxTransformer::load(vb, config)
    })
    .map_err(|e| format!("{}: {e}", transformer_path.display()))
}

/// A BFL (or GGUF) FLUX.1 file's sizes read off its tensors, as BFL ships no
/// config: widths from `img_in`/`txt_in`/`vector_in`, the head size from the
/// q/k norms, block counts from the names, guidance from `guidance_in`. The
/// RoPE axes are FLUX.1's (16, 56, 56) for its 128-wide heads; other head
/// sizes need `transformer/config.json` to say them.
fn config_from_shapes(
    files: &kiln_engine::WeightFiles,
    prefix: &str,
    path: &Path,
) -> Result<FluxConfig, String> {
    let shapes = loading::BflShapes {
        files,
        names: files.names(),
        prefix: prefix.to_string(),
        path,
    };
    let image_in = shapes.dims2("img_in.weight")?;
    let head_dim = shapes.dims1("double_blocks.0.img_attn.norm.query_norm.scale")?;
    if head_dim != 128 {
        return Err(format!(
            "{}: {head_dim}-wide attention heads; FLUX.1's RoPE axes are known for 128 only: put the model's transformer/config.json beside it",
            path.display()
        ));
    }
    let config = serde_json::json!({
        "in_channels": image_in.1,
        "joint_attention_dim": shapes.dims2("txt_in.weight")?.1,
        "pooled_projection_dim": shapes.dims2("vector_in.in_layer.weight")?.1,
        "num_attention_heads": image_in.0 / head_dim,
        "attention_head_dim": head_dim,
        "num_layers": shapes.count("double_blocks"),
        "num_single_layers": shapes.count("single_blocks"),
        "guidance_embeds": shapes.has("guidance_in."),
    });
    serde_json::from_value(config).map_err(|e| e.to_string())
}

fn load_vae(dir: &Path, device: &Device) -> Result<AutoencoderKl, String> {
    let (vae_weights, vae_config_path) = if dir.join("vae").is_dir() {
        (dir.join("vae"), dir.join("vae/config.json"))
    } else {
        (dir.join("ae.safetensors"), dir.join("vae/config.json"))
    };
    let vae_config: VaeConfig = if vae_config_path.is_file() {
        read_json(&vae_config_path)?
    } else {
        // BFL's ae.safetensors ships without a config: FLUX.1's VAE sizes.
        serde_json::from_value(serde_json::json!({
            "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "norm_num_groups": 32, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "use_quant_conv": false, "use_post_quant_conv": false
        }))
        .map_err(|e| e.to_string())?
    };
    let files = open(&vae_weights)?;
    let adapter = detect_vae_layout(&files.names()).adapter(&vae_config);
    // The VAE runs in f32 (diffusers upcasts it where `force_upcast`).
    AutoencoderKl::load(var_builder(files, adapter, DType::F32, device), vae_config)
        .map_err(|e| format!("{}: {e}", vae_weights.display()))
}

fn load_text_encoders(
    dir: &Path,
    device: &Device,
    dtype: DType,
    quantization: Quantization,
) -> Result<TextEncoders, String> {
    let clip_config: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let clip = ClipTextModel::load(
        var_builder(
            open(&dir.join("text_encoder"))?,
            KeyAdapter::default(),
            dtype,
            device,
        ),
        clip_config,
    )
    .map_err(|e| format!("{}: {e}", dir.join("text_encoder").display()))?;
    let t5_config: T5Config = read_json(&dir.join("text_encoder_2/config.json"))?;
    let t5_files = open(&dir.join("text_encoder_2"))?;
    let t5 = quantization
        .text_encoder(|| {
            T5Encoder::load(
                var_builder(t5_files, KeyAdapter::default(), dtype, device),
                t5_config,
            )
        })
        .map_err(|e| format!("{}: {e}", dir.join("text_encoder_2").display()))?;
    let eos = clip.eos_token_id();
    Ok(TextEncoders {
        clip_tokenizer: PromptTokenizer::load(&dir.join("tokenizer"), eos, eos)?,
        clip,
        t5_tokenizer: PromptTokenizer::load(&dir.join("tokenizer_2"), 0, 1)?,
        t5,
    })
}

/// `scheduler/scheduler_config.json`, else FLUX.1's: dev shifts dynamically, schnell does not.
fn load_scheduler(dir: &Path, guidance_embeds: bool) -> Result<FlowMatchEulerConfig, String> {
    let scheduler_path = dir.join("scheduler/scheduler_config.json");
    Ok(if scheduler_path.is_file() {
        read_json(&scheduler_path)?
    } else if guidance_embeds {
        FlowMatchEulerConfig {
            use_dynamic_shifting: true,
            shift: 3.0,
            ..FlowMatchEulerConfig::default()
        }
    } else {
        FlowMatchEulerConfig::default()
    })
}

/// Whether `dir` looks like a FLUX model folder (for layout detection at register time).
pub fn is_flux_folder(dir: &Path) -> bool {
    if let Ok(index) = read_json::<serde_json::Value>(&dir.join("model_index.json")) {
        let class = index["_class_name"].as_str().unwrap_or_default();
        // FLUX.2's pipelines (`Flux2…`) are another family.
        return class.starts_with("Flux") && !class.starts_with("Flux2");
    }
    dir.join("text_encoder_2").is_dir() && transformer_weights(dir).is_ok()
}
