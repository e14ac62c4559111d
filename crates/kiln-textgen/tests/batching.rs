//! The continuous-batching engine on the tiny fixture models: every request of
//! a concurrent batch (chunked prompts, paged cache, preemption under a tiny
//! pool, prefix-cache hits) gets exactly the tokens transformers gives it, or
//! that it gets alone; seeded sampling does not depend on the batch; cancelled
//! streams give their blocks back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use kiln_textgen::verify::read_reference;
use kiln_textgen::{
    BatchConfig, BatchEngine, GenerationEvent, GenerationRequest, GenerationStream, LanguageModel,
    ModelSource, SamplingParams, TextGenError, TextGeneration,
};
use serde_json::json;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llm")
}

fn source(name: &str) -> ModelSource {
    match name.split_once(':') {
        Some((folder, file)) => ModelSource::Gguf(fixtures().join(folder).join("gguf").join(file)),
        None => ModelSource::Folder(fixtures().join(name)),
    }
}

fn engine(name: &str, config: BatchConfig) -> BatchEngine {
    let model = LanguageModel::load(&source(name), DType::F32, &Device::Cpu).unwrap();
    BatchEngine::start(model, config, 0).unwrap()
}

/// Small blocks and a small step budget, so prompts are chunked and span blocks.
fn chunky() -> BatchConfig {
    BatchConfig {
        max_batch_size: 8,
        max_num_batched_tokens: 12,
        block_size: 4,
        ..BatchConfig::default()
    }
}

/// What a finished stream gave: its ids, and the cached prompt tokens.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    ids: Vec<u32>,
    cached: usize,
}

fn drain(mut stream: GenerationStream) -> Outcome {
    let mut ids = Vec::new();
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { id, .. } => ids.push(id),
            GenerationEvent::Finished {
                completion_tokens,
                details,
                ..
            } => {
                assert_eq!(completion_tokens, ids.len());
                return Outcome {
                    ids,
                    cached: details.cached_tokens,
                };
            }
            GenerationEvent::Failed(e) => panic!("{e}"),
        }
    }
    panic!("stream ended without Finished")
}

/// Submit every request at once, then read them all.
fn together(engine: &BatchEngine, requests: &[GenerationRequest]) -> Vec<Outcome> {
    let streams: Vec<GenerationStream> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    streams.into_iter().map(drain).collect()
}

/// One request at a time.
fn alone(engine: &BatchEngine, requests: &[GenerationRequest]) -> Vec<Vec<u32>> {
    requests
        .iter()
        .map(|r| drain(engine.submit(r.clone()).unwrap()).ids)
        .collect()
}

/// transformers' recorded cases: (input ids, greedy output ids).
fn reference_cases(folder: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    read_reference(&fixtures().join(folder).join("reference"))
        .unwrap()
        .into_iter()
        .map(|c| (c.input_ids, c.output_ids))
        .collect()
}

/// Varied prompts over the model's vocabulary: lengths below, at and past the
/// step budget and the block size.
fn prompts(count: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..count)
        .map(|i| {
            let len = [3usize, 4, 5, 13, 29, 8, 17, 40][i % 8];
            (0..len)
                .map(|j| 1 + ((i * 131 + j * 7919) as u32 % (vocab - 2)))
                .collect()
        })
        .collect()
}

#[test]
fn concurrent_chunked_batches_give_transformers_greedy_ids() {
    for name in [
        "tiny-llama3",
        "tiny-llama-linear",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-mistral",
        "tiny-llama3:model-f32.gguf",
    ] {
        let folder = name.split(':').next().unwrap_or(name);
        let cases = reference_cases(folder);
        let engine = engine(name, chunky());
        let requests: Vec<GenerationRequest> = cases
            .iter()
            .map(|(input, output)| GenerationRequest::greedy(input.clone(), output.len()))
            .collect();
        let got = together(&engine, &requests);
        for ((_, want), got) in cases.iter().zip(&got) {
            assert_eq!(&got.ids, want, "{name}");
        }
    }
}

