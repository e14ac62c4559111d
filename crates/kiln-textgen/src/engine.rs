//! The seam between protocols and generation: a request goes in, a stream of
//! token events comes out (`submit`), a dropped or aborted stream stops its
//! work, and `health` reports free capacity, as TGI's `Backend` and vLLM's
//! engine client do. [`SerialEngine`] runs one sequence at a time on its own
//! thread; a batching engine slots in behind the same trait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::bundle::LanguageModel;
use crate::error::TextGenError;
use crate::inbox::{Counters, Inbox, Submission};
use crate::metrics::EngineMetrics;
use crate::sampling::{Sampler, SamplingParams, log_softmax, top_entries};
use crate::stop::{StopMatcher, StopOutcome};
use crate::tokenizer::IncrementalDecoder;

/// The most `top_logprobs` a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One sequence to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Strings that end generation (not returned).
    pub stop: Vec<String>,
    /// Ids that end generation besides the model's EOS ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS ids.
    pub ignore_eos: bool,
    /// `Some(n)`: report each token's log-probability and the `n` most likely.
    pub logprobs: Option<usize>,
}

impl GenerationRequest {
    /// Greedy decoding of exactly `max_tokens` tokens (EOS ignored, no stops):
    /// what parity checks and benchmarks run.
    pub fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        GenerationRequest {
            prompt_ids,
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            logprobs: None,
        }
    }
}

/// A token and its log-probability under the raw logits.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token's own text (may hold a partial character as U+FFFD).
    pub token: String,
    pub logprob: f32,
    /// The most likely alternatives, most likely first.
    pub top: Vec<(u32, String, f32)>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// A generated token and the text it releases (possibly empty: held back
    /// for a stop string or an incomplete character).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end: the remaining text, the reason and the token counts.
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        details: FinishDetails,
    },
    /// Generation failed part-way.
    Failed(TextGenError),
}

/// Where a request's time went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTimings {
    /// Submitted → first scheduled.
    pub queue: f64,
    /// Submitted → first token sampled.
    pub time_to_first_token: f64,
    /// First token → last token.
    pub decode: f64,
}

impl RequestTimings {
    /// From the instants a request was submitted, first scheduled and got
    /// its first token, up to now.
    pub fn measured(submitted: Instant, scheduled: Instant, first_token: Option<Instant>) -> Self {
        let now = Instant::now();
        let first = first_token.unwrap_or(now);
        RequestTimings {
            queue: scheduled.saturating_duration_since(submitted).as_secs_f64(),
            time_to_first_token: first.saturating_duration_since(submitted).as_secs_f64(),
            decode: now.saturating_duration_since(first).as_secs_f64(),
        }
    }
}

/// What a finished request reports besides its text.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FinishDetails {
    /// Prompt tokens whose keys and values came from the prefix cache
    /// (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    pub timings: RequestTimings,
}

impl FinishDetails {
    /// OpenAI's `usage` object, with `prompt_tokens_details.cached_tokens`.
    pub fn usage_json(&self, prompt_tokens: usize, completion_tokens: usize) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    /// Per-request timings in llama-server's `timings` shape (milliseconds;
    /// `cache_n` prompt tokens came from the prefix cache), plus the queue time.
    pub fn timings_json(
        &self,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) -> serde_json::Value {
        let t = &self.timings;
        let ms = |s: f64| (s * 1e6).round() / 1e3;
        let prompt_ms = ms((t.time_to_first_token - t.queue).max(0.0));
        let per_second = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
        let computed = prompt_tokens.saturating_sub(self.cached_tokens);
        let decoded = completion_tokens.saturating_sub(1);
        serde_json::json!({
            "queue_ms": ms(t.queue),
            "ttft_ms": ms(t.time_to_first_token),
            "cache_n": self.cached_tokens,
            "prompt_n": computed,
            "prompt_ms": prompt_ms,
            "prompt_per_second": per_second(computed, prompt_ms),
            "predicted_n": completion_tokens,
            "predicted_ms": ms(t.decode),
            "predicted_per_second": per_second(decoded, ms(t.decode)),
        })
    }
}

/// Stops a sequence from outside; dropping the stream does the same.
#[derive(Debug, Clone, Default)]
pub struct AbortHandle(Arc<AtomicBool>);

