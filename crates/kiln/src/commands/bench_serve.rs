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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

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

/// Where the prompts come from.
#[derive(Clone, Debug)]
pub enum DatasetSpec {
    Random(RandomDataset),
    /// A JSONL file; lines without an output length generate `default_output_len` tokens.
    File {
        path: PathBuf,
        default_output_len: usize,
    },
}

/// Synthetic prompts of about `input_len` tokens asking for `output_len` tokens.
#[derive(Clone, Debug)]
pub struct RandomDataset {
    pub input_len: usize,
    pub output_len: usize,
    /// Lengths are uniform in `[len*(1-ratio), len*(1+ratio)]`.
    pub range_ratio: f64,
    pub prompt_form: RandomPromptForm,
}

#[derive(Clone, Copy, Debug)]
pub enum RandomPromptForm {
    /// Text of random words from a built-in list (about one token per word).
    Words,
    /// Lists of random token ids in `[1, vocab_size)` (exact input length).
    TokenIds { vocab_size: u32 },
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

impl RandomDataset {
    fn validate(&self, chat: bool) -> Result<()> {
        if self.input_len == 0 || self.output_len == 0 {
            bail!("--random-input-len and --random-output-len must be at least 1");
        }
        if !(0.0..1.0).contains(&self.range_ratio) {
            bail!(
                "--random-range-ratio must be in [0, 1), not {}",
                self.range_ratio
            );
        }
        if let RandomPromptForm::TokenIds { vocab_size } = self.prompt_form {
            if chat {
                bail!("--prompt-ids needs /v1/completions: chat messages are text");
            }
            if vocab_size < 2 {
                bail!("--vocab-size must be at least 2");
            }
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
    Ok(reqwest::Client::builder()
        .default_headers(headers)
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

/// Poisson arrivals: exponential gaps with mean `1 / rate`, none at an infinite rate.
struct PoissonArrivals {
    rate: f64,
    rng: SplitMix64,
}

impl PoissonArrivals {
    fn new(rate: f64, seed: u64) -> Self {
        Self {
            rate,
            rng: SplitMix64::new(seed ^ 0xa771_7a15),
        }
    }

    fn next_gap(&mut self) -> Duration {
        if self.rate.is_infinite() {
            return Duration::ZERO;
        }
        // 1 - u is in (0, 1], so the logarithm is finite.
        Duration::from_secs_f64(-(1.0 - self.rng.unit()).ln() / self.rate)
    }
}

// ---------------------------------------------------------------------------
// Prompts and request bodies
// ---------------------------------------------------------------------------

/// One request's prompt and the tokens it asks for.
#[derive(Clone, Debug, PartialEq)]
struct PlannedPrompt {
    prompt: Prompt,
    /// Prompt tokens as planned: exact for token ids, an estimate for text;
    /// used only when the server reports no `usage.prompt_tokens`.
    input_len: usize,
    output_len: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

/// Common short English words: most tokenizers give each one token (with its
/// leading space), so `n` of them make a prompt of about `n` tokens.
const PROMPT_WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "her", "it", "an", "are", "were", "which", "this", "be", "or", "has", "had",
    "not", "but", "first", "one", "new", "their", "after", "who", "they", "two", "its", "also",
    "time", "year", "city", "school", "world", "house", "water", "music", "river", "game", "team",
    "war", "state", "name", "family", "life", "day", "part", "place", "people", "work", "number",
    "book", "film", "line", "road", "king", "light", "land", "north", "south", "east", "west",
    "great", "small", "long", "old", "high", "early", "last", "each", "other", "many", "over",
    "under", "between", "during", "while", "made", "found", "known", "called", "built", "born",
    "red", "green", "blue", "black", "white", "stone", "tree", "field", "station", "church",
];

fn plan_prompts(spec: &DatasetSpec, count: usize, seed: u64) -> Result<Vec<PlannedPrompt>> {
    match spec {
        DatasetSpec::Random(random) => Ok(random_prompts(random, count, seed)),
        DatasetSpec::File {
            path,
            default_output_len,
        } => {
            let lines = read_dataset(path, *default_output_len)?;
            Ok(lines.into_iter().cycle().take(count).collect())
        }
    }
}

fn random_prompts(spec: &RandomDataset, count: usize, seed: u64) -> Vec<PlannedPrompt> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| {
            let input_len = sample_len(&mut rng, spec.input_len, spec.range_ratio);
            let output_len = sample_len(&mut rng, spec.output_len, spec.range_ratio);
            let prompt = match spec.prompt_form {
                RandomPromptForm::Words => Prompt::Text(
                    (0..input_len)
                        .map(|_| PROMPT_WORDS[rng.below(PROMPT_WORDS.len() as u64) as usize])
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                RandomPromptForm::TokenIds { vocab_size } => Prompt::TokenIds(
                    (0..input_len)
                        .map(|_| 1 + rng.below(u64::from(vocab_size) - 1) as u32)
                        .collect(),
                ),
            };
            PlannedPrompt {
                prompt,
                input_len,
                output_len,
            }
        })
        .collect()
}

/// A length uniform in `[len*(1-ratio), len*(1+ratio)]` (at least 1), as
/// vLLM's random dataset draws them.
fn sample_len(rng: &mut SplitMix64, len: usize, ratio: f64) -> usize {
    let low = ((len as f64 * (1.0 - ratio)) as usize).max(1);
    let high = ((len as f64 * (1.0 + ratio)) as usize).max(low);
    low + rng.below((high - low + 1) as u64) as usize
}

fn read_dataset(path: &Path, default_output_len: usize) -> Result<Vec<PlannedPrompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let prompts = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            dataset_line(line, default_output_len)
                .with_context(|| format!("{} line {}", path.display(), index + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

/// `{"prompt": "...", "max_tokens": N}` (or `output_len`), or ShareGPT's
/// `{"conversations": [{"value": "..."}, ...]}` whose first turn is the prompt.
fn dataset_line(line: &str, default_output_len: usize) -> Result<PlannedPrompt> {
    let record: Value = serde_json::from_str(line).context("not a JSON object")?;
    let text = record["prompt"]
        .as_str()
        .or_else(|| record["conversations"][0]["value"].as_str())
        .context("no \"prompt\" string (or ShareGPT \"conversations\")")?;
    let output_len = match record
        .get("max_tokens")
        .or_else(|| record.get("output_len"))
    {
        Some(value) => value
            .as_u64()
            .filter(|&n| n > 0)
            .context("max_tokens/output_len must be a positive integer")?
            as usize,
        None => default_output_len,
    };
    Ok(PlannedPrompt {
        prompt: Prompt::Text(text.to_owned()),
        input_len: text.split_whitespace().count(),
        output_len,
    })
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

/// A small seeded generator (SplitMix64): the same seed gives the same
/// prompts and arrival times on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` for `n > 0` (the modulo bias is below 2^-40 for the sizes used here).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------

/// An incremental parser of a `text/event-stream` body: feed it the bytes as
/// they arrive, however they are split, and it returns the `data` of each
/// complete event (several `data:` lines joined with newlines). Comments
/// (`:` lines) and other fields are skipped; lines may end in LF, CRLF or CR.
#[derive(Default)]
pub struct SseParser {
    pending: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// The events completed by `bytes`.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(offset) = self.pending[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = start + offset;
            let terminator = match (self.pending[end], self.pending.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                // A CR that ends the input may be the first half of a CRLF.
                (b'\r', None) => break,
                _ => 1,
            };
            let line = String::from_utf8_lossy(&self.pending[start..end]).into_owned();
            start = end + terminator;
            events.extend(self.take_line(&line));
        }
        self.pending.drain(..start);
        events
    }

    /// The last event when the body ends without its blank line.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        let line = String::from_utf8_lossy(&rest);
        let line = line.trim_end_matches('\r');
        if !line.is_empty() {
            self.take_line(line);
        }
        self.data.take()
    }

    /// Apply one line; a blank line completes the event being built.
    fn take_line(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        None
    }
}

/// What one streamed chunk carries.
#[derive(Debug, Default, PartialEq)]
struct ChunkContent {
    has_text: bool,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// Read one event's data: completions' `choices[].text`, chat's
/// `choices[].delta.content` (or `reasoning_content`) and `usage`; an
/// `error` object, or data that is not JSON, is an error.
fn read_chunk(data: &str) -> Result<ChunkContent> {
    let chunk: Value = serde_json::from_str(data)
        .with_context(|| format!("a streamed event is not JSON: {}", clip(data, 200)))?;
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        let message = error["message"].as_str().map(str::to_owned);
        bail!(
            "the server sent an error: {}",
            message.unwrap_or_else(|| error.to_string())
        );
    }
    let non_empty = |value: &Value| value.as_str().is_some_and(|s| !s.is_empty());
    let has_text = chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|choice| {
            non_empty(&choice["text"])
                || non_empty(&choice["delta"]["content"])
                || non_empty(&choice["delta"]["reasoning_content"])
        })
    });
    let usage = &chunk["usage"];
    Ok(ChunkContent {
        has_text,
        prompt_tokens: usage["prompt_tokens"].as_u64(),
        completion_tokens: usage["completion_tokens"].as_u64(),
    })
}

// ---------------------------------------------------------------------------
// Per-request measurements
// ---------------------------------------------------------------------------

/// What one request measured.
#[derive(Clone, Debug)]
pub struct RequestOutcome {
    /// Why it failed (HTTP status, an error in the stream, a transport
    /// error); `None` when it succeeded.
    pub error: Option<String>,
    /// `usage.prompt_tokens`, else the planned prompt length.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`, else the number of text-carrying chunks.
    pub output_tokens: u64,
    /// Sending the request → the first text-carrying chunk.
    pub ttft: Option<Duration>,
    /// Gaps between successive text-carrying chunks.
    pub itl: Vec<Duration>,
    /// Sending the request → the end of the response.
    pub latency: Duration,
}

impl RequestOutcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }

    /// `(latency - TTFT) / (output_tokens - 1)`, for more than one output token.
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| {
            self.latency.saturating_sub(ttft)
                / u32::try_from(self.output_tokens - 1).unwrap_or(u32::MAX)
        })
    }
}

