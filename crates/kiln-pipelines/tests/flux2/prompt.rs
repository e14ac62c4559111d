//! FLUX.2's Qwen3 prompt embeddings against diffusers'
//! `Flux2KleinPipeline._get_qwen3_prompt_embeds` on the tiny Qwen3
//! (`fixtures/flux2/generate_prompt.py`): the padded ids exactly, and the
//! stacked hidden states at cosine distance <= 1e-6, max abs <= 1e-4 (f32),
//! for a short prompt (padded) and a long one (truncated).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kiln_engine::parity;
use kiln_pipelines::text_to_image::flux2::Qwen3PromptEncoder;
use kiln_pipelines::text_to_image::generation::{PromptEncoder, PromptOptions};
use kiln_textgen::bundle::{LanguageModel, ModelSource};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn qwen3_prompt_embeddings_match_the_flux2_pipeline() {
    let folder = fixtures().join("llm/tiny-qwen3");
    let lm = LanguageModel::load(
        &ModelSource::Folder(folder.clone()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(folder.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let pad = lm
        .tokenizer
        .token_id(config["pad_token"].as_str().unwrap())
        .unwrap();
    let encoder = Qwen3PromptEncoder::new(lm, vec![0, 1, 2], pad).unwrap();
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("flux2/prompt/index.json")).unwrap(),
    )
    .unwrap();
    let refs = candle_core::safetensors::load(
        fixtures().join("flux2/prompt/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (name, case) in index["cases"].as_object().unwrap() {
        let length = case["max_sequence_length"].as_u64().unwrap() as usize;
        let prompt = case["prompt"].as_str().unwrap();
        let (ids, valid) = encoder.ids(prompt, length).unwrap();
        let expected: Vec<u32> = refs[&format!("{name}.ids")]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        assert_eq!(ids, expected, "{name}: token ids");
        let mask = refs[&format!("{name}.mask")].to_vec1::<i64>().unwrap();
        assert_eq!(
            valid,
            mask.iter().filter(|&&m| m == 1).count(),
            "{name}: real tokens"
        );
        let options = PromptOptions {
            max_sequence_length: length,
            clip_skip: 0,
        };
        let embeds = encoder.condition(prompt, options, &Device::Cpu).unwrap();
        assert!(embeds.pooled.is_none());
        let c = parity::compare(&embeds.sequence, &refs[&format!("{name}.embeds")]).unwrap();
        assert!(
            c.cosine_distance <= 1e-6 && c.max_abs <= 1e-4,
            "{name}: cosine distance {:e}, max abs {:e}",
            c.cosine_distance,
            c.max_abs
        );
    }
}

#[test]
fn a_hidden_layer_past_the_model_is_refused() {
    let folder = fixtures().join("llm/tiny-qwen3");
    let lm = LanguageModel::load(&ModelSource::Folder(folder), DType::F32, &Device::Cpu).unwrap();
    let err = Qwen3PromptEncoder::new(lm, vec![9, 18, 27], 0)
        .err()
        .unwrap();
    assert!(err.contains("layer 9") && err.contains("2 layers"), "{err}");
}

#[test]
fn a_diffusers_folder_with_text_encoder_and_tokenizer_apart_encodes_the_same() {
    let source = fixtures().join("llm/tiny-qwen3");
    let folder = tempfile::tempdir().unwrap();
    let (encoder_dir, tokenizer_dir) = (
        folder.path().join("text_encoder"),
        folder.path().join("tokenizer"),
    );
    std::fs::create_dir_all(&encoder_dir).unwrap();
    std::fs::create_dir_all(&tokenizer_dir).unwrap();
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), encoder_dir.join(file)).unwrap();
    }
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(source.join(file), tokenizer_dir.join(file)).unwrap();
    }
    let from_folder =
        Qwen3PromptEncoder::load_folder(folder.path(), vec![0, 1, 2], DType::F32, &Device::Cpu)
            .unwrap();
    let refs = candle_core::safetensors::load(
        fixtures().join("flux2/prompt/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let options = PromptOptions {
        max_sequence_length: 24,
        clip_skip: 0,
    };
    let embeds = from_folder
        .condition("a photo of a cat", options, &Device::Cpu)
        .unwrap();
    let c = parity::compare(&embeds.sequence, &refs["short.embeds"]).unwrap();
    assert!(
        c.cosine_distance <= 1e-6,
        "cosine distance {:e}",
        c.cosine_distance
    );

    // A tokenizer folder that names no pad token is a clear error.
    std::fs::write(tokenizer_dir.join("tokenizer_config.json"), "{}").unwrap();
    let err =
        Qwen3PromptEncoder::load_folder(folder.path(), vec![0, 1, 2], DType::F32, &Device::Cpu)
            .err()
            .unwrap();
    assert!(err.contains("pad_token"), "{err}");
}
