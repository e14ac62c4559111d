//! The SDXL UNet against diffusers on the tiny random fixture
//! (`fixtures/sdxl/generate.py`): one forward with classifier-free-guidance
//! batch, text context and SDXL's added conditioning, on a non-square latent.
//! Cosine distance ≤ 1e-5 (the intermediate-tensor tolerance: float32 sums in
//! a different order).

use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_nn::VarBuilder;
use kiln_engine::parity::{self, Tolerance};
use kiln_engine::weights::load_all;
use kiln_engine::{AdaptedWeights, KeyAdapter, WeightFiles};
use kiln_models::unet::{AddedConditioning, UNet2DConditionModel, UNetConfig};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl/tiny-sdxl")
}

fn load() -> UNet2DConditionModel {
    let dir = fixture().join("unet");
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let files = WeightFiles::open(&dir).unwrap();
    let backend = AdaptedWeights::new(files, KeyAdapter::default());
    let vb = VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        kiln_engine::parity::device_under_test(),
    );
    UNet2DConditionModel::load(vb, config).unwrap()
}

#[test]
fn unet_forward_matches_diffusers() {
    let unet = load();
    let refs = load_all(
        &fixture().join("reference/references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    let output = unet
        .forward(
            &refs["unet.sample"],
            &refs["unet.timestep"],
            &refs["unet.encoder_hidden_states"],
            Some(&AddedConditioning {
                text_embeds: &refs["unet.text_embeds"],
                time_ids: &refs["unet.time_ids"],
            }),
        )
        .unwrap();
    let comparison = parity::compare(&output, &refs["unet.output"]).unwrap();
    eprintln!("unet: {comparison:?}");
    if let Err(problem) = parity::check(
        "unet output",
        &output,
        &refs["unet.output"],
        Tolerance::INTERMEDIATE,
    ) {
        panic!("{problem}");
    }
}

#[test]
fn unsupported_unet_options_are_named() {
    let text = std::fs::read_to_string(fixture().join("unet/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["resnet_time_scale_shift"] = "scale_shift".into();
    let parsed: UNetConfig = serde_json::from_value(config.clone()).unwrap();
    assert!(
        parsed
            .validate()
            .unwrap_err()
            .contains("resnet_time_scale_shift")
    );
    config["resnet_time_scale_shift"] = "default".into();
    config["norm_num_groups"] = 7.into();
    let parsed: UNetConfig = serde_json::from_value(config).unwrap();
    assert!(parsed.validate().unwrap_err().contains("norm_num_groups"));
}
