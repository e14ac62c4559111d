//! Text-generation errors, typed so each protocol maps them to its own status:
//! the caller's mistakes (with the field and the rule) apart from load and
//! engine failures.

/// Why a generation request could not be served.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TextGenError {
    /// The request broke a rule; `field` is the request field at fault.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The prompt and the requested completion do not fit the context window.
    #[error(
        "this model's maximum context length is {context} tokens, but the request has {prompt} prompt tokens{}",
        requested_text(*.requested)
    )]
    ContextLength {
        context: usize,
        prompt: usize,
        requested: Option<usize>,
    },
    /// The chat template failed (including its own `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// Tokenizing or detokenizing failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model's files could not be loaded.
    #[error("{0}")]
    Load(String),
    /// The model failed while running (not the caller's fault).
    #[error("generation failed: {0}")]
    Engine(String),
    /// The engine is shutting down or its worker died.
    #[error("the generation engine is not running")]
    Unavailable,
}

fn requested_text(requested: Option<usize>) -> String {
    match requested {
        Some(n) => format!(" and asks for {n} completion tokens"),
        None => String::new(),
    }
}

impl TextGenError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        TextGenError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether the caller is at fault (a 400 in HTTP terms).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            TextGenError::Invalid { .. }
                | TextGenError::ContextLength { .. }
                | TextGenError::Template(_)
        )
    }

    /// The request field at fault, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            TextGenError::Invalid { field, .. } => Some(field),
            TextGenError::ContextLength { .. } => Some("messages"),
            TextGenError::Template(_) => Some("messages"),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for TextGenError {
    fn from(e: candle_core::Error) -> Self {
        TextGenError::Engine(e.to_string())
    }
}
