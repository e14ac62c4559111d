//! End-to-end tests over real HTTP on a random loopback port: protocols, errors,
//! readiness, limits, metrics and graceful shutdown.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use kiln_pipelines::contract::{InputSpec, ModelInterface};
use kiln_pipelines::tabular::glm::{FitOptions, GlmSpec, fit_glm, load};
use kiln_pipelines::{
    InputSchema, Pipeline, PipelineError, PredictRequest, Prediction, RawFrame, Signature, Tensor,
};
use kiln_registry::ResolvedModel;
use kiln_server::{ModelSettings, ModelSpec, Server};
use serde_json::{Value, json};
use tokio::net::TcpStream;

mod common;

use common::{Reply, http, post_json, start, test_config, tiny_flux_spec, wait_ready};

const MODEL: &str = "test.glm.claims";

fn glm_pipeline() -> Arc<dyn Pipeline> {
    let csv_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/glm/claims_poisson/data.csv");
    let data = RawFrame::from_csv(&std::fs::read_to_string(csv_path).unwrap()).unwrap();
    let spec = GlmSpec {
        exposure: Some("exposure".into()),
        ..GlmSpec::new("claims ~ driver_age + C(region) + urban", "poisson")
    };
    let (config, inputs) = fit_glm(&spec, &data, FitOptions::default()).unwrap();
    let model = ResolvedModel {
        name: None,
        version: Some(3),
        dir: std::env::temp_dir(),
        manifest: config.to_manifest(&inputs),
    };
    load(&model).unwrap()
}

fn glm_spec(name: &str) -> ModelSpec {
    let pipeline = glm_pipeline();
    ModelSpec {
        name: name.into(),
        version: Some(3),
        reference: format!("models:/{name}/3"),
        settings: ModelSettings::default(),
        loader: Arc::new(move || Ok(Arc::clone(&pipeline))),
    }
}

fn rows() -> Value {
    json!({"columns": ["driver_age", "region", "urban", "exposure"],
           "data": [[30, "north", 1, 1.0], [55, "coastal", 0, 0.5]]})
}

#[tokio::test]
async fn mlflow_formats_agree_and_sagemaker_attributes_pass_through() {
    let server = start(vec![glm_spec(MODEL)], 1 << 20).await;
    let addr = server.addr;
    let split = post_json(addr, "/invocations", &json!({"dataframe_split": rows()})).await;
    assert_eq!(split.status, 200, "{}", split.text());
    let expected = split.json()["predictions"].clone();
    assert_eq!(expected.as_array().unwrap().len(), 2);
    let records = json!({"dataframe_records": [
        {"driver_age": 30, "region": "north", "urban": 1, "exposure": 1.0},
        {"driver_age": 55, "region": "coastal", "urban": 0, "exposure": 0.5}]});
    let instances = json!({"instances": records["dataframe_records"]});
    let inputs = json!({"inputs": {"driver_age": [30, 55], "region": ["north", "coastal"], "urban": [1, 0], "exposure": [1.0, 0.5]}});
    for body in [records, instances, inputs] {
        let reply = post_json(addr, "/invocations", &body).await;
        assert_eq!(reply.json()["predictions"], expected, "{body}");
    }
    let csv = http(
        addr,
        "POST",
        "/invocations",
        &[
            ("Content-Type", "text/csv"),
            ("X-Amzn-SageMaker-Custom-Attributes", "trace=abc"),
        ],
        b"driver_age,region,urban,exposure\n30,north,1,1.0\n55,coastal,0,0.5\n",
    )
    .await;
    assert_eq!(csv.json()["predictions"], expected);
    assert_eq!(
        csv.header("x-amzn-sagemaker-custom-attributes"),
        Some("trace=abc")
    );
    // The same model by path and by header.
    let by_path = post_json(
        addr,
        &format!("/models/{MODEL}/invocations"),
        &json!({"dataframe_split": rows()}),
    )
    .await;
    assert_eq!(by_path.json()["predictions"], expected);
    // Linear predictor on request.
    let linear = post_json(
        addr,
        "/invocations",
        &json!({"dataframe_split": rows(), "params": {"which": "linear"}}),
    )
    .await;
    let linear = linear.json()["predictions"].clone();
    for (eta, mu) in linear
        .as_array()
        .unwrap()
        .iter()
        .zip(expected.as_array().unwrap())
    {
        assert!((eta.as_f64().unwrap().exp() - mu.as_f64().unwrap()).abs() < 1e-12);
    }
    server.stop().await;
}

