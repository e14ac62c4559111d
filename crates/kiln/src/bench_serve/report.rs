//! What `kiln bench serve` measures and prints: per-request timings, their
//! percentile summaries, the aggregate metrics and the table/JSON report.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use super::BenchConfig;
use super::sse::read_chunk;

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
pub(super) struct StreamTiming {
    sent: Instant,
    first_text: Option<Instant>,
    last_text: Option<Instant>,
    itl: Vec<Duration>,
    text_chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl StreamTiming {
    pub(super) fn new(sent: Instant) -> Self {
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
    pub(super) fn on_event(&mut self, data: &str, at: Instant) -> Result<()> {
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

    pub(super) fn finish(self, error: Option<String>) -> RequestOutcome {
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
    pub(super) fn new(
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
}
