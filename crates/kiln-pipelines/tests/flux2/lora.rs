//! FLUX.2 LoRAs against diffusers (`fixtures/flux2/generate_lora.py`):
//! ai-toolkit's naming (fused q/k/v split onto the double blocks' q/k/v,
//! `linear1` onto the fused `to_qkv_mlp_proj`, no alpha), diffusers/PEFT
//! naming with alpha from its adapter metadata, and both at once at
//! `set_adapters` scales, in runtime and fused modes. Latents at cosine
//! distance ≤ 1e-5, images within 1/255. LoRAs for the other FLUX generation
//! are refused with a message that says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use kiln_engine::parity;
use kiln_engine::weights::load_all;
use kiln_pipelines::lora::{self, LoraFile};
use kiln_pipelines::text_to_image::flux2::{Flux2Components, Flux2Request, generate};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux2")
}

fn read(name: &str) -> LoraFile {
    lora::read(&fixtures().join(format!("lora/{name}.safetensors"))).unwrap()
}

fn request(index: &Value) -> Flux2Request {
    let case = &index["case"];
    let int = |k: &str| case[k].as_u64().unwrap() as usize;
    Flux2Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        width: int("width"),
        height: int("height"),
        steps: int("num_inference_steps"),
        guidance_scale: 4.0,
        seed: int("seed") as u64,
        num_outputs: 1,
        max_sequence_length: int("max_sequence_length"),
        reference_images: vec![],
        vae_tile: None,
        adapters: None,
    }
}

fn matches(
    name: &str,
    generated: &kiln_pipelines::text_to_image::flux2::Generated,
    refs: &std::collections::HashMap<String, candle_core::Tensor>,
) {
    let latents = parity::compare(&generated.latents, &refs[&format!("{name}.latents")]).unwrap();
    assert!(
        latents.cosine_distance <= 1e-5,
        "{name}: latents cosine distance {:.2e}",
        latents.cosine_distance
    );
    let image = parity::compare(&generated.images, &refs[&format!("{name}.image")]).unwrap();
    assert!(
        image.max_abs <= 1.0 / 255.0,
        "{name}: image max abs {:.2e}",
        image.max_abs
    );
}

#[test]
fn ai_toolkit_and_peft_loras_match_diffusers_at_runtime_and_fused() {
    let device = parity::device_under_test();
    let mut components =
        Flux2Components::load(&fixtures().join("tiny-klein"), None, &device, DType::F32).unwrap();
    let targets = components.lora_targets();
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora/index.json")).unwrap())
            .unwrap();
    let refs = load_all(&fixtures().join("lora/reference.safetensors"), &device).unwrap();
    let (aitk, peft) = (read("aitk"), read("peft"));
    let config = components.transformer.config().clone();
    let cases: [(&str, Vec<(&LoraFile, f64)>); 3] = [
        ("aitk", vec![(&aitk, 0.8)]),
        ("peft", vec![(&peft, 1.0)]),
        ("both", vec![(&aitk, 0.8), (&peft, 0.5)]),
    ];
    for (name, loras) in &cases {
        let (set, report) = lora::flux2_adapters(loras, &targets, &config, DType::F32).unwrap();
        assert!(report.unmatched.is_empty(), "{name}: {report:?}");
        let mut runtime = request(&index);
        runtime.adapters = Some(Arc::new(set));
        let generated = generate(&components, &runtime, &mut |_, _| true).unwrap();
        matches(name, &generated, &refs);
    }
    // Fused: merged into the weights, then restored exactly.
    let (set, _) = lora::flux2_adapters(&cases[2].1, &targets, &config, DType::F32).unwrap();
    let base = generate(&components, &request(&index), &mut |_, _| true).unwrap();
    components
        .transformer
        .for_each_linear(&mut |linear| set.merge_into(linear).map(|_| ()))
        .unwrap();
    let fused = generate(&components, &request(&index), &mut |_, _| true).unwrap();
    matches("both", &fused, &refs);
    components
        .transformer
        .for_each_linear(&mut |linear| {
            linear.unmerge();
            Ok(())
        })
        .unwrap();
    let restored = generate(&components, &request(&index), &mut |_, _| true).unwrap();
    let same = parity::compare(&restored.latents, &base.latents).unwrap();
    assert_eq!(same.max_abs, 0.0, "unmerging restores the exact weights");
    let moved = parity::compare(&fused.latents, &base.latents).unwrap();
    assert!(moved.max_abs > 0.1, "the LoRA changes the output");
}

