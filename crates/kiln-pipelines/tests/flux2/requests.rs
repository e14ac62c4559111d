//! FLUX.2 requests through the served pipeline (`text_to_image/flux2`) on the
//! tiny klein folders: the manifest `kiln models register` writes, the
//! RunPod handler's preset as the base model's default with explicit fields
//! winning, every problem reported at once with its field and rule, seeds
//! that reproduce, reference images, and the handler's `lora_path`.

use std::path::{Path, PathBuf};

use base64::Engine;
use kiln_pipelines::text_to_image::flux2::{Flux2Pipeline, manifest_for_folder};
use kiln_pipelines::{Pipeline, PipelineError, PredictInput, PredictRequest, Prediction};
use kiln_registry::ResolvedModel;
use serde_json::{Value, json};

fn folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/flux2")
        .join(name)
}

fn open(name: &str, config: Value) -> Flux2Pipeline {
    let dir = folder(name);
    let mut manifest = manifest_for_folder(&dir).unwrap();
    for (key, value) in config.as_object().unwrap() {
        manifest.config[key] = value.clone();
    }
    Flux2Pipeline::open(&ResolvedModel {
        name: None,
        version: None,
        dir,
        manifest,
    })
    .unwrap()
}

fn fields(input: Value) -> serde_json::Map<String, Value> {
    input.as_object().unwrap().clone()
}

fn predict(pipeline: &Flux2Pipeline, input: Value) -> Result<Value, PipelineError> {
    match pipeline.predict(PredictRequest {
        input: PredictInput::Fields(fields(input)),
        params: serde_json::Map::new(),
    })? {
        Prediction::Json(value) => Ok(value),
        Prediction::Tensors(_) => panic!("FLUX.2 returns JSON"),
    }
}

fn problems(result: Result<Value, PipelineError>) -> String {
    match result {
        Err(PipelineError::InvalidInput(found)) => found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
        other => panic!("expected invalid input, got {other:?}"),
    }
}

fn png(width: u32, height: u32) -> String {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 7) as u8])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn registration_describes_each_variant_with_the_runpod_preset() {
    let base = manifest_for_folder(&folder("tiny-klein-base")).unwrap();
    assert_eq!(base.pipeline, "text_to_image/flux2");
    assert_eq!(base.config["default_preset"], "realistic_character");
    assert_eq!(
        base.presets["realistic_character"],
        json!({"num_inference_steps": 28, "guidance_scale": 2.5, "width": 1024, "height": 1024,
               "max_sequence_length": 512})
    );
    let distilled = manifest_for_folder(&folder("tiny-klein")).unwrap();
    assert!(distilled.config.get("default_preset").is_none());
    let described = kiln_pipelines::describe_model_folder(&folder("tiny-klein"))
        .unwrap()
        .unwrap();
    assert_eq!(described.pipeline, "text_to_image/flux2");
    let flux1 = kiln_pipelines::describe_model_folder(&folder("../flux/tiny-dev"))
        .unwrap()
        .unwrap();
    assert_eq!(flux1.pipeline, "text_to_image/flux");
}

