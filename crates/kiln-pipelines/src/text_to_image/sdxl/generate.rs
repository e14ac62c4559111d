//! SDXL generation exactly as diffusers' `StableDiffusionXLPipeline` runs it:
//! both text encoders' penultimate hidden states concatenated, bigG's projected
//! pooled embedding, zero (or encoded) negative conditioning, the six
//! size/crop numbers, latents from the torch-compatible generator scaled by the
//! sampler's initial sigma, classifier-free guidance with optional rescale,
//! the chosen sampler (its ancestral noise continuing the same generator), and
//! the VAE decode with the config's scaling factor. Image-to-image
//! (`StableDiffusionXLImg2ImgPipeline`) encodes the init image, noises it to
//! the step `strength` starts at and runs the rest; inpainting
//! (`StableDiffusionXLInpaintPipeline` with a standard 4-channel UNet) also
//! re-imposes the noised original outside the mask after every step. The
//! generator's draws come in diffusers' order (latent sample, noise, and for
//! inpainting the unused masked-image sample) so seeds reproduce.

use std::time::Instant;

use candle_core::{DType, Tensor};
use kiln_engine::TorchGenerator;
use kiln_models::unet::AddedConditioning;

use super::components::SdxlComponents;
use crate::error::PipelineError;
use crate::text_to_image::generation::{
    PromptConditioning, PromptEncoder, PromptOptions, StepCallback, Timings,
};
use crate::text_to_image::loading::decode_images;
use crate::text_to_image::schedulers::SamplerKind;

/// Tokens per prompt (CLIP's context).
const TOKENS: usize = 77;

/// Everything one generation needs, already validated.
#[derive(Debug, Clone)]
pub struct SdxlRequest {
    pub prompt: String,
    /// `None`: zero embeddings when the model forces zeros for empty prompts.
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub num_outputs: usize,
    /// Layers skipped from the end of both text encoders (diffusers' `clip_skip`).
    pub clip_skip: usize,
    /// (height, width) the model is told the image was, and where it was cropped.
    pub original_size: (usize, usize),
    pub crop_top_left: (usize, usize),
    pub target_size: (usize, usize),
    /// Image-to-image / inpainting: the init image (1, 3, H, W) in [-1, 1].
    pub init_image: Option<Tensor>,
    /// Inpainting: (1, 1, H, W), 1 where the image is repainted.
    pub mask: Option<Tensor>,
    /// How much of the schedule an init image goes through (1 = all of it).
    pub strength: f64,
    /// Decode the VAE in tiles of this many pixels (bounded memory); `None`
    /// decodes the whole batch at once.
    pub vae_tile: Option<usize>,
    /// LoRA adapters active for this request only (runtime mode).
    pub adapters: Option<std::sync::Arc<kiln_engine::lora::AdapterSet>>,
}

/// What a generation produces: images as (B, H, W, 3) floats in [0, 1].
pub struct SdxlGenerated {
    pub images: Tensor,
    pub timings: Timings,
}

fn run(e: candle_core::Error) -> PipelineError {
    PipelineError::Execution(e.to_string())
}

/// (context (1, 77, sum of widths), pooled (1, bigG projection)) of `text`.
pub fn encode_prompt(
    components: &SdxlComponents,
    text: &str,
    clip_skip: usize,
) -> Result<(Tensor, Tensor), PipelineError> {
    let mut states = Vec::with_capacity(2);
    let mut pooled = None;
    for (tokenizer, encoder) in [
        (&components.tokenizer, &components.text_encoder),
        (&components.tokenizer_2, &components.text_encoder_2),
    ] {
        let ids = tokenizer.ids(text, TOKENS)?;
        let ids = Tensor::from_vec(ids, (1, TOKENS), &components.device).map_err(run)?;
        let output = encoder.forward(&ids, encoder.eos_token_id()).map_err(run)?;
        let layers = output.hidden_states.len();
        let index = layers.checked_sub(2 + clip_skip).ok_or_else(|| {
            PipelineError::invalid(
                "clip_skip",
                crate::error::ProblemKind::Constraint,
                format!("must be below {}", layers.saturating_sub(1)),
            )
        })?;
        states.push(output.hidden_states[index].clone());
        pooled = output.text_embeds.or(Some(output.pooled));
    }
    let context = Tensor::cat(&states, 2).map_err(run)?;
    let pooled = pooled.ok_or_else(|| PipelineError::Execution("no text encoder".into()))?;
    Ok((context, pooled))
}

