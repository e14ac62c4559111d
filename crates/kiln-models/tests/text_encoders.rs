//! CLIP and T5 encoders against transformers on the tiny FLUX fixtures: pooled CLIP
//! output and T5 hidden states for "a photo of a cat" (cosine distance <= 1e-5,
//! max abs diff <= 1e-4, the bound for intermediate tensors).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::weights::load_all;
use kiln_engine::{AdaptedWeights, KeyAdapter, WeightFiles};
use kiln_models::clip::{ClipTextConfig, ClipTextModel};
use kiln_models::t5::{T5Config, T5Encoder};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux/tiny-dev")
}

fn vb(component: &str) -> VarBuilder<'static> {
    let files = WeightFiles::open(&fixtures().join(component)).unwrap();
    VarBuilder::from_backend(
        Box::new(AdaptedWeights::new(files, KeyAdapter::default())),
        DType::F32,
        Device::Cpu,
    )
}

fn config<T: serde::de::DeserializeOwned>(component: &str) -> T {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(component).join("config.json")).unwrap(),
    )
    .unwrap()
}

fn compare(name: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.dims(), theirs.dims(), "{name}: shape");
    let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norms: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
        * b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let distance = 1.0 - dot / norms;
    let max_abs = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        distance <= 1e-5 && max_abs <= 1e-4,
        "{name}: cosine distance {distance:e}, max abs {max_abs:e}"
    );
}

#[test]
fn clip_and_t5_match_transformers() {
    let refs = load_all(
        &fixtures().join("reference/references.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let clip =
        ClipTextModel::load(vb("text_encoder"), config::<ClipTextConfig>("text_encoder")).unwrap();
    let ids = refs["text.clip_input_ids"].to_dtype(DType::U32).unwrap();
    let out = clip.forward(&ids, clip.eos_token_id()).unwrap();
    compare(
        "clip last hidden state",
        &out.last_hidden_state,
        &refs["text.clip_last_hidden_state"],
    );
    compare("clip pooled", &out.pooled, &refs["text.clip_pooled"]);

    let t5 = T5Encoder::load(vb("text_encoder_2"), config::<T5Config>("text_encoder_2")).unwrap();
    let ids = refs["text.t5_input_ids"].to_dtype(DType::U32).unwrap();
    compare(
        "t5 hidden states",
        &t5.forward(&ids).unwrap(),
        &refs["text.t5_last_hidden_state"],
    );
}
