//! OpenAI's text endpoints over Kiln's text-generation engine:
//! `POST /v1/chat/completions` and `POST /v1/completions`, whole or streamed as
//! server-sent events (`data: {chunk}`, `data: [DONE]`, a usage chunk with
//! `stream_options.include_usage`), `n` choices, `logprobs` in each API's shape,
//! errors in OpenAI's envelope (also mid-stream). The adapter builds prompts
//! and requests; it never touches tensors. A client that goes away drops its
//! stream, which aborts the generation and frees the model's slot.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kiln_textgen::{
    FinishDetails, FinishReason, GenerationEvent, GenerationRequest, GenerationStream,
    TextGenError, TextGeneration, TokenLogprob,
};
use serde_json::{Map, Value, json};

use super::body_or_error;
use super::openai::{error, error_response};
use crate::error::ApiError;
use crate::metrics::labelled;
use crate::state::{AppState, ModelLease, ServedModel};

mod stream;
use stream::event_stream;

/// Choices one request may ask for.
const MAX_CHOICES: i64 = 16;

/// Which of the two APIs a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

impl Api {
    fn id_prefix(self) -> &'static str {
        match self {
            Api::Chat => "chatcmpl",
            Api::Completions => "cmpl",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completions, _) => "text_completion",
        }
    }
}

/// A generation error in OpenAI's shape and status.
fn textgen_error(e: &TextGenError) -> Response {
    match e {
        TextGenError::ContextLength { .. } => error_response(
            StatusCode::BAD_REQUEST,
            &e.to_string(),
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        TextGenError::Invalid { field, message } => error_response(
            StatusCode::BAD_REQUEST,
            &format!("{field}: {message}"),
            "invalid_request_error",
            Some(field),
            Some("invalid_value"),
        ),
        TextGenError::Template(_) => error_response(
            StatusCode::BAD_REQUEST,
            &e.to_string(),
            "invalid_request_error",
            Some("messages"),
            Some("invalid_value"),
        ),
        TextGenError::Unavailable => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &e.to_string(),
            "server_error",
            None,
            None,
        ),
        _ => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
            "server_error",
            None,
            None,
        ),
    }
}

/// A refusal before generation starts (boxed: responses are large).
type Refusal = Box<Response>;

fn bad_param(param: &str, message: &str) -> Refusal {
    Box::new(error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        Some(param),
        Some("invalid_value"),
    ))
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Everything parsed from the body before generation starts.
struct Prepared {
    api: Api,
    model_name: String,
    /// One request per choice (per prompt, times `n`).
    requests: Vec<GenerationRequest>,
    stream: bool,
    include_usage: bool,
    /// Completions' `logprobs` keep its own shape.
    wants_logprobs: bool,
}

fn parse_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, Refusal> {
    let body = body_or_error(state, body).map_err(|e| Box::new(error(e)))?;
    serde_json::from_slice::<Map<String, Value>>(&body).map_err(|e| {
        Box::new(error(ApiError::BadRequest(format!(
            "the body must be a JSON object: {e}"
        ))))
    })
}

/// The served model a request names (or the first that generates text).
fn find_model(state: &AppState, body: &Map<String, Value>) -> Result<Arc<ServedModel>, Refusal> {
    match body.get("model") {
        Some(Value::String(name)) => state.model(name).map_err(|e| Box::new(error(e))),
        None | Some(Value::Null) => state
            .models
            .iter()
            .find(|m| {
                m.interface()
                    .is_some_and(|i| i.pipeline == kiln_pipelines::text_generation::PIPELINE_KIND)
            })
            .cloned()
            .ok_or_else(|| {
                Box::new(error(ApiError::ModelNotFound(
                    "(no text-generation model is served)".into(),
                )))
            }),
        Some(_) => Err(bad_param("model", "model must be a string")),
    }
}

fn engine_of(lease: &ModelLease, model: &ServedModel) -> Result<Arc<dyn TextGeneration>, Refusal> {
    lease.pipeline.text_generation().ok_or_else(|| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            &format!(
                "model {:?} does not generate text (its pipeline is {})",
                model.name,
                lease.pipeline.interface().pipeline
            ),
            "invalid_request_error",
            Some("model"),
            Some("model_not_supported"),
        ))
    })
}

