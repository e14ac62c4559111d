//! Loading a FLUX.2-klein model folder as diffusers lays it out
//! (`model_index.json` with `is_distilled`, `transformer/`, `text_encoder/`
//! (Qwen3), `tokenizer/`, `vae/` (AutoencoderKLFlux2 with its BatchNorm
//! statistics), `scheduler/`), where the transformer may instead be BFL's
//! single file (`flux-2-klein-*.safetensors`, in the root or in
//! `transformer/`; its sizes then read from `transformer/config.json`, else
//! from the tensor shapes). Loaded resident, or offloaded: each part loaded
//! onto the accelerator for its stage only. Every failure names the file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kiln_models::flux2::{Flux2Config, Flux2Layout, Flux2Transformer};
use kiln_models::vae::{AutoencoderKl, LatentNorm, VaeConfig};

use super::prompt::{DEFAULT_HIDDEN_LAYERS, Qwen3PromptEncoder};
use crate::error::PipelineError;
use crate::text_to_image::generation::Part;
use crate::text_to_image::loading::{
    self, Quantization, flux_keeps_dense, open, read_json, var_builder,
};
use crate::text_to_image::schedulers::FlowMatchEulerConfig;

/// The VAE with the BatchNorm statistics the pipeline normalises latents by.
pub struct Flux2Vae {
    pub vae: AutoencoderKl,
    pub norm: LatentNorm,
}

impl Flux2Vae {
    /// Pixels per latent along each side (8 for FLUX.2's VAE).
    pub fn scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }
}

/// What a folder says about the model, known without loading weights.
#[derive(Debug, Clone)]
pub struct Flux2Facts {
    pub config: Flux2Config,
    pub scheduler: FlowMatchEulerConfig,
    /// Step-distilled (one forward per step, guidance ignored).
    pub is_distilled: bool,
    /// VAE pixels per latent.
    pub vae_scale: usize,
    /// Qwen3 hidden-state layers stacked into the prompt embedding.
    pub text_layers: Vec<usize>,
}

/// Everything a FLUX.2 generation needs, loaded.
pub struct Flux2Components {
    pub text: Qwen3PromptEncoder,
    pub transformer: Flux2Transformer,
    pub vae: Flux2Vae,
    pub facts: Flux2Facts,
    pub device: Device,
    pub dtype: DType,
    /// Bytes the loaded weights hold (quantized layers counted as stored).
    pub resident_bytes: u64,
}

/// Where the sampling loop gets each part, one stage at a time.
pub trait Flux2Parts {
    fn text(&self) -> Result<Part<'_, Qwen3PromptEncoder>, PipelineError>;
    fn transformer(&self) -> Result<Part<'_, Flux2Transformer>, PipelineError>;
    fn vae(&self) -> Result<Part<'_, Flux2Vae>, PipelineError>;
    fn facts(&self) -> &Flux2Facts;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
}