/// SDXL's two CLIPs behind the shared seam (the penultimate layer, or
/// `clip_skip` more, of each, side by side; the second's projected pool).
impl PromptEncoder for SdxlComponents {
    fn condition(
        &self,
        prompt: &str,
        options: PromptOptions,
        _device: &candle_core::Device,
    ) -> Result<PromptConditioning, PipelineError> {
        let (sequence, pooled) = encode_prompt(self, prompt, options.clip_skip)?;
        Ok(PromptConditioning {
            sequence,
            pooled: Some(pooled),
        })
    }
}

/// diffusers' `rescale_noise_cfg`: scale the guided prediction to the text
/// prediction's standard deviation (unbiased, per image), blended by `amount`.
fn rescale(guided: &Tensor, text: &Tensor, amount: f64) -> candle_core::Result<Tensor> {
    let std = |t: &Tensor| -> candle_core::Result<Tensor> {
        let b = t.dim(0)?;
        let flat = t.reshape((b, ()))?;
        let n = flat.dim(1)? as f64;
        let mean = flat.mean_keepdim(1)?;
        let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n - 1.0))?;
        var.sqrt()?.reshape((b, 1, 1, 1))
    };
    let rescaled = guided.broadcast_mul(&(std(text)? / std(guided)?)?)?;
    (rescaled * amount)? + (guided * (1.0 - amount))?
}

/// Generate images for `request` (its LoRA adapters, if any, are active only
/// for this call on this thread).
pub fn generate(
    components: &SdxlComponents,
    request: &SdxlRequest,
    on_step: StepCallback,
) -> Result<SdxlGenerated, PipelineError> {
    kiln_engine::lora::with_adapters(request.adapters.clone(), || {
        generate_with_active_adapters(components, request, on_step)
    })
}