/// The prompts' ids: chat messages through the template, or completions'
/// `prompt` (a string, a list of strings, or a list of token ids).
fn prompts(
    engine: &dyn TextGeneration,
    api: Api,
    body: &Map<String, Value>,
) -> Result<Vec<Vec<u32>>, TextGenError> {
    let model = engine.model();
    match api {
        Api::Chat => {
            let messages = body
                .get("messages")
                .ok_or_else(|| TextGenError::invalid("messages", "is required"))?;
            let messages = kiln_textgen::prompt::normalise_messages(messages)?;
            let mut extra = match body.get("chat_template_kwargs") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(kwargs)) => kwargs.clone(),
                Some(_) => {
                    return Err(TextGenError::invalid(
                        "chat_template_kwargs",
                        "must be an object",
                    ));
                }
            };
            for key in ["tools", "documents"] {
                if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
                    extra.entry(key).or_insert_with(|| v.clone());
                }
            }
            let add_generation_prompt = match body.get("add_generation_prompt") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(TextGenError::invalid(
                        "add_generation_prompt",
                        "must be true or false",
                    ));
                }
            };
            Ok(vec![model.chat_prompt(
                &messages,
                add_generation_prompt,
                &extra,
            )?])
        }
        Api::Completions => {
            let prompt = body
                .get("prompt")
                .ok_or_else(|| TextGenError::invalid("prompt", "is required"))?;
            let invalid = || {
                TextGenError::invalid(
                    "prompt",
                    "must be a string, a list of strings, or a list of token ids",
                )
            };
            match prompt {
                Value::String(text) => Ok(vec![model.text_prompt(text)?]),
                Value::Array(items) if items.is_empty() => Err(invalid()),
                Value::Array(items) if items.iter().all(Value::is_string) => items
                    .iter()
                    .map(|t| model.text_prompt(t.as_str().unwrap_or_default()))
                    .collect(),
                Value::Array(items) if items.iter().all(|v| v.as_u64().is_some()) => Ok(vec![
                    items
                        .iter()
                        .filter_map(|v| v.as_u64().map(|t| t as u32))
                        .collect(),
                ]),
                Value::Array(items) if items.iter().all(Value::is_array) => items
                    .iter()
                    .map(|ids| {
                        ids.as_array()
                            .filter(|ids| ids.iter().all(|v| v.as_u64().is_some()))
                            .map(|ids| {
                                ids.iter()
                                    .filter_map(|v| v.as_u64().map(|t| t as u32))
                                    .collect()
                            })
                            .ok_or_else(invalid)
                    })
                    .collect(),
                _ => Err(invalid()),
            }
        }
    }
}

fn prepare(
    engine: &dyn TextGeneration,
    api: Api,
    model_name: &str,
    body: &Map<String, Value>,
) -> Result<Prepared, Refusal> {
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_i64() {
            Some(n) if (1..=MAX_CHOICES).contains(&n) => n as usize,
            _ => {
                return Err(bad_param(
                    "n",
                    &format!("n must be an integer between 1 and {MAX_CHOICES}"),
                ));
            }
        },
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad_param("stream", "stream must be true or false")),
    };
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if api == Api::Completions && body.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err(bad_param("echo", "echo is not supported"));
    }
    if api == Api::Completions && body.get("suffix").is_some_and(|s| !s.is_null()) {
        return Err(bad_param(
            "suffix",
            "suffix is not supported by these models",
        ));
    }
    let prompt_ids = prompts(engine, api, body).map_err(|e| Box::new(textgen_error(&e)))?;
    let model = engine.model();
    let mut requests = Vec::with_capacity(prompt_ids.len() * n);
    for ids in prompt_ids {
        let base = model
            .build_request(ids, body, api == Api::Chat)
            .map_err(|e| Box::new(textgen_error(&e)))?;
        kiln_textgen::engine::validate(model, &base).map_err(|e| Box::new(textgen_error(&e)))?;
        for i in 0..n {
            let mut request = base.clone();
            // Each choice draws its own stream; a seed still reproduces all of them.
            request.sampling.seed = base.sampling.seed.map(|s| s.wrapping_add(i as u64));
            requests.push(request);
        }
    }
    let wants_logprobs = requests.first().is_some_and(|r| r.logprobs.is_some());
    Ok(Prepared {
        api,
        model_name: model_name.to_string(),
        requests,
        stream,
        include_usage,
        wants_logprobs,
    })
}

/// `bytes` as OpenAI lists them.
fn bytes_of(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// Chat's `logprobs.content` entry for one token.
fn chat_logprob(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": bytes_of(&lp.token),
        "top_logprobs": lp.top.iter().map(|(_, token, logprob)| json!({
            "token": token, "logprob": logprob, "bytes": bytes_of(token)
        })).collect::<Vec<_>>(),
    })
}

/// Completions' legacy `logprobs` object for some tokens, `offset` bytes into the text.
fn completion_logprobs(lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(lps.len());
    for lp in lps {
        text_offset.push(offset);
        offset += lp.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            let mut top = Map::new();
            for (_, token, logprob) in &l.top {
                top.entry(token.clone()).or_insert(json!(logprob));
            }
            Value::Object(top)
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// One finished choice.
struct Choice {
    text: String,
    reason: FinishReason,
    logprobs: Vec<TokenLogprob>,
    prompt_tokens: usize,
    completion_tokens: usize,
    details: FinishDetails,
}

async fn collect(mut stream: GenerationStream) -> Result<Choice, TextGenError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            GenerationEvent::Token {
                text: piece,
                logprob,
                ..
            } => {
                text.push_str(&piece);
                logprobs.extend(logprob);
            }
            GenerationEvent::Finished {
                text: rest,
                reason,
                prompt_tokens,
                completion_tokens,
                details,
            } => {
                text.push_str(&rest);
                return Ok(Choice {
                    text,
                    reason,
                    logprobs,
                    prompt_tokens,
                    completion_tokens,
                    details,
                });
            }
            GenerationEvent::Failed(e) => return Err(e),
        }
    }
    Err(TextGenError::Unavailable)
}