/// The clock of one streaming request.
struct StreamTiming {
    sent: Instant,
    first_text: Option<Instant>,
    last_text: Option<Instant>,
    itl: Vec<Duration>,
    text_chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl StreamTiming {
    fn new(sent: Instant) -> Self {
        Self {
            sent,
            first_text: None,
            last_text: None,
            itl: Vec::new(),
            text_chunks: 0,
            prompt_tokens: None,
            completion_tokens: None,
        }
    }

    /// One event's data, received at `at`; an error in the stream ends it.
    fn on_event(&mut self, data: &str, at: Instant) -> Result<()> {
        if data.trim() == "[DONE]" {
            return Ok(());
        }
        let chunk = read_chunk(data)?;
        if chunk.has_text {
            if let Some(last) = self.last_text {
                self.itl.push(at - last);
            }
            self.first_text.get_or_insert(at);
            self.last_text = Some(at);
            self.text_chunks += 1;
        }
        self.prompt_tokens = chunk.prompt_tokens.or(self.prompt_tokens);
        self.completion_tokens = chunk.completion_tokens.or(self.completion_tokens);
        Ok(())
    }

    fn finish(self, error: Option<String>) -> RequestOutcome {
        let error = error.or_else(|| {
            self.first_text
                .is_none()
                .then(|| "the stream carried no text".to_owned())
        });
        RequestOutcome {
            error,
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.completion_tokens.unwrap_or(self.text_chunks),
            ttft: self.first_text.map(|first| first - self.sent),
            itl: self.itl,
            latency: self.sent.elapsed(),
        }
    }
}

// ---------------------------------------------------------------------------
// Metrics and the report
// ---------------------------------------------------------------------------

/// The `q`-th percentile (0..=100) of sorted values, interpolating linearly
/// between the closest ranks (numpy's default); 0 for no values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let rank = q.clamp(0.0, 100.0) / 100.0 * last as f64;
    let (below, above) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[below] + (sorted[above] - sorted[below]) * (rank - below as f64)
}

