//! The library side of the `kiln` package: command code that integration
//! tests call directly (the binary itself is `src/main.rs`).

pub mod bench_serve;