#[test]
fn the_default_preset_applies_first_and_explicit_fields_win() {
    let base = open("tiny-klein-base", json!({}));
    let (request, _, _) = base.prepare(&fields(json!({"prompt": "a fox"}))).unwrap();
    assert_eq!(
        (
            request.steps,
            request.guidance_scale,
            request.width,
            request.height
        ),
        (28, 2.5, 1024, 1024)
    );
    assert_eq!(request.max_sequence_length, 512);
    let (request, _, _) = base
        .prepare(&fields(
            json!({"prompt": "a fox", "num_inference_steps": 3, "width": 256}),
        ))
        .unwrap();
    assert_eq!(
        (request.steps, request.guidance_scale, request.width),
        (3, 2.5, 256)
    );
    let (request, _, _) = base
        .prepare(&fields(json!({"prompt": "a fox", "preset": "fast"})))
        .unwrap();
    assert_eq!(
        (request.steps, request.width, request.guidance_scale),
        (20, 512, 4.0)
    );
    // A distilled model has no default preset: its own defaults apply.
    let distilled = open("tiny-klein", json!({}));
    let (request, _, _) = distilled
        .prepare(&fields(json!({"prompt": "a fox"})))
        .unwrap();
    assert_eq!(
        (request.steps, request.width, request.height),
        (4, 1024, 1024)
    );
    // A default preset the model does not define is a load error naming it.
    let dir = folder("tiny-klein");
    let mut manifest = manifest_for_folder(&dir).unwrap();
    manifest.config["default_preset"] = json!("portrait");
    let err = Flux2Pipeline::open(&ResolvedModel {
        name: None,
        version: None,
        dir,
        manifest,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("default_preset \"portrait\""), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_field_and_rule() {
    let p = open("tiny-klein", json!({}));
    let text = problems(predict(
        &p,
        json!({"prompt": "x", "width": 1000, "height": 64, "num_outputs": 5,
               "negative_prompt": "blurry", "max_sequence_length": 600, "images": [3]}),
    ));
    for needle in [
        "negative_prompt: unknown field",
        "num_outputs: must be <= 4, got 5",
        "max_sequence_length: must be <= 512",
        "width: must be a multiple of 16, got 1000; nearest valid: 992 or 1008",
        "images[0]: ",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let text = problems(predict(
        &p,
        json!({"prompt": "x", "width": 4096, "height": 2048}),
    ));
    assert!(text.contains("the limit is 4194304"), "{text}");
    let text = problems(predict(&p, json!({"prompt": "x", "image": png(48, 80)})));
    assert!(
        text.contains("image: is 48x80; both sides must be at least 64"),
        "{text}"
    );
    let text = problems(predict(&p, json!({"prompt": "x", "image": "/etc/passwd"})));
    assert!(
        text.starts_with("image: /etc/passwd is not a file"),
        "{text}"
    );
}

#[test]
fn generations_reproduce_from_their_seed_and_edit_from_reference_images() {
    let p = open("tiny-klein", json!({}));
    let input = json!({"prompt": "a fox", "width": 32, "height": 48, "num_inference_steps": 2,
                       "max_sequence_length": 16, "seed": 9, "num_outputs": 2});
    let first = predict(&p, input.clone()).unwrap();
    let again = predict(&p, input).unwrap();
    assert_eq!(first["images"], again["images"]);
    assert_eq!(
        (
            first["seed"].as_u64(),
            first["images"].as_array().unwrap().len()
        ),
        (Some(9), 2)
    );
    assert_eq!(
        (first["width"].as_u64(), first["height"].as_u64()),
        (Some(32), Some(48))
    );
    // Without a size, an edit takes the reference image's, floored to the grid.
    let edit = predict(
        &p,
        json!({"prompt": "make it blue", "image": png(72, 68), "num_inference_steps": 1,
               "max_sequence_length": 16, "seed": 3}),
    )
    .unwrap();
    assert_eq!(
        (edit["width"].as_u64(), edit["height"].as_u64()),
        (Some(64), Some(64))
    );
    let base64 = edit["images"][0]["base64"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64)
        .unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (64, 64));
}

#[test]
fn the_runpod_handlers_lora_path_applies_and_is_reported() {
    let lora_dir = folder("lora");
    let flux1_dir = folder("../flux/lora");
    let p = open(
        "tiny-klein",
        json!({"lora_dirs": [lora_dir.to_str().unwrap(), flux1_dir.to_str().unwrap()]}),
    );
    let input = json!({"prompt": "a red fox in the snow", "width": 32, "height": 32,
                       "num_inference_steps": 1, "max_sequence_length": 16, "seed": 42});
    let plain = predict(&p, input.clone()).unwrap();
    let mut with_lora = input.clone();
    with_lora["lora_path"] = json!(lora_dir.join("aitk.safetensors").to_str().unwrap());
    with_lora["lora_scale"] = json!(0.8);
    let styled = predict(&p, with_lora.clone()).unwrap();
    assert_ne!(plain["images"], styled["images"]);
    assert_eq!(styled["loras"][0]["format"], "ai-toolkit/BFL");
    assert_eq!(styled["loras"][0]["unmatched_modules"], json!([]));
    assert_eq!(styled["lora_mode"], "runtime");
    with_lora["lora_mode"] = json!("fused");
    let fused = predict(&p, with_lora).unwrap();
    assert_eq!(fused["lora_mode"], "fused");
    // After a fused request, a plain one sees the exact base weights again.
    assert_eq!(predict(&p, input).unwrap()["images"], plain["images"]);
    let flux1 = flux1_dir.join("style_peft.safetensors");
    let text = problems(predict(
        &p,
        json!({"prompt": "x", "width": 32, "height": 32, "lora_path": flux1.to_str().unwrap()}),
    ));
    assert!(
        text.contains("lora_path: ") && text.contains("trained for FLUX.1"),
        "{text}"
    );
}

#[test]
fn offload_tiling_and_missing_files_behave_as_for_flux1() {
    let input = json!({"prompt": "a fox", "width": 32, "height": 32, "num_inference_steps": 1,
                       "max_sequence_length": 16, "seed": 4});
    let resident = open("tiny-klein", json!({}));
    let expected = predict(&resident, input.clone()).unwrap();
    let mut tiled = input.clone();
    tiled["vae_tiling"] = json!(true);
    assert_eq!(
        predict(&resident, tiled).unwrap()["images"],
        expected["images"]
    );
    // Model CPU offload: each part loaded for its stage, the same image;
    // fused LoRAs need resident weights and say so.
    let lora_dir = folder("lora");
    let offloaded = open(
        "tiny-klein",
        json!({"offload": "model", "lora_dirs": [lora_dir.to_str().unwrap()]}),
    );
    assert_eq!(
        predict(&offloaded, input.clone()).unwrap()["images"],
        expected["images"]
    );
    let mut fused = input.clone();
    fused["lora_path"] = json!(lora_dir.join("aitk.safetensors").to_str().unwrap());
    fused["lora_mode"] = json!("fused");
    let text = problems(predict(&offloaded, fused.clone()));
    assert!(
        text.contains("lora_mode: ") && text.contains("needs resident weights"),
        "{text}"
    );
    fused["lora_mode"] = json!("runtime");
    assert_ne!(
        predict(&offloaded, fused).unwrap()["images"],
        expected["images"]
    );
    // A folder missing a part fails its load naming the file.
    let dir = tempfile::tempdir().unwrap();
    for entry in [
        "model_index.json",
        "transformer",
        "text_encoder",
        "tokenizer",
        "scheduler",
    ] {
        let from = folder("tiny-klein").join(entry);
        let to = dir.path().join(entry);
        if from.is_dir() {
            std::fs::create_dir(&to).unwrap();
            for file in std::fs::read_dir(&from).unwrap() {
                let file = file.unwrap().path();
                std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
            }
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let manifest = manifest_for_folder(dir.path()).unwrap();
    let err = Flux2Pipeline::open(&ResolvedModel {
        name: None,
        version: None,
        dir: dir.path().to_path_buf(),
        manifest,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("vae/config.json"), "{err}");
}

#[test]
fn a_quantized_model_serves_runtime_loras_refuses_fused_ones_and_reports_its_size() {
    let lora_dir = folder("lora");
    let dense = open("tiny-klein", json!({}));
    let p = open(
        "tiny-klein",
        json!({"quantize": "int8", "lora_dirs": [lora_dir.to_str().unwrap()]}),
    );
    let (dense_bytes, bytes) = (dense.resident_bytes().unwrap(), p.resident_bytes().unwrap());
    assert!(bytes < dense_bytes, "{bytes} vs {dense_bytes}");
    let input = json!({"prompt": "a fox", "width": 32, "height": 32, "num_inference_steps": 1,
                       "max_sequence_length": 16, "seed": 4,
                       "lora_path": lora_dir.join("aitk.safetensors").to_str().unwrap()});
    let output = predict(&p, input.clone()).unwrap();
    assert_eq!(output["lora_mode"], "runtime");
    let mut fused = input;
    fused["lora_mode"] = json!("fused");
    let text = problems(predict(&p, fused));
    assert!(
        text.contains("lora_mode: ") && text.contains("quantized (int8)"),
        "{text}"
    );
}