/// Token counts over a request's choices; a prompt shared by several choices
/// counts once, as OpenAI counts it.
#[derive(Default)]
struct UsageTally {
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    counted_prompts: std::collections::HashSet<Vec<u32>>,
}

impl UsageTally {
    fn add(
        &mut self,
        prompt: Vec<u32>,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached: usize,
    ) {
        if self.counted_prompts.insert(prompt) {
            self.prompt_tokens += prompt_tokens;
            self.cached_tokens += cached;
        }
        self.completion_tokens += completion_tokens;
    }

    fn json(&self) -> Value {
        FinishDetails {
            cached_tokens: self.cached_tokens,
            ..FinishDetails::default()
        }
        .usage_json(self.prompt_tokens, self.completion_tokens)
    }
}

/// Generate every choice (submitted together, so a batching engine runs them
/// side by side) and answer with the whole body.
async fn complete(
    engine: Arc<dyn TextGeneration>,
    prepared: Prepared,
    _lease: ModelLease,
) -> Response {
    let id = format!(
        "{}-{}",
        prepared.api.id_prefix(),
        uuid::Uuid::new_v4().simple()
    );
    let mut choices = Vec::with_capacity(prepared.requests.len());
    let mut tally = UsageTally::default();
    let mut prompts = Vec::with_capacity(prepared.requests.len());
    let mut streams = Vec::with_capacity(prepared.requests.len());
    for request in prepared.requests {
        prompts.push(request.prompt_ids.clone());
        match engine.submit(request) {
            Ok(stream) => streams.push(collect(stream)),
            Err(e) => return textgen_error(&e),
        }
    }
    let collected = futures_util::future::join_all(streams).await;
    let single = collected.len() == 1;
    let mut timings = Value::Null;
    for (index, (prompt, choice)) in prompts.into_iter().zip(collected).enumerate() {
        let choice = match choice {
            Ok(choice) => choice,
            Err(e) => return textgen_error(&e),
        };
        tally.add(
            prompt,
            choice.prompt_tokens,
            choice.completion_tokens,
            choice.details.cached_tokens,
        );
        if single {
            timings = choice
                .details
                .timings_json(choice.prompt_tokens, choice.completion_tokens);
        }
        choices.push(match prepared.api {
            Api::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": choice.text, "refusal": null, "tool_calls": []},
                "logprobs": if prepared.wants_logprobs {
                    json!({"content": choice.logprobs.iter().map(chat_logprob).collect::<Vec<_>>(), "refusal": null})
                } else { Value::Null },
                "finish_reason": choice.reason.as_str(),
            }),
            Api::Completions => json!({
                "index": index,
                "text": choice.text,
                "logprobs": if prepared.wants_logprobs { completion_logprobs(&choice.logprobs, 0) } else { Value::Null },
                "finish_reason": choice.reason.as_str(),
            }),
        });
    }
    Json(json!({
        "id": id,
        "object": prepared.api.object(false),
        "created": now_seconds(),
        "model": prepared.model_name,
        "choices": choices,
        "usage": tally.json(),
        "system_fingerprint": null,
        "timings": timings,
    }))
    .into_response()
}

async fn serve(state: Arc<AppState>, api: Api, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match parse_body(&state, body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let model = match find_model(&state, &body) {
        Ok(model) => model,
        Err(response) => return *response,
    };
    serve_model(&state, &model, api, body).await
}

/// Answer an OpenAI-shaped body on `model` (also SageMaker's `/invocations`
/// with a chat or completion body, as MAX serves it).
pub async fn serve_model(
    state: &AppState,
    model: &Arc<ServedModel>,
    api: Api,
    body: Map<String, Value>,
) -> Response {
    let lease = match state.lease_bounded(model).await {
        Ok(lease) => lease,
        Err(e) => return labelled(error(e), &model.name),
    };
    let engine = match engine_of(&lease, model) {
        Ok(engine) => engine,
        Err(response) => return labelled(*response, &model.name),
    };
    let prepared = match prepare(&*engine, api, &model.name, &body) {
        Ok(prepared) => prepared,
        Err(response) => return labelled(*response, &model.name),
    };
    let response = if prepared.stream {
        Sse::new(event_stream(engine, prepared, lease))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response()
    } else {
        complete(engine, prepared, lease).await
    };
    labelled(response, &model.name)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(state, Api::Chat, body).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(state, Api::Completions, body).await
}
