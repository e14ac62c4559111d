//! The safety checker against diffusers (`fixtures/sdxl/generate.py`,
//! `safety/`): the CLIP vision tower and projection on diffusers' own pixel
//! values (cosine distance ≤ 1e-5), and the flag decisions from Kiln's own
//! preprocessing of the images, which must be identical. Kiln's bicubic
//! resize is not PIL's bit for bit; the fixture's decision margins (≥ 0.02 in
//! score) are far wider than the difference that makes.

mod common;

use common::predict;

use std::path::{Path, PathBuf};

use kiln_engine::parity::{self, Tolerance};
use kiln_engine::weights::load_all;
use kiln_pipelines::text_to_image::sdxl::safety::SafetyFilter;
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl/safety")
}

#[test]
fn the_checker_embeds_and_flags_like_diffusers() {
    let filter = SafetyFilter::load(&fixture(), &kiln_engine::parity::device_under_test())
        .unwrap()
        .unwrap();
    let refs = load_all(
        &fixture().join("reference/references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    let embeds = filter
        .checker()
        .image_embeds(&refs["pixel_values"])
        .unwrap();
    if let Err(problem) = parity::check(
        "image_embeds",
        &embeds,
        &refs["image_embeds"],
        Tolerance::INTERMEDIATE,
    ) {
        panic!("{problem}");
    }
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("reference/index.json")).unwrap(),
    )
    .unwrap();
    let images: Vec<image::RgbImage> = index["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| {
            image::open(fixture().join(format!("reference/{}.png", name.as_str().unwrap())))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    let pixels = filter.preprocess(&images).unwrap();
    let drift = parity::compare(&pixels, &refs["pixel_values"])
        .unwrap()
        .max_abs;
    eprintln!("preprocessing vs CLIPImageProcessor: max abs diff {drift:.3e}");
    let flagged: Vec<bool> = filter
        .check(&images)
        .unwrap()
        .iter()
        .map(|v| v.nsfw)
        .collect();
    let expected: Vec<bool> = serde_json::from_value(index["flagged"].clone()).unwrap();
    assert_eq!(flagged, expected);
    assert!(filter.check(&images).unwrap()[3].special_care);
}

#[test]
fn a_folder_without_a_checker_has_none() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        SafetyFilter::load(dir.path(), &kiln_engine::parity::device_under_test())
            .unwrap()
            .is_none()
    );
}

/// The tiny SDXL pipeline with the tiny checker beside it.
fn pipeline_with_checker() -> (
    tempfile::TempDir,
    kiln_pipelines::text_to_image::sdxl::SdxlPipeline,
) {
    let sdxl = fixture().with_file_name("tiny-sdxl");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&sdxl)
        .unwrap()
        .chain(std::fs::read_dir(fixture()).unwrap())
    {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "reference" {
            std::os::unix::fs::symlink(&path, dir.path().join(name)).unwrap();
        }
    }
    let manifest = kiln_pipelines::text_to_image::sdxl::manifest_for_folder(dir.path()).unwrap();
    let components = kiln_pipelines::text_to_image::sdxl::SdxlComponents::load(
        dir.path(),
        &kiln_engine::parity::device_under_test(),
        candle_core::DType::F32,
    )
    .unwrap();
    assert!(components.safety.is_some());
    let pipeline = kiln_pipelines::text_to_image::sdxl::SdxlPipeline::new(
        components,
        &manifest,
        64,
        "tiny".into(),
    );
    (dir, pipeline)
}

#[test]
fn flagged_images_are_dropped_and_an_all_flagged_request_fails_unless_disabled() {
    let (_dir, pipeline) = pipeline_with_checker();
    let calls: Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixture()
                .with_file_name("tiny-sdxl")
                .join("reference/index.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let input = |name: &str, disable: bool| {
        let call = &calls["calls"][name];
        let mut input = serde_json::json!({
            "prompt": call["prompt"], "num_inference_steps": call["num_inference_steps"],
            "guidance_scale": call["guidance_scale"], "scheduler": call["sampler"], "seed": call["seed"],
            "disable_safety_checker": disable,
        });
        if let Some(negative) = call["negative_prompt"].as_str() {
            input["negative_prompt"] = negative.into();
        }
        input
    };
    // The fixture's checker flags exactly the euler_cfg_negative image.
    let flagged = predict(&pipeline, input("euler_cfg_negative", false)).unwrap_err();
    assert!(
        flagged.contains("safety checker flagged every generated image"),
        "{flagged}"
    );
    let allowed = predict(&pipeline, input("euler_cfg_negative", true)).unwrap();
    assert_eq!(allowed["images"].as_array().unwrap().len(), 1);
    let clean = predict(&pipeline, input("euler_zero_negative", false)).unwrap();
    assert_eq!(clean["nsfw_filtered"], 0);
    assert_eq!(clean["images"].as_array().unwrap().len(), 1);
}
