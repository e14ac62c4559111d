//! The serial engine on a tiny fixture model: a dropped stream stops its
//! sequence (the slot comes back), stop strings and EOS end sequences as
//! OpenAI clients expect, seeds reproduce, logprobs are the log-softmax of the
//! logits, and bad requests fail before any work with the field named.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use kiln_textgen::{
    FinishReason, GenerationEvent, GenerationRequest, LanguageModel, ModelSource, SamplingParams,
    SerialEngine, TextGenError, TextGeneration,
};

fn engine(folder: &str) -> SerialEngine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/llm")
        .join(folder);
    SerialEngine::start(
        LanguageModel::load(&ModelSource::Folder(dir), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

fn request(engine: &SerialEngine, prompt: &str, max_tokens: usize) -> GenerationRequest {
    GenerationRequest::greedy(engine.model().text_prompt(prompt).unwrap(), max_tokens)
}

/// All events of one request: (token ids, text, finish reason).
fn run(
    engine: &SerialEngine,
    request: GenerationRequest,
) -> (Vec<u32>, String, FinishReason, Vec<GenerationEvent>) {
    let mut stream = engine.submit(request).unwrap();
    let (mut ids, mut text, mut events) = (Vec::new(), String::new(), Vec::new());
    while let Some(event) = stream.next_blocking() {
        events.push(event.clone());
        match event {
            GenerationEvent::Token {
                id, text: piece, ..
            } => {
                ids.push(id);
                text.push_str(&piece);
            }
            GenerationEvent::Finished {
                text: rest, reason, ..
            } => {
                text.push_str(&rest);
                return (ids, text, reason, events);
            }
            GenerationEvent::Failed(e) => panic!("{e}"),
        }
    }
    panic!("stream ended without Finished")
}

#[test]
fn a_dropped_stream_stops_generating_and_frees_the_engine() {
    let engine = engine("tiny-llama3");
    let mut stream = engine
        .submit(request(&engine, "Go on and on", 480))
        .unwrap();
    assert!(matches!(
        stream.next_blocking(),
        Some(GenerationEvent::Token { .. })
    ));
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.health().running > 0 {
        assert!(Instant::now() < deadline, "the sequence kept running");
        std::thread::sleep(Duration::from_millis(5));
    }
    let health = engine.health();
    assert_eq!(health.aborted, 1);
    assert!(
        health.generated_tokens < 480,
        "generated {} tokens after the client left",
        health.generated_tokens
    );
    // The engine serves the next request.
    let (ids, _, reason, _) = run(&engine, request(&engine, "Again", 3));
    assert_eq!((ids.len(), reason), (3, FinishReason::Length));
}

#[test]
fn stop_strings_cut_the_text_and_eos_ends_with_stop() {
    let engine = engine("tiny-llama3");
    let (_, full, _, _) = run(&engine, request(&engine, "The cat sat on the mat.", 12));
    let stop: String = full.chars().skip(5).take(2).collect();
    let expected: String = full[..full.find(&stop).unwrap()].to_string();
    let mut with_stop = request(&engine, "The cat sat on the mat.", 12);
    with_stop.stop = vec![stop.clone()];
    let (_, text, reason, _) = run(&engine, with_stop);
    assert_eq!(
        (text.as_str(), reason),
        (expected.as_str(), FinishReason::Stop)
    );
    // Treating the first generated token as EOS stops before its text.
    let (ids, _, _, _) = run(&engine, request(&engine, "The cat sat on the mat.", 12));
    let mut eos = request(&engine, "The cat sat on the mat.", 12);
    eos.stop_token_ids = vec![ids[2]];
    eos.ignore_eos = false;
    let (stopped_ids, _, reason, events) = run(&engine, eos);
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(
        stopped_ids.len(),
        ids.iter().position(|&i| i == ids[2]).unwrap()
    );
    match events.last() {
        Some(GenerationEvent::Finished {
            completion_tokens, ..
        }) => assert_eq!(*completion_tokens, stopped_ids.len() + 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn seeded_sampling_reproduces_and_logprobs_are_normalised() {
    let engine = engine("tiny-qwen3");
    let sampled = |seed| {
        let mut r = request(&engine, "Pick", 16);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        run(&engine, r).0
    };
    assert_eq!(sampled(5), sampled(5));
    assert_ne!(sampled(5), sampled(6));
    let mut r = request(&engine, "Pick", 4);
    r.logprobs = Some(5);
    let (_, _, _, events) = run(&engine, r);
    for event in &events {
        if let GenerationEvent::Token {
            id,
            logprob: Some(lp),
            ..
        } = event
        {
            assert_eq!(lp.id, *id);
            assert_eq!(lp.top.len(), 5);
            assert_eq!(lp.top[0].0, *id, "greedy picks the most likely token");
            let mass: f32 = lp.top.iter().map(|t| t.2.exp()).sum();
            assert!(mass <= 1.0 + 1e-5 && lp.logprob <= 0.0);
        }
    }
}

#[test]
fn bad_requests_fail_before_any_work() {
    let engine = engine("tiny-llama3");
    let mut long = request(&engine, "x", 10);
    long.prompt_ids = vec![5; 600];
    assert_eq!(
        engine.submit(long).err(),
        Some(TextGenError::ContextLength {
            context: 512,
            prompt: 600,
            requested: Some(10)
        })
    );
    let mut zero = request(&engine, "x", 0);
    zero.max_tokens = 0;
    assert_eq!(
        engine
            .submit(zero)
            .err()
            .and_then(|e| e.field().map(str::to_string))
            .as_deref(),
        Some("max_tokens")
    );
    let mut vocab = request(&engine, "x", 2);
    vocab.prompt_ids = vec![100_000];
    assert_eq!(
        engine
            .submit(vocab)
            .err()
            .and_then(|e| e.field().map(str::to_string))
            .as_deref(),
        Some("prompt")
    );
    let mut hot = request(&engine, "x", 2);
    hot.sampling.temperature = 9.0;
    assert_eq!(
        engine
            .submit(hot)
            .err()
            .and_then(|e| e.field().map(str::to_string))
            .as_deref(),
        Some("temperature")
    );
    assert_eq!(engine.health().running + engine.health().waiting, 0);
}
