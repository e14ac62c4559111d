//! The FLUX transformer against diffusers on the tiny random fixtures
//! (`fixtures/flux`, made by `fixtures/flux/generate.py`): one forward pass from the
//! diffusers folder and from the BFL single file must give diffusers' output.
//! Tolerance: cosine distance <= 1e-5 (the bound for intermediate tensors)
//! and max abs diff <= 1e-4; torch's own result moves by ~1.5e-6 with weight
//! alignment alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::parity::{self, Tolerance};
use kiln_engine::weights::load_all;
use kiln_engine::{AdaptedWeights, WeightFiles};
use kiln_models::flux::{FluxConfig, FluxLayout, FluxTransformer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux")
}

fn references(variant: &str) -> HashMap<String, Tensor> {
    load_all(
        &fixtures()
            .join(variant)
            .join("reference/references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap()
}

fn compare(name: &str, ours: &Tensor, theirs: &Tensor) {
    if let Err(problem) = parity::check(name, ours, theirs, Tolerance::INTERMEDIATE) {
        panic!("{problem}");
    }
}

fn config(variant: &str) -> FluxConfig {
    let text =
        std::fs::read_to_string(fixtures().join(variant).join("transformer/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(weights: &Path, config: FluxConfig) -> FluxTransformer {
    let files = WeightFiles::open(weights).unwrap();
    let layout = FluxLayout::detect(&files.names()).expect("a FLUX layout");
    let adapter = layout.adapter(&config);
    let backend = AdaptedWeights::new(files, adapter);
    let vb = VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        kiln_engine::parity::device_under_test(),
    );
    FluxTransformer::load(vb, config).unwrap()
}

fn ids(tensor: &Tensor) -> Vec<[f64; 3]> {
    tensor
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| [f64::from(row[0]), f64::from(row[1]), f64::from(row[2])])
        .collect()
}

fn forward_matches(model: &FluxTransformer, refs: &HashMap<String, Tensor>, with_guidance: bool) {
    let get = |name: &str| refs[&format!("transformer_forward.{name}")].clone();
    let mut all_ids = ids(&get("txt_ids"));
    all_ids.extend(ids(&get("img_ids")));
    let guidance = with_guidance.then(|| get("guidance"));
    let output = model
        .forward(
            &get("hidden_states"),
            &get("encoder_hidden_states"),
            &all_ids,
            &get("timestep"),
            guidance.as_ref(),
            &get("pooled_projections"),
        )
        .unwrap();
    compare("transformer output", &output, &get("output"));
}

#[test]
fn dev_transformer_matches_diffusers_from_the_diffusers_folder() {
    let model = load(&fixtures().join("tiny-dev/transformer"), config("tiny-dev"));
    forward_matches(&model, &references("tiny-dev"), true);
}

#[test]
fn dev_transformer_matches_diffusers_from_the_bfl_single_file() {
    let model = load(
        &fixtures().join("tiny-dev-bfl/flux1-tiny-dev.safetensors"),
        config("tiny-dev"),
    );
    forward_matches(&model, &references("tiny-dev"), true);
}

#[test]
fn schnell_transformer_has_no_guidance_embedding() {
    let model = load(
        &fixtures().join("tiny-schnell/transformer"),
        config("tiny-schnell"),
    );
    forward_matches(&model, &references("tiny-schnell"), false);
}

#[test]
fn wrong_shapes_name_the_tensor_and_file() {
    let mut config = config("tiny-dev");
    config.joint_attention_dim = 48;
    let files = WeightFiles::open(&fixtures().join("tiny-dev/transformer")).unwrap();
    let backend = AdaptedWeights::new(files, FluxLayout::Diffusers.adapter(&config));
    let vb = VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        kiln_engine::parity::device_under_test(),
    );
    let err = FluxTransformer::load(vb, config).err().unwrap().to_string();
    assert!(
        err.contains("context_embedder.weight") && err.contains("the model expects [32, 48]"),
        "{err}"
    );
}

#[path = "flux_cases/flux2.rs"]
mod flux2;
