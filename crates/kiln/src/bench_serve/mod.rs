//! `kiln bench serve`: a load generator for any OpenAI-compatible server
//! (`kiln serve`, llama.cpp's llama-server, vLLM, MAX's `max serve`) that
//! streams completions over real HTTP and reports the serving metrics of
//! vLLM's and MAX's `benchmark_serving.py`: throughput, TTFT, TPOT, ITL and
//! end-to-end latency.
//!
//! Every timing is taken on the client: TTFT runs from sending the request to
//! the first server-sent event that carries text, ITL is the gap between
//! successive text-carrying events, and TPOT is `(e2e - TTFT) / (output - 1)`.
//! Token counts come from the server's final `usage` chunk (the request asks
//! for it with `stream_options.include_usage`), not from the prompt builder.

mod dataset;
mod report;
mod sse;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use dataset::{DatasetSpec, RandomDataset, RandomPromptForm};
pub use report::{Metrics, Report, RequestOutcome, Summary, percentile};
pub use sse::SseParser;

use dataset::{PlannedPrompt, PoissonArrivals, Prompt, plan_prompts};
use report::StreamTiming;

// ---------------------------------------------------------------------------
// Command line and configuration
// ---------------------------------------------------------------------------

#[derive(Args)]
pub struct ServeBenchArgs {
    /// The server's address, without the endpoint path.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    endpoint: String,
    /// The "model" sent with every request (default: the first id of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Bearer token for the server.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// `random` (synthetic prompts) or a JSONL file: one object a line with
    /// `prompt` and optional `max_tokens`/`output_len`, or ShareGPT's
    /// `conversations` (the first turn is the prompt).
    #[arg(long, default_value = "random")]
    dataset: String,
    /// Input length of random prompts, in tokens (about one word per token).
    #[arg(long, default_value_t = 128)]
    random_input_len: usize,
    /// Tokens to generate per request (also for dataset lines that name none).
    #[arg(long, default_value_t = 64)]
    random_output_len: usize,
    /// Random lengths are drawn uniformly from [len*(1-R), len*(1+R)].
    #[arg(long, default_value_t = 0.0)]
    random_range_ratio: f64,
    /// Random prompts as lists of token ids on /v1/completions (exact input
    /// length; Kiln and vLLM accept them).
    #[arg(long)]
    prompt_ids: bool,
    /// Token ids of --prompt-ids are drawn from [1, vocab-size).
    #[arg(long, default_value_t = 32000)]
    vocab_size: u32,
    /// Seed for random prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests to send.
    #[arg(long, default_value_t = 100)]
    num_prompts: usize,
    /// At most this many requests in flight (default: no limit).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Requests per second, Poisson arrivals; `inf` sends all at once.
    #[arg(long, default_value = "inf")]
    request_rate: f64,
    /// Sampling temperature of every request.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Do not send `ignore_eos: true` (generations may then stop early).
    #[arg(long)]
    no_ignore_eos: bool,
    /// Also write the result (and per-request timings) to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Free text stored in the JSON result.
    #[arg(long)]
    label: Option<String>,
}

/// Everything one benchmark run needs; `kiln bench serve` builds it from its flags.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The server's address, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// The path requests go to: `/v1/completions` or `/v1/chat/completions`.
    pub endpoint: String,
    /// The "model" of every request; `None` asks GET /v1/models for its first id.
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub dataset: DatasetSpec,
    pub num_prompts: usize,
    /// At most this many requests in flight; `None` for no limit.
    pub max_concurrency: Option<usize>,
    /// Requests per second (Poisson arrivals); infinity sends all at once.
    pub request_rate: f64,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub seed: u64,
    pub label: Option<String>,
}
impl ServeBenchArgs {
    fn into_config(self) -> BenchConfig {
        let dataset = if self.dataset == "random" {
            DatasetSpec::Random(RandomDataset {
                input_len: self.random_input_len,
                output_len: self.random_output_len,
                range_ratio: self.random_range_ratio,
                prompt_form: if self.prompt_ids {
                    RandomPromptForm::TokenIds {
                        vocab_size: self.vocab_size,
                    }
                } else {
                    RandomPromptForm::Words
                },
            })
        } else {
            DatasetSpec::File {
                path: PathBuf::from(self.dataset),
                default_output_len: self.random_output_len,
            }
        };
        BenchConfig {
            base_url: self.base_url,
            endpoint: self.endpoint,
            model: self.model,
            api_key: self.api_key,
            dataset,
            num_prompts: self.num_prompts,
            max_concurrency: self.max_concurrency,
            request_rate: self.request_rate,
            temperature: self.temperature,
            ignore_eos: !self.no_ignore_eos,
            seed: self.seed,
            label: self.label,
        }
    }
}

