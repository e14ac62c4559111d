//! One module per `kiln` subcommand.

pub mod bench;
pub mod bench_flux2;
pub mod bench_graph;
pub mod bench_llm;
// In the library, so that tests/bench_serve.rs can call `run_benchmark`.
pub use kiln::bench_serve;
pub mod generate;
pub mod glm;
pub mod models;
pub mod predict;
pub mod serve;
pub mod verify;