/// Mean, median, p90, p99 and (population) standard deviation; all 0 for no
/// values, as vLLM reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub std: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let variance = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            median: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            std: variance.sqrt(),
        }
    }

    fn from_durations(durations: impl Iterator<Item = Duration>) -> Self {
        let millis: Vec<f64> = durations.map(|d| d.as_secs_f64() * 1e3).collect();
        Self::of(&millis)
    }

    fn stats(&self) -> [(&'static str, &'static str, f64); 5] {
        [
            ("mean", "Mean", self.mean),
            ("median", "Median", self.median),
            ("p90", "P90", self.p90),
            ("p99", "P99", self.p99),
            ("std", "Std", self.std),
        ]
    }
}

/// The aggregate numbers of a run; token counts and latencies come from
/// successful requests only.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2el_ms: Summary,
}

impl Metrics {
    pub fn of(requests: &[RequestOutcome], duration: Duration) -> Self {
        let ok: Vec<&RequestOutcome> = requests.iter().filter(|r| r.succeeded()).collect();
        let total_input_tokens = ok.iter().map(|r| r.prompt_tokens.unwrap_or(0)).sum();
        let total_output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
        let seconds = duration.as_secs_f64().max(f64::MIN_POSITIVE);
        Self {
            completed: ok.len(),
            failed: requests.len() - ok.len(),
            total_input_tokens,
            total_output_tokens,
            request_throughput: ok.len() as f64 / seconds,
            output_throughput: total_output_tokens as f64 / seconds,
            total_token_throughput: (total_input_tokens + total_output_tokens) as f64 / seconds,
            ttft_ms: Summary::from_durations(ok.iter().filter_map(|r| r.ttft)),
            tpot_ms: Summary::from_durations(ok.iter().filter_map(|r| r.tpot())),
            itl_ms: Summary::from_durations(ok.iter().flat_map(|r| r.itl.iter().copied())),
            e2el_ms: Summary::from_durations(ok.iter().map(|r| r.latency)),
        }
    }

