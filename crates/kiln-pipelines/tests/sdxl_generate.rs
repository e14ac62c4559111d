//! SDXL generation against diffusers on the tiny random pipeline
//! (`fixtures/sdxl/generate.py`): token ids exact, prompt and pooled
//! embeddings at cosine distance ≤ 1e-5, and final images within 1/255 (the
//! 8-bit step; float32) for Euler with CFG and a negative prompt, zeroed
//! negative conditioning, DPM++ 2M Karras with guidance_rescale, Euler
//! ancestral on a non-square size, no CFG, image-to-image (Euler, DPM++) and
//! inpainting (Euler ancestral, whose noise depends on diffusers' exact order
//! of generator draws, and full strength), and v-prediction models (zero-SNR
//! Euler and DDIM, DPM++ 2M Karras) from a scheduler config or a single file's
//! `v_pred`/`ztsnr` markers.

mod common;
#[path = "common/sdxl_calls.rs"]
mod sdxl_calls;

use common::{predict, worst_pixel};
use sdxl_calls::{fixture, reference_image, request_for};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use kiln_engine::parity::{self, Tolerance};
use kiln_engine::weights::load_all;
use kiln_pipelines::text_to_image::schedulers::SamplerKind;
use kiln_pipelines::text_to_image::sdxl::{SdxlComponents, encode_prompt, generate};
use serde_json::Value;

