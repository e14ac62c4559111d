//! Parity with transformers on the tiny random models of `fixtures/llm`
//! (`generate.py` there): per-step logits of greedy generation at cosine
//! distance ≤ 1e-6 in f32 (observed ~1e-13: the same f32 arithmetic up to
//! summation order), identical greedy token ids, Qwen3's hidden states, and the
//! GGUF copies (f32 as close as the folders; Q8_0 within KL 1e-2 and Q4_0
//! within KL 5e-2 of the f32 reference, as llama.cpp's blocks round).

use std::path::PathBuf;

use candle_core::{DType, Device};
use kiln_engine::parity::compare_logits;
use kiln_textgen::verify::{ReferenceCase, read_reference, teacher_forced_logits};
use kiln_textgen::{
    GenerationEvent, GenerationRequest, LanguageModel, ModelSource, SerialEngine, TextGeneration,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llm")
}

fn cases(model: &str) -> Vec<ReferenceCase> {
    read_reference(&fixtures().join(model).join("reference")).unwrap()
}

fn load(source: ModelSource) -> LanguageModel {
    LanguageModel::load(&source, DType::F32, &Device::Cpu).unwrap()
}

/// Every step of every case within the limits; `max_kl` replaces the cosine
/// and abs/rel checks for quantized weights.
fn check_steps(
    name: &str,
    model: &LanguageModel,
    case: &ReferenceCase,
    max_kl: Option<f64>,
) -> f64 {
    let ours = teacher_forced_logits(model, case).unwrap();
    let mut worst_kl: f64 = 0.0;
    for (step, (o, r)) in ours.iter().zip(&case.logits).enumerate() {
        let c = compare_logits(o, r, 1e-4, 1e-3).unwrap();
        worst_kl = worst_kl.max(c.kl);
        match max_kl {
            None => {
                assert!(
                    c.cosine_distance <= 1e-6,
                    "{name}/{}: step {step} cosine distance {:e}",
                    case.name,
                    c.cosine_distance
                );
                assert!(
                    c.max_abs <= 1e-4,
                    "{name}/{}: step {step} max |Δ| {:e}",
                    case.name,
                    c.max_abs
                );
                assert_eq!(c.violations, 0, "{name}/{}: step {step}", case.name);
            }
            Some(limit) => assert!(
                c.kl <= limit,
                "{name}/{}: step {step} KL {:e} > {limit:e}",
                case.name,
                c.kl
            ),
        }
    }
    worst_kl
}

fn check_folder(model_name: &str) {
    let model = load(ModelSource::Folder(fixtures().join(model_name)));
    let cases = cases(model_name);
    assert!(cases.len() >= 3, "{model_name}: expected at least 3 cases");
    for case in &cases {
        check_steps(model_name, &model, case, None);
        // Greedy through the engine gives transformers' ids exactly.
        assert_eq!(
            greedy(model_name, case),
            case.output_ids,
            "{model_name}/{}",
            case.name
        );
    }
}

/// Greedy continuation through the serial engine (EOS ignored, as the reference).
fn greedy(name: &str, case: &ReferenceCase) -> Vec<u32> {
    let engine = SerialEngine::start(load(source_of(name))).unwrap();
    let mut stream = engine
        .submit(GenerationRequest::greedy(
            case.input_ids.clone(),
            case.output_ids.len(),
        ))
        .unwrap();
    let mut ids = Vec::new();
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { id, .. } => ids.push(id),
            GenerationEvent::Finished {
                completion_tokens, ..
            } => {
                assert_eq!(completion_tokens, ids.len());
                break;
            }
            GenerationEvent::Failed(e) => panic!("{e}"),
        }
    }
    ids
}

fn source_of(name: &str) -> ModelSource {
    if let Some((folder, file)) = name.split_once(':') {
        ModelSource::Gguf(fixtures().join(folder).join("gguf").join(file))
    } else {
        ModelSource::Folder(fixtures().join(name))
    }
}

#[test]
fn llama3_sharded_with_llama3_rope_scaling_matches_transformers() {
    check_folder("tiny-llama3");
}

