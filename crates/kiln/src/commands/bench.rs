//! `kiln bench flux` / `kiln bench sdxl` (and `kiln bench flux2`, `kiln
//! bench llm` and `kiln bench serve`, in their own modules): time one FLUX transformer forward and
//! whole generations, or one SDXL UNet step (CFG batch) and VAE decode, on a
//! model folder, for `bench/flux_vs_diffusers.py` and `bench/sdxl_vs_diffusers.py`
//! to compare with diffusers on the same weights, on the CPU or a CUDA device
//! (`--device`, `--dtype`). Prints JSON (median seconds, peak resident memory).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use kiln_pipelines::text_to_image::flux::{FluxComponents, GenerationRequest, generate};
use kiln_pipelines::text_to_image::loading::Quantization;
use serde_json::json;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Transformer forward and full generation timings for a FLUX folder.
    Flux(FluxBenchArgs),
    /// Transformer forward and full generation timings for a FLUX.2-klein folder.
    Flux2(super::bench_flux2::Flux2BenchArgs),
    /// UNet step and VAE decode timings for an SDXL folder.
    Sdxl(SdxlBenchArgs),
    /// Prefill and decode tokens/s of one stream for an LLM folder or GGUF file.
    Llm(super::bench_llm::LlmBenchArgs),
    /// Load-test an OpenAI-compatible server: throughput, TTFT, TPOT, ITL, latency.
    Serve(super::bench_serve::ServeBenchArgs),
    /// Batch latency and throughput of an ONNX model or Kiln graph.
    Graph(super::bench_graph::GraphBenchArgs),
}

/// Where and in which precision a benchmark runs.
#[derive(Args)]
pub struct PlacementArgs {
    /// cpu, cuda, cuda:N or auto (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

impl PlacementArgs {
    pub(crate) fn resolve(&self) -> Result<(Device, DType)> {
        Ok((
            kiln_engine::device::select_device(&self.device)?,
            kiln_engine::device::parse_dtype(&self.dtype)?,
        ))
    }

    /// [`PlacementArgs::resolve`] for an image model, as `kiln serve` loads
    /// one: bf16 on a CPU is f32 compute over bf16 denoiser weights.
    pub(crate) fn resolve_image(
        &self,
        mut quantization: Quantization,
    ) -> Result<(Device, DType, Quantization)> {
        let (device, dtype) = self.resolve()?;
        let (dtype, denoiser) =
            kiln_pipelines::settings::image_precision(&device, dtype, quantization.denoiser);
        quantization.denoiser = denoiser;
        Ok((device, dtype, quantization))
    }
}

#[derive(Args)]
pub struct SdxlBenchArgs {
    /// An SDXL model folder (diffusers layout or single file).
    #[arg(long)]
    model: PathBuf,
    /// Square image sizes to time, in pixels.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    sizes: Vec<usize>,
    /// Timed repetitions (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    quality: QualityArgs,
    #[command(flatten)]
    placement: PlacementArgs,
}

/// The 4-step Euler generation saved for quality comparisons at `size`.
fn sdxl_request(size: usize) -> kiln_pipelines::text_to_image::sdxl::SdxlRequest {
    kiln_pipelines::text_to_image::sdxl::SdxlRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: Some(String::new()),
        width: size,
        height: size,
        steps: 4,
        guidance_scale: 5.0,
        guidance_rescale: 0.0,
        sampler: kiln_pipelines::text_to_image::schedulers::SamplerKind::Euler,
        seed: 0,
        num_outputs: 1,
        clip_skip: 0,
        original_size: (size, size),
        crop_top_left: (0, 0),
        target_size: (size, size),
        init_image: None,
        mask: None,
        strength: 1.0,
        vae_tile: None,
        adapters: None,
    }
}

/// One UNet step with classifier-free guidance (batch 2) and one VAE decode per size.
fn bench_sdxl(args: SdxlBenchArgs) -> Result<()> {
    use kiln_models::unet::AddedConditioning;
    use kiln_pipelines::text_to_image::sdxl::{SdxlComponents, encode_prompt};
    let (device, dtype, quantization) =
        args.placement.resolve_image(args.quality.quantization()?)?;
    let components = SdxlComponents::load_quantized(&args.model, &device, dtype, quantization)
        .map_err(anyhow::Error::msg)?;
    let (context, pooled) =
        encode_prompt(&components, "a photo of a cat", 0).map_err(|e| anyhow::anyhow!("{e}"))?;
    let context = Tensor::cat(&[&context, &context], 0)?;
    let pooled = Tensor::cat(&[&pooled, &pooled], 0)?;
    let mut results = Vec::new();
    for &size in &args.sizes {
        let latent = size / 8;
        let sample = Tensor::randn(0f32, 1.0, (2, 4, latent, latent), &device)?.to_dtype(dtype)?;
        let time_ids = Tensor::new(
            &[[size as f32, size as f32, 0.0, 0.0, size as f32, size as f32]; 2],
            &device,
        )?
        .to_dtype(dtype)?;
        let timestep = Tensor::new(&[500f32], &device)?;
        let added = AddedConditioning {
            text_embeds: &pooled,
            time_ids: &time_ids,
        };
        let unet_s = time(&device, args.runs, || {
            components
                .unet
                .forward(&sample, &timestep, &context, Some(&added))?;
            Ok(())
        })
        .context("UNet step")?;
        // The VAE runs in f32 whatever the UNet's dtype (SDXL's force_upcast).
        let one = sample.narrow(0, 0, 1)?.to_dtype(DType::F32)?;
        let vae_s = time(&device, args.runs, || {
            components.vae.decode(&one)?;
            Ok(())
        })
        .context("VAE decode")?;
        results.push(json!({"size": size, "unet_step_s": unet_s, "vae_decode_s": vae_s}));
        args.quality.save("sdxl", size, || {
            let request = sdxl_request(size);
            Ok(kiln_pipelines::text_to_image::sdxl::generate(
                &components,
                &request,
                &mut |_, _| true,
            )?
            .images)
        })?;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "results": results,
            "quantize": args.quality.quantize,
            "resident_bytes": components.resident_bytes,
            "peak_rss_mib": peak_rss_mib(),
        }))?
    );
    Ok(())
}

