//! The FLUX pipeline as a request handler: validation (every problem at once, with
//! the field and the rule), presets, aspect ratios, reproducible seeds, output
//! formats, img2img inputs, and load errors that name the missing file.

/// FLUX.2's latent preparation (same binary).
#[path = "flux2/latents.rs"]
mod flux2_latents;
/// FLUX.2's prompt encoder (in this binary to save a link on 2-core CI).
#[path = "flux2/prompt.rs"]
mod flux2_prompt;

use std::path::{Path, PathBuf};

use base64::Engine;
use kiln_pipelines::text_to_image::flux::{
    load, manifest_for_folder, size_for, size_for_aspect_ratio,
};
use kiln_pipelines::{Pipeline, PipelineError, PredictInput, PredictRequest, Prediction};
use kiln_registry::ResolvedModel;
use serde_json::{Map, Value, json};

fn tiny_dev() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux/tiny-dev")
}

fn pipeline() -> std::sync::Arc<dyn Pipeline> {
    let dir = tiny_dev();
    let mut manifest = manifest_for_folder(&dir).unwrap();
    manifest.presets.insert(
        "tiny".into(),
        json!({"width": 32, "height": 32, "num_inference_steps": 1}),
    );
    load(&ResolvedModel {
        name: None,
        version: None,
        dir,
        manifest,
    })
    .unwrap()
}

fn predict(pipeline: &dyn Pipeline, input: Value) -> Result<Value, PipelineError> {
    let Value::Object(fields) = input else {
        panic!("object")
    };
    match pipeline.predict(PredictRequest {
        input: PredictInput::Fields(fields),
        params: Map::new(),
    })? {
        Prediction::Json(value) => Ok(value),
        Prediction::Tensors(_) => panic!("FLUX returns JSON"),
    }
}

