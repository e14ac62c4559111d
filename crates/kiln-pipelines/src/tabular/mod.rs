//! Pipelines over tabular data.

pub mod glm;
