//! Continuous batching over a paged KV cache, as vLLM's and MAX's engines do:
//! one thread runs engine steps; each step takes every running sequence's next
//! token (decodes first, so a long prompt never stalls them), then chunks of
//! prompts up to a token budget, admits waiting requests first come first
//! served (reusing cached prefix blocks), preempts the latest arrivals for
//! recomputation when blocks run out, and runs all of it as one batched
//! forward pass.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use kiln_models::llm::{PagedKvCache, PagedSequence};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::bundle::LanguageModel;
use crate::engine::{
    AbortHandle, EngineHealth, FinishDetails, GenerationEvent, GenerationRequest, GenerationStream,
    RequestTimings, SequenceOutput, TextGeneration, validate,
};
use crate::error::TextGenError;
use crate::inbox::{Counters, Inbox, Submission};
use crate::kv_blocks::{BlockId, BlockPool};
use crate::metrics::{EngineMetrics, SharedMetrics};

/// How the engine batches; `[[models]] config` keys of the same names.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Sequences in one step at most (vLLM's `max_num_seqs`).
    pub max_batch_size: usize,
    /// Tokens (prompt chunks and decodes together) in one step at most.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Memory for the KV cache; `None`: enough for `max_batch_size` full
    /// contexts, capped at the larger of 2 GiB and the weights' size, and
    /// never less than one full context.
    pub kv_cache_bytes: Option<u64>,
    /// Share full blocks between requests with the same prefix.
    pub prefix_caching: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_size: 32,
            max_num_batched_tokens: 512,
            block_size: 16,
            kv_cache_bytes: None,
            prefix_caching: true,
        }
    }
}

const DEFAULT_KV_CAP: u64 = 2 << 30;

impl BatchConfig {
    /// Read the batching keys of a model's config object (others are left to
    /// their owners); a wrong value is an error naming its key.
    pub fn from_json(config: &Value) -> Result<Self, TextGenError> {
        let mut out = BatchConfig::default();
        let count = |key: &str, min: usize| -> Result<Option<usize>, TextGenError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n as usize >= min => Ok(Some(n as usize)),
                    _ => Err(TextGenError::invalid(
                        key,
                        format!("must be an integer of at least {min}"),
                    )),
                },
            }
        };
        out.max_batch_size = count("max_batch_size", 1)?.unwrap_or(out.max_batch_size);
        out.max_num_batched_tokens =
            count("max_num_batched_tokens", 1)?.unwrap_or(out.max_num_batched_tokens);
        out.block_size = count("kv_cache_block_size", 1)?.unwrap_or(out.block_size);
        out.kv_cache_bytes = match config.get("kv_cache_bytes") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(
                kiln_engine::units::parse_bytes(text)
                    .map_err(|e| TextGenError::invalid("kv_cache_bytes", e))?,
            ),
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                TextGenError::invalid("kv_cache_bytes", "must be a byte count or a size like 2GiB")
            })?),
        };
        out.prefix_caching = match config.get("prefix_caching") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(TextGenError::invalid(
                    "prefix_caching",
                    "must be true or false",
                ));
            }
        };
        // Every running sequence decodes in each step (as vLLM requires).
        if out.max_num_batched_tokens < out.max_batch_size {
            return Err(TextGenError::invalid(
                "max_num_batched_tokens",
                format!(
                    "must be at least max_batch_size ({}), so that every running sequence \
                     decodes in each step",
                    out.max_batch_size
                ),
            ));
        }
        Ok(out)
    }

    /// Blocks in the pool for `model` whose weights take `weight_bytes`.
    pub fn num_blocks(&self, model: &LanguageModel, weight_bytes: u64) -> usize {
        let per_block = PagedKvCache::bytes_per_block(model.model.config(), self.block_size).max(1);
        let one_context = model.context_length.div_ceil(self.block_size) as u64;
        let budget = self.kv_cache_bytes.unwrap_or_else(|| {
            let full = one_context * per_block * self.max_batch_size as u64;
            full.min(DEFAULT_KV_CAP.max(weight_bytes))
                .max(one_context * per_block)
        });
        (budget / per_block).max(1) as usize
    }
}