impl Flux2Parts for Flux2Components {
    fn text(&self) -> Result<Part<'_, Qwen3PromptEncoder>, PipelineError> {
        Ok(Part::Resident(&self.text))
    }

    fn transformer(&self) -> Result<Part<'_, Flux2Transformer>, PipelineError> {
        Ok(Part::Resident(&self.transformer))
    }

    fn vae(&self) -> Result<Part<'_, Flux2Vae>, PipelineError> {
        Ok(Part::Resident(&self.vae))
    }

    fn facts(&self) -> &Flux2Facts {
        &self.facts
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Flux2Components {
    /// Load every component of the model folder at `dir`; `text_layers`
    /// overrides the pipeline's (9, 18, 27).
    pub fn load(
        dir: &Path,
        text_layers: Option<Vec<usize>>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, String> {
        Self::load_quantized(dir, text_layers, device, dtype, Quantization::default())
    }

    /// As [`Flux2Components::load`], quantizing the transformer's linear
    /// layers (and, with `text_encoder`, Qwen3's) as `quantization` says.
    pub fn load_quantized(
        dir: &Path,
        text_layers: Option<Vec<usize>>,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<Self, String> {
        let (loaded, bytes) = kiln_engine::resident::count_loaded(|| {
            Self::load_uncounted(dir, text_layers, device, dtype, quantization)
        });
        let mut components = loaded?;
        components.resident_bytes = bytes;
        Ok(components)
    }

    fn load_uncounted(
        dir: &Path,
        text_layers: Option<Vec<usize>>,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<Self, String> {
        let facts = read_facts(dir, text_layers)?;
        Ok(Flux2Components {
            resident_bytes: 0,
            transformer: quantization.denoiser(flux_keeps_dense, || {
                load_transformer(dir, &facts.config, device, dtype)
            })?,
            vae: quantization.flux_vae(|| load_vae(dir, device))?,
            text: quantization.text_encoder(|| load_text(dir, &facts, device, dtype))?,
            facts,
            device: device.clone(),
            dtype,
        })
    }

    /// The layers LoRAs may target: the transformer's linears.
    pub fn lora_targets(&mut self) -> crate::lora::LoraTargets {
        let mut targets = crate::lora::LoraTargets {
            denoiser: self.transformer.linear_names().unwrap_or_default(),
            ..Default::default()
        };
        let _ = self.transformer.for_each_linear(&mut |linear| {
            targets.add_shape(linear);
            Ok(())
        });
        targets
    }
}

/// Model CPU offload (diffusers' `enable_model_cpu_offload`): each part (text
/// encoder, transformer, VAE) is loaded onto the accelerator from the
/// memory-mapped files for its stage only, so it holds one part at a time.
pub struct OffloadedFlux2 {
    dir: PathBuf,
    facts: Flux2Facts,
    device: Device,
    dtype: DType,
    /// Applied at every transformer load (re-quantized from the dense file
    /// each time; a GGUF file's blocks are read as stored).
    quantization: Quantization,
}

impl OffloadedFlux2 {
    /// Check the folder by loading every part once into host memory (so a bad
    /// file fails here, naming it), keep nothing on `device`, and return the
    /// layers LoRAs may target.
    pub fn open(
        dir: &Path,
        text_layers: Option<Vec<usize>>,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<(Self, crate::lora::LoraTargets), String> {
        let mut checked =
            Flux2Components::load_quantized(dir, text_layers, &Device::Cpu, dtype, quantization)?;
        let targets = checked.lora_targets();
        let offloaded = OffloadedFlux2 {
            dir: dir.to_path_buf(),
            facts: checked.facts.clone(),
            device: device.clone(),
            dtype,
            quantization,
        };
        Ok((offloaded, targets))
    }
}

fn stage_error(e: String) -> PipelineError {
    PipelineError::Execution(format!("loading a model part for its stage: {e}"))
}

impl Flux2Parts for OffloadedFlux2 {
    fn text(&self) -> Result<Part<'_, Qwen3PromptEncoder>, PipelineError> {
        self.quantization
            .text_encoder(|| load_text(&self.dir, &self.facts, &self.device, self.dtype))
            .map(Part::Loaded)
            .map_err(stage_error)
    }

    fn transformer(&self) -> Result<Part<'_, Flux2Transformer>, PipelineError> {
        self.quantization
            .denoiser(flux_keeps_dense, || {
                load_transformer(&self.dir, &self.facts.config, &self.device, self.dtype)
            })
            .map(Part::Loaded)
            .map_err(stage_error)
    }

    fn vae(&self) -> Result<Part<'_, Flux2Vae>, PipelineError> {
        self.quantization
            .flux_vae(|| load_vae(&self.dir, &self.device))
            .map(Part::Loaded)
            .map_err(stage_error)
    }

    fn facts(&self) -> &Flux2Facts {
        &self.facts
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// `model_index.json`'s `is_distilled` (false when absent, as diffusers).
fn is_distilled(dir: &Path) -> Result<bool, String> {
    let index: serde_json::Value = read_json(&dir.join("model_index.json"))?;
    Ok(index["is_distilled"].as_bool().unwrap_or(false))
}

fn transformer_weights(dir: &Path) -> Result<PathBuf, String> {
    loading::transformer_weights(dir, "FLUX.2", &[])
}

/// The transformer's sizes from a BFL file's tensor shapes (BFL ships no
/// config): widths from `img_in`/`txt_in`/`time_in`, the head size from the
/// q/k norms, block counts from the names, the MLP ratio from `img_mlp.0`,
/// RoPE axes a quarter of the head each (klein's (32, 32, 32, 32)).
fn config_from_shapes(weights: &Path) -> Result<Flux2Config, String> {
    let files = open(weights)?;
    let names = files.names();
    let Some(Flux2Layout::Bfl { prefix }) = Flux2Layout::detect(&names) else {
        return Err(format!(
            "{}: no transformer/config.json, and the weights are not a BFL FLUX.2 file to read sizes from",
            weights.display()
        ));
    };
    let shapes = loading::BflShapes {
        files: &files,
        names,
        prefix,
        path: weights,
    };
    let count = |block: &str| shapes.count(block);
    let image_in = shapes.dims2("img_in.weight")?;
    let text_in = shapes.dims2("txt_in.weight")?;
    let time_in = shapes.dims2("time_in.in_layer.weight")?;
    let mlp_in = shapes.dims2("double_blocks.0.img_mlp.0.weight")?;
    let head_dim = shapes.dims1("double_blocks.0.img_attn.norm.query_norm.scale")?;
    let dim = image_in.0;
    let config = serde_json::json!({
        "in_channels": image_in.1,
        "joint_attention_dim": text_in.1,
        "timestep_guidance_channels": time_in.1,
        "num_attention_heads": dim / head_dim.max(1),
        "attention_head_dim": head_dim,
        "axes_dims_rope": vec![head_dim / 4; 4],
        "num_layers": count("double_blocks"),
        "num_single_layers": count("single_blocks"),
        "mlp_ratio": (mlp_in.0 / 2) as f64 / dim.max(1) as f64,
        "guidance_embeds": shapes.has("guidance_in."),
    });
    serde_json::from_value(config).map_err(|e| e.to_string())
}

fn read_facts(dir: &Path, text_layers: Option<Vec<usize>>) -> Result<Flux2Facts, String> {
    let config_path = dir.join("transformer/config.json");
    let config: Flux2Config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        config_from_shapes(&transformer_weights(dir)?)?
    };
    config
        .validate()
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let scheduler_path = dir.join("scheduler/scheduler_config.json");
    let scheduler = if scheduler_path.is_file() {
        read_json(&scheduler_path)?
    } else {
        FlowMatchEulerConfig {
            use_dynamic_shifting: true,
            shift: 3.0,
            ..FlowMatchEulerConfig::default()
        }
    };
    let vae_config =
        VaeConfig::from_file(&dir.join("vae/config.json")).map_err(|e| e.to_string())?;
    if 4 * vae_config.latent_channels != config.in_channels {
        return Err(format!(
            "{}: the VAE has {} latent channels, the transformer takes {} (4 × 2×2 patches)",
            dir.display(),
            vae_config.latent_channels,
            config.in_channels
        ));
    }
    Ok(Flux2Facts {
        is_distilled: is_distilled(dir)?,
        vae_scale: vae_config.downscale_factor(),
        text_layers: text_layers.unwrap_or_else(|| DEFAULT_HIDDEN_LAYERS.to_vec()),
        config,
        scheduler,
    })
}

fn load_transformer(
    dir: &Path,
    config: &Flux2Config,
    device: &Device,
    dtype: DType,
) -> Result<Flux2Transformer, String> {
    let weights = transformer_weights(dir)?;
    loading::check_saved_quantization(&dir.join("transformer/config.json"))?;
    let files = open(&weights)?;
    let layout = Flux2Layout::detect(&files.names()).ok_or_else(|| {
        format!(
            "{}: not a FLUX.2 transformer (no double_stream_modulation_img weights; a FLUX.1 checkpoint?)",
            weights.display()
        )
    })?;
    let adapter = layout.adapter(config);
    loading::load_weights(files, adapter, dtype, device, |vb| {
        Flux2Transformer::load(vb, config.clone())
    })
    .map_err(|e| format!("{}: {e}", weights.display()))
}

fn load_vae(dir: &Path, device: &Device) -> Result<Flux2Vae, String> {
    let folder = dir.join("vae");
    let config = VaeConfig::from_file(&folder.join("config.json")).map_err(|e| e.to_string())?;
    let files = open(&folder)?;
    // The VAE runs in f32, as the pipeline's latents are denormalised in f32.
    let vb = var_builder(
        files,
        kiln_engine::KeyAdapter::default(),
        DType::F32,
        device,
    );
    let norm = LatentNorm::load(vb.clone(), config.latent_channels, config.batch_norm_eps)
        .map_err(|e| format!("{}: {e}", folder.display()))?;
    let vae = AutoencoderKl::load(vb, config).map_err(|e| format!("{}: {e}", folder.display()))?;
    Ok(Flux2Vae { vae, norm })
}

fn load_text(
    dir: &Path,
    facts: &Flux2Facts,
    device: &Device,
    dtype: DType,
) -> Result<Qwen3PromptEncoder, String> {
    Qwen3PromptEncoder::load_folder(dir, facts.text_layers.clone(), dtype, device)
        .map_err(|e| format!("{}: {e}", dir.join("text_encoder").display()))
}

/// Whether `dir` is a FLUX.2 model folder (`model_index.json` names a
/// `Flux2…Pipeline`).
pub fn is_flux2_folder(dir: &Path) -> bool {
    read_json::<serde_json::Value>(&dir.join("model_index.json"))
        .ok()
        .and_then(|index| index["_class_name"].as_str().map(str::to_string))
        .is_some_and(|class| class.starts_with("Flux2"))
}
