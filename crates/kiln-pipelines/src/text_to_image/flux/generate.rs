//! The FLUX sampling loop exactly as diffusers' FluxPipeline and
//! FluxImg2ImgPipeline run it: noise from the torch-compatible generator in the
//! unpacked latent shape, 2×2 packing, dynamic-shift FlowMatchEuler sigmas, optional
//! true CFG with a negative prompt, Euler steps, VAE decode with scaling and shift.
//! The loop takes each model part for its stage from [`FluxParts`]: borrowed
//! from resident components, or loaded for that stage only (model CPU offload).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_engine::TorchGenerator;
use kiln_models::flux::{FluxTransformer, pack_latents, position_ids, unpack_latents};
use kiln_models::vae::AutoencoderKl;

use super::prompt::{PromptEmbeddings, TextEncoders};
use crate::error::PipelineError;
use crate::text_to_image::flow_loop::{Conditioning, VelocityModel, denoise};
pub use crate::text_to_image::generation::Part;
use crate::text_to_image::generation::{PromptEncoder, PromptOptions};
pub use crate::text_to_image::generation::{StepCallback, Timings};
use crate::text_to_image::loading::decode_images;
use crate::text_to_image::schedulers::FlowMatchEulerConfig;

/// Everything one generation needs, already validated.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub true_cfg_scale: f64,
    pub seed: u64,
    pub num_outputs: usize,
    pub max_sequence_length: usize,
    /// img2img: the init image as (1, 3, H, W) in [-1, 1], and the strength.
    pub init_image: Option<(Tensor, f64)>,
    /// Decode the VAE in tiles of this many pixels (bounded memory), one image at
    /// a time; `None` decodes the whole batch at once.
    pub vae_tile: Option<usize>,
    /// LoRA adapters active for this request only (runtime mode).
    pub adapters: Option<std::sync::Arc<kiln_engine::lora::AdapterSet>>,
}

/// What a generation produces: images as (B, H, W, 3) floats in [0, 1].
pub struct Generated {
    pub images: Tensor,
    pub timings: Timings,
}

/// The loaded model parts the loop needs.
pub struct FluxModels<'a> {
    pub text: &'a TextEncoders,
    pub transformer: &'a FluxTransformer,
    pub vae: &'a AutoencoderKl,
    pub scheduler: &'a FlowMatchEulerConfig,
    pub device: &'a Device,
    pub dtype: DType,
}

/// Where the sampling loop gets each part, one stage at a time.
pub trait FluxParts {
    fn text(&self) -> Result<Part<'_, TextEncoders>, PipelineError>;
    fn transformer(&self) -> Result<Part<'_, FluxTransformer>, PipelineError>;
    fn vae(&self) -> Result<Part<'_, AutoencoderKl>, PipelineError>;
    fn scheduler(&self) -> &FlowMatchEulerConfig;
    /// The transformer's config (known without loading its weights).
    fn config(&self) -> &kiln_models::flux::FluxConfig;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
}