    /// Each latency metric with its JSON key, its short name and its title.
    fn latencies(&self) -> [(&'static str, &'static str, &'static str, &Summary); 4] {
        [
            ("ttft", "TTFT", "Time to First Token", &self.ttft_ms),
            (
                "tpot",
                "TPOT",
                "Time per Output Token (excl. 1st token)",
                &self.tpot_ms,
            ),
            ("itl", "ITL", "Inter-token Latency", &self.itl_ms),
            ("e2el", "E2EL", "End-to-end Latency", &self.e2el_ms),
        ]
    }
}

/// The result of one run: its settings, the aggregate metrics and every
/// request's measurements (in request order).
#[derive(Clone, Debug)]
pub struct Report {
    pub label: Option<String>,
    pub base_url: String,
    pub endpoint: String,
    pub model: String,
    pub num_prompts: usize,
    pub max_concurrency: Option<usize>,
    pub request_rate: f64,
    pub duration: Duration,
    pub metrics: Metrics,
    pub requests: Vec<RequestOutcome>,
}

impl Report {
    fn new(
        config: &BenchConfig,
        model: String,
        duration: Duration,
        requests: Vec<RequestOutcome>,
    ) -> Self {
        Self {
            label: config.label.clone(),
            base_url: config.base_url.clone(),
            endpoint: config.endpoint.clone(),
            model,
            num_prompts: config.num_prompts,
            max_concurrency: config.max_concurrency,
            request_rate: config.request_rate,
            duration,
            metrics: Metrics::of(&requests, duration),
            requests,
        }
    }

    fn max_concurrency_text(&self) -> String {
        self.max_concurrency
            .map_or_else(|| "unlimited".to_owned(), |c| c.to_string())
    }

    /// The result block of vLLM's and MAX's `benchmark_serving.py`.
    pub fn render_table(&self) -> String {
        let m = &self.metrics;
        let mut out = format!("{:=^50}\n", " Serving Benchmark Result ");
        let mut row = |name: &str, value: String| out.push_str(&format!("{name:<40} {value}\n"));
        row("Model:", self.model.clone());
        row("Maximum request concurrency:", self.max_concurrency_text());
        row("Request rate (req/s):", self.request_rate.to_string());
        row("Successful requests:", m.completed.to_string());
        row("Failed requests:", m.failed.to_string());
        row(
            "Benchmark duration (s):",
            format!("{:.2}", self.duration.as_secs_f64()),
        );
        row("Total input tokens:", m.total_input_tokens.to_string());
        row("Total generated tokens:", m.total_output_tokens.to_string());
        row(
            "Request throughput (req/s):",
            format!("{:.2}", m.request_throughput),
        );
        row(
            "Output token throughput (tok/s):",
            format!("{:.2}", m.output_throughput),
        );
        row(
            "Total token throughput (tok/s):",
            format!("{:.2}", m.total_token_throughput),
        );
        for (_, short, title, summary) in m.latencies() {
            out.push_str(&format!("{:-^50}\n", title));
            for (_, stat, value) in summary.stats() {
                out.push_str(&format!(
                    "{:<40} {:.2}\n",
                    format!("{stat} {short} (ms):"),
                    value
                ));
            }
        }
        out.push_str(&format!("{}\n", "=".repeat(50)));
        out
    }