#[tokio::test]
async fn mlflow_errors_have_mlflow_shapes_and_codes() {
    let server = start(vec![glm_spec(MODEL)], 4096).await;
    let addr = server.addr;
    let cases: Vec<(Reply, u16, &str, &str)> = vec![
        (http(addr, "POST", "/invocations", &[("Content-Type", "text/plain")], b"x").await, 415, "BAD_REQUEST", "unsupported content type"),
        (http(addr, "POST", "/invocations", &[("Content-Type", "application/json")], b"{not json").await, 400, "BAD_REQUEST", "not valid JSON"),
        (post_json(addr, "/invocations", &json!({"dataframe_split": rows(), "instances": []})).await, 400, "BAD_REQUEST", "exactly one of"),
        (post_json(addr, "/invocations", &json!({"dataframe_records": [{"driver_age": 30, "urban": 1, "exposure": 1.0}]})).await, 400, "INVALID_PARAMETER_VALUE", "required column `region`"),
        (post_json(addr, "/invocations", &json!({"dataframe_records": [{"driver_age": "old", "region": "north", "urban": 1, "exposure": 1.0}]})).await, 400, "BAD_REQUEST", "column `driver_age` row 0: expected double"),
        (post_json(addr, "/invocations", &json!({"dataframe_split": {"columns": ["driver_age"], "data": []}})).await, 400, "BAD_REQUEST", "no rows"),
        (post_json(addr, "/invocations", &json!({"dataframe_records": [{"driver_age": 30, "region": "mars", "urban": 1, "exposure": 1.0}]})).await, 400, "BAD_REQUEST", "\\\"mars\\\" was not seen in training"),
        (post_json(addr, "/invocations", &json!({"dataframe_records": [{"driver_age": 30, "region": "north", "urban": 1, "exposure": 0.0}]})).await, 400, "BAD_REQUEST", "exposure must be > 0"),
        (http(addr, "POST", "/invocations", &[("Content-Type", "text/csv")], b"driver_age,region,urban,exposure\nNaN,north,1,1\n").await, 400, "BAD_REQUEST", "finite"),
        (post_json(addr, "/invocations", &json!({"dataframe_split": rows(), "params": {"which": "median"}})).await, 400, "INVALID_PARAMETER_VALUE", "must be one of mean, linear"),
        (http(addr, "POST", "/invocations", &[("Content-Type", "application/json"), ("X-Kiln-Model", "no.such.model")], b"{}").await, 404, "RESOURCE_DOES_NOT_EXIST", "no.such.model"),
        (http(addr, "POST", "/invocations", &[("Content-Type", "application/json")], &vec![b' '; 10_000]).await, 413, "REQUEST_LIMIT_EXCEEDED", "4096 bytes"),
    ];
    for (reply, status, code, needle) in cases {
        let body = reply.json();
        assert_eq!(reply.status, status, "{body}");
        assert_eq!(body["error_code"], code, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains(needle) || body.to_string().contains(needle),
            "{needle:?} not in {body}"
        );
    }
    // As MLflow's server: an unknown parameter is ignored (with a warning in
    // the log), and a missing number is NaN (its prediction is null in JSON).
    let ignored = post_json(
        addr,
        "/invocations",
        &json!({"dataframe_split": rows(), "params": {"seed": 1}}),
    )
    .await;
    assert_eq!(ignored.status, 200, "{}", ignored.text());
    let nan = post_json(addr, "/invocations", &json!({"dataframe_records": [{"driver_age": null, "region": "north", "urban": 1, "exposure": 1.0}]})).await;
    assert_eq!(nan.status, 200, "{}", nan.text());
    assert_eq!(nan.json()["predictions"], json!([null]));
    // Nothing above hurt the server.
    assert_eq!(http(addr, "GET", "/ping", &[], b"").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn kserve_v2_and_v1_speak_the_open_inference_protocol() {
    let server = start(vec![glm_spec(MODEL)], 1 << 20).await;
    let addr = server.addr;
    assert_eq!(
        http(addr, "GET", "/v2/health/live", &[], b"").await.json(),
        json!({"live": true})
    );
    assert_eq!(
        http(addr, "GET", "/v2", &[], b"").await.json()["name"],
        "kiln"
    );
    let meta = http(addr, "GET", &format!("/v2/models/{MODEL}"), &[], b"")
        .await
        .json();
    assert_eq!(meta["versions"], json!(["3"]));
    assert_eq!(
        meta["inputs"][1],
        json!({"name": "region", "datatype": "BYTES", "shape": [-1]})
    );
    assert_eq!(
        http(
            addr,
            "GET",
            &format!("/v2/models/{MODEL}/versions/3/ready"),
            &[],
            b""
        )
        .await
        .json()["ready"],
        true
    );
    let request = json!({"id": "r1", "inputs": [
        {"name": "driver_age", "datatype": "INT64", "shape": [2], "data": [30, 55]},
        {"name": "region", "datatype": "BYTES", "shape": [2, 1], "data": [["north"], ["coastal"]]},
        {"name": "urban", "datatype": "INT32", "shape": [2], "data": [1, 0]},
        {"name": "exposure", "datatype": "FP32", "shape": [2], "data": [1.0, 0.5]}]});
    let reply = post_json(addr, &format!("/v2/models/{MODEL}/infer"), &request).await;
    let body = reply.json();
    assert_eq!(reply.status, 200, "{body}");
    assert_eq!(body["id"], "r1");
    assert_eq!(body["model_version"], "3");
    assert_eq!(body["outputs"][0]["datatype"], "FP64");
    assert_eq!(body["outputs"][0]["shape"], json!([2]));
    let mlflow = post_json(addr, "/invocations", &json!({"dataframe_split": rows()}))
        .await
        .json();
    assert_eq!(body["outputs"][0]["data"], mlflow["predictions"]);

    // Binary output on request: JSON header part, then little-endian FP64.
    let mut binary_request = request.clone();
    binary_request["outputs"] =
        json!([{"name": "predictions", "parameters": {"binary_data": true}}]);
    let reply = post_json(
        addr,
        &format!("/v2/models/{MODEL}/versions/3/infer"),
        &binary_request,
    )
    .await;
    let json_length: usize = reply
        .header("inference-header-content-length")
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&reply.body[..json_length]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 16);
    let first = f64::from_le_bytes(reply.body[json_length..json_length + 8].try_into().unwrap());
    assert_eq!(first, mlflow["predictions"][0].as_f64().unwrap());

    let unknown = post_json(addr, "/v2/models/nope/infer", &request).await;
    assert_eq!(
        (unknown.status, unknown.json()["error"].is_string()),
        (404, true)
    );
    let wrong_version = http(
        addr,
        "GET",
        &format!("/v2/models/{MODEL}/versions/9"),
        &[],
        b"",
    )
    .await;
    assert_eq!(wrong_version.status, 404);
    let mut bad = request.clone();
    bad["inputs"][0]["datatype"] = json!("FP128");
    let reply = post_json(addr, &format!("/v2/models/{MODEL}/infer"), &bad).await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("unknown datatype")
    );
    let mut missing = request.clone();
    missing["inputs"].as_array_mut().unwrap().remove(1);
    let reply = post_json(addr, &format!("/v2/models/{MODEL}/infer"), &missing).await;
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("required column `region`")
    );

    let v1 = post_json(
        addr,
        &format!("/v1/models/{MODEL}:predict"),
        &json!({"instances": [{"driver_age": 30, "region": "north", "urban": 1, "exposure": 1.0}]}),
    )
    .await;
    assert_eq!(v1.json()["predictions"][0], mlflow["predictions"][0]);
    let v1_model = http(addr, "GET", &format!("/v1/models/{MODEL}"), &[], b"")
        .await
        .json();
    assert_eq!(v1_model["ready"], true);
    // The path OpenAI's `models.retrieve` reads too.
    assert_eq!(
        (v1_model["id"].as_str(), v1_model["object"].as_str()),
        (Some(MODEL), Some("model"))
    );
    assert!(v1_model["created"].is_i64() && v1_model["owned_by"] == "kiln");
    let unknown = http(addr, "GET", "/v1/no-such-route", &[], b"").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["type"], "invalid_request_error");
    assert!(
        unknown.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/no-such-route")
    );
    server.stop().await;
}

