//! The job system over real HTTP: RunPod and OpenAI endpoints on a step
//! pipeline whose speed the tests control (`common::steps`), plus the tiny
//! FLUX model for image shapes. Covers queue bounds, cancellation, timeouts,
//! panics, retries, restart recovery, webhooks, lazy loading, idle unloading,
//! LRU eviction and API keys. Cog's routes are in `cog.rs`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::steps::{
    final_status, get, next_hook, run, settings, step_spec, wait_for_status, webhook_receiver,
};
use common::{flux_spec, http, post_json, start_with, test_config};
use kiln_server::{LoadPolicy, ModelSettings, ModelSpec, ServeConfig};
use serde_json::json;

#[tokio::test]
async fn runpod_jobs_run_report_progress_and_fail_alone() {
    let server = start_with(
        &test_config(1 << 20),
        vec![step_spec("steps", settings(16), None)],
    )
    .await;

    let id = run(&server, json!({"steps": 3})).await;
    let done = final_status(&server, &id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(done["output"], json!({"done": 3}));
    assert!(
        done["delayTime"].is_i64() && done["executionTime"].is_i64(),
        "{done}"
    );
    let stream = get(&server, &format!("/stream/{id}")).await.json();
    assert_eq!(stream["id"], id.as_str());
    assert_eq!(
        stream["stream"],
        json!([{"output": {"step": 1, "total": 3}}, {"output": {"step": 2, "total": 3}},
               {"output": {"step": 3, "total": 3}}, {"output": {"done": 3}}])
    );
    assert_eq!(
        get(&server, &format!("/stream/{id}")).await.json()["stream"],
        json!([])
    );

    // Schema errors fail the job at once, in rp_validator's words.
    let reply = post_json(
        server.addr,
        "/run",
        &json!({"input": {"steps": "many", "colour": 1}}),
    )
    .await;
    let id = reply.json()["id"].as_str().unwrap().to_string();
    let failed = final_status(&server, &id).await;
    assert_eq!(failed["status"], "FAILED");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("Unexpected input. colour is not a valid input option."),
        "{error}"
    );
    // Every problem at once, as rp_validator lists them.
    assert!(error.contains("steps should be"), "{error}");
    assert!(error.contains("steps should be"), "{error}");

    // A panicking job fails alone; the next one runs.
    let id = run(&server, json!({"panic": true})).await;
    let failed = final_status(&server, &id).await;
    assert_eq!(failed["status"], "FAILED");
    assert!(
        failed["error"].as_str().unwrap().contains("asked to panic"),
        "{failed}"
    );
    // ... and can be retried (it panics again, but goes through the queue).
    let retried = post_json(server.addr, &format!("/retry/{id}"), &json!({})).await;
    assert_eq!(retried.json(), json!({"id": id, "status": "IN_QUEUE"}));
    let again = final_status(&server, &id).await;
    assert_eq!(again["status"], "FAILED");
    assert_eq!(again["retries"], 1);
    let id = run(&server, json!({"steps": 1})).await;
    assert_eq!(final_status(&server, &id).await["status"], "COMPLETED");
    let not_retryable = post_json(server.addr, &format!("/retry/{id}"), &json!({})).await;
    assert_eq!(not_retryable.status, 400);

    // runsync answers with the result; the /v2/{model} mount is the same endpoint.
    let reply = post_json(
        server.addr,
        "/v2/steps/runsync",
        &json!({"input": {"steps": 2}}),
    )
    .await;
    assert_eq!(reply.json()["status"], "COMPLETED", "{}", reply.text());
    assert_eq!(reply.json()["output"], json!({"done": 2}));
    assert_eq!(get(&server, "/status/no-such-job").await.status, 404);
    // Results are kept for the job's TTL, then gone.
    let reply = post_json(
        server.addr,
        "/run",
        &json!({"input": {"steps": 1}, "policy": {"ttl": 1000}}),
    )
    .await;
    let id = reply.json()["id"].as_str().unwrap().to_string();
    assert_eq!(final_status(&server, &id).await["status"], "COMPLETED");
    // (A TTL is at least one second; the purge runs every second.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(get(&server, &format!("/status/{id}")).await.status, 404);
    assert_eq!(get(&server, "/v2/nosuchmodel/status/x").await.status, 404);
    let missing_input = post_json(server.addr, "/run", &json!({"prompt": "x"})).await;
    assert_eq!(missing_input.status, 400);
    assert!(
        missing_input.json()["error"]
            .as_str()
            .unwrap()
            .contains("input")
    );

    let health = get(&server, "/v2/steps/health").await.json();
    assert_eq!(
        health["jobs"]["completed"], 3,
        "{health} (the expired job is purged)"
    );
    assert_eq!(health["jobs"]["failed"], 2, "{health}");
    assert_eq!(health["jobs"]["retried"], 1, "{health}");
    assert_eq!(health["workers"], json!({"idle": 1, "running": 0}));
    let metrics = get(&server, "/metrics").await.text();
    assert!(
        metrics.contains("kiln_jobs_total{model=\"steps\",status=\"COMPLETED\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_denoising_steps_total{model=\"steps\"}"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn queues_are_bounded_and_cancel_timeout_and_purge_stop_jobs() {
    let server = start_with(
        &test_config(1 << 20),
        vec![step_spec("steps", settings(2), None)],
    )
    .await;
    // One running, two queued: the fourth is refused with Retry-After.
    let running = run(&server, json!({"steps": 1000, "delay_ms": 5})).await;
    wait_for_status(&server, &running, "IN_PROGRESS").await;
    let queued_a = run(&server, json!({"steps": 1})).await;
    let queued_b = run(&server, json!({"steps": 1})).await;
    let refused = post_json(server.addr, "/run", &json!({"input": {"steps": 1}})).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("5"));
    // The queue depth is read when scraped, not up to a second late; the
    // refusal counts against its model.
    let metrics = get(&server, "/metrics").await.text();
    assert!(
        metrics.contains(
            "kiln_http_requests_total{route=\"/run\",method=\"POST\",status=\"429\",model=\"steps\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_queue_depth{model=\"steps\"} 2"),
        "{metrics}"
    );

    // Cancelling a queued job keeps it from running; cancelling the running one
    // stops it at its next step and frees the worker.
    let cancelled = post_json(server.addr, &format!("/cancel/{queued_a}"), &json!({})).await;
    assert_eq!(
        cancelled.json(),
        json!({"id": queued_a, "status": "CANCELLED"})
    );
    let cancelled = post_json(server.addr, &format!("/cancel/{running}"), &json!({})).await;
    assert_eq!(cancelled.json()["status"], "CANCELLED");
    assert_eq!(
        final_status(&server, &queued_b).await["status"],
        "COMPLETED"
    );
    assert_eq!(
        final_status(&server, &queued_a).await["status"],
        "CANCELLED"
    );
    let stream = get(&server, &format!("/stream/{running}")).await.json();
    assert_eq!(stream["status"], "CANCELLED");

    // Execution timeout from the request's policy.
    let reply = post_json(
        server.addr,
        "/run",
        &json!({"input": {"steps": 1000, "delay_ms": 5}, "policy": {"executionTimeout": 100}}),
    )
    .await;
    let id = reply.json()["id"].as_str().unwrap().to_string();
    let timed_out = final_status(&server, &id).await;
    assert_eq!(timed_out["status"], "TIMED_OUT", "{timed_out}");
    assert!(timed_out["error"].as_str().unwrap().contains("timeout"));

    // purge-queue cancels everything still waiting.
    let blocker = run(&server, json!({"steps": 1000, "delay_ms": 5})).await;
    wait_for_status(&server, &blocker, "IN_PROGRESS").await;
    let waiting = [run(&server, json!({})).await, run(&server, json!({})).await];
    let purged = post_json(server.addr, "/purge-queue", &json!({})).await;
    assert_eq!(purged.json(), json!({"removed": 2, "status": "completed"}));
    for id in &waiting {
        assert_eq!(final_status(&server, id).await["status"], "CANCELLED");
    }
    post_json(server.addr, &format!("/cancel/{blocker}"), &json!({})).await;
    // Every cancellation is counted once: one queued, two running, two purged;
    // the cancel requests count against the model.
    let metrics = get(&server, "/metrics").await.text();
    assert!(
        metrics.contains(
            "kiln_http_requests_total{route=\"/cancel/{id}\",method=\"POST\",status=\"200\",model=\"steps\"} 3"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_jobs_total{model=\"steps\",status=\"CANCELLED\"} 5"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn accepted_jobs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(1 << 20);
    config.jobs.database = Some(dir.path().join("jobs.sqlite"));
    // First life: the model never finishes loading, so jobs stay queued or
    // running when the server goes away.
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = Arc::clone(&released);
    let stuck = ModelSpec {
        loader: Arc::new(move || {
            while !gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err("the first life is over".into())
        }),
        ..step_spec("steps", settings(16), None)
    };
    let first = kiln_server::Server::bind(&config, vec![stuck])
        .await
        .unwrap();
    let addr = first.local_addr().unwrap();
    let task = tokio::spawn(first.run(std::future::pending()));
    let mut ids = Vec::new();
    for steps in 1..=3 {
        let reply = post_json(addr, "/run", &json!({"input": {"steps": steps}})).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        ids.push(reply.json()["id"].as_str().unwrap().to_string());
    }
    task.abort();
    let _ = task.await;

    // Second life on the same database: every accepted job completes.
    let server = start_with(&config, vec![step_spec("steps", settings(16), None)]).await;
    for (i, id) in ids.iter().enumerate() {
        let done = final_status(&server, id).await;
        assert_eq!(done["status"], "COMPLETED", "{done}");
        assert_eq!(done["output"], json!({"done": i + 1}));
    }
    // The first life's stuck worker gives up now; its late write cannot touch
    // jobs that already reached a final state.
    released.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for id in &ids {
        assert_eq!(final_status(&server, id).await["status"], "COMPLETED");
    }
    server.stop().await;
}

#[tokio::test]
async fn models_load_lazily_unload_when_idle_and_are_evicted_under_a_budget() {
    let (loads_a, loads_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let lazy = |idle: Option<Duration>| ModelSettings {
        load: LoadPolicy::Lazy,
        idle_unload: idle,
        memory_bytes: 100,
        ..ModelSettings::default()
    };
    let mut config: ServeConfig = test_config(1 << 20);
    config.server.memory_budget = Some(150);
    let server = start_with(
        &config,
        vec![
            step_spec("a", lazy(None), Some(Arc::clone(&loads_a))),
            step_spec(
                "b",
                lazy(Some(Duration::from_millis(300))),
                Some(Arc::clone(&loads_b)),
            ),
        ],
    )
    .await;
    // Ready before anything loaded: lazy models load on first use.
    assert_eq!(loads_a.load(Ordering::SeqCst), 0);
    assert_eq!(get(&server, "/v2/models/a/ready").await.status, 503);
    let reply = post_json(server.addr, "/v2/a/runsync", &json!({"input": {}})).await;
    assert_eq!(reply.json()["status"], "COMPLETED", "{}", reply.text());
    assert_eq!(loads_a.load(Ordering::SeqCst), 1);
    assert_eq!(get(&server, "/v2/models/a/ready").await.status, 200);

    // Loading b needs a's room: a is evicted.
    let reply = post_json(server.addr, "/v2/b/runsync", &json!({"input": {}})).await;
    assert_eq!(reply.json()["status"], "COMPLETED");
    assert_eq!(get(&server, "/v2/models/a/ready").await.status, 503);
    assert_eq!(get(&server, "/v2/models/b/ready").await.status, 200);

    // b unloads after 300 ms idle; the next request loads it again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(get(&server, "/v2/models/b/ready").await.status, 503);
    let reply = post_json(server.addr, "/v2/b/runsync", &json!({"input": {}})).await;
    assert_eq!(reply.json()["status"], "COMPLETED");
    assert_eq!(loads_b.load(Ordering::SeqCst), 2);
    let metrics = get(&server, "/metrics").await.text();
    assert!(
        metrics.contains("kiln_model_unloads_total{model=\"a\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_model_unloads_total{model=\"b\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_runpod_job_that_fails_validation_still_sends_its_webhook() {
    let mut config = test_config(1 << 20);
    config.jobs.webhook_private_addresses = true;
    let server = start_with(&config, vec![step_spec("steps", settings(4), None)]).await;
    let (url, mut hooks) = webhook_receiver().await;
    let reply = post_json(
        server.addr,
        "/run",
        &json!({"input": {"steps": "many"}, "webhook": url}),
    )
    .await;
    let id = reply.json()["id"].as_str().unwrap().to_string();
    let hook = next_hook(&mut hooks).await;
    assert_eq!(hook["id"], id.as_str());
    assert_eq!(hook["status"], "FAILED");
    assert!(hook["error"].as_str().unwrap().contains("steps"), "{hook}");
    server.stop().await;
}

#[tokio::test]
async fn openai_images_and_api_keys() {
    let mut config = test_config(1 << 20);
    config.server.api_keys = vec!["k-123".into()];
    let server = start_with(&config, vec![flux_spec("tiny-schnell", "flux")]).await;
    let addr = server.addr;
    let auth = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer k-123"),
    ];
    // Health answers without a key; everything else needs one.
    assert_eq!(get(&server, "/ping").await.status, 200);
    let refused = get(&server, "/v1/models").await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        post_json(addr, "/run", &json!({"input": {}})).await.status,
        401
    );
    // Paths that merely end like a probe are not probes.
    let sneaky = http(
        addr,
        "PUT",
        "/predictions/health",
        &[("Content-Type", "application/json")],
        br#"{"input": {"prompt": "x"}}"#,
    )
    .await;
    assert_eq!(sneaky.status, 401);
    assert_eq!(get(&server, "/status/health").await.status, 401);
    assert_eq!(get(&server, "/v2/flux/health").await.status, 200);
    let wrong = http(
        addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer k-12")],
        b"",
    )
    .await;
    assert_eq!(wrong.status, 401);

    let models = http(addr, "GET", "/v1/models", &auth, b"").await.json();
    assert_eq!(models["data"][0]["id"], "flux");
    let request = json!({"model": "flux", "prompt": "a cat", "n": 2, "size": "32x32",
                         "response_format": "b64_json", "seed": 7, "num_inference_steps": 1});
    let reply = http(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        request.to_string().as_bytes(),
    )
    .await;
    let body = reply.json();
    assert_eq!(reply.status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["seed"], 7);
    let again = http(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        request.to_string().as_bytes(),
    )
    .await;
    assert_eq!(again.json()["data"], body["data"], "same seed, same images");

    let bad = json!({"model": "flux", "prompt": "a cat", "size": "33x32"});
    let reply = http(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        bad.to_string().as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["param"], "size");
    let bad = json!({"model": "flux", "prompt": "a cat", "n": 9});
    let reply = http(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        bad.to_string().as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["param"], "n");
    let unknown = json!({"model": "dall-e-3", "prompt": "a cat"});
    let reply = http(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        unknown.to_string().as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "model_not_found");

    // RunPod's image output is the FLUX shorts handler's shape.
    let reply = http(
        addr,
        "POST",
        "/v2/flux/runsync",
        &auth,
        json!({"input": {"prompt": "a cat", "width": 32, "height": 48, "num_inference_steps": 1, "seed": 3}})
            .to_string()
            .as_bytes(),
    )
    .await;
    let output = &reply.json()["output"];
    assert_eq!(output["status"], "success", "{output}");
    assert_eq!(output["prompt"], "a cat");
    assert_eq!(output["model"], "flux");
    assert_eq!(output["image"]["width"], 32);
    assert_eq!(output["image"]["height"], 48);
    assert!(output["image"]["image_base64"].as_str().unwrap().len() > 100);
    assert!(output.get("images").is_none());
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_running_jobs_record_their_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(1 << 20);
    config.jobs.database = Some(dir.path().join("jobs.sqlite"));
    let server = start_with(&config, vec![step_spec("steps", settings(16), None)]).await;
    let running = run(&server, json!({"steps": 20, "delay_ms": 20})).await;
    wait_for_status(&server, &running, "IN_PROGRESS").await;
    let queued = run(&server, json!({"steps": 1})).await;
    server.stop().await;

    // The running job finished during the grace period; the queued one waited.
    let server = start_with(&config, vec![step_spec("steps", settings(16), None)]).await;
    let done = get(&server, &format!("/status/{running}")).await.json();
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert!(done.get("retries").is_none(), "it ran once: {done}");
    assert_eq!(final_status(&server, &queued).await["status"], "COMPLETED");
    server.stop().await;
}

#[tokio::test]
async fn a_model_that_cannot_load_is_unavailable_on_openai_images() {
    let broken = ModelSpec {
        name: "broken".into(),
        version: None,
        reference: "test".into(),
        settings: ModelSettings {
            load: LoadPolicy::Lazy,
            ..settings(4)
        },
        loader: Arc::new(|| Err("weights are corrupt".to_string())),
    };
    let server = start_with(&test_config(1 << 20), vec![broken]).await;
    // 503 as MLflow, KServe and SageMaker answer, not a 500.
    let reply = post_json(
        server.addr,
        "/v1/images/generations",
        &json!({"prompt": "a cat", "model": "broken"}),
    )
    .await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "server_error");
    assert!(
        reply.text().contains("weights are corrupt"),
        "{}",
        reply.text()
    );
    server.stop().await;
}
