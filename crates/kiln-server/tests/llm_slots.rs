//! An LLM's slot over HTTP, with an engine the test drives by hand: a streaming
//! client holds the model's one slot, one more request waits, the next gets
//! OpenAI's 429; a client that disconnects mid-stream aborts its generation and
//! the waiting request is served.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use kiln_pipelines::text_generation::TextGenerationPipeline;
use kiln_server::{ModelSettings, ModelSpec};
use kiln_textgen::{
    AbortHandle, EngineHealth, FinishReason, GenerationEvent, GenerationRequest, GenerationStream,
    LanguageModel, ModelSource, TextGenError, TextGeneration,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;

/// Accepts requests and emits nothing until the test says so.
struct HandDriven {
    model: LanguageModel,
    submitted: Mutex<Vec<(UnboundedSender<GenerationEvent>, AbortHandle)>>,
}

impl TextGeneration for HandDriven {
    fn model(&self) -> &LanguageModel {
        &self.model
    }

    fn submit(&self, _request: GenerationRequest) -> Result<GenerationStream, TextGenError> {
        let (events, abort, stream) = GenerationStream::channel();
        self.submitted.lock().unwrap().push((events, abort));
        Ok(stream)
    }

    fn health(&self) -> EngineHealth {
        EngineHealth {
            running: 0,
            waiting: 0,
            capacity: 1,
            generated_tokens: 0,
            aborted: 0,
        }
    }
}

impl HandDriven {
    fn submitted(&self) -> usize {
        self.submitted.lock().unwrap().len()
    }

    fn handle(&self, i: usize) -> (UnboundedSender<GenerationEvent>, AbortHandle) {
        self.submitted.lock().unwrap()[i].clone()
    }
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_one_waiter_then_429_and_a_disconnect_frees_the_slot() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llm/tiny-llama3");
    let model = LanguageModel::load(&ModelSource::Folder(dir), DType::F32, &Device::Cpu).unwrap();
    let engine = Arc::new(HandDriven {
        model,
        submitted: Mutex::new(Vec::new()),
    });
    let for_loader = Arc::clone(&engine);
    let spec = ModelSpec {
        name: "llm".into(),
        version: None,
        reference: "hand-driven".into(),
        settings: ModelSettings {
            concurrency: 1,
            max_queue: 1,
            ..ModelSettings::default()
        },
        loader: Arc::new(move || {
            let engine: Arc<dyn TextGeneration> = for_loader.clone();
            Ok(Arc::new(TextGenerationPipeline::new(engine)) as Arc<dyn kiln_pipelines::Pipeline>)
        }),
    };
    let server = common::start(vec![spec], 1 << 20).await;
    let addr = server.addr;

    // A: a stream that holds the slot (headers arrive, no token yet).
    let body = json!({"model": "llm", "prompt": "Hi", "stream": true, "max_tokens": 8}).to_string();
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    a.write_all(head.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 512];
    let n = a.read(&mut first).await.unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    until("A's submission", || engine.submitted() == 1).await;

    // B waits for the slot; C finds the queue full.
    let b = tokio::spawn(async move {
        common::post_json(
            addr,
            "/v1/completions",
            &json!({"model": "llm", "prompt": "Hi", "max_tokens": 2}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = common::post_json(
        addr,
        "/v1/completions",
        &json!({"model": "llm", "prompt": "Hi"}),
    )
    .await;
    assert_eq!(c.status, 429, "{}", c.text());
    assert_eq!(c.json()["error"]["type"], "rate_limit_error");
    assert!(c.header("retry-after").is_some());
    assert_eq!(engine.submitted(), 1, "B must still be waiting");

    // A goes away mid-stream: its generation is aborted and B gets the slot.
    drop(a);
    let (_, a_abort) = engine.handle(0);
    until("A's abort", || a_abort.is_aborted()).await;
    until("B's submission", || engine.submitted() == 2).await;
    let (b_events, _) = engine.handle(1);
    let pieces = engine.model().tokenizer.encode("ok", false).unwrap();
    b_events
        .send(GenerationEvent::Token {
            id: pieces[0],
            text: "ok".into(),
            logprob: None,
        })
        .unwrap();
    b_events
        .send(GenerationEvent::Finished {
            text: String::new(),
            reason: FinishReason::Length,
            prompt_tokens: 2,
            completion_tokens: 1,
            details: Default::default(),
        })
        .unwrap();
    let b = b.await.unwrap();
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.json()["choices"][0]["text"], "ok");
    assert_eq!(b.json()["choices"][0]["finish_reason"], "length");
    server.stop().await;
}