#[test]
fn a_lora_for_the_other_flux_generation_is_refused_saying_so() {
    let device = parity::device_under_test();
    let mut flux2 =
        Flux2Components::load(&fixtures().join("tiny-klein"), None, &device, DType::F32).unwrap();
    let targets = flux2.lora_targets();
    let flux1_lora = lora::read(&fixtures().join("../flux/lora/style_peft.safetensors")).unwrap();
    let err = lora::flux2_adapters(
        &[(&flux1_lora, 1.0)],
        &targets,
        flux2.transformer.config(),
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("trained for FLUX.1") && err.contains("this model is FLUX.2"),
        "{err}"
    );
    // ai-toolkit names are BFL's in both generations: the shapes tell.
    let flux1_aitk =
        lora::read(&fixtures().join("../flux/lora/style_aitoolkit.safetensors")).unwrap();
    let err = lora::flux2_adapters(
        &[(&flux1_aitk, 1.0)],
        &targets,
        flux2.transformer.config(),
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("this model is FLUX.2") && err.contains("another FLUX generation"),
        "{err}"
    );
    let mut flux1 = kiln_pipelines::text_to_image::flux::FluxComponents::load(
        &fixtures().join("../flux/tiny-dev"),
        &device,
        DType::F32,
    )
    .unwrap();
    let flux1_targets = flux1.lora_targets();
    for name in ["aitk", "peft"] {
        let err = lora::flux_adapters(
            &[(&read(name), 1.0)],
            &flux1_targets,
            flux1.transformer.config(),
            DType::F32,
        )
        .unwrap_err()
        .to_string();
        // The PEFT file has FLUX.2-only names; the ai-toolkit one BFL names
        // both generations share, and SwiGLU-wide MLP updates.
        assert!(
            err.contains("this model is FLUX.1")
                && (err.contains("trained for FLUX.2") || err.contains("another FLUX generation")),
            "{name}: {err}"
        );
    }
}

#[test]
fn kohya_names_of_the_same_lora_give_the_same_adapters() {
    let device = parity::device_under_test();
    let mut components =
        Flux2Components::load(&fixtures().join("tiny-klein"), None, &device, DType::F32).unwrap();
    let targets = components.lora_targets();
    let config = components.transformer.config().clone();
    // ai-toolkit's file renamed as kohya's trainer writes FLUX LoRAs, with
    // alpha = rank (scale 1, as ai-toolkit's no-alpha files).
    let tensors =
        candle_core::safetensors::load(fixtures().join("lora/aitk.safetensors"), &device).unwrap();
    let mut kohya = std::collections::HashMap::new();
    for (name, tensor) in tensors {
        let stem = name.trim_start_matches("diffusion_model.");
        let (module, part) = stem.split_once(".lora_").unwrap();
        let module = format!("lora_unet_{}", module.replace('.', "_"));
        let part = if part.starts_with('A') {
            "lora_down.weight"
        } else {
            "lora_up.weight"
        };
        if part == "lora_down.weight" {
            let rank = tensor.dims()[0] as f32;
            kohya.insert(
                format!("{module}.alpha"),
                candle_core::Tensor::new(rank, &device).unwrap(),
            );
        }
        kohya.insert(format!("{module}.{part}"), tensor);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kohya.safetensors");
    candle_core::safetensors::save(&kohya, &path).unwrap();
    let kohya = lora::read(&path).unwrap();
    assert_eq!(kohya.format.name(), "kohya");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora/index.json")).unwrap())
            .unwrap();
    let refs = load_all(&fixtures().join("lora/reference.safetensors"), &device).unwrap();
    let (set, report) =
        lora::flux2_adapters(&[(&kohya, 0.8)], &targets, &config, DType::F32).unwrap();
    assert!(report.unmatched.is_empty(), "{report:?}");
    let mut runtime = request(&index);
    runtime.adapters = Some(Arc::new(set));
    let generated = generate(&components, &runtime, &mut |_, _| true).unwrap();
    matches("aitk", &generated, &refs);
}
