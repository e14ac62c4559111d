//! Kiln's numeric engine: everything below the model code. Today: a random number
//! generator that reproduces torch's CPU `torch.randn`/`torch.rand` streams, so a
//! seed gives the same initial noise as diffusers.

pub mod rng;

pub use rng::TorchGenerator;
