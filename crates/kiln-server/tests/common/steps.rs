//! A step pipeline whose speed the job tests control (steps, delay, panic on
//! request), its model spec, and helpers for driving jobs over HTTP: RunPod
//! status polling and webhook receivers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln_pipelines::contract::{InputSpec, ModelInterface};
use kiln_pipelines::{
    FieldKind, FieldSpec, InputSchema, Pipeline, PipelineError, PredictInput, PredictRequest,
    Prediction, Progress, ProgressFn, Signature,
};
use kiln_server::{ModelSettings, ModelSpec};
use serde_json::{Value, json};

use super::{Reply, Running, http, post_json};

/// Runs `steps` steps of `delay_ms` each, reporting progress; panics on request.
pub struct StepPipeline {
    interface: ModelInterface,
}

impl StepPipeline {
    fn new() -> Self {
        let int = |name: &str, default: i64| FieldSpec {
            name: name.into(),
            description: String::new(),
            kind: FieldKind::Integer {
                minimum: Some(0),
                maximum: Some(10_000),
            },
            default: Some(json!(default)),
        };
        StepPipeline {
            interface: ModelInterface {
                pipeline: "test/steps".into(),
                inputs: InputSpec::Fields(InputSchema {
                    fields: vec![
                        int("steps", 3),
                        int("delay_ms", 0),
                        FieldSpec {
                            name: "panic".into(),
                            description: String::new(),
                            kind: FieldKind::Boolean,
                            default: Some(json!(false)),
                        },
                    ],
                }),
                params: InputSchema::default(),
                outputs: Signature {
                    inputs: vec![],
                    outputs: vec![],
                },
            },
        }
    }
}

impl Pipeline for StepPipeline {
    fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        self.predict_with_progress(request, &mut |_| true)
    }

    fn predict_with_progress(
        &self,
        request: PredictRequest,
        progress: ProgressFn,
    ) -> Result<Prediction, PipelineError> {
        let PredictInput::Fields(fields) = request.input else {
            return Err(PipelineError::Execution("fields expected".into()));
        };
        let InputSpec::Fields(schema) = &self.interface.inputs else {
            unreachable!("built with fields")
        };
        let input = schema.validate(&fields)?;
        if input["panic"] == json!(true) {
            panic!("asked to panic");
        }
        let steps = input["steps"].as_u64().unwrap_or(0) as usize;
        let delay = Duration::from_millis(input["delay_ms"].as_u64().unwrap_or(0));
        for step in 1..=steps {
            std::thread::sleep(delay);
            if !progress(Progress { step, total: steps }) {
                return Err(PipelineError::Stopped);
            }
        }
        Ok(Prediction::Json(json!({"done": steps})))
    }
}

pub fn step_spec(
    name: &str,
    settings: ModelSettings,
    loads: Option<Arc<AtomicUsize>>,
) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        version: None,
        reference: "test".into(),
        settings,
        loader: Arc::new(move || {
            if let Some(loads) = &loads {
                loads.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Arc::new(StepPipeline::new()) as Arc<dyn Pipeline>)
        }),
    }
}

pub async fn get(server: &Running, path: &str) -> Reply {
    http(server.addr, "GET", path, &[], b"").await
}

/// Poll RunPod `/status` until the job is final.
pub async fn final_status(server: &Running, id: &str) -> Value {
    for _ in 0..500 {
        let body = get(server, &format!("/status/{id}")).await.json();
        let status = body["status"].as_str().unwrap_or_default().to_string();
        if !["IN_QUEUE", "IN_PROGRESS"].contains(&status.as_str()) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never finished");
}

pub async fn wait_for_status(server: &Running, id: &str, wanted: &str) {
    for _ in 0..500 {
        if get(server, &format!("/status/{id}")).await.json()["status"] == wanted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {id} never reached {wanted}");
}

pub async fn run(server: &Running, input: Value) -> String {
    let reply = post_json(server.addr, "/run", &json!({ "input": input })).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["status"], "IN_QUEUE");
    reply.json()["id"].as_str().unwrap().to_string()
}

pub fn settings(max_queue: usize) -> ModelSettings {
    ModelSettings {
        max_queue,
        ..ModelSettings::default()
    }
}

/// A loopback HTTP receiver that records webhook bodies.
pub async fn webhook_receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let sender = sender.clone();
            async move {
                let _ = sender.send(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, receiver)
}

pub async fn next_hook(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), receiver.recv())
        .await
        .expect("no webhook arrived")
        .expect("receiver closed")
}