/// A pipeline for lifecycle tests: sleeps, or panics when asked to.
struct SlowPipeline {
    interface: ModelInterface,
    delay: Duration,
}

impl SlowPipeline {
    fn new(delay: Duration) -> Self {
        let signature: Signature = serde_json::from_value(json!({
            "inputs": [{"name": "x", "type": "double"}],
            "outputs": [{"name": "y", "type": "double"}]
        }))
        .unwrap();
        SlowPipeline {
            interface: ModelInterface {
                pipeline: "test/slow".into(),
                inputs: InputSpec::Columns(signature.clone()),
                params: InputSchema::default(),
                outputs: signature,
            },
            delay,
        }
    }
}

impl Pipeline for SlowPipeline {
    fn interface(&self) -> &ModelInterface {
        &self.interface
    }
    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        let kiln_pipelines::PredictInput::Frame(raw) = request.input else {
            return Err(PipelineError::Execution("expected a frame".into()));
        };
        let InputSpec::Columns(signature) = &self.interface.inputs else {
            unreachable!("constructed with columns")
        };
        let frame = raw.conform(signature)?;
        let Some(kiln_pipelines::frame::ColumnValues::Float(x)) = frame.column("x") else {
            return Err(PipelineError::Execution("x missing".into()));
        };
        if x[0] < 0.0 {
            panic!("negative input makes this test pipeline panic");
        }
        std::thread::sleep(self.delay);
        Ok(Prediction::Tensors(vec![Tensor::f64_vector(
            "y",
            x.clone(),
        )]))
    }
}

