//! Cog's prediction routes over real HTTP on the step pipeline
//! (`common::steps`): sync, async with webhooks, idempotent PUT, cancellation,
//! server-sent events, BUSY/409, stripped unknown inputs, and the
//! `[cog] strict_inputs` / `queue` options.

mod common;

use std::time::Duration;

use common::steps::{
    final_status, get, next_hook, settings, step_spec, wait_for_status, webhook_receiver,
};
use common::{http, post_json, start_with, test_config};
use serde_json::json;

#[tokio::test]
async fn cog_strict_inputs_and_queueing_are_options() {
    let mut config = test_config(1 << 20);
    config.cog.strict_inputs = true;
    config.cog.queue = true;
    let server = start_with(&config, vec![step_spec("steps", settings(4), None)]).await;
    let addr = server.addr;
    let unknown = post_json(
        addr,
        "/predictions",
        &json!({"input": {"steps": 1, "colour": "red"}}),
    )
    .await;
    assert_eq!(unknown.status, 422);
    assert_eq!(
        unknown.json()["detail"][0]["loc"],
        json!(["body", "input", "colour"])
    );
    // Behind a busy slot, predictions queue (up to max_queue) instead of 409.
    let slow = json!({"input": {"steps": 50, "delay_ms": 5}}).to_string();
    for _ in 0..2 {
        let accepted = http(
            addr,
            "POST",
            "/predictions",
            &[
                ("Content-Type", "application/json"),
                ("Prefer", "respond-async"),
            ],
            slow.as_bytes(),
        )
        .await;
        assert_eq!(accepted.status, 202, "{}", accepted.text());
    }
    assert_eq!(
        get(&server, "/health-check").await.json()["status"],
        "READY"
    );
    server.stop().await;
}

