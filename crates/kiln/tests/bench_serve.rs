//! `kiln bench serve` against a mock OpenAI streaming server on loopback:
//! every request is counted, token totals match what the server sent, the
//! concurrency limit holds on the server's side, and HTTP 500s and errors in
//! the stream are counted as failures without ending the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use kiln::bench_serve::{
    BenchConfig, DatasetSpec, RandomDataset, RandomPromptForm, Report, run_benchmark,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MODEL: &str = "mock-model";

/// How the mock answers the n-th completion request (counted from 0).
#[derive(Clone, Copy)]
enum Failure {
    None,
    /// HTTP 500 for every request whose number is a multiple of this.
    Http500Every(usize),
    /// An `error` event mid-stream for every request whose number is a multiple of this.
    StreamErrorEvery(usize),
}

/// What the mock saw and sent. A request counts as in flight from its
/// arrival until just before its last bytes leave (the client cannot finish
/// it earlier), so `max_in_flight` never exceeds the client's true count.
#[derive(Default)]
struct Observed {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    failed: AtomicUsize,
    prompt_tokens_sent: AtomicU64,
    completion_tokens_sent: AtomicU64,
}

impl Observed {
    fn request_ends(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn start_mock(failure: Failure) -> (String, Arc<Observed>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let observed = Arc::new(Observed::default());
    let state = observed.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve_connection(socket, state.clone(), failure));
        }
    });
    (base_url, observed)
}

/// Read one HTTP/1.1 request: its head and its Content-Length body.
async fn read_request(socket: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Some((head, buffer[head_end..head_end + length].to_vec()))
}

async fn serve_connection(mut socket: TcpStream, state: Arc<Observed>, failure: Failure) {
    let Some((head, body)) = read_request(&mut socket).await else {
        return;
    };
    if head.starts_with("GET /v1/models ") {
        let body = format!(r#"{{"object":"list","data":[{{"id":"{MODEL}","object":"model"}}]}}"#);
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = socket.write_all(answer.as_bytes()).await;
        return;
    }
    let number = state.requests.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let _ = answer(&mut socket, &head, &request, number, &state, failure).await;
}

/// Whether the request carries what `kiln bench serve` promises to send.
fn well_formed(head: &str, request: &Value) -> bool {
    let chat = head.starts_with("POST /v1/chat/completions ");
    let prompt_ok = if chat {
        request["messages"][0]["role"] == "user" && request["messages"][0]["content"].is_string()
    } else {
        head.starts_with("POST /v1/completions ")
            && (request["prompt"].is_string() || request["prompt"].is_array())
    };
    prompt_ok
        && request["model"] == MODEL
        && request["stream"] == true
        && request["stream_options"]["include_usage"] == true
        && request["ignore_eos"] == true
        && request["temperature"] == 0.0
        && request["max_tokens"].as_u64().is_some_and(|n| n > 0)
        && head
            .to_ascii_lowercase()
            .contains("authorization: bearer test-key")
}

/// Prompt tokens as the mock counts them: words of a text prompt, ids of a list.
fn prompt_tokens(request: &Value) -> u64 {
    let text = request["messages"][0]["content"]
        .as_str()
        .or(request["prompt"].as_str());
    match (text, request["prompt"].as_array()) {
        (Some(text), _) => text.split_whitespace().count() as u64,
        (None, Some(ids)) => ids.len() as u64,
        (None, None) => 0,
    }
}

async fn answer(
    socket: &mut TcpStream,
    head: &str,
    request: &Value,
    number: usize,
    state: &Observed,
    failure: Failure,
) -> std::io::Result<()> {
    if matches!(failure, Failure::Http500Every(k) if number.is_multiple_of(k))
        || !well_formed(head, request)
    {
        state.failed.fetch_add(1, Ordering::SeqCst);
        state.request_ends();
        let body = r#"{"error":{"message":"mock failure","type":"server_error"}}"#;
        let answer = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return socket.write_all(answer.as_bytes()).await;
    }
    // Close-delimited body: no Content-Length, no chunked encoding.
    socket
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
        )
        .await?;
    let chat = head.starts_with("POST /v1/chat/");
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(1);
    for token in 0..max_tokens {
        if matches!(failure, Failure::StreamErrorEvery(k) if number.is_multiple_of(k)) && token == 2
        {
            state.failed.fetch_add(1, Ordering::SeqCst);
            state.request_ends();
            let event = "data: {\"error\":{\"message\":\"mock ran out of memory\"}}\n\n";
            return socket.write_all(event.as_bytes()).await;
        }
        let event = if chat {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{token} \"}}}}]}}\n\n"
            )
        } else {
            format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"w{token} \"}}]}}\n\n")
        };
        // Two writes with a pause between, so events straddle reads.
        let (first, second) = event.as_bytes().split_at(event.len() / 2);
        socket.write_all(first).await?;
        socket.flush().await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
        socket.write_all(second).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let prompt_tokens = prompt_tokens(request);
    let usage = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{max_tokens},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        prompt_tokens + max_tokens
    );
    socket.write_all(usage.as_bytes()).await?;
    state
        .prompt_tokens_sent
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    state
        .completion_tokens_sent
        .fetch_add(max_tokens, Ordering::SeqCst);
    // The body is close-delimited: the client finishes at the close.
    state.request_ends();
    socket.shutdown().await
}

