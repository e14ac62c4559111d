//! `kiln bench graph`: batch latency and throughput of an ONNX model or Kiln
//! graph, compiled once, on random inputs at each batch size, for
//! `bench/graph_vs_onnxruntime.py` to set beside onnxruntime. Prints JSON.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_graph::{DType, Dim, InferenceSession, SessionOptions};
use serde_json::json;

#[derive(Args)]
pub struct GraphBenchArgs {
    /// An `.onnx` file, or a folder with `graph.json` and its safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes (the first symbolic dim of every input).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    /// Sizes of other symbolic dims, as NAME=SIZE (e.g. `seq=128`); 16 otherwise.
    #[arg(long = "dim", value_delimiter = ',')]
    dims: Vec<String>,
    /// Timed runs per batch size, after `--warmup` untimed ones.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Run the graph as built (no folding or fusion), to measure the passes.
    #[arg(long)]
    no_optimize: bool,
    /// Also report where the time goes, per op kind (timed runs only).
    #[arg(long)]
    profile: bool,
}

fn random_input(
    ty: &kiln_graph::TensorType,
    batch: usize,
    named: &HashMap<String, usize>,
    seed: u64,
) -> Result<Tensor> {
    let mut seen_symbol = false;
    let dims: Vec<usize> = ty
        .dims
        .iter()
        .map(|d| match d {
            Dim::Static(n) => *n,
            Dim::Symbolic(s) if !seen_symbol && !named.contains_key(s) => {
                seen_symbol = true;
                batch
            }
            Dim::Symbolic(s) => named.get(s).copied().unwrap_or(16),
            Dim::Unknown => 16,
        })
        .collect();
    let count: usize = dims.iter().product();
    let device = &Device::Cpu;
    Ok(match ty.dtype {
        dtype if dtype.is_float() => {
            // A fixed LCG: the same inputs for every run and every engine.
            let mut state = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect();
            Tensor::from_vec(values, dims, device)?.to_dtype(dtype.storage())?
        }
        DType::Bool | DType::U8 => Tensor::ones(dims, candle_core::DType::U8, device)?,
        other => Tensor::ones(dims, other.storage(), device)?,
    })
}

pub fn run(args: GraphBenchArgs) -> Result<()> {
    let named: HashMap<String, usize> = args
        .dims
        .iter()
        .map(|pair| {
            let (name, size) = pair
                .split_once('=')
                .with_context(|| format!("--dim takes NAME=SIZE, got {pair:?}"))?;
            Ok((
                name.to_string(),
                size.parse()
                    .with_context(|| format!("--dim {pair}: not a size"))?,
            ))
        })
        .collect::<Result<_>>()?;
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let started = Instant::now();
    let (graph, weights) = if args.model.is_dir() {
        let text = std::fs::read_to_string(args.model.join("graph.json"))?;
        let graph = kiln_graph::serial::from_json(&text)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&args.model)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        (graph, kiln_graph::load_safetensors(&files)?)
    } else {
        let imported = kiln_graph::onnx::import_file(&args.model)?;
        (imported.graph, imported.weights)
    };
    let model = InferenceSession::new(SessionOptions {
        optimize: !args.no_optimize,
    })
    .load(&graph, &weights)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let bar = ProgressBar::new((args.batch.len() * (args.runs + args.warmup)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} runs {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut results = Vec::new();
    for &batch in &args.batch {
        bar.set_message(format!("batch {batch}"));
        let inputs: HashMap<String, Tensor> = model
            .signature()
            .inputs
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| Ok((name.clone(), random_input(ty, batch, &named, i as u64)?)))
            .collect::<Result<_>>()?;
        for _ in 0..args.warmup {
            model.execute(&inputs)?;
            bar.inc(1);
        }
        let mut times = Vec::with_capacity(args.runs);
        let mut profile = HashMap::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            if args.profile {
                model.execute_profiled(&inputs, &mut profile)?;
            } else {
                model.execute(&inputs)?;
            }
            times.push(t.elapsed().as_secs_f64());
            bar.inc(1);
        }
        let total: f64 = profile.values().map(|d| d.as_secs_f64()).sum();
        let mut shares: Vec<(&str, f64)> = profile
            .iter()
            .map(|(k, d)| (*k, d.as_secs_f64() / total.max(1e-12)))
            .collect();
        shares.sort_by(|a, b| b.1.total_cmp(&a.1));
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        results.push(json!({
            "batch": batch,
            "median_s": median,
            "mean_s": mean,
            "min_s": times[0],
            "p90_s": times[(times.len() * 9 / 10).min(times.len() - 1)],
            "items_per_s": batch as f64 / median,
            "profile": shares.iter().map(|(op, share)| json!({"op": op, "share": share})).collect::<Vec<_>>(),
        }));
    }
    bar.finish_and_clear();
    let report = model.report();
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "model": args.model.display().to_string(),
            "load_s": load_seconds,
            "threads": std::env::var("RAYON_NUM_THREADS").ok(),
            "compile": {
                "nodes_before": report.nodes_before,
                "nodes_after": report.nodes_after,
                "folded": report.folded,
                "fused": report.fused,
            },
            "results": results,
        }))?
    );
    Ok(())
}