#[derive(Args)]
pub struct FluxBenchArgs {
    /// A FLUX model folder (diffusers layout).
    #[arg(long)]
    model: PathBuf,
    /// Square image sizes to time, in pixels.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    sizes: Vec<usize>,
    /// Denoising steps per generation.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// T5 tokens.
    #[arg(long, default_value_t = 64)]
    max_sequence_length: usize,
    /// Timed repetitions (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also time the forward with a random LoRA of this rank on every linear
    /// layer, applied at runtime and fused (0: no LoRA timings).
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    /// Time only whole generations with model CPU offload (each part on the
    /// device for its stage only), to compare with diffusers' enable_model_cpu_offload.
    #[arg(long)]
    offload: bool,
    #[command(flatten)]
    quality: QualityArgs,
    #[command(flatten)]
    placement: PlacementArgs,
}

/// Quantization and the images kept for quality comparisons, as the FLUX and
/// SDXL benchmarks take them.
#[derive(Args)]
pub struct QualityArgs {
    /// Quantize the transformer/UNet while loading: int8, q8_0 or q4_k (none: dense).
    #[arg(long, default_value = "none")]
    quantize: String,
    /// Save one generated image per size (f32, (1, H, W, 3)) as
    /// `<family>-<size>.safetensors` here, for quality comparisons.
    #[arg(long)]
    save_images: Option<PathBuf>,
}

impl QualityArgs {
    fn quantization(&self) -> Result<Quantization> {
        Ok(Quantization {
            denoiser: kiln_engine::quant::QuantKind::parse(&self.quantize)
                .map_err(anyhow::Error::msg)?,
            text_encoder: false,
        })
    }

    /// Save `images` as `<family>-<size>.safetensors` when asked to.
    fn save(
        &self,
        family: &str,
        size: usize,
        images: impl FnOnce() -> Result<Tensor>,
    ) -> Result<()> {
        let Some(dir) = &self.save_images else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{family}-{size}.safetensors"));
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("image".to_string(), images()?)]),
            &path,
        )?;
        Ok(())
    }
}

/// The generation every FLUX benchmark times at `size`.
fn flux_request(args: &FluxBenchArgs, size: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: None,
        width: size,
        height: size,
        steps: args.steps,
        guidance_scale: 3.5,
        true_cfg_scale: 1.0,
        seed: 0,
        num_outputs: 1,
        max_sequence_length: args.max_sequence_length,
        init_image: None,
        vae_tile: None,
        adapters: None,
    }
}

/// Time whole generations from `parts`, with the per-stage split of the last.
fn time_generations(
    parts: &dyn kiln_pipelines::text_to_image::flux::FluxParts,
    args: &FluxBenchArgs,
    size: usize,
) -> Result<(f64, serde_json::Value)> {
    let request = flux_request(args, size);
    let mut stages = Vec::new();
    let generate_s = time(parts.device(), args.runs, || {
        stages.push(generate(parts, &request, &mut |_, _| true)?.timings);
        Ok(())
    })
    .context("generation")?;
    let last = stages.last().cloned().unwrap_or_default();
    Ok((
        generate_s,
        json!({"text_s": last.text_encoding_s, "denoise_s": last.denoising_s, "vae_s": last.vae_s}),
    ))
}

/// `--offload`: whole generations with model CPU offload only, so the peak
/// device memory seen is the offloaded one.
fn bench_flux_offloaded(args: FluxBenchArgs, quantization: Quantization) -> Result<()> {
    let (device, dtype, quantization) = args.placement.resolve_image(quantization)?;
    let (parts, _) = kiln_pipelines::text_to_image::flux::OffloadedFlux::open(
        &args.model,
        &device,
        dtype,
        quantization,
    )
    .map_err(anyhow::Error::msg)?;
    let mut results = Vec::new();
    for &size in &args.sizes {
        let (generate_s, stages) = time_generations(&parts, &args, size)?;
        results.push(json!({"size": size, "generate_s": generate_s, "stages": stages}));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"results": results, "peak_rss_mib": peak_rss_mib()}))?
    );
    Ok(())
}

