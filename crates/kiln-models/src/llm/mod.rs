//! Decoder-only LLMs (Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral): config,
//! rotary embeddings, file layouts (transformers and GGUF names), the model,
//! and its batched forward over a paged key/value cache.

pub mod config;
pub mod layout;
pub mod model;
pub mod paged;
pub mod rope;
pub mod weights;

pub use config::{LlmConfig, LlmConfigError, LlmFamily, RopeScaling};
pub use model::{CausalLm, SequenceCache};
pub use paged::{PagedKvCache, PagedSequence};
pub use weights::LlmWeights;
