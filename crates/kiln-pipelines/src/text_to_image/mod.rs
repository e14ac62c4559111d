//! Text-to-image pipelines and what they share: schedulers, prompt
//! tokenizers, generation timings and callbacks, image input and output.

mod clip_bpe;
pub mod flow_loop;
pub mod flux;
pub mod flux2;
pub mod front;
pub mod generation;
pub mod image_io;
pub mod loading;
pub mod lora_weights;
pub mod result;
pub mod schedulers;
pub mod sdxl;
pub mod tokenizer;

/// A seed for requests without one: splitmix64 of the clock, in torch's 32-bit range.
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 of the clock: a seed in torch's 32-bit range.
    let mut z = nanos.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 0xffff_ffff
}

/// Run a fields-taking pipeline (images, LLMs) for `Pipeline::predict` (no `progress`)
/// or `predict_with_progress`: tables are refused naming `model`.
pub(crate) fn predict_fields(
    request: crate::contract::PredictRequest,
    model: &str,
    progress: Option<crate::contract::ProgressFn>,
    run: impl FnOnce(
        &serde_json::Map<String, serde_json::Value>,
        &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<serde_json::Value, crate::error::PipelineError>,
) -> Result<crate::contract::Prediction, crate::error::PipelineError> {
    let crate::contract::PredictInput::Fields(input) = request.input else {
        return Err(crate::error::PipelineError::invalid(
            "input",
            crate::error::ProblemKind::Malformed,
            format!("{model} takes an object of fields (prompt, ...), not a table"),
        ));
    };
    let output = match progress {
        Some(progress) => run(&input, &mut |step, total| {
            progress(crate::contract::Progress { step, total })
        })?,
        None => run(&input, &mut |_, _| true)?,
    };
    Ok(crate::contract::Prediction::Json(output))
}
