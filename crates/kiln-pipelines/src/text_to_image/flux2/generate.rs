//! The FLUX.2-klein sampling loop exactly as diffusers' `Flux2KleinPipeline`
//! runs it: Qwen3 prompt embeddings (and the empty prompt's for CFG on base
//! models), noise in the patchified shape, tokens with 4-axis ids, reference
//! images for editing as extra tokens at time offsets 10, 20, …, the
//! empirical-mu FlowMatchEuler schedule, the shared flow loop, then BatchNorm
//! denormalisation, unpatchify and the VAE.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_engine::TorchGenerator;
use kiln_models::flux2::Flux2Transformer;
use kiln_models::vae::{patchify, unpatchify};

use super::components::{Flux2Parts, Flux2Vae};
use super::latents::{latent_ids, noise, noise_shape, pack, text_ids, unpack};
use crate::error::PipelineError;
use crate::text_to_image::flow_loop::{Conditioning, VelocityModel, denoise};
use crate::text_to_image::generation::{PromptEncoder, PromptOptions, StepCallback, Timings};
use crate::text_to_image::loading::decode_images;
use crate::text_to_image::schedulers::empirical_mu;

/// Everything one generation needs, already validated.
#[derive(Debug, Clone)]
pub struct Flux2Request {
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// CFG scale against the empty prompt (base models, when > 1).
    pub guidance_scale: f64,
    pub seed: u64,
    pub num_outputs: usize,
    pub max_sequence_length: usize,
    /// Images to edit from / condition on, each (1, 3, H, W) in [-1, 1] with
    /// sides multiples of twice the VAE scale.
    pub reference_images: Vec<Tensor>,
    /// Decode the VAE in tiles of this many pixels (bounded memory).
    pub vae_tile: Option<usize>,
    /// LoRA adapters active for this request only (runtime mode).
    pub adapters: Option<std::sync::Arc<kiln_engine::lora::AdapterSet>>,
}

/// What a generation produces: images as (B, H, W, 3) floats in [0, 1], and
/// the latents the VAE decoded (B, C, H/s, W/s).
pub struct Generated {
    pub images: Tensor,
    pub latents: Tensor,
    pub timings: Timings,
}

fn run(e: candle_core::Error) -> PipelineError {
    PipelineError::Execution(e.to_string())
}

/// Reference images as the transformer's extra tokens (normalised latents,
/// packed, one batch row) and their ids (T = 10, 20, …).
fn reference_tokens(
    vae: &Flux2Vae,
    images: &[Tensor],
    device: &Device,
) -> Result<(Tensor, Vec<[f64; 4]>), PipelineError> {
    let mut tokens = Vec::with_capacity(images.len());
    let mut ids = Vec::new();
    for (index, image) in images.iter().enumerate() {
        // diffusers takes the posterior's mode ("argmax"): no noise drawn.
        let mean = vae
            .vae
            .encode(&image.to_device(device).map_err(run)?)
            .map_err(run)?
            .mean;
        let latents = vae
            .norm
            .normalize(&patchify(&mean).map_err(run)?)
            .map_err(run)?;
        let (_, _, h, w) = latents.dims4().map_err(run)?;
        let time = (10 + 10 * index) as f64;
        ids.extend(
            latent_ids(h, w)
                .into_iter()
                .map(|[_, row, col, l]| [time, row, col, l]),
        );
        tokens.push(pack(&latents).map_err(run)?);
    }
    Ok((Tensor::cat(&tokens, 1).map_err(run)?, ids))
}