#[tokio::test]
async fn cog_predictions_sync_async_idempotent_events_and_webhooks() {
    let mut config = test_config(1 << 20);
    // The receiver below is on loopback, which webhooks may not reach by default.
    config.jobs.webhook_private_addresses = true;
    let server = start_with(&config, vec![step_spec("steps", settings(4), None)]).await;
    let addr = server.addr;
    let root = get(&server, "/").await.json();
    assert_eq!(root["predictions_url"], "/predictions");
    assert_eq!(
        get(&server, "/health-check").await.json()["status"],
        "READY"
    );
    let openapi = get(&server, "/openapi.json").await.json();
    assert_eq!(
        openapi["components"]["schemas"]["Input"]["properties"]["steps"]["x-order"],
        0
    );

    let sync = post_json(addr, "/predictions", &json!({"input": {"steps": 2}})).await;
    let body = sync.json();
    assert_eq!(sync.status, 200, "{body}");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["output"], json!({"done": 2}));
    assert_eq!(body["logs"], "step 1/2\nstep 2/2\n");
    assert!(body["metrics"]["predict_time"].is_f64());
    for key in ["created_at", "started_at", "completed_at"] {
        assert!(body[key].as_str().unwrap().ends_with('Z'), "{key}: {body}");
    }

    let invalid = post_json(addr, "/predictions", &json!({"input": {"steps": -1}})).await;
    assert_eq!(invalid.status, 422);
    assert_eq!(
        invalid.json()["detail"][0]["loc"],
        json!(["body", "input", "steps"])
    );

    // Async with a filtered webhook: only "completed" is delivered.
    let (url, mut hooks) = webhook_receiver().await;
    let accepted = http(
        addr,
        "POST",
        "/predictions",
        &[("Content-Type", "application/json"), ("Prefer", "respond-async")],
        json!({"id": "p-1", "input": {"steps": 2}, "webhook": url, "webhook_events_filter": ["completed"]})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    assert_eq!(accepted.json()["status"], "starting");
    let hook = next_hook(&mut hooks).await;
    assert_eq!(hook["id"], "p-1");
    assert_eq!(hook["status"], "succeeded");
    assert_eq!(hook["output"], json!({"done": 2}));

    // PUT on a finished id starts a new prediction under that id, as Cog does.
    let again = http(
        addr,
        "PUT",
        "/predictions/p-1",
        &[
            ("Content-Type", "application/json"),
            ("Prefer", "respond-async"),
        ],
        br#"{"input": {"steps": 3}}"#,
    )
    .await;
    assert_eq!(again.status, 202, "{}", again.text());
    assert_eq!(again.json()["input"], json!({"steps": 3}));
    assert_eq!(
        final_status(&server, "p-1").await["output"],
        json!({"done": 3})
    );
    // A body id that differs from the path's is Cog's 422.
    let mismatch = http(
        addr,
        "PUT",
        "/predictions/p-9",
        &[("Content-Type", "application/json")],
        br#"{"id": "other", "input": {"steps": 1}}"#,
    )
    .await;
    assert_eq!(mismatch.status, 422);
    assert_eq!(mismatch.json()["detail"][0]["loc"], json!(["body", "id"]));

    // A running async prediction can be cancelled; unknown ids are 404.
    let accepted = http(
        addr,
        "PUT",
        "/predictions/p-2",
        &[
            ("Content-Type", "application/json"),
            ("Prefer", "respond-async"),
        ],
        json!({"input": {"steps": 1000, "delay_ms": 5}, "webhook": url, "webhook_events_filter": ["completed"]})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(accepted.status, 202);
    wait_for_status(&server, "p-2", "IN_PROGRESS").await;
    // PUT of the running id again answers with it as it is (202).
    let running = http(
        addr,
        "PUT",
        "/predictions/p-2",
        &[
            ("Content-Type", "application/json"),
            ("Prefer", "respond-async"),
        ],
        br#"{"input": {"steps": 1}}"#,
    )
    .await;
    assert_eq!(running.status, 202);
    assert_eq!(running.json()["input"]["steps"], 1000);
    // Every slot is taken: Cog says BUSY and refuses a new prediction with 409.
    assert_eq!(get(&server, "/health-check").await.json()["status"], "BUSY");
    let busy = post_json(addr, "/predictions", &json!({"input": {"steps": 1}})).await;
    assert_eq!(busy.status, 409, "{}", busy.text());
    assert_eq!(busy.json()["detail"], "Already running a prediction");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        post_json(addr, "/predictions/p-2/cancel", &json!({}))
            .await
            .json(),
        json!({})
    );
    assert_eq!(
        post_json(addr, "/predictions/nope/cancel", &json!({}))
            .await
            .status,
        404
    );
    assert_eq!(final_status(&server, "p-2").await["status"], "CANCELLED");
    // The cancelled prediction keeps the logs it had written.
    let cancelled = next_hook(&mut hooks).await;
    assert_eq!(cancelled["id"], "p-2");
    assert_eq!(cancelled["status"], "canceled");
    assert!(
        cancelled["logs"]
            .as_str()
            .unwrap()
            .starts_with("step 1/1000\n"),
        "{cancelled}"
    );

    // The slot frees once the worker sees the cancellation.
    for _ in 0..200 {
        if get(&server, "/health-check").await.json()["status"] == "READY" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Unknown input fields are stripped, as Cog does, and named in the logs.
    let stripped = post_json(
        addr,
        "/predictions",
        &json!({"input": {"steps": 1, "colour": "red", "go_faster": true}}),
    )
    .await;
    assert_eq!(stripped.status, 200, "{}", stripped.text());
    assert_eq!(stripped.json()["input"], json!({"steps": 1}));
    assert!(
        stripped.json()["logs"]
            .as_str()
            .unwrap()
            .starts_with("Stripped unknown input fields: colour, go_faster\n"),
        "{}",
        stripped.text()
    );

    // Server-sent events: start, one log per step, output, completed.
    let events = http(
        addr,
        "POST",
        "/predictions",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        br#"{"input": {"steps": 2}}"#,
    )
    .await;
    let text = events.text();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        ["start", "log", "log", "output", "completed"],
        "{text}"
    );
    assert!(
        text.contains(r#"data: {"data":"step 2/2\n","source":"stdout"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"data: {"chunk":{"done":2},"index":0}"#),
        "{text}"
    );
    server.stop().await;
}
