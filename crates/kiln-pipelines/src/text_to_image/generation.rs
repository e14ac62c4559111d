//! What every text-to-image generation loop reports: per-stage timings and
//! the per-step callback (progress, and cancellation when it returns false).

/// Per-stage wall time, reported with every result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub text_encoding_s: f64,
    pub denoising_s: f64,
    pub vae_s: f64,
}

/// Called after each denoising step with (step, total); returning false cancels.
pub type StepCallback<'a> = &'a mut dyn FnMut(usize, usize) -> bool;