fn problems(result: Result<Value, PipelineError>) -> Vec<String> {
    match result {
        Err(PipelineError::InvalidInput(problems)) => {
            problems.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected invalid input, got {other:?}"),
    }
}

#[test]
fn every_problem_is_reported_with_field_and_rule() {
    let p = pipeline();
    let found = problems(predict(
        &*p,
        json!({"prompt": 7, "width": 1000, "height": 64, "num_inference_steps": 0, "num_outputs": 5,
               "output_format": "gif", "max_sequence_length": 600, "colour": "red"}),
    ));
    let text = found.join("\n");
    for needle in [
        "colour: unknown field",
        "prompt: should be str type, not int",
        "num_inference_steps: must be >= 1, got 0",
        "num_outputs: must be <= 4, got 5",
        "output_format: must be one of png, jpeg, webp",
        "max_sequence_length: must be <= 512",
        "width: must be a multiple of 16, got 1000; nearest valid: 992 or 1008",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let found = problems(predict(
        &*p,
        json!({"prompt": "x", "width": 4096, "height": 4096}),
    ));
    assert!(
        found[0].contains("is 16777216 pixels; the limit is 2097152"),
        "{found:?}"
    );
    let found = problems(predict(
        &*p,
        json!({"prompt": "x", "image": "bm90IGFuIGltYWdl"}),
    ));
    assert!(
        found[0].starts_with("image: undecodable image")
            || found[0].starts_with("image: cannot read"),
        "{found:?}"
    );
    // One message whether the file exists outside the folders or not at all.
    let found = problems(predict(&*p, json!({"prompt": "x", "image": "/etc/passwd"})));
    assert_eq!(
        found[0],
        "image: /etc/passwd is not a file in the folders files may be read from (KILN_INPUT_DIRS)"
    );
    let found = problems(predict(
        &*p,
        json!({"prompt": "x", "image": "/etc/no-such-file"}),
    ));
    assert_eq!(
        found[0],
        "image: /etc/no-such-file is not a file in the folders files may be read from (KILN_INPUT_DIRS)"
    );
}

#[test]
fn seeds_reproduce_and_are_always_reported() {
    let p = pipeline();
    let request =
        json!({"prompt": "a cat", "width": 32, "height": 32, "num_inference_steps": 1, "seed": 9});
    let first = predict(&*p, request.clone()).unwrap();
    let second = predict(&*p, request).unwrap();
    assert_eq!(first["seed"], 9);
    assert_eq!(first["images"][0]["base64"], second["images"][0]["base64"]);
    let random = predict(
        &*p,
        json!({"prompt": "a cat", "width": 32, "height": 32, "num_inference_steps": 1}),
    )
    .unwrap();
    assert!(
        random["seed"].as_u64().is_some(),
        "a random seed is reported: {random}"
    );
}

#[test]
fn presets_apply_first_and_explicit_fields_win() {
    let p = pipeline();
    let out = predict(
        &*p,
        json!({"prompt": "a cat", "preset": "tiny", "width": 48}),
    )
    .unwrap();
    assert_eq!(
        (out["width"].as_u64(), out["height"].as_u64()),
        (Some(48), Some(32))
    );
    let found = problems(predict(&*p, json!({"prompt": "a cat", "preset": "huge"})));
    assert!(found[0].starts_with("preset: must be one of"), "{found:?}");
}

#[test]
fn outputs_are_encoded_in_the_requested_format_and_count() {
    let p = pipeline();
    let out = predict(
        &*p,
        json!({"prompt": "a cat", "width": 32, "height": 48, "num_inference_steps": 1, "seed": 1,
               "num_outputs": 2, "output_format": "jpeg", "output_quality": 80}),
    )
    .unwrap();
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_ne!(
        images[0]["base64"], images[1]["base64"],
        "each output has its own noise"
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(images[0]["base64"].as_str().unwrap())
        .unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (32, 48));
    assert_eq!(images[0]["mime_type"], "image/jpeg");
    let webp = predict(&*p, json!({"prompt": "a cat", "width": 32, "height": 32, "num_inference_steps": 1, "output_format": "webp"})).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(webp["images"][0]["base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(&bytes[..4], b"RIFF");
}

#[test]
fn image_to_image_takes_base64_and_data_urls() {
    let p = pipeline();
    let png = std::fs::read(tiny_dev().join("reference/init.png")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let plain = predict(&*p, json!({"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 4, "image": b64, "strength": 0.6, "seed": 11})).unwrap();
    let url = predict(&*p, json!({"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 4,
                                  "image": format!("data:image/png;base64,{b64}"), "strength": 0.6, "seed": 11})).unwrap();
    assert_eq!(plain["images"][0]["base64"], url["images"][0]["base64"]);
    let found = problems(predict(
        &*p,
        json!({"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2, "image": b64, "strength": 0.0}),
    ));
    assert!(found[0].contains("runs no step"), "{found:?}");
}

#[test]
fn aspect_ratios_give_megapixel_multiples_of_16() {
    assert_eq!(size_for_aspect_ratio("1:1"), Some((1024, 1024)));
    let (w, h) = size_for_aspect_ratio("9:16").unwrap();
    assert_eq!((w % 16, h % 16), (0, 0));
    assert!(h > w && (w * h) as f64 > 0.9e6 && ((w * h) as f64) < 1.1e6);
    // Replicate's `megapixels: "0.25"` halves each side.
    assert_eq!(size_for("1:1", 0.25), Some((512, 512)));
    let (w, h) = size_for("16:9", 0.25).unwrap();
    assert!(w > h && (w * h) as f64 > 0.22e6 && ((w * h) as f64) < 0.28e6);
}

#[test]
fn missing_component_files_are_named() {
    let copy = tempfile::tempdir().unwrap();
    for entry in [
        "model_index.json",
        "transformer",
        "text_encoder",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
        "vae",
    ] {
        let from = tiny_dev().join(entry);
        let to = copy.path().join(entry);
        if from.is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for file in std::fs::read_dir(&from).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
            }
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let manifest = manifest_for_folder(copy.path()).unwrap();
    let err = load(&ResolvedModel {
        name: None,
        version: None,
        dir: copy.path().to_path_buf(),
        manifest,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("text_encoder_2"), "{err}");
}

#[test]
fn vae_tiling_is_a_request_option_that_keeps_small_images_identical() {
    let p = pipeline();
    let request =
        json!({"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 4});
    let plain = predict(&*p, request.clone()).unwrap();
    let mut tiled_request = request;
    tiled_request["vae_tiling"] = json!(true);
    let tiled = predict(&*p, tiled_request).unwrap();
    // One 512-pixel tile covers a 64x64 image: tiling must not change it.
    assert_eq!(plain["images"][0]["base64"], tiled["images"][0]["base64"]);
    let found = problems(predict(&*p, json!({"prompt": "x", "vae_tiling": "yes"})));
    assert!(
        found[0].starts_with("vae_tiling: should be bool type"),
        "{found:?}"
    );
}

#[path = "flux2/requests.rs"]
mod flux2_requests;