#[test]
fn llama_three_layers_linear_rope_tied_matches_transformers() {
    check_folder("tiny-llama-linear");
}

#[test]
fn qwen2_with_qkv_bias_matches_transformers() {
    check_folder("tiny-qwen2");
}

#[test]
fn qwen3_with_qk_norm_and_wide_heads_matches_transformers() {
    check_folder("tiny-qwen3");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_folder("tiny-mistral");
}

#[test]
fn qwen3_hidden_states_match_output_hidden_states() {
    let model = load(ModelSource::Folder(fixtures().join("tiny-qwen3")));
    let cases = cases("tiny-qwen3");
    let short = cases.iter().find(|c| c.name == "short").unwrap();
    let tensors = candle_core::safetensors::load(
        fixtures().join("tiny-qwen3/reference/references.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let states = model.model.hidden_states(&short.input_ids).unwrap();
    assert_eq!(states.len(), 3);
    for (k, state) in states.iter().enumerate() {
        let reference = &tensors[&format!("hidden.short.layer{k}")];
        let c = kiln_engine::parity::compare(state, reference).unwrap();
        assert!(
            c.cosine_distance <= 1e-6,
            "layer {k}: cosine distance {:e}",
            c.cosine_distance
        );
    }
}

#[test]
fn qwen3_hidden_states_of_a_padded_prompt_match_transformers_with_its_mask() {
    // fixtures/llm/generate_padded_hidden.py: 12 real tokens and 6 pads, as
    // FLUX.2's pipeline pads its prompt; pad rows read the real tokens only.
    let model = load(ModelSource::Folder(fixtures().join("tiny-qwen3")));
    let tensors = candle_core::safetensors::load(
        fixtures().join("tiny-qwen3/reference/padded_hidden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids: Vec<u32> = tensors["ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let valid = tensors["valid"].to_vec1::<i64>().unwrap()[0] as usize;
    let states = model.model.padded_hidden_states(&ids, valid).unwrap();
    assert_eq!(states.len(), 3);
    for (k, state) in states.iter().enumerate() {
        let c = kiln_engine::parity::compare(state, &tensors[&format!("layer{k}")]).unwrap();
        assert!(
            c.cosine_distance <= 1e-6 && c.max_abs <= 1e-4,
            "layer {k}: cosine distance {:e}, max abs {:e}",
            c.cosine_distance,
            c.max_abs
        );
    }
    // Without the mask the pad rows would differ: the test sees the mask.
    let unmasked = model.model.hidden_states(&ids).unwrap();
    let c = kiln_engine::parity::compare(&unmasked[2], &tensors["layer2"]).unwrap();
    assert!(
        c.max_abs > 1e-3,
        "pads attending to pads should change the pad rows"
    );
    assert!(model.model.padded_hidden_states(&ids, 0).is_err());
}

/// GGUF: the f32 file at the folder's tolerance; quantized ones by KL.
fn check_gguf(folder: &str, file: &str, max_kl: Option<f64>) {
    let name = format!("{folder}:{file}");
    let model = load(source_of(&name));
    let mut worst_kl: f64 = 0.0;
    for case in &cases(folder) {
        worst_kl = worst_kl.max(check_steps(&name, &model, case, max_kl));
        if max_kl.is_none() {
            assert_eq!(greedy(&name, case), case.output_ids, "{name}/{}", case.name);
        }
    }
    eprintln!("{name}: worst KL {worst_kl:e}");
}

#[test]
fn gguf_llama_f32_unpermutes_qk_and_reads_rope_freqs() {
    check_gguf("tiny-llama3", "model-f32.gguf", None);
}

#[test]
fn gguf_llama_q8_0_and_q4_0_stay_close_to_transformers() {
    check_gguf("tiny-llama3", "model-q8_0.gguf", Some(1e-2));
    check_gguf("tiny-llama3", "model-q4_0.gguf", Some(5e-2));
}

#[test]
fn gguf_qwen2_f32_and_q8_0_match() {
    check_gguf("tiny-qwen2", "model-f32.gguf", None);
    check_gguf("tiny-qwen2", "model-q8_0.gguf", Some(1e-2));
}
