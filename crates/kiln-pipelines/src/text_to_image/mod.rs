//! Text-to-image pipelines and what they share (schedulers).

pub mod schedulers;
