//! Kiln's numeric engine, under the model code: a torch-compatible random number
//! generator, safetensors weight loading with layout key adapters, and the layers
//! and attention the models share, on candle.

pub mod activation;
pub mod bf16_gemm;
pub mod conv;
mod conv_direct;
mod conv_im2col;
mod conv_nhwc;
mod cpu_attention;
pub mod cpu_gemm;
mod cpu_op;
pub mod device;
pub mod error;
pub mod fastmath;
pub mod gguf;
pub mod group_norm;
pub mod json;
pub mod lora;
pub mod memory;
pub mod nn;
pub mod paged_attention;
pub mod parity;
pub mod q8_gemm;
pub mod qlinear;
pub mod quant;
pub mod resident;
pub mod rng;
pub mod simd;
pub mod threads;
pub mod units;
pub mod weights;

pub use error::{EngineError, Result};
pub use rng::{NormalKernel, TorchGenerator};
pub use weights::{AdaptedWeights, KeyAdapter, KeyRule, SharedWeights, Source, WeightFiles};