#[tokio::test]
async fn readiness_is_false_until_every_model_has_loaded() {
    let (release, gate) = mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let slow = ModelSpec {
        name: "test.slow.model".into(),
        version: None,
        reference: "test".into(),
        settings: ModelSettings::default(),
        loader: Arc::new(move || {
            gate.lock().unwrap().recv().map_err(|e| e.to_string())?;
            Ok(Arc::new(SlowPipeline::new(Duration::ZERO)) as Arc<dyn Pipeline>)
        }),
    };
    let config = test_config(1 << 20);
    let server = Server::bind(&config, vec![glm_spec(MODEL), slow])
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.run(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        http(addr, "GET", "/v2/health/ready", &[], b"").await.status,
        503
    );
    assert_eq!(http(addr, "GET", "/ping", &[], b"").await.status, 503);
    assert_eq!(
        http(addr, "GET", "/v2/health/live", &[], b"").await.status,
        200
    );
    let early = http(
        addr,
        "POST",
        "/invocations",
        &[
            ("Content-Type", "application/json"),
            ("X-Kiln-Model", "test.slow.model"),
        ],
        br#"{"inputs": {"x": [1]}}"#,
    )
    .await;
    assert_eq!(early.status, 503);
    assert_eq!(early.json()["error_code"], "TEMPORARILY_UNAVAILABLE");
    release.send(()).unwrap();
    wait_ready(addr).await;
    let metrics = http(addr, "GET", "/metrics", &[], b"").await.text();
    assert!(
        metrics.contains("kiln_model_load_seconds{model=\"test.slow.model\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_model_loaded{model=\"test.slow.model\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_http_requests_total{route=\"/invocations\",method=\"POST\",status=\"503\",model=\"test.slow.model\"} 1"),
        "{metrics}"
    );
    task.abort();
}

#[tokio::test]
async fn a_failed_load_keeps_the_server_unready_and_says_why() {
    let broken = ModelSpec {
        name: "test.broken.model".into(),
        version: None,
        reference: "test".into(),
        settings: ModelSettings::default(),
        loader: Arc::new(|| Err("weights are corrupt".into())),
    };
    let config = test_config(1 << 20);
    let server = Server::bind(&config, vec![broken]).await.unwrap();
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.run(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        http(addr, "GET", "/v2/health/ready", &[], b"").await.status,
        503
    );
    let reply = post_json(
        addr,
        "/v2/models/test.broken.model/infer",
        &json!({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1.0]}]}),
    )
    .await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("weights are corrupt")
    );
    task.abort();
}

#[tokio::test]
async fn a_failed_model_beside_a_good_one_leaves_the_server_ready_unless_strict() {
    let broken = || ModelSpec {
        name: "test.broken.model".into(),
        version: None,
        reference: "test".into(),
        settings: ModelSettings::default(),
        loader: Arc::new(|| Err("weights are corrupt".into())),
    };
    for strict in [false, true] {
        let mut config = test_config(1 << 20);
        config.server.strict_readiness = strict;
        let server = Server::bind(&config, vec![glm_spec(MODEL), broken()])
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ready = http(addr, "GET", "/v2/health/ready", &[], b"").await;
        assert_eq!(ready.status, if strict { 503 } else { 200 });
        assert_eq!(
            ready.json()["failed_models"][0]["error"],
            "weights are corrupt"
        );
        let ping = http(addr, "GET", "/ping", &[], b"").await;
        if strict {
            assert_eq!(ping.status, 503);
            assert!(
                ping.text()
                    .contains("failed: test.broken.model: weights are corrupt")
            );
        } else {
            assert_eq!(ping.status, 200);
        }
        let model_ready = http(addr, "GET", "/v2/models/test.broken.model/ready", &[], b"").await;
        assert_eq!(model_ready.status, 503);
        assert_eq!(model_ready.json()["error"], "weights are corrupt");
        // Cog's health check is about the default (first) model.
        let cog = http(addr, "GET", "/health-check", &[], b"").await;
        assert_eq!(cog.json()["status"], "READY");
        let reply = post_json(addr, "/invocations", &json!({"dataframe_split": rows()})).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        task.abort();
    }
}