/// Run one generation.
fn generate_with_active_adapters(
    models: &dyn Flux2Parts,
    request: &Flux2Request,
    on_step: StepCallback,
) -> Result<Generated, PipelineError> {
    let facts = models.facts().clone();
    let (device, dtype) = (models.device().clone(), models.dtype());
    let batch = request.num_outputs;
    let cfg = request.guidance_scale > 1.0 && !facts.is_distilled;

    let started = Instant::now();
    let text = models.text()?;
    let options = PromptOptions {
        max_sequence_length: request.max_sequence_length,
        clip_skip: 0,
    };
    let expand = |prompt: &str| -> Result<Tensor, PipelineError> {
        text.condition(prompt, options, &device)?
            .sequence
            .repeat((batch, 1, 1))
            .and_then(|t| t.to_device(&device))
            .and_then(|t| t.to_dtype(dtype))
            .map_err(run)
    };
    let prompt = expand(&request.prompt)?;
    let negative = if cfg { Some(expand("")?) } else { None };
    drop(text);
    let text_encoding_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let shape = noise_shape(
        batch,
        facts.config.latent_channels(),
        (request.height, request.width),
        facts.vae_scale,
    );
    let (grid_h, grid_w) = (shape.2, shape.3);
    let mut generator = TorchGenerator::new(request.seed);
    let latents = pack(&noise(&mut generator, shape, &device).map_err(run)?)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(run)?;
    let image_tokens = grid_h * grid_w;
    let mut ids = text_ids(request.max_sequence_length);
    ids.extend(latent_ids(grid_h, grid_w));
    let references = if request.reference_images.is_empty() {
        None
    } else {
        let vae = models.vae()?;
        let (tokens, reference_ids) = reference_tokens(&vae, &request.reference_images, &device)?;
        ids.extend(reference_ids);
        Some(
            tokens
                .repeat((batch, 1, 1))
                .and_then(|t| t.to_dtype(dtype))
                .map_err(run)?,
        )
    };
    let schedule = facts
        .scheduler
        .schedule_with_mu(request.steps, empirical_mu(image_tokens, request.steps));
    let transformer = models.transformer()?;
    let velocity = Flux2Velocity {
        transformer: &transformer,
        ids: &ids,
        prompt: &prompt,
        negative: negative.as_ref(),
        references: references.as_ref(),
        image_tokens,
        batch,
    };
    let latents = denoise(
        &velocity,
        latents,
        &schedule,
        0,
        request.guidance_scale,
        on_step,
    )?;
    drop(transformer);
    let denoising_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let vae = models.vae()?;
    let patchified =
        unpack(&latents.to_dtype(DType::F32).map_err(run)?, grid_h, grid_w).map_err(run)?;
    let latents = unpatchify(&vae.norm.denormalize(&patchified).map_err(run)?).map_err(run)?;
    let images = decode_images(&vae.vae, &latents, request.vae_tile).map_err(run)?;
    Ok(Generated {
        images,
        latents,
        timings: Timings {
            text_encoding_s,
            denoising_s,
            vae_s: started.elapsed().as_secs_f64(),
        },
    })
}

/// The FLUX.2 transformer as the shared loop's velocity model: the prompt's
/// (or the empty prompt's) embeddings, reference tokens appended after the
/// image's and dropped from the prediction, no guidance embedding.
struct Flux2Velocity<'a> {
    transformer: &'a Flux2Transformer,
    ids: &'a [[f64; 4]],
    prompt: &'a Tensor,
    negative: Option<&'a Tensor>,
    references: Option<&'a Tensor>,
    image_tokens: usize,
    batch: usize,
}

impl VelocityModel for Flux2Velocity<'_> {
    fn velocity(
        &self,
        latents: &Tensor,
        timestep: f32,
        conditioning: Conditioning,
    ) -> Result<Tensor, PipelineError> {
        let run =
            |e: candle_core::Error| PipelineError::Execution(format!("denoising failed: {e}"));
        let text = match (conditioning, self.negative) {
            (Conditioning::Negative, Some(negative)) => negative,
            _ => self.prompt,
        };
        let input = match self.references {
            Some(references) => Tensor::cat(&[latents, references], 1).map_err(run)?,
            None => latents.clone(),
        };
        // diffusers passes timestep/1000 and the model multiplies by 1000 again.
        let t = timestep / 1000.0;
        let timestep =
            Tensor::from_vec(vec![t; self.batch], self.batch, latents.device()).map_err(run)?;
        let out = self
            .transformer
            .forward(&input, text, self.ids, &timestep, None)
            .map_err(run)?;
        out.narrow(1, 0, self.image_tokens).map_err(run)
    }

    fn has_negative(&self) -> bool {
        self.negative.is_some()
    }
}

/// Generate images for `request` (its LoRA adapters, if any, are active only
/// for this call on this thread).
pub fn generate(
    models: &dyn Flux2Parts,
    request: &Flux2Request,
    on_step: StepCallback,
) -> Result<Generated, PipelineError> {
    kiln_engine::lora::with_adapters(request.adapters.clone(), || {
        generate_with_active_adapters(models, request, on_step)
    })
}
