//! Parity with transformers on the tiny random models of `fixtures/llm`
//! (`generate.py` there): per-step logits of greedy generation at cosine
//! distance ≤ 1e-6 in f32 (observed ~1e-13: the same f32 arithmetic up to
//! summation order), identical greedy token ids, Qwen3's hidden states, and the
//! GGUF copies (f32 as close as the folders; Q8_0 within KL 1e-2 and Q4_0
//! within KL 5e-2 of the f32 reference, as llama.cpp's blocks round).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use kiln_textgen::{
    GenerationEvent, GenerationRequest, LanguageModel, ModelSource, SamplingParams, SerialEngine,
    TextGeneration,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llm")
}

struct Case {
    name: String,
    input_ids: Vec<u32>,
    output_ids: Vec<u32>,
    logits: Tensor,
}

fn cases(model: &str) -> (Vec<Case>, HashMap<String, Tensor>) {
    let dir = fixtures().join(model).join("reference");
    let tensors =
        candle_core::safetensors::load(dir.join("references.safetensors"), &Device::Cpu).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let ids = |name: &str| -> Vec<u32> {
        tensors[name]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    };
    let cases = index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            input_ids: ids(c["input_ids"].as_str().unwrap()),
            output_ids: ids(c["output_ids"].as_str().unwrap()),
            logits: tensors[c["logits"].as_str().unwrap()].clone(),
        })
        .collect();
    (cases, tensors)
}

fn load(source: ModelSource) -> LanguageModel {
    LanguageModel::load(&source, DType::F32, &Device::Cpu).unwrap()
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (na * nb)
}

/// KL(reference ‖ ours) over softmaxes, MAX's definition (ε-smoothed).
fn kl(reference: &[f32], ours: &[f32]) -> f64 {
    let softmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = x.iter().map(|v| f64::from(v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s + 1e-10).collect()
    };
    let (p, q) = (softmax(reference), softmax(ours));
    p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
}

/// Teacher-forced logits for every reference step: the prompt, then each
/// reference output token.
fn step_logits(model: &LanguageModel, case: &Case) -> Vec<Vec<f32>> {
    let net = &model.model;
    let mut cache = net.new_cache();
    let mut out = vec![
        net.next_logits(&case.input_ids, &mut cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    ];
    for &id in &case.output_ids[..case.output_ids.len() - 1] {
        out.push(
            net.next_logits(&[id], &mut cache)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    out
}

fn check_folder(model_name: &str) {
    let model = load(ModelSource::Folder(fixtures().join(model_name)));
    let (cases, _) = cases(model_name);
    assert!(cases.len() >= 3, "{model_name}: expected at least 3 cases");
    for case in &cases {
        let reference = case.logits.to_vec2::<f32>().unwrap();
        let ours = step_logits(&model, case);
        for (step, (r, o)) in reference.iter().zip(&ours).enumerate() {
            let d = cosine_distance(r, o);
            assert!(
                d <= 1e-6,
                "{model_name}/{}: step {step} cosine distance {d:e}",
                case.name
            );
            let worst = r
                .iter()
                .zip(o)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4,
                "{model_name}/{}: step {step} max |Δ| {worst:e}",
                case.name
            );
        }
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
fn greedy(name: &str, case: &Case) -> Vec<u32> {
    let engine = SerialEngine::start(load(source_of(name))).unwrap();
    let mut stream = engine
        .submit(GenerationRequest {
            prompt_ids: case.input_ids.clone(),
            max_tokens: case.output_ids.len(),
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: true,
            logprobs: None,
        })
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
    let (cases, tensors) = cases("tiny-qwen3");
    let short = cases.iter().find(|c| c.name == "short").unwrap();
    let states = model.model.hidden_states(&short.input_ids).unwrap();
    assert_eq!(states.len(), 3);
    for (k, state) in states.iter().enumerate() {
        let reference = tensors[&format!("hidden.short.layer{k}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ours = state.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = cosine_distance(&reference, &ours);
        assert!(d <= 1e-6, "layer {k}: cosine distance {d:e}");
    }
}

/// GGUF: the f32 file at the folder's tolerance; quantized ones by KL.
fn check_gguf(folder: &str, file: &str, max_kl: Option<f64>) {
    let name = format!("{folder}:{file}");
    let model = load(source_of(&name));
    let (cases, _) = cases(folder);
    let mut worst_kl: f64 = 0.0;
    for case in &cases {
        let reference = case.logits.to_vec2::<f32>().unwrap();
        let ours = step_logits(&model, case);
        for (step, (r, o)) in reference.iter().zip(&ours).enumerate() {
            match max_kl {
                None => {
                    let d = cosine_distance(r, o);
                    assert!(
                        d <= 1e-6,
                        "{name}/{}: step {step} cosine distance {d:e}",
                        case.name
                    );
                }
                Some(limit) => {
                    let k = kl(r, o);
                    worst_kl = worst_kl.max(k);
                    assert!(
                        k <= limit,
                        "{name}/{}: step {step} KL {k:e} > {limit:e}",
                        case.name
                    );
                }
            }
        }
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
