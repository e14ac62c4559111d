//! Whole FLUX.2-klein generations against diffusers' `Flux2KleinPipeline` on
//! the tiny random fixtures (`fixtures/flux2/generate_klein.py`): distilled
//! (square, non-square with two images, the 512-token default text length,
//! an edit with a reference image that is cropped to the grid) and base
//! (CFG against the empty prompt, and guidance 1 without it). The latents
//! before the VAE must match at cosine distance ≤ 1e-5; the final images
//! (floats in [0, 1]) to max abs ≤ 1/255. The seeded noise is the same draw
//! to about one ULP (see latents.rs), well inside both.

use std::path::{Path, PathBuf};

use candle_core::DType;
use kiln_engine::parity;
use kiln_engine::weights::load_all;
use kiln_pipelines::text_to_image::flux2::{
    Flux2Components, Flux2Request, generate, reference_tensor,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux2")
}

fn check_variant(name: &str, cases: &[&str]) {
    check_folder(&fixtures().join(name), name, cases);
}

/// The cases of `name`'s references, generated from the model folder `model`.
fn check_folder(model: &Path, name: &str, cases: &[&str]) {
    let dir = fixtures().join(name);
    let device = parity::device_under_test();
    let components = Flux2Components::load(model, None, &device, DType::F32).unwrap();
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference/index.json")).unwrap())
            .unwrap();
    let refs = load_all(&dir.join("reference/references.safetensors"), &device).unwrap();
    for case in cases {
        let args = &index["cases"][case];
        let int = |k: &str| args[k].as_u64().unwrap() as usize;
        let reference_images = if args["edit_image"].as_bool().unwrap() {
            let image = image::open(dir.join("reference/edit.png"))
                .unwrap()
                .to_rgb8();
            vec![reference_tensor(&image, 16).unwrap()]
        } else {
            vec![]
        };
        let request = Flux2Request {
            prompt: args["prompt"].as_str().unwrap().into(),
            width: int("width"),
            height: int("height"),
            steps: int("num_inference_steps"),
            guidance_scale: args["guidance_scale"].as_f64().unwrap_or(4.0),
            seed: int("seed") as u64,
            num_outputs: args["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
            max_sequence_length: int("max_sequence_length"),
            reference_images,
            vae_tile: None,
            adapters: None,
        };
        let mut steps = 0;
        let generated = generate(&components, &request, &mut |_, _| {
            steps += 1;
            true
        })
        .unwrap();
        assert_eq!(steps, request.steps, "{case}: progress callbacks");
        let latents =
            parity::compare(&generated.latents, &refs[&format!("{case}.latents")]).unwrap();
        assert!(
            latents.cosine_distance <= 1e-5,
            "{name}/{case}: latents cosine distance {:.2e}",
            latents.cosine_distance
        );
        let image = parity::compare(&generated.images, &refs[&format!("{case}.image")]).unwrap();
        assert!(
            image.max_abs <= 1.0 / 255.0,
            "{name}/{case}: image max abs diff {:.2e} > 1/255",
            image.max_abs
        );
    }
}

#[test]
fn distilled_klein_generations_match_diffusers() {
    check_variant("tiny-klein", &["square", "two_wide", "long_text", "edit"]);
}

#[test]
fn base_klein_generations_with_and_without_cfg_match_diffusers() {
    check_variant("tiny-klein-base", &["cfg", "no_cfg"]);
}

#[test]
fn a_bfl_single_file_transformer_without_config_generates_the_same() {
    // tiny-klein's parts, with its transformer as BFL's root-level single file.
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("tiny-klein");
    for part in ["text_encoder", "tokenizer", "vae", "scheduler"] {
        std::fs::create_dir(dir.path().join(part)).unwrap();
        for file in std::fs::read_dir(source.join(part)).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, dir.path().join(part).join(file.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        source.join("model_index.json"),
        dir.path().join("model_index.json"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("tiny-klein-bfl/flux-2-klein-tiny.safetensors"),
        dir.path().join("flux-2-klein-tiny.safetensors"),
    )
    .unwrap();
    check_folder(dir.path(), "tiny-klein", &["square"]);
}
