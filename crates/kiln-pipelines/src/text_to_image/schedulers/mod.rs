//! Diffusion samplers' noise schedules, each matching its diffusers class.

pub mod flow_match;

pub use flow_match::{FlowMatchEulerConfig, FlowMatchSchedule};
