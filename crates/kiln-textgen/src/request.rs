//! Building a [`GenerationRequest`] from the fields clients send (OpenAI's names,
//! shared by every protocol and the CLI): sampling fields over the model's
//! generation defaults, `stop` as a string or list, `max_tokens` (default: the
//! rest of the context window, as vLLM), `logprobs`/`top_logprobs`.

use serde_json::{Map, Value};

use crate::bundle::LanguageModel;
use crate::engine::GenerationRequest;
use crate::error::TextGenError;

fn number(fields: &Map<String, Value>, key: &str) -> Result<Option<f32>, TextGenError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(|f| Some(f as f32))
            .ok_or_else(|| TextGenError::invalid(key, format!("must be a number, not {v}"))),
    }
}

fn integer(fields: &Map<String, Value>, key: &str) -> Result<Option<i64>, TextGenError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| TextGenError::invalid(key, format!("must be an integer, not {v}"))),
    }
}

/// `stop`: a string or a list of strings (at most 16, each non-empty).
pub fn stop_strings(value: Option<&Value>) -> Result<Vec<String>, TextGenError> {
    let stops: Vec<String> = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    TextGenError::invalid("stop", "must be a string or a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(TextGenError::invalid(
                "stop",
                "must be a string or a list of strings",
            ));
        }
    };
    if stops.len() > 16 {
        return Err(TextGenError::invalid("stop", "at most 16 stop strings"));
    }
    if stops.iter().any(String::is_empty) {
        return Err(TextGenError::invalid(
            "stop",
            "stop strings must not be empty",
        ));
    }
    Ok(stops)
}

/// How many top alternatives to report: chat's `logprobs: true` +
/// `top_logprobs: n`, or completions' `logprobs: n`.
pub fn logprobs_request(
    fields: &Map<String, Value>,
    chat: bool,
) -> Result<Option<usize>, TextGenError> {
    if chat {
        let wanted = match fields.get("logprobs") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(v) => {
                return Err(TextGenError::invalid(
                    "logprobs",
                    format!("must be true or false, not {v}"),
                ));
            }
        };
        let top = integer(fields, "top_logprobs")?;
        match (wanted, top) {
            (false, Some(_)) => Err(TextGenError::invalid(
                "top_logprobs",
                "needs `logprobs: true`",
            )),
            (false, None) => Ok(None),
            (true, None) => Ok(Some(0)),
            (true, Some(n)) if (0..=20).contains(&n) => Ok(Some(n as usize)),
            (true, Some(_)) => Err(TextGenError::invalid(
                "top_logprobs",
                "must be between 0 and 20",
            )),
        }
    } else {
        match integer(fields, "logprobs")? {
            None => Ok(None),
            Some(n) if (0..=20).contains(&n) => Ok(Some(n as usize)),
            Some(_) => Err(TextGenError::invalid(
                "logprobs",
                "must be between 0 and 20",
            )),
        }
    }
}

impl LanguageModel {
    /// A request for `prompt_ids` from client fields; unset sampling fields take
    /// the model's generation defaults. `max_tokens_key` is the field name the
    /// protocol uses (`max_tokens`, or chat's `max_completion_tokens` too).
    pub fn build_request(
        &self,
        prompt_ids: Vec<u32>,
        fields: &Map<String, Value>,
        chat: bool,
    ) -> Result<GenerationRequest, TextGenError> {
        let mut sampling = self.defaults.sampling();
        if let Some(t) = number(fields, "temperature")? {
            sampling.temperature = t;
            // An explicit temperature asks for sampling even when the model's
            // defaults are greedy; transformers' top_k default does not apply then.
            if !self.defaults.do_sample && t > 0.0 {
                sampling.top_k = 0;
            }
        }
        if let Some(p) = number(fields, "top_p")? {
            sampling.top_p = p;
        }
        if let Some(k) = integer(fields, "top_k")? {
            sampling.top_k = match k {
                -1 | 0 => 0,
                k if k > 0 => k as usize,
                _ => {
                    return Err(TextGenError::invalid(
                        "top_k",
                        "must be -1 (off) or a positive integer",
                    ));
                }
            };
        }
        if let Some(p) = number(fields, "min_p")? {
            sampling.min_p = p;
        }
        for (key, slot) in [
            ("repetition_penalty", &mut sampling.repetition_penalty),
            ("presence_penalty", &mut sampling.presence_penalty),
            ("frequency_penalty", &mut sampling.frequency_penalty),
        ] {
            if let Some(v) = number(fields, key)? {
                *slot = v;
            }
        }
        sampling.seed = match fields.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_i64()
                    .map(|s| s as u64)
                    .or_else(|| v.as_u64())
                    .ok_or_else(|| {
                        TextGenError::invalid("seed", format!("must be an integer, not {v}"))
                    })?,
            ),
        };
        sampling.validate()?;
        let key = if chat
            && fields
                .get("max_completion_tokens")
                .is_some_and(|v| !v.is_null())
        {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let room = self.context_length.saturating_sub(prompt_ids.len());
        let max_tokens = match integer(fields, key)? {
            Some(n) if n < 1 => {
                return Err(TextGenError::invalid(
                    key,
                    format!("must be at least 1, not {n}"),
                ));
            }
            Some(n) => n as usize,
            None => self
                .defaults
                .max_new_tokens
                .unwrap_or(room)
                .min(room)
                .max(1),
        };
        let stop_token_ids = match fields.get("stop_token_ids") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|i| {
                    i.as_u64().map(|i| i as u32).ok_or_else(|| {
                        TextGenError::invalid("stop_token_ids", "must be a list of token ids")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(TextGenError::invalid(
                    "stop_token_ids",
                    "must be a list of token ids",
                ));
            }
        };
        let ignore_eos = match fields.get("ignore_eos") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(TextGenError::invalid(
                    "ignore_eos",
                    format!("must be true or false, not {v}"),
                ));
            }
        };
        Ok(GenerationRequest {
            prompt_ids,
            max_tokens,
            sampling,
            stop: stop_strings(fields.get("stop"))?,
            stop_token_ids,
            ignore_eos,
            logprobs: logprobs_request(fields, chat)?,
        })
    }
}