impl AbortHandle {
    pub fn abort(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_aborted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The events of one submitted request.
pub struct GenerationStream {
    events: UnboundedReceiver<GenerationEvent>,
    abort: AbortHandle,
}

impl GenerationStream {
    /// A new stream and the sender its engine feeds (for engines implementing
    /// [`TextGeneration`]); the handle tells the engine when to stop.
    pub fn channel() -> (
        UnboundedSender<GenerationEvent>,
        AbortHandle,
        GenerationStream,
    ) {
        let (events, receiver) = unbounded_channel();
        let abort = AbortHandle::default();
        let stream = GenerationStream {
            events: receiver,
            abort: abort.clone(),
        };
        (events, abort, stream)
    }

    /// The next event (async); `None` after the last.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }

    /// The next event, blocking this thread (CLI use, never on an async thread).
    pub fn next_blocking(&mut self) -> Option<GenerationEvent> {
        self.events.blocking_recv()
    }

    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

/// How busy an engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineHealth {
    /// Sequences generating now.
    pub running: usize,
    /// Sequences waiting to start.
    pub waiting: usize,
    /// Sequences it runs at once.
    pub capacity: usize,
    /// Tokens generated since start.
    pub generated_tokens: u64,
    /// Sequences stopped because their client went away or aborted them.
    pub aborted: u64,
}

impl EngineHealth {
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.running + self.waiting)
    }
}

/// What protocols talk to.
pub trait TextGeneration: Send + Sync {
    /// The model, for prompt building (templates, tokenizer) and limits.
    fn model(&self) -> &LanguageModel;
    /// Start generating; events arrive on the returned stream.
    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, TextGenError>;
    fn health(&self) -> EngineHealth;
    /// Serving metrics, for engines that keep them.
    fn metrics(&self) -> Option<EngineMetrics> {
        None
    }
}

/// Runs sequences one after another on a dedicated thread.
pub struct SerialEngine {
    model: Arc<LanguageModel>,
    inbox: Inbox,
    counters: Arc<Counters>,
}

impl SerialEngine {
    pub fn start(model: LanguageModel) -> Result<Self, TextGenError> {
        let model = Arc::new(model);
        let (inbox, receiver) = Inbox::new();
        let counters = Arc::new(Counters::default());
        let (worker_model, worker_counters) = (Arc::clone(&model), Arc::clone(&counters));
        std::thread::Builder::new()
            .name("kiln-textgen".into())
            .spawn(move || {
                let c = &worker_counters;
                for job in receiver {
                    c.waiting.fetch_sub(1, Ordering::SeqCst);
                    c.running.fetch_add(1, Ordering::SeqCst);
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_sequence(&worker_model, &job, c)
                    }));
                    let failure = match outcome {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e),
                        Err(_) => Some(TextGenError::Engine("the model panicked".into())),
                    };
                    if let Some(e) = failure {
                        let _ = job.events.send(GenerationEvent::Failed(e));
                    }
                    c.running.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|e| TextGenError::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok(SerialEngine {
            model,
            inbox,
            counters,
        })
    }
}

impl TextGeneration for SerialEngine {
    fn model(&self) -> &LanguageModel {
        &self.model
    }

    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, TextGenError> {
        validate(&self.model, &request)?;
        self.inbox.submit(request, &self.counters)
    }

    fn health(&self) -> EngineHealth {
        self.counters.health(1)
    }
}

