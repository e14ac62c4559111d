//! `kiln bench llm`: one stream's prefill and decode speed on an LLM folder or
//! GGUF file, for `bench/llm_vs_llamacpp.py` to set beside llama.cpp, MAX and
//! transformers on the same weights. The prompt is fixed token ids (no
//! tokenizer in the timing); decode runs greedy with EOS ignored, so every
//! run generates exactly `--gen-tokens`. Prints JSON (median tokens/s).
//! `--engine batch` (the default) times the continuous-batching engine that
//! `kiln serve` runs on the CPU, with prefix caching off so every run prefills
//! its whole prompt; `--engine serial` the one-sequence engine.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_textgen::{
    BatchConfig, BatchEngine, GenerationEvent, GenerationRequest, LanguageModel, ModelSource,
    SerialEngine, TextGeneration,
};
use serde_json::json;

use super::bench::{median, peak_rss_mib};

#[derive(Args)]
pub struct LlmBenchArgs {
    /// An LLM folder (transformers layout) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Timed repetitions (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// f32, f16 or bf16 for folders (GGUF files compute in f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// `batch` (what `kiln serve` runs on the CPU) or `serial`.
    #[arg(long, default_value = "batch", value_parser = ["batch", "serial"])]
    engine: String,
}

/// Seconds to the first token (prefill + one sample) and per later token.
fn one_run(engine: &dyn TextGeneration, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
    let started = Instant::now();
    let mut stream = engine.submit(GenerationRequest::greedy(prompt.to_vec(), gen_tokens))?;
    let mut first = None;
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { .. } => {
                first.get_or_insert_with(|| started.elapsed().as_secs_f64());
            }
            GenerationEvent::Finished {
                completion_tokens, ..
            } => {
                let total = started.elapsed().as_secs_f64();
                let first = first.unwrap_or(total);
                let per_token = (total - first) / (completion_tokens.max(2) - 1) as f64;
                return Ok((first, per_token));
            }
            GenerationEvent::Failed(e) => bail!(e),
        }
    }
    bail!("the engine stopped")
}

pub fn run(args: LlmBenchArgs) -> Result<()> {
    let source = ModelSource::detect(&args.model).ok_or_else(|| {
        anyhow::anyhow!("{}: not an LLM folder or GGUF file", args.model.display())
    })?;
    let dtype = kiln_engine::device::parse_dtype(&args.dtype)?;
    let loading = Instant::now();
    let model = LanguageModel::load(&source, dtype, &candle_core::Device::Cpu)?;
    let load_s = loading.elapsed().as_secs_f64();
    let vocab = model.model.config().vocab_size as u32;
    // Ids spread over the vocabulary, away from the special tokens at its ends.
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32)
        .map(|i| 1 + (i * 7919) % (vocab - 2))
        .collect();
    let engine: Box<dyn TextGeneration> = if args.engine == "serial" {
        Box::new(SerialEngine::start(model)?)
    } else {
        let config = BatchConfig {
            max_num_batched_tokens: args.prompt_tokens.max(512),
            prefix_caching: false,
            ..BatchConfig::default()
        };
        Box::new(BatchEngine::start(model, config, source.weight_bytes())?)
    };
    let engine = engine.as_ref();
    let bar = ProgressBar::new(args.runs as u64 + 1);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} runs {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("bench llm");
    one_run(engine, &prompt, args.gen_tokens)?;
    bar.inc(1);
    let (mut firsts, mut per_tokens) = (Vec::new(), Vec::new());
    for _ in 0..args.runs.max(1) {
        let (first, per_token) = one_run(engine, &prompt, args.gen_tokens)?;
        firsts.push(first);
        per_tokens.push(per_token);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (first, per_token) = (median(firsts), median(per_tokens));
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "model": args.model.display().to_string(),
            "engine": args.engine,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "time_to_first_token_s": first,
            "prefill_tokens_per_s": args.prompt_tokens as f64 / first,
            "decode_tokens_per_s": 1.0 / per_token,
            "load_s": load_s,
            "peak_rss_mib": peak_rss_mib(),
        }))?
    );
    Ok(())
}
