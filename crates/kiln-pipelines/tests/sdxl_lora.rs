//! SDXL LoRAs against diffusers (`fixtures/sdxl/generate.py`, `lora/`): one
//! file with UNet transformer and both text encoders' modules, in diffusers'
//! PEFT naming and in kohya's SDXL naming (ldm UNet names, `lora_te1_`/
//! `lora_te2_`, alpha = 2 × rank), each at scale 0.8 against diffusers'
//! `set_adapters` image. Every module must match a layer; the image must be
//! within 1/255 (plus half a level of PNG rounding).

mod common;

use common::{predict, worst_pixel};

use std::path::{Path, PathBuf};

use candle_core::DType;
use kiln_engine::weights::load_all;
use kiln_pipelines::text_to_image::sdxl::{SdxlComponents, SdxlPipeline, manifest_for_folder};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl")
}

#[test]
fn peft_and_kohya_sdxl_loras_match_diffusers() {
    let dir = fixtures().join("tiny-sdxl");
    let manifest = manifest_for_folder(&dir).unwrap();
    let components =
        SdxlComponents::load(&dir, &kiln_engine::parity::device_under_test(), DType::F32).unwrap();
    let mut pipeline = SdxlPipeline::new(components, &manifest, 64, "tiny".into());
    let settings = kiln_pipelines::lora::sources::LoraSettings {
        dirs: vec![fixtures().join("lora")],
        ..Default::default()
    };
    pipeline.set_lora_settings(settings);
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference/index.json")).unwrap())
            .unwrap();
    let refs = load_all(
        &dir.join("reference/references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    let call = &index["calls"]["lora_0.8"];
    for (file, format) in [
        ("sdxl_peft.safetensors", "diffusers/PEFT"),
        ("sdxl_kohya.safetensors", "kohya"),
    ] {
        let output = predict(
            &pipeline,
            serde_json::json!({
                "prompt": call["prompt"], "negative_prompt": call["negative_prompt"],
                "num_inference_steps": call["num_inference_steps"], "guidance_scale": call["guidance_scale"],
                "scheduler": "K_EULER", "seed": call["seed"],
                "lora_weights": file, "lora_scale": call["lora_scale"],
            }),
        )
        .unwrap();
        let report = &output["loras"][0];
        assert_eq!(report["format"], format);
        assert_eq!(report["unmatched_modules"], serde_json::json!([]), "{file}");
        let worst = worst_pixel(&output, &refs["image.lora_0.8"]);
        eprintln!("{file}: worst pixel error {worst:.2e}");
        assert!(worst <= 1.5 / 255.0, "{file}: worst pixel error {worst}");
    }
}