fn generate_with_active_adapters(
    components: &SdxlComponents,
    request: &SdxlRequest,
    on_step: StepCallback,
) -> Result<SdxlGenerated, PipelineError> {
    let device = &components.device;
    let dtype = components.dtype;
    let started = Instant::now();
    let cfg = request.guidance_scale > 1.0;
    let options = PromptOptions {
        max_sequence_length: TOKENS,
        clip_skip: request.clip_skip,
    };
    let prompt = components.condition(&request.prompt, options, device)?;
    let pooled = prompt.pooled()?.clone();
    let context = prompt.sequence;
    let negative = if !cfg {
        None
    } else {
        match &request.negative_prompt {
            None if components.force_zeros_for_empty_prompt => Some((
                context.zeros_like().map_err(run)?,
                pooled.zeros_like().map_err(run)?,
            )),
            text => {
                let negative =
                    components.condition(text.as_deref().unwrap_or(""), options, device)?;
                let pooled = negative.pooled()?.clone();
                Some((negative.sequence, pooled))
            }
        }
    };
    let n = request.num_outputs;
    let repeat = |t: &Tensor| -> Result<Tensor, PipelineError> {
        Tensor::cat(&vec![t.clone(); n], 0).map_err(run)
    };
    let (oh, ow) = request.original_size;
    let (ct, cl) = request.crop_top_left;
    let (th, tw) = request.target_size;
    let time_ids = Tensor::from_vec(
        vec![
            oh as f32, ow as f32, ct as f32, cl as f32, th as f32, tw as f32,
        ],
        (1, 6),
        device,
    )
    .map_err(run)?;
    let (context, pooled, time_ids) = match &negative {
        Some((negative_context, negative_pooled)) => (
            Tensor::cat(&[repeat(negative_context)?, repeat(&context)?], 0).map_err(run)?,
            Tensor::cat(&[repeat(negative_pooled)?, repeat(&pooled)?], 0).map_err(run)?,
            Tensor::cat(&[repeat(&time_ids)?, repeat(&time_ids)?], 0).map_err(run)?,
        ),
        None => (repeat(&context)?, repeat(&pooled)?, repeat(&time_ids)?),
    };
    let context = context.to_dtype(dtype).map_err(run)?;
    let text_encoding_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut sampler = request
        .sampler
        .build(&components.scheduler, request.steps)
        .map_err(|e| {
            PipelineError::invalid(
                "num_inference_steps",
                crate::error::ProblemKind::Constraint,
                e.to_string(),
            )
        })?;
    let scale = components.vae_scale_factor();
    let (lh, lw) = (request.height / scale, request.width / scale);
    let channels = components.unet.config().in_channels;
    let timesteps = sampler.timesteps().to_vec();
    let start = match &request.init_image {
        // diffusers' get_timesteps: int(steps × strength) steps are run.
        Some(_) => {
            let run_steps = ((request.steps as f64 * request.strength) as usize).min(request.steps);
            (request.steps - run_steps) * sampler.order()
        }
        None => 0,
    };
    if start >= timesteps.len() {
        return Err(PipelineError::invalid(
            "strength",
            crate::error::ProblemKind::Constraint,
            format!(
                "{} × {} steps leaves no step to run; raise strength or num_inference_steps",
                request.strength, request.steps
            ),
        ));
    }
    let mut generator = TorchGenerator::new(request.seed);
    let per_image = channels * lh * lw;
    let randn = |generator: &mut TorchGenerator, count: usize| -> Result<Tensor, PipelineError> {
        Tensor::from_vec(
            generator.randn(count * per_image),
            (count, channels, lh, lw),
            device,
        )
        .map_err(run)
    };
    let mut image_latents = None;
    let mut latents = match &request.init_image {
        None => randn(&mut generator, n)?
            .affine(sampler.init_noise_sigma(), 0.0)
            .map_err(run)?,
        Some(image) => {
            let image = image.to_device(device).map_err(run)?;
            let distribution = components.vae.encode(&image).map_err(run)?;
            let eps = randn(&mut generator, 1)?;
            let encoded = distribution
                .sample(&eps)
                .and_then(|l| l.affine(components.vae.config().scaling_factor, 0.0))
                .map_err(run)?;
            let encoded = repeat(&encoded)?;
            let noise = randn(&mut generator, n)?;
            if request.mask.is_some() {
                // diffusers also samples the masked image's latents (unused by a
                // 4-channel UNet): one more draw from the generator.
                randn(&mut generator, 1)?;
            }
            let latents = if request.mask.is_some() && request.strength >= 1.0 {
                noise.affine(sampler.init_noise_sigma(), 0.0).map_err(run)?
            } else {
                sampler.add_noise(&encoded, &noise, start).map_err(run)?
            };
            image_latents = Some((encoded, noise));
            latents
        }
    };
    // The mask at latent resolution (nearest: every `scale`-th pixel), 1 = repaint.
    let mask = match &request.mask {
        Some(mask) => Some(
            mask.to_device(device)
                .and_then(|m| m.reshape((1, 1, lh, scale, lw, scale)))
                .and_then(|m| m.narrow(3, 0, 1))
                .and_then(|m| m.narrow(5, 0, 1))
                .and_then(|m| m.reshape((1, 1, lh, lw)))
                .map_err(run)?,
        ),
        None => None,
    };
    let total = timesteps.len() - start;
    let added = AddedConditioning {
        text_embeds: &pooled,
        time_ids: &time_ids,
    };
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        let input = if cfg {
            Tensor::cat(&[&latents, &latents], 0).map_err(run)?
        } else {
            latents.clone()
        };
        let input = sampler.scale_model_input(&input, i).map_err(run)?;
        let timestep = Tensor::new(&[t as f32], device).map_err(run)?;
        let prediction = components
            .unet
            .forward(
                &input.to_dtype(dtype).map_err(run)?,
                &timestep,
                &context,
                Some(&added),
            )
            .and_then(|p| p.to_dtype(DType::F32))
            .map_err(run)?;
        let prediction = if cfg {
            let uncond = prediction.narrow(0, 0, n).map_err(run)?;
            let text = prediction.narrow(0, n, n).map_err(run)?;
            let guided = (&uncond
                + ((&text - &uncond).map_err(run)? * request.guidance_scale).map_err(run)?)
            .map_err(run)?;
            if request.guidance_rescale > 0.0 {
                rescale(&guided, &text, request.guidance_rescale).map_err(run)?
            } else {
                guided
            }
        } else {
            prediction
        };
        latents = sampler
            .step(&prediction, i, &latents, &mut generator)
            .map_err(run)?;
        if let (Some(mask), Some((original, noise))) = (&mask, &image_latents) {
            let proper = if i + 1 < timesteps.len() {
                sampler.add_noise(original, noise, i + 1).map_err(run)?
            } else {
                original.clone()
            };
            let keep = mask.affine(-1.0, 1.0).map_err(run)?;
            latents = (proper.broadcast_mul(&keep).map_err(run)?
                + latents.broadcast_mul(mask).map_err(run)?)
            .map_err(run)?;
        }
        if !on_step(i + 1 - start, total) {
            return Err(PipelineError::Stopped);
        }
    }
    let denoising_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let scaling = components.vae.config().scaling_factor;
    let latents = (latents / scaling).map_err(run)?;
    let images = decode_images(&components.vae, &latents, request.vae_tile).map_err(run)?;
    Ok(SdxlGenerated {
        images,
        timings: Timings {
            text_encoding_s,
            denoising_s,
            vae_s: started.elapsed().as_secs_f64(),
        },
    })
}