    /// The same numbers with vLLM's key names (`mean_ttft_ms`, `p99_itl_ms`,
    /// ...), plus per-request lists (seconds, as vLLM stores them).
    pub fn to_json(&self) -> Value {
        let m = &self.metrics;
        let seconds = |d: &Duration| d.as_secs_f64();
        let mut result = json!({
            "label": self.label,
            "base_url": self.base_url,
            "endpoint": self.endpoint,
            "model_id": self.model,
            "num_prompts": self.num_prompts,
            "max_concurrency": self.max_concurrency,
            "request_rate": if self.request_rate.is_finite() { json!(self.request_rate) } else { json!("inf") },
            "duration": self.duration.as_secs_f64(),
            "completed": m.completed,
            "failed": m.failed,
            "total_input_tokens": m.total_input_tokens,
            "total_output_tokens": m.total_output_tokens,
            "request_throughput": m.request_throughput,
            "output_throughput": m.output_throughput,
            "total_token_throughput": m.total_token_throughput,
            "input_lens": self.requests.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>(),
            "output_lens": self.requests.iter().map(|r| r.output_tokens).collect::<Vec<_>>(),
            "ttfts": self.requests.iter().map(|r| r.ttft.as_ref().map(seconds)).collect::<Vec<_>>(),
            "e2els": self.requests.iter().map(|r| seconds(&r.latency)).collect::<Vec<_>>(),
            "itls": self.requests.iter().map(|r| r.itl.iter().map(seconds).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "errors": self.requests.iter().map(|r| r.error.clone().unwrap_or_default()).collect::<Vec<_>>(),
        });
        for (key, _, _, summary) in m.latencies() {
            for (stat, _, value) in summary.stats() {
                result[format!("{stat}_{key}_ms")] = json!(value);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `body` split at the given byte offsets and collect every event.
    fn parse_split(body: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain([body.len()].iter()) {
            events.extend(parser.push(&body[start..cut]));
            start = cut;
        }
        events.extend(parser.finish());
        events
    }

    const BODY: &str = ": keep-alive\r\n\
        data: {\"choices\":[{\"text\":\"héllo\"}]}\r\n\r\n\
        event: message\n\
        data: first line\n\
        data:second line\n\n\
        id: 7\r\
        data: cr only\r\r\
        data: [DONE]\n\n";

    fn expected_events() -> Vec<String> {
        vec![
            "{\"choices\":[{\"text\":\"héllo\"}]}".to_owned(),
            "first line\nsecond line".to_owned(),
            "cr only".to_owned(),
            "[DONE]".to_owned(),
        ]
    }

    #[test]
    fn sse_events_are_the_same_however_the_body_is_split() {
        let body = BODY.as_bytes();
        assert_eq!(parse_split(body, &[]), expected_events());
        for cut in 0..=body.len() {
            assert_eq!(parse_split(body, &[cut]), expected_events(), "cut at {cut}");
        }
        let every_byte: Vec<usize> = (1..body.len()).collect();
        assert_eq!(parse_split(body, &every_byte), expected_events());
        let mut rng = SplitMix64::new(3);
        for _ in 0..200 {
            let mut cuts: Vec<usize> = (0..4)
                .map(|_| rng.below(body.len() as u64) as usize)
                .collect();
            cuts.sort_unstable();
            assert_eq!(parse_split(body, &cuts), expected_events(), "cuts {cuts:?}");
        }
    }

    #[test]
    fn an_sse_event_without_its_blank_line_is_returned_at_the_end() {
        assert_eq!(parse_split(b"data: a\n\ndata: b", &[3]), ["a", "b"]);
        assert_eq!(parse_split(b"data: a\r", &[]), ["a"]);
        assert!(parse_split(b": only a comment\n\n", &[]).is_empty());
    }

    #[test]
    fn percentiles_interpolate_linearly_like_numpy() {
        // numpy.percentile([15, 20, 35, 40, 50], q) for q = 0, 40, 50, 90, 100.
        let values = [15.0, 20.0, 35.0, 40.0, 50.0];
        for (q, expected) in [
            (0.0, 15.0),
            (40.0, 29.0),
            (50.0, 35.0),
            (90.0, 46.0),
            (100.0, 50.0),
        ] {
            assert!((percentile(&values, q) - expected).abs() < 1e-12, "q={q}");
        }
        // numpy.percentile([1, 2, 3, 4], [50, 90, 99]) = [2.5, 3.7, 3.97].
        let values = [1.0, 2.0, 3.0, 4.0];
        assert!((percentile(&values, 50.0) - 2.5).abs() < 1e-12);
        assert!((percentile(&values, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile(&values, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn a_summary_has_the_population_std_and_interpolated_percentiles() {
        let summary = Summary::of(&[4.0, 2.0, 1.0, 3.0]);
        assert_eq!(summary.mean, 2.5);
        assert_eq!(summary.median, 2.5);
        assert!((summary.p90 - 3.7).abs() < 1e-12);
        assert!((summary.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(Summary::of(&[]), Summary::default());
    }

    #[test]
    fn chunks_are_read_for_text_usage_and_errors() {
        let completion = read_chunk(r#"{"choices":[{"index":0,"text":"hi"}]}"#).unwrap();
        assert!(completion.has_text);
        let chat = read_chunk(r#"{"choices":[{"delta":{"content":"hi"}}]}"#).unwrap();
        assert!(chat.has_text);
        let role_only = read_chunk(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#).unwrap();
        assert!(!role_only.has_text);
        let usage =
            read_chunk(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}"#)
                .unwrap();
        assert_eq!(
            usage,
            ChunkContent {
                has_text: false,
                prompt_tokens: Some(5),
                completion_tokens: Some(9),
            }
        );
        let error = read_chunk(r#"{"error":{"message":"out of memory"}}"#).unwrap_err();
        assert!(format!("{error:#}").contains("out of memory"));
        assert!(read_chunk("not json").is_err());
    }

    #[test]
    fn tpot_spreads_the_time_after_the_first_token_over_the_rest() {
        let outcome = RequestOutcome {
            error: None,
            prompt_tokens: Some(10),
            output_tokens: 5,
            ttft: Some(Duration::from_millis(100)),
            itl: Vec::new(),
            latency: Duration::from_millis(500),
        };
        assert_eq!(outcome.tpot(), Some(Duration::from_millis(100)));
        let single = RequestOutcome {
            output_tokens: 1,
            ..outcome
        };
        assert_eq!(single.tpot(), None);
    }

    #[test]
    fn random_lengths_stay_in_the_range_and_prompts_follow_the_seed() {
        let spec = RandomDataset {
            input_len: 100,
            output_len: 10,
            range_ratio: 0.5,
            prompt_form: RandomPromptForm::Words,
        };
        let prompts = random_prompts(&spec, 50, 1);
        assert!(prompts.iter().all(|p| (50..=150).contains(&p.input_len)));
        assert!(prompts.iter().all(|p| (5..=15).contains(&p.output_len)));
        let Prompt::Text(text) = &prompts[0].prompt else {
            panic!("words make text")
        };
        assert_eq!(text.split(' ').count(), prompts[0].input_len);
        assert_eq!(prompts, random_prompts(&spec, 50, 1));
        assert_ne!(prompts, random_prompts(&spec, 50, 2));
        let ids = RandomDataset {
            prompt_form: RandomPromptForm::TokenIds { vocab_size: 5 },
            range_ratio: 0.0,
            ..spec
        };
        for prompt in random_prompts(&ids, 20, 0) {
            let Prompt::TokenIds(ids) = prompt.prompt else {
                panic!("ids")
            };
            assert_eq!(ids.len(), 100);
            assert!(ids.iter().all(|&id| (1..5).contains(&id)));
        }
    }

    #[test]
    fn poisson_gaps_average_one_over_the_rate() {
        let mut arrivals = PoissonArrivals::new(50.0, 0);
        let mean = (0..20_000)
            .map(|_| arrivals.next_gap().as_secs_f64())
            .sum::<f64>()
            / 20_000.0;
        assert!((mean - 0.02).abs() < 0.001, "mean gap {mean}");
        assert_eq!(
            PoissonArrivals::new(f64::INFINITY, 0).next_gap(),
            Duration::ZERO
        );
    }

    #[test]
    fn dataset_lines_take_a_prompt_or_a_sharegpt_conversation() {
        let plain = dataset_line(r#"{"prompt": "a b c", "max_tokens": 7}"#, 64).unwrap();
        assert_eq!(plain.prompt, Prompt::Text("a b c".into()));
        assert_eq!((plain.input_len, plain.output_len), (3, 7));
        let share = dataset_line(
            r#"{"conversations": [{"from": "human", "value": "hi there"}, {"value": "x"}]}"#,
            64,
        )
        .unwrap();
        assert_eq!(share.prompt, Prompt::Text("hi there".into()));
        assert_eq!(share.output_len, 64);
        assert!(dataset_line(r#"{"prompt": "a", "max_tokens": 0}"#, 64).is_err());
        assert!(dataset_line(r#"{"text": "a"}"#, 64).is_err());
    }
}