#[test]
fn greedy_output_does_not_depend_on_the_batch() {
    for name in ["tiny-qwen3", "tiny-mistral", "tiny-llama3:model-q8_0.gguf"] {
        let engine = engine(name, chunky());
        let vocab = engine.model().model.config().vocab_size as u32;
        for n in [2usize, 5, 8] {
            let requests: Vec<GenerationRequest> = prompts(n, vocab)
                .into_iter()
                .enumerate()
                .map(|(i, p)| GenerationRequest::greedy(p, 6 + i % 5))
                .collect();
            let each_alone = alone(&engine, &requests);
            let batched: Vec<Vec<u32>> = together(&engine, &requests)
                .into_iter()
                .map(|o| o.ids)
                .collect();
            assert_eq!(batched, each_alone, "{name}, {n} at once");
        }
        let steps = engine.metrics().unwrap().batch_size;
        assert!(
            steps.sum() / steps.count() as f64 > 1.5,
            "{name}: the requests were not batched"
        );
    }
}

#[test]
fn preemption_under_a_tiny_cache_still_gives_the_same_tokens() {
    let name = "tiny-llama3";
    let roomy = engine(name, chunky());
    // 24 blocks of 4 tokens: room for two or three of these sequences at once.
    let model = LanguageModel::load(&source(name), DType::F32, &Device::Cpu).unwrap();
    let per_block = kiln_models::llm::PagedKvCache::bytes_per_block(model.model.config(), 4);
    let tight = BatchEngine::start(
        model,
        BatchConfig {
            kv_cache_bytes: Some(24 * per_block),
            prefix_caching: false,
            ..chunky()
        },
        0,
    )
    .unwrap();
    assert_eq!(tight.capacity_tokens(), 96);
    let vocab = roomy.model().model.config().vocab_size as u32;
    let requests: Vec<GenerationRequest> = prompts(6, vocab)
        .into_iter()
        .map(|p| GenerationRequest::greedy(p, 24))
        .collect();
    let want = alone(&roomy, &requests);
    let got: Vec<Vec<u32>> = together(&tight, &requests)
        .into_iter()
        .map(|o| o.ids)
        .collect();
    assert_eq!(got, want);
    let metrics = tight.metrics().unwrap();
    assert!(metrics.preemptions > 0, "the pool never ran out");
    wait_idle(&tight);
    assert_eq!(tight.metrics().unwrap().kv_cache_usage, 0.0);
}

#[test]
fn a_repeated_system_prompt_is_served_from_the_prefix_cache() {
    let name = "tiny-qwen2";
    let cached = engine(name, chunky());
    let uncached = engine(
        name,
        BatchConfig {
            prefix_caching: false,
            ..chunky()
        },
    );
    let system: Vec<u32> = (0..22).map(|i| 5 + i * 3).collect();
    let turn = |tail: &[u32]| {
        let mut ids = system.clone();
        ids.extend_from_slice(tail);
        GenerationRequest::greedy(ids, 8)
    };
    let first = drain(cached.submit(turn(&[7, 8, 9])).unwrap());
    assert_eq!(first.cached, 0);
    // The second conversation shares the 22-token system prompt: its 5 full
    // blocks of 4 come from the cache.
    let second = drain(cached.submit(turn(&[11, 12])).unwrap());
    assert_eq!(second.cached, 20);
    assert_eq!(
        second.ids,
        drain(uncached.submit(turn(&[11, 12])).unwrap()).ids
    );
    assert_eq!(
        first.ids,
        drain(uncached.submit(turn(&[7, 8, 9])).unwrap()).ids
    );
    // A follow-up turn that extends the whole first exchange hits its blocks
    // too (generated tokens are cached as well).
    let mut follow_up = turn(&[7, 8, 9]).prompt_ids;
    follow_up.extend(&first.ids);
    follow_up.extend([40, 41]);
    let third = drain(
        cached
            .submit(GenerationRequest::greedy(follow_up.clone(), 4))
            .unwrap(),
    );
    assert!(third.cached >= 28, "{}", third.cached);
    assert_eq!(
        third.ids,
        drain(
            uncached
                .submit(GenerationRequest::greedy(follow_up, 4))
                .unwrap()
        )
        .ids
    );
    let metrics = cached.metrics().unwrap();
    assert_eq!(metrics.prefix_hit_tokens, (20 + third.cached) as u64);
    assert!(metrics.prefix_queried_tokens > metrics.prefix_hit_tokens);
    assert_eq!(uncached.metrics().unwrap().prefix_hit_tokens, 0);
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let engine = engine("tiny-llama-linear", chunky());
    let vocab = engine.model().model.config().vocab_size as u32;
    let requests: Vec<GenerationRequest> = prompts(5, vocab)
        .into_iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            sampling: SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                seed: Some(100 + i as u64),
                ..SamplingParams::default()
            },
            ..GenerationRequest::greedy(p, 10)
        })
        .collect();
    let want = alone(&engine, &requests);
    let got: Vec<Vec<u32>> = together(&engine, &requests)
        .into_iter()
        .map(|o| o.ids)
        .collect();
    assert_eq!(got, want);
}

