//! `kiln bench flux2`: time one FLUX.2 transformer forward and whole
//! generations (text encoding, denoising, VAE decode) on a FLUX.2-klein
//! folder, for `bench/flux2_vs_diffusers.py` to compare with diffusers'
//! `Flux2KleinPipeline` on the same weights. Prints JSON (median seconds per
//! size, the last generation's stage split, peak resident memory).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use kiln_pipelines::text_to_image::flux2::latents::{latent_ids, text_ids};
use kiln_pipelines::text_to_image::flux2::{Flux2Components, Flux2Request, generate};
use kiln_pipelines::text_to_image::loading::Quantization;
use serde_json::json;

use super::bench::{PlacementArgs, peak_rss_mib, time};

#[derive(Args)]
pub struct Flux2BenchArgs {
    /// A FLUX.2-klein model folder (diffusers layout).
    #[arg(long)]
    model: PathBuf,
    /// Square image sizes to time, in pixels.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    sizes: Vec<usize>,
    /// Denoising steps per generation.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Qwen3 prompt tokens (the prompt is padded to this length).
    #[arg(long, default_value_t = 64)]
    max_sequence_length: usize,
    /// Timed repetitions (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    placement: PlacementArgs,
}

pub fn run(args: Flux2BenchArgs) -> Result<()> {
    let (device, dtype, quantization) = args.placement.resolve_image(Quantization::default())?;
    let components =
        Flux2Components::load_quantized(&args.model, None, &device, dtype, quantization)
            .map_err(anyhow::Error::msg)?;
    let config = components.transformer.config().clone();
    let mut results = Vec::new();
    for &size in &args.sizes {
        let grid = size / (2 * components.facts.vae_scale);
        let random = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?)
        };
        let img = random(&[1, grid * grid, config.in_channels])?;
        let txt = random(&[1, args.max_sequence_length, config.joint_attention_dim])?;
        let mut ids = text_ids(args.max_sequence_length);
        ids.extend(latent_ids(grid, grid));
        let timestep = Tensor::new(&[0.5f32], &device)?;
        let forward_s = time(&device, args.runs, || {
            components
                .transformer
                .forward(&img, &txt, &ids, &timestep, None)?;
            Ok(())
        })
        .context("transformer forward")?;
        let request = Flux2Request {
            prompt: "a photo of a cat".into(),
            width: size,
            height: size,
            steps: args.steps,
            guidance_scale: 4.0,
            seed: 0,
            num_outputs: 1,
            max_sequence_length: args.max_sequence_length,
            reference_images: vec![],
            vae_tile: None,
            adapters: None,
        };
        let mut stages = Vec::new();
        let generate_s = time(&device, args.runs, || {
            stages.push(generate(&components, &request, &mut |_, _| true)?.timings);
            Ok(())
        })
        .context("generation")?;
        let last = stages.last().cloned().unwrap_or_default();
        results.push(json!({
            "size": size, "forward_s": forward_s, "generate_s": generate_s,
            "stages": {"text_s": last.text_encoding_s, "denoise_s": last.denoising_s,
                       "vae_s": last.vae_s},
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"results": results, "peak_rss_mib": peak_rss_mib()}))?
    );
    Ok(())
}
