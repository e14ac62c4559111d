//! Kiln's text generation, below the protocols: model bundles (Hub folders and
//! GGUF files), the tokenizer and incremental detokeniser, chat templates,
//! sampling, stop strings, and the engines that turn requests into streams of
//! token events (`submit → stream`, `abort`, `health`): one sequence at a time,
//! or continuously batched over a paged KV cache with prefix caching.

pub mod batching;
pub mod bundle;
pub mod engine;
pub mod error;
pub mod generation_config;
mod inbox;
pub mod kv_blocks;
pub mod metrics;
pub mod prompt;
pub mod request;
pub mod sampling;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod verify;

pub use batching::{BatchConfig, BatchEngine};
pub use bundle::{LanguageModel, ModelSource};
pub use engine::{
    AbortHandle, EngineHealth, FinishDetails, FinishReason, GenerationEvent, GenerationRequest,
    GenerationStream, RequestTimings, SerialEngine, TextGeneration, TokenLogprob,
};
pub use error::TextGenError;
pub use metrics::EngineMetrics;
pub use sampling::SamplingParams;