#[tokio::test]
async fn a_panicking_prediction_fails_alone() {
    let slow = ModelSpec {
        name: "test.slow.model".into(),
        version: None,
        reference: "test".into(),
        settings: ModelSettings::default(),
        loader: Arc::new(|| Ok(Arc::new(SlowPipeline::new(Duration::ZERO)) as Arc<dyn Pipeline>)),
    };
    let server = start(vec![slow], 1 << 20).await;
    let reply = post_json(
        server.addr,
        "/invocations",
        &json!({"inputs": {"x": [-1.0]}}),
    )
    .await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.json()["error_code"], "INTERNAL_ERROR");
    let fine = post_json(
        server.addr,
        "/invocations",
        &json!({"inputs": {"x": [2.0]}}),
    )
    .await;
    assert_eq!(fine.json()["predictions"], json!([2.0]));
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let slow = ModelSpec {
        name: "test.slow.model".into(),
        version: None,
        reference: "test".into(),
        settings: ModelSettings::default(),
        loader: Arc::new(|| {
            Ok(Arc::new(SlowPipeline::new(Duration::from_millis(600))) as Arc<dyn Pipeline>)
        }),
    };
    let server = start(vec![slow], 1 << 20).await;
    let addr = server.addr;
    let in_flight = tokio::spawn(async move {
        post_json(addr, "/invocations", &json!({"inputs": {"x": [7.0]}})).await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.stop().await;
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["predictions"], json!([7.0]));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener should be closed"
    );
}

#[tokio::test]
async fn image_pipelines_answer_tabular_protocols_one_row_per_request() {
    let server = start(vec![tiny_flux_spec()], 1 << 20).await;
    let addr = server.addr;
    // The Databricks pattern: dataframe_split columns are the request fields.
    let reply = post_json(
        addr,
        "/invocations",
        &json!({"dataframe_split": {
            "columns": ["prompt", "width", "height", "num_inference_steps", "seed"],
            "data": [["a photo of a cat", 32, 32, 1, 7], ["a dog", 48, 32, 1, 8]]}}),
    )
    .await;
    let body = reply.json();
    assert_eq!(reply.status, 200, "{body}");
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2);
    assert_eq!(predictions[1]["width"], 48);
    // The loaded weights' bytes, as the pipeline counted them, are exported.
    let metrics = http(addr, "GET", "/metrics", &[], b"").await.text();
    let resident = metrics
        .lines()
        .find(|l| l.starts_with("kiln_model_resident_bytes{model=\"test.images.flux\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no resident bytes in {metrics}"));
    assert!(resident > 100_000, "{resident}");
    assert_eq!(predictions[0]["seed"], 7);
    assert!(
        predictions[0]["images"][0]["base64"]
            .as_str()
            .unwrap()
            .len()
            > 100
    );

    // KServe v2: BYTES tensors carry text, converted by the schema's types.
    let reply = post_json(
        addr,
        "/v2/models/test.images.flux/infer",
        &json!({"inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a photo of a cat"]},
            {"name": "width", "datatype": "BYTES", "shape": [1], "data": ["32"]},
            {"name": "height", "datatype": "INT64", "shape": [1], "data": [32]},
            {"name": "num_inference_steps", "datatype": "INT32", "shape": [1], "data": [1]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [7]}]}),
    )
    .await;
    let body = reply.json();
    assert_eq!(reply.status, 200, "{body}");
    let output: Value =
        serde_json::from_str(body["outputs"][0]["data"][0].as_str().unwrap()).unwrap();
    assert_eq!(
        output[0]["images"][0]["base64"], predictions[0]["images"][0]["base64"],
        "same seed, same image"
    );

    // Validation errors keep the protocol's shape and name the field.
    let reply = post_json(
        addr,
        "/invocations",
        &json!({"dataframe_split": {"columns": ["prompt", "width"], "data": [["a cat", 1000]]}}),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("width: must be a multiple of 16")
    );
    server.stop().await;
}
