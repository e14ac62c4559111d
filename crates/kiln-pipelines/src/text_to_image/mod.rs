//! Text-to-image pipelines and what they share (schedulers).

pub mod flux;
pub mod image_io;
pub mod schedulers;
