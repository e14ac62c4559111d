//! The streamed side of OpenAI's text endpoints: every choice submitted at
//! once, their tokens sent as server-sent event chunks (interleaved round
//! robin), each choice's last chunk with its `finish_reason` and `timings`, an
//! optional usage chunk, then `data: [DONE]`; errors arrive mid-stream in
//! OpenAI's envelope.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::Event;
use futures_util::Stream;
use kiln_textgen::{
    FinishReason, GenerationEvent, GenerationRequest, GenerationStream, TextGenError,
    TextGeneration, TokenLogprob,
};
use serde_json::{Value, json};

use super::{Api, Prepared, UsageTally, chat_logprob, completion_logprobs, now_seconds};
use crate::state::ModelLease;

/// Where an event stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Generating,
    Usage,
    Done,
    Ended,
}

/// One choice being streamed: its index, events, text bytes sent, prompt.
struct Current {
    index: usize,
    stream: GenerationStream,
    offset: usize,
    prompt: Vec<u32>,
}

/// What the event stream walks through.
struct StreamState {
    engine: Arc<dyn TextGeneration>,
    api: Api,
    /// Requests not yet submitted (all go to the engine together, so a
    /// batching engine runs the choices side by side).
    pending: Option<Vec<GenerationRequest>>,
    /// Choices still generating.
    active: Vec<Current>,
    /// Events to send before any token (the chat API's role chunks).
    queued: std::collections::VecDeque<Event>,
    /// Which choice is asked first next time (round robin, so one choice's
    /// buffered tokens do not hold back the others').
    turn: usize,
    wants_logprobs: bool,
    include_usage: bool,
    id: String,
    created: i64,
    model: String,
    usage: UsageTally,
    phase: Phase,
    /// Keeps the model's slot until the stream ends or the client leaves.
    _lease: ModelLease,
}

fn error_event(e: &TextGenError) -> Event {
    let kind = if e.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    Event::default().data(
        json!({"error": {"message": e.to_string(), "type": kind, "param": e.field(), "code": null}}).to_string(),
    )
}

impl StreamState {
    fn chunk(&self, choices: Vec<Value>) -> Event {
        self.chunk_with_timings(choices, None)
    }

    /// A chunk; a choice's last one carries its `timings` (llama-server's
    /// extra field, ignored by OpenAI clients).
    fn chunk_with_timings(&self, choices: Vec<Value>, timings: Option<Value>) -> Event {
        let mut body = json!({
            "id": self.id,
            "object": self.api.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": null,
        });
        if let (Some(timings), Some(body)) = (timings, body.as_object_mut()) {
            body.insert("timings".into(), timings);
        }
        Event::default().data(body.to_string())
    }

    fn piece(
        &self,
        index: usize,
        text: String,
        logprob: Option<&TokenLogprob>,
        reason: Option<&FinishReason>,
        offset: usize,
        timings: Option<Value>,
    ) -> Event {
        let reason = reason.map(FinishReason::as_str);
        let choice = match self.api {
            Api::Chat => json!({
                "index": index,
                "delta": if reason.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) },
                "logprobs": match logprob {
                    Some(lp) => json!({"content": [chat_logprob(lp)], "refusal": null}),
                    None => Value::Null,
                },
                "finish_reason": reason,
            }),
            Api::Completions => json!({
                "index": index,
                "text": text,
                "logprobs": match logprob {
                    Some(lp) => completion_logprobs(std::slice::from_ref(lp), offset),
                    None => Value::Null,
                },
                "finish_reason": reason,
            }),
        };
        self.chunk_with_timings(vec![choice], timings)
    }

    /// Submit every choice; the chat API announces each one's assistant role
    /// first. A refused submission ends the stream with its error.
    fn start_all(&mut self, requests: Vec<GenerationRequest>) -> Option<Event> {
        for (index, request) in requests.into_iter().enumerate() {
            let prompt = request.prompt_ids.clone();
            match self.engine.submit(request) {
                Ok(stream) => self.active.push(Current {
                    index,
                    stream,
                    offset: 0,
                    prompt,
                }),
                Err(e) => {
                    self.active.clear();
                    self.queued.clear();
                    self.phase = Phase::Done;
                    return Some(error_event(&e));
                }
            }
            if self.api == Api::Chat {
                let role = self.chunk(vec![json!({
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                })]);
                self.queued.push_back(role);
            }
        }
        None
    }

    /// The next SSE event, or `None` after `[DONE]`.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.phase {
                Phase::Ended => return None,
                Phase::Done => {
                    self.phase = Phase::Ended;
                    return Some(Event::default().data("[DONE]"));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    let body = json!({
                        "id": self.id, "object": self.api.object(true), "created": self.created,
                        "model": self.model, "choices": [],
                        "usage": self.usage.json(),
                    });
                    return Some(Event::default().data(body.to_string()));
                }
                Phase::Generating => {}
            }
            if let Some(requests) = self.pending.take()
                && let Some(error) = self.start_all(requests)
            {
                return Some(error);
            }
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            if self.active.is_empty() {
                self.phase = if self.include_usage {
                    Phase::Usage
                } else {
                    Phase::Done
                };
                continue;
            }
            // The next event of whichever choice has one, asking each in turn.
            let (event, slot) = {
                let count = self.active.len();
                let first = self.turn % count;
                let (before, after) = self.active.split_at_mut(first);
                let next = after
                    .iter_mut()
                    .chain(before.iter_mut())
                    .map(|c| Box::pin(c.stream.next()));
                let (event, position, _others) = futures_util::future::select_all(next).await;
                self.turn = first + position + 1;
                (event, (first + position) % count)
            };
            let current = &mut self.active[slot];
            let index = current.index;
            match event {
                Some(GenerationEvent::Token { text, logprob, .. }) => {
                    let at = current.offset;
                    current.offset += text.len();
                    let logprob = if self.wants_logprobs { logprob } else { None };
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    return Some(self.piece(index, text, logprob.as_ref(), None, at, None));
                }
                Some(GenerationEvent::Finished {
                    text,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    details,
                }) => {
                    let at = current.offset;
                    let prompt = std::mem::take(&mut current.prompt);
                    self.active.remove(slot);
                    self.usage.add(
                        prompt,
                        prompt_tokens,
                        completion_tokens,
                        details.cached_tokens,
                    );
                    let timings = details.timings_json(prompt_tokens, completion_tokens);
                    let last = self.piece(index, text, None, Some(&reason), at, Some(timings));
                    return Some(last);
                }
                Some(GenerationEvent::Failed(e)) => {
                    self.active.clear();
                    self.phase = Phase::Done;
                    return Some(error_event(&e));
                }
                None => {
                    self.active.clear();
                    self.phase = Phase::Done;
                    return Some(error_event(&TextGenError::Unavailable));
                }
            }
        }
    }
}

pub(super) fn event_stream(
    engine: Arc<dyn TextGeneration>,
    prepared: Prepared,
    lease: ModelLease,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let state = StreamState {
        engine,
        api: prepared.api,
        pending: Some(prepared.requests),
        active: Vec::new(),
        queued: std::collections::VecDeque::new(),
        turn: 0,
        wants_logprobs: prepared.wants_logprobs,
        include_usage: prepared.include_usage,
        id: format!(
            "{}-{}",
            prepared.api.id_prefix(),
            uuid::Uuid::new_v4().simple()
        ),
        created: now_seconds(),
        model: prepared.model_name,
        usage: UsageTally::default(),
        phase: Phase::Generating,
        _lease: lease,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let event = state.next_event().await?;
        Some((Ok(event), state))
    })
}
