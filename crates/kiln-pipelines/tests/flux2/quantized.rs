//! Weights quantized while loading (issue 17), on the tiny fixtures: FLUX.2
//! klein and FLUX.1 dev with int8 and Q8_0 transformers (and FLUX.1's T5 with
//! `quantize_text_encoder`) generate close to the dense model (latents at
//! cosine ≥ 0.999, images at PSNR ≥ 30 dB against the dense image; random
//! tiny weights are harder on quantization than trained ones), hold fewer
//! bytes, and keep the layers diffusers keeps dense (embedders, modulation,
//! norms, the output projection) dense.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kiln_engine::parity;
use kiln_engine::quant::QuantKind;
use kiln_pipelines::text_to_image::flux2::{Flux2Components, Flux2Request, generate};
use kiln_pipelines::text_to_image::loading::Quantization;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

use super::gguf_reader::psnr;

/// The tiny FLUX.1-dev request the quantization tests generate (64², 32 tokens).
pub fn flux1_request(
    steps: usize,
    seed: u64,
) -> kiln_pipelines::text_to_image::flux::GenerationRequest {
    kiln_pipelines::text_to_image::flux::GenerationRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps,
        guidance_scale: 3.5,
        true_cfg_scale: 1.0,
        seed,
        num_outputs: 1,
        max_sequence_length: 32,
        init_image: None,
        vae_tile: None,
        adapters: None,
    }
}

fn klein(quantization: Quantization) -> Flux2Components {
    Flux2Components::load_quantized(
        &fixtures().join("flux2/tiny-klein"),
        None,
        &Device::Cpu,
        DType::F32,
        quantization,
    )
    .unwrap()
}

fn square() -> Flux2Request {
    Flux2Request {
        prompt: "a red fox in the snow".into(),
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 4.0,
        seed: 42,
        num_outputs: 1,
        max_sequence_length: 32,
        reference_images: vec![],
        vae_tile: None,
        adapters: None,
    }
}

#[test]
fn int8_q8_0_and_bf16_klein_transformers_generate_close_to_dense_in_fewer_bytes() {
    let dense = klein(Quantization::default());
    let reference = generate(&dense, &square(), &mut |_, _| true).unwrap();
    // bf16 runs the AVX512-BF16 kernel where the CPU has it, else the f32
    // GEMM on the widened weights: either way within these bounds.
    for kind in [QuantKind::Int8, QuantKind::Q8_0, QuantKind::Bf16] {
        let mut quantized = klein(Quantization {
            denoiser: Some(kind),
            text_encoder: false,
        });
        let out = generate(&quantized, &square(), &mut |_, _| true).unwrap();
        let latents = parity::compare(&out.latents, &reference.latents).unwrap();
        let db = psnr(&out.images, &reference.images);
        assert!(
            latents.cosine_distance <= 1e-3 && db >= 30.0,
            "{kind:?}: latents cosine distance {:.2e}, PSNR {db:.1} dB",
            latents.cosine_distance
        );
        assert!(
            quantized.resident_bytes < dense.resident_bytes,
            "{kind:?}: {} bytes, dense {}",
            quantized.resident_bytes,
            dense.resident_bytes
        );
        let mut kept = Vec::new();
        let mut quantized_layers = 0;
        quantized
            .transformer
            .for_each_linear(&mut |linear| {
                match linear.quantization() {
                    Some(_) => quantized_layers += 1,
                    None => kept.push(linear.name().unwrap_or_default().to_string()),
                }
                Ok(())
            })
            .unwrap();
        kept.sort();
        assert!(
            quantized_layers >= 20,
            "{kind:?}: {quantized_layers} quantized"
        );
        for name in [
            "x_embedder",
            "context_embedder",
            "proj_out",
            "norm_out.linear",
            "time_guidance_embed.timestep_embedder.linear_1",
        ] {
            assert!(
                kept.iter().any(|k| k == name),
                "{kind:?}: {name} not dense in {kept:?}"
            );
        }
        // The modulation projections are quantized, as llama.cpp and
        // bitsandbytes quantize them.
        for name in [
            "double_stream_modulation_img.linear",
            "single_stream_modulation.linear",
        ] {
            assert!(
                !kept.iter().any(|k| k == name),
                "{kind:?}: {name} kept dense"
            );
        }
        // Fused LoRAs need dense weights: merging into a quantized layer fails
        // naming it, and leaves nothing changed.
        let lora =
            kiln_pipelines::lora::read(&fixtures().join("flux2/lora/aitk.safetensors")).unwrap();
        let targets = quantized.lora_targets();
        let config = quantized.transformer.config().clone();
        let (set, _) =
            kiln_pipelines::lora::flux2_adapters(&[(&lora, 1.0)], &targets, &config, DType::F32)
                .unwrap();
        let err = quantized
            .transformer
            .for_each_linear(&mut |linear| set.merge_into(linear).map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("quantized") && err.contains("runtime"),
            "{err}"
        );
    }
}

