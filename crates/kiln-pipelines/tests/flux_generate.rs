//! Whole FLUX generations against diffusers on the tiny random fixtures
//! (`fixtures/flux`, from `fixtures/flux/generate.py`): text-to-image for dev,
//! schnell, true CFG and a non-square size, and image-to-image. Final images
//! (floats in [0, 1] before 8-bit rounding) must match to max abs diff <= 1/255;
//! the initial noise must match exactly (torch-compatible generator).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use kiln_engine::weights::load_all;
use kiln_pipelines::text_to_image::flux::{FluxComponents, GenerationRequest, generate};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux")
}

struct Variant {
    components: FluxComponents,
    references: HashMap<String, Tensor>,
    index: Value,
}

fn variant(name: &str) -> Variant {
    let dir = fixtures().join(name);
    let index =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference/index.json")).unwrap())
            .unwrap();
    Variant {
        components: FluxComponents::load(
            &dir,
            &kiln_engine::parity::device_under_test(),
            DType::F32,
        )
        .unwrap(),
        references: load_all(
            &dir.join("reference/references.safetensors"),
            &kiln_engine::parity::device_under_test(),
        )
        .unwrap(),
        index,
    }
}

fn request(inputs: &Value) -> GenerationRequest {
    GenerationRequest {
        prompt: inputs["prompt"].as_str().unwrap().into(),
        negative_prompt: inputs["negative_prompt"].as_str().map(str::to_string),
        width: inputs["width"].as_u64().unwrap() as usize,
        height: inputs["height"].as_u64().unwrap() as usize,
        steps: inputs["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: inputs["guidance_scale"].as_f64().unwrap(),
        true_cfg_scale: inputs["true_cfg_scale"].as_f64().unwrap_or(1.0),
        seed: inputs["seed"].as_u64().unwrap(),
        num_outputs: 1,
        max_sequence_length: inputs["max_sequence_length"].as_u64().unwrap() as usize,
        init_image: None,
        vae_tile: None,
        adapters: None,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    kiln_engine::parity::compare(a, b).unwrap().max_abs
}

fn run(v: &Variant, request: &GenerationRequest) -> Tensor {
    let c = &v.components;
    let models = c.models();
    let mut steps = 0;
    let out = generate(&models, request, &mut |_, _| {
        steps += 1;
        true
    })
    .unwrap();
    assert!(steps > 0);
    out.images
}

fn check_case(v: &Variant, case: &str, init_image: Option<(Tensor, f64)>) {
    let inputs = &v.index["cases"][case]["inputs"];
    let mut request = request(inputs);
    request.init_image = init_image;
    let images = run(v, &request);
    let diff = max_abs_diff(&images, &v.references[&format!("{case}.image")]);
    assert!(
        diff <= 1.0 / 255.0,
        "{case}: final image max abs diff {diff} > 1/255"
    );
}

#[test]
fn initial_noise_is_diffusers_noise() {
    let v = variant("tiny-dev");
    let noise = &v.references["generate_a.initial_noise"];
    let mut generator = kiln_engine::TorchGenerator::new(42);
    let ours = Tensor::from_vec(
        generator.randn(noise.elem_count()),
        noise.dims(),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&ours, noise), 0.0);
}

#[test]
fn dev_text_to_image_true_cfg_and_non_square_match_diffusers() {
    let v = variant("tiny-dev");
    for case in ["generate_a", "generate_c", "generate_d"] {
        check_case(&v, case, None);
    }
}

#[test]
fn schnell_text_to_image_matches_diffusers() {
    let v = variant("tiny-schnell");
    let cases: Vec<String> = v.index["cases"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("generate_"))
        .cloned()
        .collect();
    assert!(!cases.is_empty());
    for case in cases {
        check_case(&v, &case, None);
    }
}

#[test]
fn image_to_image_matches_diffusers() {
    let v = variant("tiny-dev");
    let init = v.references["img2img.init_image"].clone();
    let strength = v.index["cases"]["img2img"]["inputs"]["strength"]
        .as_f64()
        .unwrap();
    check_case(&v, "img2img", Some((init, strength)));
}

#[test]
fn token_ids_match_transformers_exactly() {
    let v = variant("tiny-dev");
    let prompts = v.index["cases"]["tokens"]["inputs"]["prompts"]
        .as_array()
        .unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let prompt = prompt.as_str().unwrap();
        let expected = |which: &str| -> Vec<u32> {
            v.references[&format!("tokens.p{i}.{which}")]
                .flatten_all()
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(
            v.components.text.clip_tokenizer.ids(prompt, 77).unwrap(),
            expected("clip_input_ids"),
            "CLIP {prompt:?}"
        );
        assert_eq!(
            v.components.text.t5_tokenizer.ids(prompt, 32).unwrap(),
            expected("t5_input_ids"),
            "T5 {prompt:?}"
        );
    }
}

#[test]
fn model_cpu_offload_generates_the_same_images_one_part_at_a_time() {
    use kiln_pipelines::text_to_image::flux::{FluxParts, OffloadedFlux, Part};
    let v = variant("tiny-dev");
    let device = kiln_engine::parity::device_under_test();
    let (offloaded, targets) = OffloadedFlux::open(
        &fixtures().join("tiny-dev"),
        &device,
        DType::F32,
        Default::default(),
    )
    .unwrap();
    assert!(!targets.denoiser.is_empty() && !targets.text_encoder.is_empty());
    // Each stage loads its own part and frees it when done.
    assert!(matches!(offloaded.transformer().unwrap(), Part::Loaded(_)));
    for case in ["generate_a", "generate_c"] {
        let request = request(&v.index["cases"][case]["inputs"]);
        let resident = run(&v, &request);
        let images = generate(&offloaded, &request, &mut |_, _| true)
            .unwrap()
            .images;
        assert_eq!(max_abs_diff(&images, &resident), 0.0, "{case}");
    }
    let init = v.references["img2img.init_image"].clone();
    let mut request = request(&v.index["cases"]["img2img"]["inputs"]);
    request.init_image = Some((init, 0.6));
    let images = generate(&offloaded, &request, &mut |_, _| true)
        .unwrap()
        .images;
    assert_eq!(max_abs_diff(&images, &run(&v, &request)), 0.0, "img2img");
}

#[path = "flux2/generation.rs"]
mod flux2_generation;

#[path = "flux2/quantized.rs"]
mod quantized;

#[path = "stored_quantized/flux.rs"]
mod gguf_flux;

#[path = "stored_quantized/reader.rs"]
mod gguf_reader;

#[path = "stored_quantized/bnb.rs"]
mod bnb;