fn wait_idle(engine: &BatchEngine) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = engine.metrics().unwrap();
        if m.running == 0 && m.waiting == 0 && engine.health().running == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the engine never went idle");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cancelled_and_dropped_streams_give_their_blocks_back() {
    let engine = engine("tiny-llama3", chunky());
    let vocab = engine.model().model.config().vocab_size as u32;
    let mut streams: Vec<GenerationStream> = prompts(4, vocab)
        .into_iter()
        .map(|p| engine.submit(GenerationRequest::greedy(p, 400)).unwrap())
        .collect();
    // Each has started generating.
    for stream in &mut streams {
        assert!(matches!(
            stream.next_blocking(),
            Some(GenerationEvent::Token { .. })
        ));
    }
    assert!(engine.metrics().unwrap().kv_cache_usage > 0.0);
    streams[0].abort_handle().abort();
    drop(streams);
    wait_idle(&engine);
    let m = engine.metrics().unwrap();
    assert_eq!(m.kv_cache_usage, 0.0);
    assert_eq!(engine.health().aborted, 4);
    // The engine still serves.
    let ok = drain(
        engine
            .submit(GenerationRequest::greedy(vec![1, 2, 3], 3))
            .unwrap(),
    );
    assert_eq!(ok.ids.len(), 3);
}

#[test]
fn requests_the_pool_can_never_hold_are_refused_up_front() {
    let model = LanguageModel::load(&source("tiny-qwen3"), DType::F32, &Device::Cpu).unwrap();
    let per_block = kiln_models::llm::PagedKvCache::bytes_per_block(model.model.config(), 16);
    let engine = BatchEngine::start(
        model,
        BatchConfig {
            kv_cache_bytes: Some(4 * per_block),
            ..BatchConfig::default()
        },
        0,
    )
    .unwrap();
    let err = engine
        .submit(GenerationRequest::greedy(vec![1; 40], 30))
        .err()
        .expect("70 tokens cannot fit 64");
    match err {
        TextGenError::Invalid { field, message } => {
            assert_eq!(field, "max_tokens");
            assert!(message.contains("64"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn batching_settings_are_read_from_the_model_config_with_named_errors() {
    let config = BatchConfig::from_json(&json!({
        "max_batch_size": 4, "max_num_batched_tokens": 64, "kv_cache_bytes": "1MiB",
        "kv_cache_block_size": 8, "prefix_caching": false, "other": 1
    }))
    .unwrap();
    assert_eq!(
        config,
        BatchConfig {
            max_batch_size: 4,
            max_num_batched_tokens: 64,
            block_size: 8,
            kv_cache_bytes: Some(1 << 20),
            prefix_caching: false,
        }
    );
    for (bad, key) in [
        (json!({"max_batch_size": 0}), "max_batch_size"),
        (
            json!({"max_num_batched_tokens": "x"}),
            "max_num_batched_tokens",
        ),
        (json!({"kv_cache_bytes": "lots"}), "kv_cache_bytes"),
        (json!({"prefix_caching": "yes"}), "prefix_caching"),
        (
            json!({"max_batch_size": 64, "max_num_batched_tokens": 32}),
            "max_num_batched_tokens",
        ),
    ] {
        match BatchConfig::from_json(&bad) {
            Err(TextGenError::Invalid { field, .. }) => assert_eq!(field, key),
            other => panic!("{bad}: {other:?}"),
        }
    }
}