#[test]
fn q4_k_falls_back_to_q5_0_where_rows_are_narrower_than_its_blocks() {
    // Q4_K's super-blocks span 256 inputs; the tiny model's layers are 32 to
    // 96 wide, so each takes Q5_0 (32-wide blocks) as llama.cpp's quantizer
    // falls back.
    let dense = klein(Quantization::default());
    let mut q4 = klein(Quantization {
        denoiser: Some(QuantKind::Q4K),
        text_encoder: false,
    });
    let mut kinds = std::collections::BTreeSet::new();
    q4.transformer
        .for_each_linear(&mut |linear| {
            kinds.extend(linear.quantization());
            Ok(())
        })
        .unwrap();
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["q5_0"]);
    assert!(q4.resident_bytes < dense.resident_bytes);
    let a = generate(&dense, &square(), &mut |_, _| true).unwrap();
    let b = generate(&q4, &square(), &mut |_, _| true).unwrap();
    let db = psnr(&b.images, &a.images);
    assert!(db >= 25.0, "PSNR {db:.1} dB");
}

#[test]
fn flux1_with_int8_transformer_and_t5_generates_close_to_dense() {
    use kiln_pipelines::text_to_image::flux::FluxComponents;
    let dir = fixtures().join("flux/tiny-dev");
    let request = flux1_request(3, 7);
    let dense = FluxComponents::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let quantized = FluxComponents::load_quantized(
        &dir,
        &Device::Cpu,
        DType::F32,
        Quantization {
            denoiser: Some(QuantKind::Int8),
            text_encoder: true,
        },
    )
    .unwrap();
    let generate = |c: &FluxComponents| {
        kiln_pipelines::text_to_image::flux::generate(&c.models(), &request, &mut |_, _| true)
            .unwrap()
            .images
    };
    let db = psnr(&generate(&quantized), &generate(&dense));
    assert!(db >= 30.0, "PSNR {db:.1} dB");
    assert!(quantized.resident_bytes < dense.resident_bytes);
}

#[test]
fn model_cpu_offload_composes_with_quantization() {
    use kiln_pipelines::text_to_image::flux::{FluxComponents, FluxParts, OffloadedFlux, Part};
    let dir = fixtures().join("flux/tiny-dev");
    let quantization = Quantization {
        denoiser: Some(QuantKind::Q8_0),
        text_encoder: true,
    };
    let (offloaded, _) = OffloadedFlux::open(&dir, &Device::Cpu, DType::F32, quantization).unwrap();
    // Each stage's part loads quantized, as the resident model's does.
    let Part::Loaded(mut transformer) = offloaded.transformer().unwrap() else {
        panic!("an offloaded part loads per stage")
    };
    let mut quantized = 0;
    transformer
        .for_each_linear(&mut |linear| {
            quantized += usize::from(linear.quantization().is_some());
            Ok(())
        })
        .unwrap();
    assert!(quantized > 20, "{quantized}");
    let request = flux1_request(2, 3);
    let resident =
        FluxComponents::load_quantized(&dir, &Device::Cpu, DType::F32, quantization).unwrap();
    let generate = |parts: &dyn FluxParts| {
        kiln_pipelines::text_to_image::flux::generate(parts, &request, &mut |_, _| true)
            .unwrap()
            .images
    };
    let a = generate(&offloaded);
    let b = generate(&resident.models());
    assert_eq!(parity::compare(&a, &b).unwrap().max_abs, 0.0);

    // A GGUF transformer under offload reads its blocks at each stage.
    let folder = super::gguf_flux::folder_with_transformer(
        &fixtures().join("gguf/flux1-tiny-dev-Q8_0.gguf"),
    );
    let (from_gguf, _) = OffloadedFlux::open(
        folder.path(),
        &Device::Cpu,
        DType::F32,
        Quantization::default(),
    )
    .unwrap();
    let own = Quantization {
        denoiser: Some(QuantKind::Q8_0),
        text_encoder: false,
    };
    let (own, _) = OffloadedFlux::open(&dir, &Device::Cpu, DType::F32, own).unwrap();
    assert_eq!(
        parity::compare(&generate(&from_gguf), &generate(&own))
            .unwrap()
            .max_abs,
        0.0
    );
}

#[test]
fn quantize_text_encoder_also_quantizes_klein_qwen3() {
    let transformer_only = klein(Quantization {
        denoiser: Some(QuantKind::Int8),
        text_encoder: false,
    });
    let both = klein(Quantization {
        denoiser: Some(QuantKind::Int8),
        text_encoder: true,
    });
    // Qwen3's projections (the tiny encoder's bulk) hold a quarter of their
    // f32 bytes, so the pipeline shrinks by well over its transformer's share.
    assert!(
        both.resident_bytes + 100_000 < transformer_only.resident_bytes,
        "{} vs {}",
        both.resident_bytes,
        transformer_only.resident_bytes
    );
    let dense = generate(&klein(Quantization::default()), &square(), &mut |_, _| true).unwrap();
    let out = generate(&both, &square(), &mut |_, _| true).unwrap();
    let db = psnr(&out.images, &dense.images);
    assert!(db >= 30.0, "PSNR {db:.1} dB");
}
