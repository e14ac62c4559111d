//! Kiln's model code, one module per architecture. Each reads every size from its
//! component's `config.json`, so tiny test models and real ones load the same way,
//! and maps each file layout onto one internal naming through key adapters.

pub mod clip;
pub mod flux;
pub mod flux2;
pub mod llm;
pub mod safety_checker;
pub mod t5;
pub mod unet;
pub mod vae;