/// The rules every engine applies before accepting a request.
pub fn validate(model: &LanguageModel, request: &GenerationRequest) -> Result<(), TextGenError> {
    request.sampling.validate()?;
    if request.prompt_ids.is_empty() {
        return Err(TextGenError::invalid(
            "prompt",
            "the prompt is empty (no tokens)",
        ));
    }
    if request.max_tokens == 0 {
        return Err(TextGenError::invalid("max_tokens", "must be at least 1"));
    }
    if let Some(n) = request.logprobs
        && n > MAX_TOP_LOGPROBS
    {
        return Err(TextGenError::invalid(
            "top_logprobs",
            format!("must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    let vocab = model.model.config().vocab_size;
    if let Some(bad) = request.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(TextGenError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let prompt = request.prompt_ids.len();
    if prompt + request.max_tokens > model.context_length {
        return Err(TextGenError::ContextLength {
            context: model.context_length,
            prompt,
            requested: Some(request.max_tokens),
        });
    }
    Ok(())
}

fn logprob_of(
    model: &LanguageModel,
    raw: &[f32],
    id: u32,
    top: usize,
) -> Result<TokenLogprob, TextGenError> {
    let logprobs = log_softmax(raw);
    let spell = |id: u32| model.tokenizer.decode(&[id], false);
    let top = top_entries(&logprobs, top)
        .into_iter()
        .map(|(t, lp)| Ok((t, spell(t)?, lp)))
        .collect::<Result<Vec<_>, TextGenError>>()?;
    Ok(TokenLogprob {
        id,
        token: spell(id)?,
        logprob: logprobs
            .get(id as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY),
        top,
    })
}

/// One sequence's output side, shared by every engine: the sampler, the
/// incremental detokeniser, stop strings, the tokens so far, and the events
/// sent for them.
pub(crate) struct SequenceOutput {
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    pub(crate) tokens: Vec<u32>,
    first_token_at: Option<Instant>,
}

impl SequenceOutput {
    pub(crate) fn new(request: &GenerationRequest) -> Self {
        SequenceOutput {
            sampler: Sampler::new(request.sampling.clone()),
            decoder: IncrementalDecoder::new(),
            stops: StopMatcher::new(request.stop.clone()),
            tokens: Vec::with_capacity(request.max_tokens),
            first_token_at: None,
        }
    }

    pub(crate) fn first_token_at(&self) -> Option<Instant> {
        self.first_token_at
    }

    /// Pick the next token from `raw` logits and send what it releases.
    /// Returns how the sequence ended, or `None` while it goes on.
    pub(crate) fn push(
        &mut self,
        model: &LanguageModel,
        request: &GenerationRequest,
        raw: &[f32],
        events: &UnboundedSender<GenerationEvent>,
    ) -> Result<Option<(String, FinishReason)>, TextGenError> {
        let id = self.sampler.sample(raw, &request.prompt_ids, &self.tokens);
        self.tokens.push(id);
        self.first_token_at.get_or_insert_with(Instant::now);
        let is_stop_id = model.eos_token_ids.contains(&id) || request.stop_token_ids.contains(&id);
        if is_stop_id && !request.ignore_eos {
            let rest = self.decoder.finish(&model.tokenizer)?;
            let rest = match self.stops.push(&rest) {
                StopOutcome::Continue(t) => t + &self.stops.finish(),
                StopOutcome::Stopped(t) => t,
            };
            return Ok(Some((rest, FinishReason::Stop)));
        }
        let logprob = match request.logprobs {
            Some(top) => Some(logprob_of(model, raw, id, top)?),
            None => None,
        };
        let piece = self.decoder.push(&model.tokenizer, id)?;
        match self.stops.push(&piece) {
            StopOutcome::Stopped(text) => {
                let _ = events.send(GenerationEvent::Token { id, text, logprob });
                return Ok(Some((String::new(), FinishReason::Stop)));
            }
            StopOutcome::Continue(text) => {
                let _ = events.send(GenerationEvent::Token { id, text, logprob });
            }
        }
        if self.tokens.len() >= request.max_tokens {
            let rest = self.decoder.finish(&model.tokenizer)?;
            return Ok(Some(match self.stops.push(&rest) {
                StopOutcome::Continue(t) => (t + &self.stops.finish(), FinishReason::Length),
                StopOutcome::Stopped(t) => (t, FinishReason::Stop),
            }));
        }
        Ok(None)
    }

    /// The closing event.
    pub(crate) fn finished(
        &self,
        request: &GenerationRequest,
        text: String,
        reason: FinishReason,
        details: FinishDetails,
    ) -> GenerationEvent {
        GenerationEvent::Finished {
            text,
            reason,
            prompt_tokens: request.prompt_ids.len(),
            completion_tokens: self.tokens.len(),
            details,
        }
    }
}

/// Generate one sequence, sending its events; stops early when aborted or when
/// nobody listens any more.
fn run_sequence(
    model: &LanguageModel,
    job: &Submission,
    counters: &Counters,
) -> Result<(), TextGenError> {
    let request = &job.request;
    let net = &model.model;
    let started = Instant::now();
    let mut cache = net.new_cache();
    let mut output = SequenceOutput::new(request);
    let gone = || {
        let gone = job.abort.is_aborted() || job.events.is_closed();
        if gone {
            counters.aborted.fetch_add(1, Ordering::SeqCst);
        }
        gone
    };
    if gone() {
        return Ok(());
    }
    let mut logits = net.next_logits(&request.prompt_ids, &mut cache)?;
    loop {
        if gone() {
            return Ok(());
        }
        let raw: Vec<f32> = logits.to_vec1()?;
        let outcome = output.push(model, request, &raw, &job.events)?;
        counters.generated.fetch_add(1, Ordering::SeqCst);
        if let Some((text, reason)) = outcome {
            let details = FinishDetails {
                cached_tokens: 0,
                timings: RequestTimings::measured(job.submitted, started, output.first_token_at()),
            };
            let _ = job
                .events
                .send(output.finished(request, text, reason, details));
            return Ok(());
        }
        let last = output.tokens[output.tokens.len() - 1];
        logits = net.next_logits(&[last], &mut cache)?;
    }
}
