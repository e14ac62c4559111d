//! Decoder-only LLMs (Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral): config,
//! rotary embeddings, file layouts (transformers and GGUF names) and the model.

pub mod config;
pub mod layout;
pub mod model;
pub mod rope;
pub mod weights;

pub use config::{LlmConfig, LlmConfigError, LlmFamily, RopeScaling};
pub use model::{CausalLm, SequenceCache};
pub use weights::LlmWeights;
