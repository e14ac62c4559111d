//! Turning what clients send into prompt tokens: chat messages through the
//! model's template (then tokenized without further special tokens, as
//! transformers' `apply_chat_template(tokenize=True)`), or plain text with the
//! tokenizer's own additions (BOS), as vLLM's completions do.

use serde_json::{Map, Value};

use crate::bundle::LanguageModel;
use crate::error::TextGenError;

/// Roles a chat message may have.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Check OpenAI-shaped messages: each an object with a known `role` and string
/// (or text-part list) `content`; parts are joined into one string for the
/// template, as vLLM does for text-only models.
pub fn normalise_messages(messages: &Value) -> Result<Vec<Value>, TextGenError> {
    let items = messages
        .as_array()
        .ok_or_else(|| TextGenError::invalid("messages", "must be a list of message objects"))?;
    if items.is_empty() {
        return Err(TextGenError::invalid(
            "messages",
            "must hold at least one message",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| format!("messages[{i}].{name}");
            let object = m
                .as_object()
                .ok_or_else(|| TextGenError::invalid(format!("messages[{i}]"), "must be an object"))?;
            let role = object
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| TextGenError::invalid(field("role"), "is required and must be a string"))?;
            if !ROLES.contains(&role) {
                return Err(TextGenError::invalid(
                    field("role"),
                    format!("{role:?} is not one of {}", ROLES.join(", ")),
                ));
            }
            let mut out: Map<String, Value> = object.clone();
            match object.get("content") {
                None | Some(Value::Null) if role == "assistant" => {}
                Some(Value::String(_)) => {}
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(TextGenError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    "only {\"type\": \"text\", \"text\": ...} parts are supported by text models",
                                ));
                            }
                        }
                    }
                    out.insert("content".into(), Value::String(text));
                }
                _ => {
                    return Err(TextGenError::invalid(
                        field("content"),
                        "is required and must be a string or a list of text parts",
                    ));
                }
            }
            Ok(Value::Object(out))
        })
        .collect()
}

impl LanguageModel {
    /// The chat template's text for `messages`.
    pub fn render_chat(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String, TextGenError> {
        let template = self.template.as_ref().ok_or_else(|| {
            TextGenError::invalid(
                "messages",
                "this model has no chat template; use /v1/completions with a prompt",
            )
        })?;
        template.render(messages, add_generation_prompt, extra)
    }

    /// Prompt ids for a chat.
    pub fn chat_prompt(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<Vec<u32>, TextGenError> {
        let text = self.render_chat(messages, add_generation_prompt, extra)?;
        self.tokenizer.encode(&text, false)
    }

    /// Prompt ids for plain text.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, TextGenError> {
        self.tokenizer.encode(text, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_checked_field_by_field() {
        let e = normalise_messages(&json!([{"role": "robot", "content": "hi"}])).unwrap_err();
        assert_eq!(e.field(), Some("messages[0].role"));
        let e = normalise_messages(&json!([{"role": "user"}])).unwrap_err();
        assert_eq!(e.field(), Some("messages[0].content"));
        let e = normalise_messages(&json!([])).unwrap_err();
        assert_eq!(e.field(), Some("messages"));
        let ok = normalise_messages(&json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])).unwrap();
        assert_eq!(ok[0]["content"], "ab");
    }
}