impl BenchConfig {
    fn is_chat(&self) -> bool {
        self.endpoint
            .trim_end_matches('/')
            .ends_with("/chat/completions")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url.trim_end_matches('/'), path)
    }

    fn validate(&self) -> Result<()> {
        if self.num_prompts == 0 {
            bail!("--num-prompts must be at least 1");
        }
        if self.max_concurrency == Some(0) {
            bail!("--max-concurrency must be at least 1");
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            bail!(
                "--request-rate must be above 0 (or inf), not {}",
                self.request_rate
            );
        }
        if let DatasetSpec::Random(random) = &self.dataset {
            random.validate(self.is_chat())?;
        }
        Ok(())
    }
}
pub fn run(args: ServeBenchArgs) -> Result<()> {
    let json_path = args.json.clone();
    let config = args.into_config();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_benchmark(&config))?;
    print!("{}", report.render_table());
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let Some(error) = report.requests.iter().find_map(|r| r.error.as_deref()) else {
        return Ok(());
    };
    let failed = report.metrics.failed;
    if report.metrics.completed == 0 {
        bail!("all {failed} requests failed; the first error: {error}");
    }
    eprintln!("{failed} requests failed; the first error: {error}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Running the benchmark
// ---------------------------------------------------------------------------

/// Send `config.num_prompts` streaming requests with the configured load and
/// measure each from the client. Failed requests are recorded, never fatal;
/// only a bad configuration, an unreadable dataset or a failed model lookup
/// end the run with an error.
pub async fn run_benchmark(config: &BenchConfig) -> Result<Report> {
    config.validate()?;
    let client = http_client(config.api_key.as_deref())?;
    let model = match &config.model {
        Some(model) => model.clone(),
        None => first_served_model(&client, &config.url("/v1/models")).await?,
    };
    let prompts = plan_prompts(&config.dataset, config.num_prompts, config.seed)?;
    let bodies = prompts
        .iter()
        .map(|prompt| request_body(config, &model, prompt).to_string())
        .collect();
    let progress = progress_bar(config.num_prompts);
    let started = Instant::now();
    let mut outcomes = send_all(config, &client, bodies, &progress).await?;
    let duration = started.elapsed();
    progress.finish_and_clear();
    for (outcome, prompt) in outcomes.iter_mut().zip(&prompts) {
        outcome.prompt_tokens.get_or_insert(prompt.input_len as u64);
    }
    Ok(Report::new(config, model, duration, outcomes))
}

fn http_client(api_key: Option<&str>) -> Result<reqwest::Client> {
    let mut headers = HeaderMap::new();
    if let Some(key) = api_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    // A fresh connection per request: servers such as llama-server close idle
    // keep-alive connections, and a request sent on one that the server just
    // closed fails ("connection closed before message completed").
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(0)
        .build()?)
}

/// The first model id the server lists at GET /v1/models.
async fn first_served_model(client: &reqwest::Client, url: &str) -> Result<String> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response_json(response)
        .await
        .with_context(|| format!("GET {url}"))?;
    if !status.is_success() {
        bail!("GET {url}: HTTP {status}: {body}");
    }
    body["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("GET {url} listed no model; pass --model"))
}

/// The body of `response` as JSON (reqwest's `json` feature is off in this workspace).
async fn response_json(response: reqwest::Response) -> Result<Value> {
    let bytes = response.bytes().await?;
    serde_json::from_slice(&bytes).context("the answer is not JSON")
}

fn progress_bar(requests: usize) -> ProgressBar {
    let bar = ProgressBar::new(requests as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} requests {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("bench serve");
    bar
}

/// Start every request at its arrival time, at most `max_concurrency` in
/// flight, and return the outcomes in request order.
async fn send_all(
    config: &BenchConfig,
    client: &reqwest::Client,
    bodies: Vec<String>,
    progress: &ProgressBar,
) -> Result<Vec<RequestOutcome>> {
    let url: Arc<str> = config.url(&config.endpoint).into();
    let limit = config.max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let mut arrivals = PoissonArrivals::new(config.request_rate, config.seed);
    let mut tasks = JoinSet::new();
    for (index, body) in bodies.into_iter().enumerate() {
        if index > 0 {
            let gap = arrivals.next_gap();
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        let (client, url, limit, progress) =
            (client.clone(), url.clone(), limit.clone(), progress.clone());
        tasks.spawn(async move {
            let _permit = match limit {
                Some(limit) => Some(limit.acquire_owned().await),
                None => None,
            };
            let outcome = send_one(&client, &url, body).await;
            progress.inc(1);
            (index, outcome)
        });
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.context("a request task panicked")?);
    }
    outcomes.sort_by_key(|(index, _)| *index);
    Ok(outcomes.into_iter().map(|(_, outcome)| outcome).collect())
}

/// One streaming request, timed from the moment it is sent.
async fn send_one(client: &reqwest::Client, url: &str, body: String) -> RequestOutcome {
    let mut timing = StreamTiming::new(Instant::now());
    let streamed = stream_events(client, url, body, &mut timing).await;
    timing.finish(streamed.err().map(|e| format!("{e:#}")))
}

async fn stream_events(
    client: &reqwest::Client,
    url: &str,
    body: String,
    timing: &mut StreamTiming,
) -> Result<()> {
    let mut response = client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        let text = response.text().await.unwrap_or_default();
        bail!("HTTP {status}: {}", clip(&text, 300));
    }
    let mut parser = SseParser::default();
    while let Some(bytes) = response.chunk().await? {
        let received = Instant::now();
        for data in parser.push(&bytes) {
            timing.on_event(&data, received)?;
        }
    }
    if let Some(data) = parser.finish() {
        timing.on_event(&data, Instant::now())?;
    }
    Ok(())
}

fn clip(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// The JSON body of one streaming request.
fn request_body(config: &BenchConfig, model: &str, planned: &PlannedPrompt) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": planned.output_len,
        "temperature": config.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    match (&planned.prompt, config.is_chat()) {
        (Prompt::Text(text), true) => {
            body["messages"] = json!([{"role": "user", "content": text}]);
        }
        (Prompt::Text(text), false) => body["prompt"] = json!(text),
        (Prompt::TokenIds(ids), _) => body["prompt"] = json!(ids),
    }
    if config.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    body
}