/// A request inside the engine.
struct Sequence {
    arrival: u64,
    request: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    abort: AbortHandle,
    submitted: Instant,
    scheduled_at: Option<Instant>,
    last_token_at: Option<Instant>,
    output: SequenceOutput,
    /// The prompt, then every generated token: what the cache must hold.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in `blocks`.
    computed: usize,
    blocks: Vec<BlockId>,
    /// The hash of each full block registered in the prefix cache.
    hashes: Vec<u64>,
    /// Prompt tokens found in the prefix cache when first admitted.
    cached_tokens: Option<usize>,
    /// Preempted this step (its blocks are already released).
    preempted: bool,
}

impl Sequence {
    fn new(arrival: u64, s: Submission) -> Self {
        Sequence {
            arrival,
            output: SequenceOutput::new(&s.request),
            tokens: s.request.prompt_ids.clone(),
            request: s.request,
            events: s.events,
            abort: s.abort,
            submitted: s.submitted,
            scheduled_at: None,
            last_token_at: None,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: None,
            preempted: false,
        }
    }

    fn gone(&self) -> bool {
        self.abort.is_aborted() || self.events.is_closed()
    }

    fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Give every block back and start over from nothing (recompute).
    fn reset(&mut self, pool: &mut BlockPool) {
        pool.release(&self.blocks);
        self.blocks.clear();
        self.hashes.clear();
        self.computed = 0;
    }

    /// Put each newly full block into the prefix cache.
    fn register_full_blocks(&mut self, pool: &mut BlockPool) {
        let bs = pool.block_size();
        while (self.hashes.len() + 1) * bs <= self.computed {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or_else(BlockPool::root);
            let hash =
                pool.register_full(self.blocks[i], parent, &self.tokens[i * bs..(i + 1) * bs]);
            self.hashes.push(hash);
        }
    }
}

/// The continuous-batching engine.
pub struct BatchEngine {
    model: Arc<LanguageModel>,
    inbox: Inbox,
    counters: Arc<Counters>,
    metrics: Arc<SharedMetrics>,
    config: BatchConfig,
    capacity_tokens: usize,
}

