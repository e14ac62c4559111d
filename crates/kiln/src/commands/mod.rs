//! One module per `kiln` subcommand.

pub mod bench;
pub mod bench_llm;
pub mod generate;
pub mod glm;
pub mod models;
pub mod predict;
pub mod serve;
pub mod verify;
