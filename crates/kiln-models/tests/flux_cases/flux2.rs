//! The FLUX.2 transformer against diffusers' Flux2Transformer2DModel on the
//! tiny random fixtures of `fixtures/flux2/generate_klein.py`: the klein
//! configs (no guidance embedding) from their diffusers folders, and another
//! config family (3 heads of 8, axes (2, 2, 2, 2), theta 500, mlp_ratio 2.5,
//! eps 1e-5, a guidance embedding) from both its diffusers folder and BFL's
//! single-file names. Tolerance as FLUX.1's: cosine distance ≤ 1e-5, max abs
//! ≤ 1e-4.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::weights::load_all;
use kiln_engine::{AdaptedWeights, WeightFiles};
use kiln_models::flux2::{Flux2Config, Flux2Layout, Flux2Transformer};

use super::compare;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux2")
}

fn config(folder: &Path) -> Flux2Config {
    let text = std::fs::read_to_string(folder.join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(weights: &Path, config: Flux2Config) -> Flux2Transformer {
    let files = WeightFiles::open(weights).unwrap();
    let layout = Flux2Layout::detect(&files.names()).expect("a FLUX.2 layout");
    let backend = AdaptedWeights::new(files, layout.adapter(&config));
    let vb = VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        kiln_engine::parity::device_under_test(),
    );
    Flux2Transformer::load(vb, config).unwrap()
}

fn ids(tensor: &Tensor) -> Vec<[f64; 4]> {
    tensor
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| std::array::from_fn(|i| f64::from(row[i])))
        .collect()
}

/// One forward on the `forward.*` inputs of `reference/` must give its output.
fn forward_matches(model: &Flux2Transformer, reference: &Path, guidance: Option<f32>) {
    let refs: HashMap<String, Tensor> = load_all(
        &reference.join("references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    let get = |name: &str| refs[&format!("forward.{name}")].clone();
    let mut all_ids = ids(&get("txt_ids"));
    all_ids.extend(ids(&get("img_ids")));
    let hidden = get("hidden_states");
    let guidance = guidance.map(|g| Tensor::new(&[g, g], hidden.device()).unwrap());
    let output = model
        .forward(
            &hidden,
            &get("encoder_hidden_states"),
            &all_ids,
            &get("timestep"),
            guidance.as_ref(),
        )
        .unwrap();
    compare("FLUX.2 transformer output", &output, &get("output"));
}

#[test]
fn klein_transformers_match_diffusers() {
    for variant in ["tiny-klein", "tiny-klein-base"] {
        let folder = fixtures().join(variant);
        let transformer = folder.join("transformer");
        let model = load(&transformer, config(&transformer));
        forward_matches(&model, &folder.join("reference"), None);
    }
}

#[test]
fn another_config_family_matches_from_the_diffusers_folder_and_the_bfl_file() {
    let folder = fixtures().join("tiny-transformer-alt");
    let model = load(&folder, config(&folder));
    forward_matches(&model, &folder.join("reference"), Some(3.5));
    let bfl = load(&folder.join("bfl.safetensors"), config(&folder));
    forward_matches(&bfl, &folder.join("reference"), Some(3.5));
}

#[test]
fn a_flux1_file_is_not_taken_for_flux2_nor_the_reverse() {
    let flux1 =
        WeightFiles::open(&fixtures().join("../flux/tiny-dev-bfl/flux1-tiny-dev.safetensors"))
            .unwrap();
    assert_eq!(Flux2Layout::detect(&flux1.names()), None);
    let flux2 =
        WeightFiles::open(&fixtures().join("tiny-transformer-alt/bfl.safetensors")).unwrap();
    assert_eq!(kiln_models::flux::FluxLayout::detect(&flux2.names()), None);
}
