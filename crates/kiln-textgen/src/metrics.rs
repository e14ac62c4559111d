//! What a text-generation engine measures about its serving (time to first
//! token, inter-token latency, queue time, batch sizes, KV-cache use, prefix
//! cache hits), kept in fixed-bucket histograms and counters, and written in
//! Prometheus' text format under vLLM-style names (`kiln_llm_*`).

use std::fmt::Write;
use std::sync::Mutex;

/// Latency buckets in seconds (vLLM's TTFT buckets, extended downwards for
/// the CPU's small models).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
];
/// Sequences per engine step.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0,
];

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations `<= bounds[i]`, not cumulative (one per bucket, plus +Inf).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Everything one engine reports.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineMetrics {
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub queue_time: Histogram,
    pub e2e_latency: Histogram,
    pub batch_size: Histogram,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub kv_cache_usage: f64,
    pub kv_cache_blocks: usize,
    pub running: usize,
    pub waiting: usize,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(LATENCY_BUCKETS),
            queue_time: Histogram::new(LATENCY_BUCKETS),
            e2e_latency: Histogram::new(LATENCY_BUCKETS),
            batch_size: Histogram::new(BATCH_BUCKETS),
            prompt_tokens: 0,
            generation_tokens: 0,
            preemptions: 0,
            prefix_queried_tokens: 0,
            prefix_hit_tokens: 0,
            kv_cache_usage: 0.0,
            kv_cache_blocks: 0,
            running: 0,
            waiting: 0,
        }
    }
}

/// An engine's metrics behind a lock: the engine thread writes, scrapes copy.
#[derive(Debug, Default)]
pub struct SharedMetrics(Mutex<EngineMetrics>);

impl SharedMetrics {
    /// Change the metrics (a poisoned lock is recovered: metrics are plain data).
    pub fn update(&self, change: impl FnOnce(&mut EngineMetrics)) {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut guard);
    }

    pub fn snapshot(&self) -> EngineMetrics {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A metric family: its name, help, type and how to read it from one engine.
enum Family {
    Histogram(fn(&EngineMetrics) -> &Histogram),
    Counter(fn(&EngineMetrics) -> f64),
    Gauge(fn(&EngineMetrics) -> f64),
}

const FAMILIES: &[(&str, &str, Family)] = &[
    (
        "kiln_llm_time_to_first_token_seconds",
        "Time from submission to the first generated token.",
        Family::Histogram(|m| &m.time_to_first_token),
    ),
    (
        "kiln_llm_inter_token_latency_seconds",
        "Time between successive tokens of one request.",
        Family::Histogram(|m| &m.inter_token_latency),
    ),
    (
        "kiln_llm_request_queue_time_seconds",
        "Time a request waited before its first scheduled step.",
        Family::Histogram(|m| &m.queue_time),
    ),
    (
        "kiln_llm_e2e_request_latency_seconds",
        "Time from submission to the last token.",
        Family::Histogram(|m| &m.e2e_latency),
    ),
    (
        "kiln_llm_batch_size",
        "Sequences in each engine step.",
        Family::Histogram(|m| &m.batch_size),
    ),
    (
        "kiln_llm_prompt_tokens",
        "Prompt tokens of finished requests.",
        Family::Counter(|m| m.prompt_tokens as f64),
    ),
    (
        "kiln_llm_generation_tokens",
        "Tokens generated.",
        Family::Counter(|m| m.generation_tokens as f64),
    ),
    (
        "kiln_llm_num_preemptions",
        "Sequences preempted (to be recomputed) when the KV cache ran out.",
        Family::Counter(|m| m.preemptions as f64),
    ),
    (
        "kiln_llm_prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        Family::Counter(|m| m.prefix_queried_tokens as f64),
    ),
    (
        "kiln_llm_prefix_cache_hits",
        "Prompt tokens found in the prefix cache.",
        Family::Counter(|m| m.prefix_hit_tokens as f64),
    ),
    (
        "kiln_llm_kv_cache_usage_ratio",
        "Share of KV-cache blocks held by sequences (0 to 1).",
        Family::Gauge(|m| m.kv_cache_usage),
    ),
    (
        "kiln_llm_kv_cache_blocks",
        "KV-cache blocks in the pool.",
        Family::Gauge(|m| m.kv_cache_blocks as f64),
    ),
    (
        "kiln_llm_num_requests_running",
        "Requests in the running batch.",
        Family::Gauge(|m| m.running as f64),
    ),
    (
        "kiln_llm_num_requests_waiting",
        "Requests waiting to be scheduled.",
        Family::Gauge(|m| m.waiting as f64),
    ),
];

/// Every engine's metrics in the text exposition (OpenMetrics: counter
/// families are named without `_total`, their samples with it), labelled by
/// model; the caller places it before the document's `# EOF`.
pub fn render_prometheus(engines: &[(String, EngineMetrics)]) -> String {
    let mut out = String::new();
    if engines.is_empty() {
        return out;
    }
    for (name, help, family) in FAMILIES {
        let kind = match family {
            Family::Histogram(_) => "histogram",
            Family::Counter(_) => "counter",
            Family::Gauge(_) => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (model, metrics) in engines {
            let model = escape_label(model);
            match family {
                Family::Histogram(read) => write_histogram(&mut out, name, &model, read(metrics)),
                Family::Counter(read) => {
                    let _ = writeln!(out, "{name}_total{{model=\"{model}\"}} {}", read(metrics));
                }
                Family::Gauge(read) => {
                    let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", read(metrics));
                }
            }
        }
    }
    out
}

fn write_histogram(out: &mut String, name: &str, model: &str, h: &Histogram) {
    let mut cumulative = 0;
    for (bound, count) in h.bounds.iter().zip(&h.counts) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{model}\",le=\"{bound:?}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count);
}

/// A label value as the text format wants it (`\`, `"` and newlines escaped).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_text_format() {
        let mut m = EngineMetrics::default();
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(1000.0);
        m.prefix_hit_tokens = 32;
        let text = render_prometheus(&[("a\"b".into(), m)]);
        assert!(text.contains(
            "kiln_llm_time_to_first_token_seconds_bucket{model=\"a\\\"b\",le=\"0.0025\"} 0\n"
        ));
        assert!(text.contains(
            "kiln_llm_time_to_first_token_seconds_bucket{model=\"a\\\"b\",le=\"0.005\"} 2\n"
        ));
        assert!(text.contains(
            "kiln_llm_time_to_first_token_seconds_bucket{model=\"a\\\"b\",le=\"+Inf\"} 3\n"
        ));
        assert!(text.contains("kiln_llm_time_to_first_token_seconds_count{model=\"a\\\"b\"} 3\n"));
        assert!(text.contains("kiln_llm_prefix_cache_hits_total{model=\"a\\\"b\"} 32\n"));
        assert_eq!(
            text.matches("# TYPE kiln_llm_batch_size histogram").count(),
            1
        );
    }
}