impl BatchEngine {
    /// Start the engine thread for `model` (CPU), with a KV pool sized by
    /// `config` (`weight_bytes`: the model's files, for the default budget).
    pub fn start(
        model: LanguageModel,
        config: BatchConfig,
        weight_bytes: u64,
    ) -> Result<Self, TextGenError> {
        let num_blocks = config.num_blocks(&model, weight_bytes);
        let model = Arc::new(model);
        let (inbox, receiver) = Inbox::new();
        let counters = Arc::new(Counters::default());
        let metrics = Arc::new(SharedMetrics::default());
        metrics.update(|m| m.kv_cache_blocks = num_blocks);
        let mut worker = Worker {
            cache: PagedKvCache::new(model.model.config(), config.block_size, num_blocks),
            pool: BlockPool::new(num_blocks, config.block_size, config.prefix_caching),
            model: Arc::clone(&model),
            config: config.clone(),
            counters: Arc::clone(&counters),
            metrics: Arc::clone(&metrics),
            running: Vec::new(),
            waiting: VecDeque::new(),
            arrivals: 0,
        };
        std::thread::Builder::new()
            .name("kiln-batching".into())
            .spawn(move || worker.run(receiver))
            .map_err(|e| TextGenError::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok(BatchEngine {
            model,
            inbox,
            counters,
            metrics,
            capacity_tokens: num_blocks * config.block_size,
            config,
        })
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Tokens the KV pool holds in all.
    pub fn capacity_tokens(&self) -> usize {
        self.capacity_tokens
    }
}

impl TextGeneration for BatchEngine {
    fn model(&self) -> &LanguageModel {
        &self.model
    }

    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, TextGenError> {
        validate(&self.model, &request)?;
        let needed = request.prompt_ids.len() + request.max_tokens;
        if needed > self.capacity_tokens {
            return Err(TextGenError::invalid(
                "max_tokens",
                format!(
                    "the prompt ({} tokens) and max_tokens ({}) need {needed} tokens of KV cache; \
                     this model's cache holds {} (raise kv_cache_bytes in its config)",
                    request.prompt_ids.len(),
                    request.max_tokens,
                    self.capacity_tokens
                ),
            ));
        }
        self.inbox.submit(request, &self.counters)
    }

    fn health(&self) -> EngineHealth {
        self.counters.health(self.config.max_batch_size)
    }

    fn metrics(&self) -> Option<EngineMetrics> {
        Some(self.metrics.snapshot())
    }
}

/// One sequence's share of a step: its index in `running` and its new tokens.
struct Scheduled {
    index: usize,
    tokens: usize,
}

/// The engine thread's state.
struct Worker {
    model: Arc<LanguageModel>,
    config: BatchConfig,
    cache: PagedKvCache,
    pool: BlockPool,
    counters: Arc<Counters>,
    metrics: Arc<SharedMetrics>,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    arrivals: u64,
}

impl Worker {
    fn run(&mut self, submissions: mpsc::Receiver<Submission>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                match submissions.recv() {
                    Ok(s) => self.accept(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = submissions.try_recv() {
                self.accept(s);
            }
            self.drop_gone();
            let plan = self.schedule();
            if plan.is_empty() {
                // Nothing fits now (cannot happen with an empty batch, since
                // every request fits the pool alone); wait for a change.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            self.step(&plan);
            self.publish();
        }
    }

    fn accept(&mut self, submission: Submission) {
        self.arrivals += 1;
        self.waiting
            .push_back(Sequence::new(self.arrivals, submission));
    }

    /// Forget sequences whose client left or aborted, freeing their blocks.
    fn drop_gone(&mut self) {
        let pool = &mut self.pool;
        let mut aborted = 0;
        let mut keep = |s: &mut Sequence| {
            if s.gone() {
                s.reset(pool);
                aborted += 1;
                false
            } else {
                true
            }
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(&mut keep);
        self.counters.aborted.fetch_add(aborted, Ordering::SeqCst);
    }

    /// Decide this step's batch: decodes, then prompt chunks of running
    /// sequences, then new admissions, within the token budget.
    fn schedule(&mut self) -> Vec<Scheduled> {
        self.running.sort_by_key(|s| s.arrival);
        let mut budget = self.config.max_num_batched_tokens;
        let mut plan = Vec::new();
        let mut scheduled = vec![false; self.running.len()];
        let decodes = (0..self.running.len()).filter(|&i| self.running[i].remaining() == 1);
        let prefills = (0..self.running.len()).filter(|&i| self.running[i].remaining() > 1);
        let order: Vec<usize> = decodes.chain(prefills).collect();
        for index in order {
            if budget == 0 {
                break;
            }
            if self.running[index].preempted {
                continue;
            }
            let tokens = self.running[index].remaining().min(budget);
            if self.grow(index, tokens, &scheduled) {
                scheduled[index] = true;
                plan.push(Scheduled { index, tokens });
                budget -= tokens;
            }
        }
        // As vLLM: no admissions in a step that had to preempt.
        if !self.running.iter().any(|s| s.preempted) {
            self.admit(&mut budget, &mut plan);
        }
        self.requeue_preempted(&mut plan);
        plan
    }

    /// Give `running[index]` blocks for `tokens` more tokens, preempting the
    /// latest unscheduled arrivals when the pool is short; when even that is
    /// not enough, the sequence itself is preempted (returns false).
    fn grow(&mut self, index: usize, tokens: usize, scheduled: &[bool]) -> bool {
        let seq = &self.running[index];
        let need = self
            .pool
            .blocks_for(seq.computed + tokens)
            .saturating_sub(seq.blocks.len());
        while self.pool.free_blocks() < need {
            let victim = (0..self.running.len())
                .filter(|&j| j != index && !scheduled[j] && !self.running[j].preempted)
                .max_by_key(|&j| self.running[j].arrival);
            match victim {
                Some(j) => self.preempt(j),
                None => {
                    self.preempt(index);
                    return false;
                }
            }
        }
        for _ in 0..need {
            // The loop above made room for every one.
            if let Some(block) = self.pool.allocate() {
                self.running[index].blocks.push(block);
            }
        }
        true
    }

    fn preempt(&mut self, index: usize) {
        let seq = &mut self.running[index];
        seq.reset(&mut self.pool);
        seq.preempted = true;
        self.metrics.update(|m| m.preemptions += 1);
    }

    /// Move preempted sequences back to the waiting queue (first come, first
    /// served: they arrived before anything still waiting), fixing `plan`'s
    /// indices.
    fn requeue_preempted(&mut self, plan: &mut [Scheduled]) {
        if !self.running.iter().any(|s| s.preempted) {
            return;
        }
        let mut new_index = Vec::with_capacity(self.running.len());
        let mut kept = Vec::with_capacity(self.running.len());
        for mut seq in self.running.drain(..) {
            if seq.preempted {
                seq.preempted = false;
                new_index.push(usize::MAX);
                self.waiting.push_back(seq);
            } else {
                new_index.push(kept.len());
                kept.push(seq);
            }
        }
        self.running = kept;
        for s in plan.iter_mut() {
            s.index = new_index[s.index];
        }
        self.waiting.make_contiguous().sort_by_key(|s| s.arrival);
    }

    /// Admit waiting sequences in arrival order while the batch, the budget
    /// and the pool allow, each with its cached prefix.
    fn admit(&mut self, budget: &mut usize, plan: &mut Vec<Scheduled>) {
        while *budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let hit = self.pool.lookup_prefix(&seq.tokens);
            let cached = hit.blocks.len() * self.pool.block_size();
            seq.blocks = hit.blocks;
            seq.hashes = hit.hashes;
            seq.computed = cached;
            let tokens = seq.remaining().min(*budget);
            let need = self.pool.blocks_for(seq.computed + tokens) - seq.blocks.len();
            if self.pool.free_blocks() < need {
                seq.reset(&mut self.pool);
                break;
            }
            for _ in 0..need {
                if let Some(block) = self.pool.allocate() {
                    seq.blocks.push(block);
                }
            }
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(cached);
                let (queried, hit) = (seq.tokens.len() as u64, cached as u64);
                self.metrics.update(|m| {
                    m.prefix_queried_tokens += queried;
                    m.prefix_hit_tokens += hit;
                });
            }
            if seq.scheduled_at.is_none() {
                let now = Instant::now();
                seq.scheduled_at = Some(now);
                let queued = now.saturating_duration_since(seq.submitted).as_secs_f64();
                self.metrics.update(|m| m.queue_time.observe(queued));
            }
            *budget -= tokens;
            if let Some(seq) = self.waiting.pop_front() {
                plan.push(Scheduled {
                    index: self.running.len(),
                    tokens,
                });
                self.running.push(seq);
            }
        }
    }

    /// Run the batch and hand each finished prompt or decode its next token.
    fn step(&mut self, plan: &[Scheduled]) {
        let batch: Vec<PagedSequence<'_>> = plan
            .iter()
            .map(|s| {
                let seq = &self.running[s.index];
                PagedSequence {
                    tokens: &seq.tokens[seq.computed..seq.computed + s.tokens],
                    start: seq.computed,
                    blocks: &seq.blocks,
                    logits: seq.computed + s.tokens == seq.tokens.len(),
                }
            })
            .collect();
        let wants: Vec<bool> = batch.iter().map(|b| b.logits).collect();
        let model = &self.model.model;
        let cache = &mut self.cache;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model
                .forward_paged(&batch, cache)
                .and_then(|l| l.map(|l| l.flatten_all()?.to_vec1::<f32>()).transpose())
        }));
        let logits = match outcome {
            Ok(Ok(logits)) => logits.unwrap_or_default(),
            Ok(Err(e)) => return self.fail(plan, TextGenError::from(e)),
            Err(_) => return self.fail(plan, TextGenError::Engine("the model panicked".into())),
        };
        let vocab = self.model.model.config().vocab_size;
        self.metrics
            .update(|m| m.batch_size.observe(plan.len() as f64));
        let mut row = 0;
        let mut finished = Vec::new();
        for (s, wants) in plan.iter().zip(wants) {
            let seq = &mut self.running[s.index];
            seq.computed += s.tokens;
            seq.register_full_blocks(&mut self.pool);
            if !wants {
                continue;
            }
            let raw = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            match self.sample(s.index, raw) {
                Ok(false) => {}
                Ok(true) => finished.push(s.index),
                Err(e) => {
                    let _ = self.running[s.index]
                        .events
                        .send(GenerationEvent::Failed(e));
                    finished.push(s.index);
                }
            }
        }
        self.remove(&finished);
    }