fn setup() -> (SdxlComponents, HashMap<String, Tensor>, Value) {
    let components = SdxlComponents::load(
        &fixture(),
        &kiln_engine::parity::device_under_test(),
        DType::F32,
    )
    .unwrap();
    let refs = load_all(
        &fixture().join("reference/references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    let index = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("reference/index.json")).unwrap(),
    )
    .unwrap();
    (components, refs, index)
}

fn check(name: &str, ours: &Tensor, theirs: &Tensor) {
    if let Err(problem) = parity::check(name, ours, theirs, Tolerance::INTERMEDIATE) {
        panic!("{problem}");
    }
}

#[test]
fn prompts_encode_like_diffusers() {
    let (components, refs, index) = setup();
    let prompt = index["prompt"].as_str().unwrap();
    let ids1: Vec<i64> = refs["tokens.ids1"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ids2: Vec<i64> = refs["tokens.ids2"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ours1: Vec<i64> = components
        .tokenizer
        .ids(prompt, 77)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let ours2: Vec<i64> = components
        .tokenizer_2
        .ids(prompt, 77)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(ours1, ids1);
    assert_eq!(ours2, ids2, "tokenizer_2 pads with \"!\"");
    let (context, pooled) = encode_prompt(&components, prompt, 0).unwrap();
    check("prompt_embeds", &context, &refs["text.prompt_embeds"]);
    check("pooled", &pooled, &refs["text.pooled"]);
    let (context, pooled) =
        encode_prompt(&components, index["negative_prompt"].as_str().unwrap(), 0).unwrap();
    check(
        "negative_prompt_embeds",
        &context,
        &refs["text.negative_prompt_embeds"],
    );
    check("negative_pooled", &pooled, &refs["text.negative_pooled"]);
}

/// The request a recorded diffusers call describes.
/// Generate `call` with `components` and check the image against diffusers' (1/255).
fn check_call(
    components: &SdxlComponents,
    refs: &HashMap<String, Tensor>,
    name: &str,
    call: &Value,
) {
    let generated = generate(components, &request_for(call), &mut |_, _| true).unwrap();
    let diff = parity::compare(&generated.images, &refs[&format!("image.{name}")])
        .unwrap()
        .max_abs;
    eprintln!("{name}: max abs diff vs diffusers {diff:.2e}");
    assert!(diff <= 1.0 / 255.0, "{name}: max abs diff {diff}");
}

#[test]
fn images_match_diffusers_for_every_recorded_call() {
    let (components, refs, index) = setup();
    for (name, call) in index["calls"].as_object().unwrap() {
        if call.get("lora").is_some() || call.get("scheduler_config").is_some() {
            continue; // sdxl_lora.rs; v-prediction below
        }
        check_call(&components, &refs, name, call);
    }
}

/// A copy of the tiny pipeline whose scheduler_config.json has `overrides`, as
/// a v-prediction fine-tune ships it.
fn folder_with_scheduler(overrides: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        let target = dir.path().join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            for file in std::fs::read_dir(&path).unwrap() {
                let file = file.unwrap().path();
                if file.is_file() {
                    std::fs::copy(&file, target.join(file.file_name().unwrap())).unwrap();
                }
            }
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
    merge_scheduler_config(dir.path(), overrides);
    dir
}

fn merge_scheduler_config(folder: &Path, overrides: &Value) {
    let file = folder.join("scheduler/scheduler_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for (key, value) in overrides.as_object().unwrap() {
        config[key] = value.clone();
    }
    std::fs::write(&file, config.to_string()).unwrap();
}

/// Copy `from`'s files (one level of folders) into `to`, replacing what is there.
fn copy_folder(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_folder(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn a_vae_of_another_depth_and_a_scheduler_config_with_infinity_match_diffusers() {
    // fixtures/sdxl/generate_vae_depth.py: a 3-level VAE (scale factor 4) and
    // DPMSolverMultistepScheduler's saved config, `lambda_min_clipped: -Infinity`.
    let extra = fixture().with_file_name("vae-depth3");
    let folder = folder_with_scheduler(&serde_json::json!({}));
    std::fs::remove_dir_all(folder.path().join("vae")).unwrap();
    copy_folder(&extra, folder.path());
    let scheduler =
        std::fs::read_to_string(folder.path().join("scheduler/scheduler_config.json")).unwrap();
    assert!(scheduler.contains("-Infinity"), "{scheduler}");

    let components =
        SdxlComponents::load(folder.path(), &parity::device_under_test(), DType::F32).unwrap();
    assert_eq!(components.vae_scale_factor(), 4);
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(extra.join("index.json")).unwrap()).unwrap();
    let refs = load_all(
        &extra.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let generated = generate(&components, &request_for(&index["call"]), &mut |_, _| true).unwrap();
    assert_eq!(generated.images.dims(), &[1, 32, 48, 3]);
    let diff = parity::compare(&generated.images, &refs["image"])
        .unwrap()
        .max_abs;
    assert!(diff <= 1.0 / 255.0, "max abs diff {diff}");

    // Registering the folder reads the same configs: the default size is the
    // UNet's sample_size (8) times the VAE's factor.
    let manifest = kiln_pipelines::text_to_image::sdxl::manifest_for_folder(folder.path()).unwrap();
    assert_eq!(manifest.config["default_size"], 32);
}

#[test]
fn v_prediction_models_match_diffusers_from_their_scheduler_config() {
    let (_, refs, index) = setup();
    let mut checked = 0;
    for (name, call) in index["calls"].as_object().unwrap() {
        let Some(overrides) = call.get("scheduler_config") else {
            continue;
        };
        let folder = folder_with_scheduler(overrides);
        let components =
            SdxlComponents::load(folder.path(), &parity::device_under_test(), DType::F32).unwrap();
        check_call(&components, &refs, name, call);
        checked += 1;
    }
    assert_eq!(checked, 3, "Euler and DDIM with zero-SNR, DPM++ 2M Karras");

    // Heun and PNDM: diffusers ignores rescale_betas_zero_snr there; Kiln refuses.
    let folder = folder_with_scheduler(&index["calls"]["vpred_zsnr_euler"]["scheduler_config"]);
    let components =
        SdxlComponents::load(folder.path(), &parity::device_under_test(), DType::F32).unwrap();
    let mut request = request_for(&index["calls"]["vpred_zsnr_euler"]);
    request.sampler = SamplerKind::Heun;
    let err = generate(&components, &request, &mut |_, _| true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("rescale_betas_zero_snr") && err.contains("K_EULER"),
        "{err}"
    );
}

#[test]
fn a_single_file_with_v_pred_and_ztsnr_markers_is_a_zero_snr_v_prediction_model() {
    let (_, refs, index) = setup();
    let folder = single_file_folder(true);
    // Only the spacing comes from the folder; v-prediction and zero SNR come from the markers.
    merge_scheduler_config(
        folder.path(),
        &serde_json::json!({"timestep_spacing": "trailing"}),
    );
    let file = folder.path().join("tiny-sdxl-single.safetensors");
    let mut tensors = load_all(&file, &candle_core::Device::Cpu).unwrap();
    for marker in ["v_pred", "ztsnr"] {
        tensors.insert(
            marker.to_string(),
            Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let components =
        SdxlComponents::load(folder.path(), &parity::device_under_test(), DType::F32).unwrap();
    check_call(
        &components,
        &refs,
        "vpred_zsnr_euler",
        &index["calls"]["vpred_zsnr_euler"],
    );
}

fn pipeline() -> kiln_pipelines::text_to_image::sdxl::SdxlPipeline {
    let manifest = kiln_pipelines::text_to_image::sdxl::manifest_for_folder(&fixture()).unwrap();
    let components = SdxlComponents::load(
        &fixture(),
        &kiln_engine::parity::device_under_test(),
        DType::F32,
    )
    .unwrap();
    kiln_pipelines::text_to_image::sdxl::SdxlPipeline::new(components, &manifest, 64, "tiny".into())
}

#[test]
fn requests_generate_through_the_pipeline_and_bad_ones_name_the_field() {
    let (_, refs, index) = setup();
    let pipeline = pipeline();
    let call = &index["calls"]["karras_dpm_rescale"];
    let output = predict(
        &pipeline,
        serde_json::json!({
            "prompt": call["prompt"], "negative_prompt": call["negative_prompt"],
            "num_inference_steps": call["num_inference_steps"], "guidance_scale": call["guidance_scale"],
            "guidance_rescale": call["guidance_rescale"], "scheduler": "DPMSolverMultistepScheduler",
            "seed": call["seed"],
        }),
    );
    // "DPMSolverMultistepScheduler" is plain DPM++ 2M; KarrasDPM adds Karras sigmas.
    assert!(output.is_ok(), "{output:?}");
    let output = predict(
        &pipeline,
        serde_json::json!({
            "prompt": call["prompt"], "negative_prompt": call["negative_prompt"],
            "num_inference_steps": call["num_inference_steps"], "guidance_scale": call["guidance_scale"],
            "guidance_rescale": call["guidance_rescale"], "scheduler": "KarrasDPM",
            "seed": call["seed"],
        }),
    )
    .unwrap();
    let worst = worst_pixel(&output, &refs["image.karras_dpm_rescale"]);
    // 8-bit PNG: rounding adds up to half a level to the 1/255 parity bound.
    assert!(worst <= 1.5 / 255.0, "worst pixel error {worst}");

    let odd = predict(&pipeline, serde_json::json!({"prompt": "x", "width": 65})).unwrap_err();
    assert!(
        odd.contains("width: must be a multiple of 8, got 65; nearest valid: 64 or 72"),
        "{odd}"
    );
    let unknown = predict(
        &pipeline,
        serde_json::json!({"prompt": "x", "scheduler": "LMS"}),
    )
    .unwrap_err();
    assert!(
        unknown.contains("scheduler") && unknown.contains("KarrasDPM"),
        "{unknown}"
    );
    let skip = predict(
        &pipeline,
        serde_json::json!({"prompt": "x", "clip_skip": 5, "num_inference_steps": 1}),
    )
    .unwrap_err();
    assert!(skip.contains("clip_skip"), "{skip}");
    let missing = predict(&pipeline, serde_json::json!({"width": 64})).unwrap_err();
    assert!(missing.contains("prompt"), "{missing}");

    // Image inputs: undecodable, a mask without an image, a mask of another size.
    let png = |image: &image::RgbImage| {
        use base64::Engine;
        let mut bytes = Vec::new();
        image
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    let init = png(&reference_image("init.png"));
    let small = png(&image::RgbImage::new(32, 32));
    let broken = predict(
        &pipeline,
        serde_json::json!({"prompt": "x", "image": "data:image/png;base64,AAAA"}),
    )
    .unwrap_err();
    assert!(broken.contains("image"), "{broken}");
    let alone = predict(&pipeline, serde_json::json!({"prompt": "x", "mask": small})).unwrap_err();
    assert!(
        alone.contains("mask") && alone.contains("needs the image"),
        "{alone}"
    );
    let mismatch = predict(
        &pipeline,
        serde_json::json!({"prompt": "x", "image": init, "mask": small}),
    )
    .unwrap_err();
    assert!(
        mismatch.contains("mask: is 32x32, the image is 64x64"),
        "{mismatch}"
    );
    // An inpainting request through the pipeline matches diffusers' image.
    let call = &index["calls"]["inpaint_full"];
    let output = predict(
        &pipeline,
        serde_json::json!({
            "prompt": call["prompt"], "image": init, "mask": png(&reference_image("mask.png")),
            "prompt_strength": 1.0, "num_inference_steps": call["num_inference_steps"],
            "guidance_scale": call["guidance_scale"], "scheduler": "K_EULER", "seed": call["seed"],
        }),
    )
    .unwrap();
    assert_eq!(output["images"][0]["width"], 64);
}

/// A single-file folder: the converted checkpoint beside the tiny pipeline's
/// tokenizers and (when `with_configs`) its component configs.
fn single_file_folder(with_configs: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().with_file_name("tiny-sdxl-single.safetensors"),
        dir.path().join("tiny-sdxl-single.safetensors"),
    )
    .unwrap();
    let mut parts = vec!["tokenizer", "tokenizer_2"];
    if with_configs {
        parts.extend(["unet", "text_encoder", "text_encoder_2", "vae", "scheduler"]);
    }
    for part in parts {
        std::fs::create_dir_all(dir.path().join(part)).unwrap();
        for entry in std::fs::read_dir(fixture().join(part)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                std::fs::copy(&path, dir.path().join(part).join(path.file_name().unwrap()))
                    .unwrap();
            }
        }
    }
    dir
}

#[test]
fn a_single_file_checkpoint_generates_the_same_image() {
    let (_, refs, index) = setup();
    let folder = single_file_folder(true);
    assert!(kiln_pipelines::text_to_image::sdxl::is_sdxl_folder(
        folder.path()
    ));
    let components = SdxlComponents::load(
        folder.path(),
        &kiln_engine::parity::device_under_test(),
        DType::F32,
    )
    .unwrap();
    let request = request_for(&index["calls"]["euler_cfg_negative"]);
    let generated = generate(&components, &request, &mut |_, _| true).unwrap();
    let diff = parity::compare(&generated.images, &refs["image.euler_cfg_negative"])
        .unwrap()
        .max_abs;
    eprintln!("single file: max abs diff vs diffusers {diff:.2e}");
    assert!(diff <= 1.0 / 255.0, "max abs diff {diff}");

    // Without configs the SDXL base sizes apply, and the mismatch names a tensor.
    let bare = single_file_folder(false);
    let err = SdxlComponents::load(
        bare.path(),
        &kiln_engine::parity::device_under_test(),
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(
        err.contains("tiny-sdxl-single.safetensors") && err.contains("shape"),
        "{err}"
    );
    let folder = single_file_folder(true);
    std::fs::remove_dir_all(folder.path().join("tokenizer_2")).unwrap();
    let err = SdxlComponents::load(
        folder.path(),
        &kiln_engine::parity::device_under_test(),
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(
        err.contains("tokenizer_2") && err.contains("single-file"),
        "{err}"
    );
}

#[path = "stored_quantized/sdxl.rs"]
mod gguf_sdxl;

#[path = "stored_quantized/reader.rs"]
mod gguf_reader;