/// A random rank-`rank` LoRA on every linear layer of the transformer.
fn random_lora(
    transformer: &mut kiln_models::flux::FluxTransformer,
    rank: usize,
    dtype: DType,
) -> Result<kiln_engine::lora::AdapterSet> {
    let mut set = kiln_engine::lora::AdapterSet::default();
    transformer.for_each_linear(&mut |linear| {
        if let Some(name) = linear.name() {
            let down = Tensor::randn(0f32, 0.02, (rank, linear.in_dim()), &Device::Cpu)?;
            let up = Tensor::randn(0f32, 0.02, (linear.out_dim(), rank), &Device::Cpu)?;
            set.add(
                name,
                kiln_engine::lora::LowRank::new(&down, &up, 1.0, dtype)?,
            );
        }
        Ok(())
    })?;
    Ok(set)
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Median wall time of `runs` calls after one warm-up; each call ends with the
/// device's queue drained, so asynchronous CUDA work is inside the measurement.
pub(crate) fn time<F: FnMut() -> Result<()>>(
    device: &Device,
    runs: usize,
    mut f: F,
) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        f()?;
        device.synchronize()?;
        samples.push(started.elapsed().as_secs_f64());
    }
    Ok(median(samples))
}

pub fn run(command: BenchCommand) -> Result<()> {
    let args = match command {
        BenchCommand::Flux(args) => args,
        BenchCommand::Flux2(args) => return super::bench_flux2::run(args),
        BenchCommand::Sdxl(args) => return bench_sdxl(args),
        BenchCommand::Llm(args) => return super::bench_llm::run(args),
        BenchCommand::Serve(args) => return super::bench_serve::run(args),
        BenchCommand::Graph(args) => return super::bench_graph::run(args),
    };
    let quantization = args.quality.quantization()?;
    if args.offload {
        return bench_flux_offloaded(args, quantization);
    }
    let (device, dtype, quantization) = args.placement.resolve_image(quantization)?;
    let mut components = FluxComponents::load_quantized(&args.model, &device, dtype, quantization)
        .map_err(anyhow::Error::msg)?;
    let resident_bytes = components.resident_bytes;
    let lora = if args.lora_rank > 0 {
        Some(std::sync::Arc::new(random_lora(
            &mut components.transformer,
            args.lora_rank,
            dtype,
        )?))
    } else {
        None
    };
    let config = components.transformer.config().clone();
    let mut results = Vec::new();
    for &size in &args.sizes {
        let tokens = (size / 16) * (size / 16);
        let random = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?)
        };
        let img = random(&[1, tokens, config.in_channels])?;
        let txt = random(&[1, args.max_sequence_length, config.joint_attention_dim])?;
        let pooled = random(&[1, config.pooled_projection_dim])?;
        let ids = kiln_models::flux::position_ids(args.max_sequence_length, size / 16, size / 16);
        let timestep = Tensor::new(&[0.5f32], &device)?;
        let guidance = Tensor::new(&[3.5f32], &device)?;
        let forward = |components: &FluxComponents| -> Result<()> {
            components.transformer.forward(
                &img,
                &txt,
                &ids,
                &timestep,
                config.guidance_embeds.then_some(&guidance),
                &pooled,
            )?;
            Ok(())
        };
        let forward_s =
            time(&device, args.runs, || forward(&components)).context("transformer forward")?;
        let mut lora_timings = json!(null);
        if let Some(set) = &lora {
            let runtime_s = time(&device, args.runs, || {
                kiln_engine::lora::with_adapters(Some(set.clone()), || forward(&components))
            })
            .context("forward with a runtime LoRA")?;
            components
                .transformer
                .for_each_linear(&mut |linear| set.merge_into(linear).map(|_| ()))?;
            let fused_s =
                time(&device, args.runs, || forward(&components)).context("fused forward")?;
            components.transformer.for_each_linear(&mut |linear| {
                linear.unmerge();
                Ok(())
            })?;
            lora_timings = json!({
                "rank": args.lora_rank,
                "runtime_forward_s": runtime_s,
                "fused_forward_s": fused_s,
                "runtime_vs_none": runtime_s / forward_s,
                "fused_vs_none": fused_s / forward_s,
            });
        }
        let (generate_s, stages) = time_generations(&components.models(), &args, size)?;
        args.quality.save("flux", size, || {
            Ok(generate(
                &components.models(),
                &flux_request(&args, size),
                &mut |_, _| true,
            )?
            .images)
        })?;
        results.push(json!({
            "size": size, "forward_s": forward_s, "generate_s": generate_s, "lora": lora_timings,
            "stages": stages,
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "results": results,
            "peak_rss_mib": peak_rss_mib(),
            "quantize": args.quality.quantize,
            "resident_bytes": resident_bytes,
        }))?
    );
    Ok(())
}