fn config(base_url: String) -> BenchConfig {
    BenchConfig {
        base_url,
        endpoint: "/v1/completions".into(),
        model: None,
        api_key: Some("test-key".into()),
        dataset: DatasetSpec::Random(RandomDataset {
            input_len: 16,
            output_len: 8,
            range_ratio: 0.5,
            prompt_form: RandomPromptForm::Words,
        }),
        num_prompts: 12,
        max_concurrency: Some(4),
        request_rate: f64::INFINITY,
        temperature: 0.0,
        ignore_eos: true,
        seed: 0,
        label: Some("mock".into()),
    }
}

fn assert_totals_match(report: &Report, observed: &Observed) {
    let m = &report.metrics;
    assert_eq!(
        m.total_output_tokens,
        observed.completion_tokens_sent.load(Ordering::SeqCst)
    );
    assert_eq!(
        m.total_input_tokens,
        observed.prompt_tokens_sent.load(Ordering::SeqCst)
    );
    for request in report.requests.iter().filter(|r| r.succeeded()) {
        let ttft = request.ttft.expect("a successful request has a TTFT");
        assert!(
            ttft <= request.latency,
            "TTFT {ttft:?} > e2e {:?}",
            request.latency
        );
        assert_eq!(request.itl.len() as u64 + 1, request.output_tokens);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_succeeds_and_the_concurrency_limit_holds() {
    let (base_url, observed) = start_mock(Failure::None).await;
    let report = run_benchmark(&config(base_url)).await.unwrap();
    let m = &report.metrics;
    assert_eq!((m.completed, m.failed), (12, 0), "{:?}", report.requests);
    assert_eq!(report.model, MODEL, "the model comes from GET /v1/models");
    assert_eq!(observed.requests.load(Ordering::SeqCst), 12);
    let max_in_flight = observed.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&max_in_flight),
        "{max_in_flight} requests in flight at most (limit 4, and they should overlap)"
    );
    assert_totals_match(&report, &observed);
    assert!(m.output_throughput > 0.0 && m.ttft_ms.mean > 0.0 && m.itl_ms.p99 > 0.0);
    assert!(m.tpot_ms.mean > 0.0 && m.e2el_ms.median >= m.ttft_ms.median);
    let table = report.render_table();
    assert!(table.contains("Successful requests:                     12\n"));
    let json = report.to_json();
    assert_eq!(json["completed"], 12);
    assert_eq!(json["label"], "mock");
    assert_eq!(json["request_rate"], "inf");
    assert!(json["p99_itl_ms"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_with_poisson_arrivals_are_measured_too() {
    let (base_url, observed) = start_mock(Failure::None).await;
    let config = BenchConfig {
        endpoint: "/v1/chat/completions".into(),
        model: Some(MODEL.into()),
        max_concurrency: None,
        request_rate: 200.0,
        ..config(base_url)
    };
    let report = run_benchmark(&config).await.unwrap();
    assert_eq!((report.metrics.completed, report.metrics.failed), (12, 0));
    assert_totals_match(&report, &observed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_id_prompts_have_their_exact_length() {
    let (base_url, observed) = start_mock(Failure::None).await;
    let config = BenchConfig {
        dataset: DatasetSpec::Random(RandomDataset {
            input_len: 20,
            output_len: 4,
            range_ratio: 0.0,
            prompt_form: RandomPromptForm::TokenIds { vocab_size: 1000 },
        }),
        ..config(base_url)
    };
    let report = run_benchmark(&config).await.unwrap();
    assert_eq!(report.metrics.completed, 12);
    assert_eq!(report.metrics.total_input_tokens, 12 * 20);
    assert_eq!(report.metrics.total_output_tokens, 12 * 4);
    assert_totals_match(&report, &observed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_500s_and_stream_errors_are_counted_as_failures() {
    for failure in [Failure::Http500Every(3), Failure::StreamErrorEvery(4)] {
        let (base_url, observed) = start_mock(failure).await;
        let report = run_benchmark(&config(base_url)).await.unwrap();
        let failed = observed.failed.load(Ordering::SeqCst);
        assert!(failed > 0);
        assert_eq!(report.metrics.failed, failed);
        assert_eq!(report.metrics.completed, 12 - failed);
        assert_totals_match(&report, &observed);
        let errors: Vec<&str> = report
            .requests
            .iter()
            .filter_map(|r| r.error.as_deref())
            .collect();
        let expected = match failure {
            Failure::Http500Every(_) => "HTTP 500",
            _ => "mock ran out of memory",
        };
        assert!(errors.iter().all(|e| e.contains(expected)), "{errors:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_every_request_without_ending_the_run() {
    // Bind and drop a listener to get a port nobody serves.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = BenchConfig {
        model: Some(MODEL.into()),
        num_prompts: 3,
        ..config(format!("http://127.0.0.1:{port}"))
    };
    let report = run_benchmark(&config).await.unwrap();
    assert_eq!((report.metrics.completed, report.metrics.failed), (0, 3));
    assert_eq!(report.metrics.ttft_ms.mean, 0.0);
}
