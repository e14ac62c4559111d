//! `kiln verify`: MAX-style logit verification of an LLM against a reference
//! dump (`scripts/llm_reference.py` writes one with transformers): a table per
//! prompt of cosine distance, KL(reference‖Kiln), max |Δ|, abs/rel violations
//! and argmax agreement, and a non-zero exit past the thresholds.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use kiln_textgen::verify::{read_reference, verify_case};
use kiln_textgen::{LanguageModel, ModelSource};

#[derive(Args)]
pub struct VerifyArgs {
    /// An LLM folder (transformers layout) or a .gguf file.
    model: PathBuf,
    /// The reference dump folder (index.json + references.safetensors).
    #[arg(long)]
    reference: PathBuf,
    /// Largest cosine distance (1 − cos) allowed at any step.
    #[arg(long, default_value_t = 1e-5)]
    max_cosine_distance: f64,
    /// Largest KL(reference ‖ Kiln) allowed at any step.
    #[arg(long, default_value_t = 1e-3)]
    max_kl: f64,
    /// Absolute tolerance of the abs/rel rule |a−b| ≤ max(atol, rtol·max(|a|,|b|)).
    #[arg(long, default_value_t = 1e-4)]
    atol: f64,
    /// Relative tolerance of the abs/rel rule.
    #[arg(long, default_value_t = 1e-3)]
    rtol: f64,
    /// Also fail when any logit breaks the abs/rel rule (off: quantized models
    /// are judged by cosine and KL).
    #[arg(long)]
    strict: bool,
    /// f32, f16 or bf16 for folders.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    let source = ModelSource::detect(&args.model).ok_or_else(|| {
        anyhow::anyhow!("{}: not an LLM folder or GGUF file", args.model.display())
    })?;
    let dtype = kiln_engine::device::parse_dtype(&args.dtype)?;
    let model = LanguageModel::load(&source, dtype, &candle_core::Device::Cpu)?;
    let cases = read_reference(&args.reference)?;
    println!(
        "{:<20} {:>5} {:>12} {:>12} {:>10} {:>10} {:>8}  verdict",
        "case", "steps", "cos dist", "KL", "max |Δ|", "abs/rel ✗", "argmax"
    );
    let mut failed = Vec::new();
    for case in &cases {
        let r = verify_case(&model, case, args.atol, args.rtol)?;
        let pass = r.worst_cosine_distance <= args.max_cosine_distance
            && r.worst_kl <= args.max_kl
            && (!args.strict || r.violations == 0);
        println!(
            "{:<20} {:>5} {:>12.3e} {:>12.3e} {:>10.3e} {:>10} {:>5}/{:<2}  {}",
            r.name,
            r.steps,
            r.worst_cosine_distance,
            r.worst_kl,
            r.max_abs,
            r.violations,
            r.same_argmax,
            r.steps,
            if pass { "pass" } else { "FAIL" }
        );
        if !pass {
            failed.push(r.name);
        }
    }
    println!(
        "thresholds: cosine distance ≤ {:e}, KL ≤ {:e}{}",
        args.max_cosine_distance,
        args.max_kl,
        if args.strict {
            format!(
                ", abs/rel (atol {:e}, rtol {:e}) everywhere",
                args.atol, args.rtol
            )
        } else {
            String::new()
        }
    );
    if !failed.is_empty() {
        bail!(
            "{} of {} cases past the thresholds: {}",
            failed.len(),
            cases.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