    /// Sample `running[index]`'s next token; true when the sequence ended.
    fn sample(&mut self, index: usize, raw: &[f32]) -> Result<bool, TextGenError> {
        let seq = &mut self.running[index];
        let outcome = seq
            .output
            .push(&self.model, &seq.request, raw, &seq.events)?;
        self.counters.generated.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let gap = seq.last_token_at.map(|t| now.saturating_duration_since(t));
        let ttft = now.saturating_duration_since(seq.submitted).as_secs_f64();
        seq.last_token_at = Some(now);
        self.metrics.update(|m| {
            m.generation_tokens += 1;
            match gap {
                Some(gap) => m.inter_token_latency.observe(gap.as_secs_f64()),
                None => m.time_to_first_token.observe(ttft),
            }
        });
        let Some((text, reason)) = outcome else {
            let id = seq.output.tokens[seq.output.tokens.len() - 1];
            seq.tokens.push(id);
            return Ok(false);
        };
        let details = FinishDetails {
            cached_tokens: seq.cached_tokens.unwrap_or(0),
            timings: RequestTimings::measured(
                seq.submitted,
                seq.scheduled_at.unwrap_or(seq.submitted),
                seq.output.first_token_at(),
            ),
        };
        let prompt = seq.request.prompt_ids.len() as u64;
        let e2e = now.saturating_duration_since(seq.submitted).as_secs_f64();
        self.metrics.update(|m| {
            m.prompt_tokens += prompt;
            m.e2e_latency.observe(e2e);
        });
        let _ = seq
            .events
            .send(seq.output.finished(&seq.request, text, reason, details));
        Ok(true)
    }

    /// A failed step fails every sequence in it.
    fn fail(&mut self, plan: &[Scheduled], error: TextGenError) {
        for s in plan {
            let _ = self.running[s.index]
                .events
                .send(GenerationEvent::Failed(error.clone()));
        }
        let indices: Vec<usize> = plan.iter().map(|s| s.index).collect();
        self.remove(&indices);
    }

    /// Drop the sequences at `indices` from the batch, freeing their blocks.
    fn remove(&mut self, indices: &[usize]) {
        if indices.is_empty() {
            return;
        }
        let pool = &mut self.pool;
        let mut i = 0;
        self.running.retain_mut(|s| {
            let gone = indices.contains(&i);
            i += 1;
            if gone {
                s.reset(pool);
            }
            !gone
        });
    }

    /// Refresh what `health` and the metrics read.
    fn publish(&self) {
        let (running, waiting) = (self.running.len(), self.waiting.len());
        self.counters.running.store(running, Ordering::SeqCst);
        self.counters.waiting.store(waiting, Ordering::SeqCst);
        let usage = self.pool.usage();
        self.metrics.update(|m| {
            m.running = running;
            m.waiting = waiting;
            m.kv_cache_usage = usage;
        });
    }
}
