//! Kiln's text generation, below the protocols: model bundles (Hub folders and
//! GGUF files), the tokenizer and incremental detokeniser, chat templates,
//! sampling, stop strings, and the engine that turns a request into a stream of
//! token events (`submit → stream`, `abort`, `health`).

pub mod bundle;
pub mod engine;
pub mod error;
pub mod generation_config;
pub mod prompt;
pub mod request;
pub mod sampling;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod verify;

pub use bundle::{LanguageModel, ModelSource};
pub use engine::{
    AbortHandle, EngineHealth, FinishReason, GenerationEvent, GenerationRequest, GenerationStream,
    SerialEngine, TextGeneration, TokenLogprob,
};
pub use error::TextGenError;
pub use sampling::SamplingParams;
