//! CLIP and T5 encoders against transformers on the tiny FLUX fixtures: pooled CLIP
//! output and T5 hidden states for "a photo of a cat" (cosine distance <= 1e-5,
//! max abs diff <= 1e-4, the bound for intermediate tensors).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::parity::{self, Tolerance};
use kiln_engine::weights::load_all;
use kiln_engine::{AdaptedWeights, KeyAdapter, WeightFiles};
use kiln_models::clip::{ClipTextConfig, ClipTextModel};
use kiln_models::t5::{T5Config, T5Encoder};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux/tiny-dev")
}

fn vb(component: &str) -> VarBuilder<'static> {
    vb_in(component, DType::F32)
}

fn vb_in(component: &str, dtype: DType) -> VarBuilder<'static> {
    let files = WeightFiles::open(&fixtures().join(component)).unwrap();
    VarBuilder::from_backend(
        Box::new(AdaptedWeights::new(files, KeyAdapter::default())),
        dtype,
        kiln_engine::parity::device_under_test(),
    )
}

fn config<T: serde::de::DeserializeOwned>(component: &str) -> T {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(component).join("config.json")).unwrap(),
    )
    .unwrap()
}

fn compare(name: &str, ours: &Tensor, theirs: &Tensor) {
    if let Err(problem) = parity::check(name, ours, theirs, Tolerance::INTERMEDIATE) {
        panic!("{problem}");
    }
}

#[test]
fn clip_and_t5_match_transformers() {
    let refs = load_all(
        &fixtures().join("reference/references.safetensors"),
        &kiln_engine::parity::device_under_test(),
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

/// bf16 (what GPUs run): the encoders run end to end (the causal mask follows
/// the activations' dtype) and stay near the f32 reference (bf16 keeps ~3
/// significant digits: cosine distance <= 1e-3).
#[test]
fn text_encoders_run_in_bf16() {
    let refs = load_all(
        &fixtures().join("reference/references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    let bf16 = Tolerance {
        cosine_distance: 1e-3,
        max_abs: f64::INFINITY,
    };
    let clip = ClipTextModel::load(
        vb_in("text_encoder", DType::BF16),
        config::<ClipTextConfig>("text_encoder"),
    )
    .unwrap();
    let ids = refs["text.clip_input_ids"].to_dtype(DType::U32).unwrap();
    let out = clip.forward(&ids, clip.eos_token_id()).unwrap();
    assert_eq!(out.pooled.dtype(), DType::BF16);
    parity::check(
        "clip pooled (bf16)",
        &out.pooled,
        &refs["text.clip_pooled"],
        bf16,
    )
    .unwrap();
    let t5 = T5Encoder::load(
        vb_in("text_encoder_2", DType::BF16),
        config::<T5Config>("text_encoder_2"),
    )
    .unwrap();
    let ids = refs["text.t5_input_ids"].to_dtype(DType::U32).unwrap();
    let hidden = t5.forward(&ids).unwrap();
    parity::check(
        "t5 (bf16)",
        &hidden,
        &refs["text.t5_last_hidden_state"],
        bf16,
    )
    .unwrap();
}