impl FluxParts for FluxModels<'_> {
    fn text(&self) -> Result<Part<'_, TextEncoders>, PipelineError> {
        Ok(Part::Resident(self.text))
    }

    fn transformer(&self) -> Result<Part<'_, FluxTransformer>, PipelineError> {
        Ok(Part::Resident(self.transformer))
    }

    fn vae(&self) -> Result<Part<'_, AutoencoderKl>, PipelineError> {
        Ok(Part::Resident(self.vae))
    }

    fn scheduler(&self) -> &FlowMatchEulerConfig {
        self.scheduler
    }

    fn config(&self) -> &kiln_models::flux::FluxConfig {
        self.transformer.config()
    }

    fn device(&self) -> &Device {
        self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

fn run(e: candle_core::Error) -> PipelineError {
    PipelineError::Execution(e.to_string())
}

fn randn(
    generator: &mut TorchGenerator,
    shape: (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor, PipelineError> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(generator.randn(n), shape, &Device::Cpu)
        .and_then(|t| t.to_device(device))
        .map_err(run)
}

/// Run one generation.
fn generate_with_active_adapters(
    models: &dyn FluxParts,
    request: &GenerationRequest,
    on_step: StepCallback,
) -> Result<Generated, PipelineError> {
    let started = Instant::now();
    let device = models.device();
    let dtype = models.dtype();
    let text = models.text()?;
    let options = PromptOptions {
        max_sequence_length: request.max_sequence_length,
        clip_skip: 0,
    };
    let embeddings = text.condition(&request.prompt, options, device)?;
    let negative = match &request.negative_prompt {
        Some(prompt) if request.true_cfg_scale > 1.0 => {
            Some(text.condition(prompt, options, device)?)
        }
        _ => None,
    };
    drop(text);
    let text_encoding_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let batch = request.num_outputs;
    // FLUX.1: the VAE's 8× down-scaling, then 2×2 patches of its latents.
    let (latent_h, latent_w) = (2 * (request.height / 16), 2 * (request.width / 16));
    let shape = (batch, models.config().latent_channels(), latent_h, latent_w);
    let mut generator = TorchGenerator::new(request.seed);
    let image_seq_len = (latent_h / 2) * (latent_w / 2);
    let schedule = models.scheduler().schedule(request.steps, image_seq_len);
    let scaling_and_shift = |vae: &AutoencoderKl| {
        let config = vae.config();
        (config.scaling_factor, config.shift_factor.unwrap_or(0.0))
    };

    let mut start_step = 0;
    let latents = match &request.init_image {
        None => randn(&mut generator, shape, device)?,
        Some((image, strength)) => {
            start_step = schedule.start_for_strength(*strength);
            if start_step >= request.steps {
                return Err(PipelineError::invalid(
                    "strength",
                    crate::error::ProblemKind::Constraint,
                    format!(
                        "strength {strength} with {} steps runs no step; raise strength or num_inference_steps",
                        request.steps
                    ),
                ));
            }
            let vae = models.vae()?;
            let (scaling, shift) = scaling_and_shift(&vae);
            let posterior = vae
                .encode(&image.to_device(device).map_err(run)?)
                .map_err(run)?;
            drop(vae);
            let eps = randn(&mut generator, posterior.mean.dims4().map_err(run)?, device)?;
            let sample = (&posterior.mean + posterior.std.mul(&eps).map_err(run)?).map_err(run)?;
            let image_latents = ((sample - shift).map_err(run)? * scaling).map_err(run)?;
            let image_latents = image_latents.repeat((batch, 1, 1, 1)).map_err(run)?;
            let noise = randn(&mut generator, shape, device)?;
            let sigma = f64::from(schedule.sigmas[start_step]);
            ((noise * sigma).map_err(run)? + (image_latents * (1.0 - sigma)).map_err(run)?)
                .map_err(run)?
        }
    };
    let latents = pack_latents(&latents)
        .map_err(run)?
        .to_dtype(dtype)
        .map_err(run)?;
    let ids = position_ids(request.max_sequence_length, latent_h / 2, latent_w / 2);
    let expand = |e: &PromptEmbeddings| -> Result<(Tensor, Tensor), PipelineError> {
        Ok((
            e.sequence
                .repeat((batch, 1, 1))
                .and_then(|t| t.to_dtype(dtype))
                .map_err(run)?,
            e.pooled()?
                .repeat((batch, 1))
                .and_then(|t| t.to_dtype(dtype))
                .map_err(run)?,
        ))
    };
    let (sequence, pooled) = expand(&embeddings)?;
    let negative = negative.as_ref().map(expand).transpose()?;
    let transformer = models.transformer()?;
    let guidance = if transformer.config().guidance_embeds {
        Some(
            Tensor::from_vec(vec![request.guidance_scale as f32; batch], batch, device)
                .map_err(run)?,
        )
    } else {
        None
    };
    let velocity_model = FluxVelocity {
        transformer: &transformer,
        ids: &ids,
        guidance: guidance.as_ref(),
        prompt: (&sequence, &pooled),
        negative: negative.as_ref().map(|(s, p)| (s, p)),
        batch,
    };
    let latents = denoise(
        &velocity_model,
        latents,
        &schedule,
        start_step,
        request.true_cfg_scale,
        on_step,
    )?;
    drop(transformer);
    let denoising_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let vae = models.vae()?;
    let (scaling, shift) = scaling_and_shift(&vae);
    let latents = unpack_latents(
        &latents.to_dtype(DType::F32).map_err(run)?,
        latent_h,
        latent_w,
    )
    .map_err(run)?;
    let latents = ((latents / scaling).map_err(run)? + shift).map_err(run)?;
    let images = decode_images(&vae, &latents, request.vae_tile).map_err(run)?;
    Ok(Generated {
        images,
        timings: Timings {
            text_encoding_s,
            denoising_s,
            vae_s: started.elapsed().as_secs_f64(),
        },
    })
}

/// FLUX.1's transformer as the shared loop's velocity model: the prompt's
/// (or negative's) T5 sequence and CLIP pooled output, the position ids, and
/// the guidance embedding for guidance-distilled models.
struct FluxVelocity<'a> {
    transformer: &'a FluxTransformer,
    ids: &'a [[f64; 3]],
    guidance: Option<&'a Tensor>,
    prompt: (&'a Tensor, &'a Tensor),
    negative: Option<(&'a Tensor, &'a Tensor)>,
    batch: usize,
}

impl VelocityModel for FluxVelocity<'_> {
    fn velocity(
        &self,
        latents: &Tensor,
        timestep: f32,
        conditioning: Conditioning,
    ) -> Result<Tensor, PipelineError> {
        let run =
            |e: candle_core::Error| PipelineError::Execution(format!("denoising failed: {e}"));
        let (sequence, pooled) = match (conditioning, self.negative) {
            (Conditioning::Negative, Some(negative)) => negative,
            _ => self.prompt,
        };
        // diffusers passes timestep/1000 and the model multiplies by 1000 again.
        let t = timestep / 1000.0;
        let timestep =
            Tensor::from_vec(vec![t; self.batch], self.batch, latents.device()).map_err(run)?;
        self.transformer
            .forward(
                latents,
                sequence,
                self.ids,
                &timestep,
                self.guidance,
                pooled,
            )
            .map_err(run)
    }

    fn has_negative(&self) -> bool {
        self.negative.is_some()
    }
}

/// Generate images for `request` (its LoRA adapters, if any, are active only for
/// this call on this thread).
pub fn generate(
    models: &dyn FluxParts,
    request: &GenerationRequest,
    on_step: StepCallback,
) -> Result<Generated, PipelineError> {
    kiln_engine::lora::with_adapters(request.adapters.clone(), || {
        generate_with_active_adapters(models, request, on_step)
    })
}
