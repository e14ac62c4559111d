//! `kiln predict`: run a model once, Cog-style (`-i prompt="a cat" -i image=@in.png
//! -o out.png`) for generative models, on a CSV file for tabular ones, or on a
//! JSON file of tensors for graph models; a progress
//! bar follows the denoising steps, and LLMs stream their tokens.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_pipelines::contract::InputSpec;
use kiln_pipelines::{PredictInput, PredictRequest, Prediction, Progress, RawFrame, load_pipeline};
use kiln_registry::Registry;
use serde_json::{Map, Value};

#[derive(Args)]
pub struct PredictArgs {
    /// Model reference (`models:/name@alias`, a name, or a model folder).
    model: String,
    /// Input field as KEY=VALUE; `@path` reads a file (images become base64).
    #[arg(short = 'i', long = "input")]
    inputs: Vec<String>,
    /// CSV file with one row per prediction (tabular models); for tensor
    /// models (graphs, ONNX) also a JSON file `{"input": [batch-first nested
    /// list], ...}` or any MLflow `/invocations` body.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Parameters as KEY=VALUE (e.g. `-p which=linear`).
    #[arg(short = 'p', long = "param")]
    params: Vec<String>,
    /// Where to write images (`out.png`; `out-1.png`, ... for more than one).
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
}

fn split_pair(text: &str, what: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => bail!("{what} are written KEY=VALUE, got {text:?}"),
    }
}

/// A command-line value: `@file` (base64 of its bytes), JSON (numbers, booleans,
/// quoted strings), or plain text.
fn parse_value(value: &str) -> Result<Value> {
    if let Some(path) = value.strip_prefix('@') {
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        return Ok(Value::String(
            base64::engine::general_purpose::STANDARD.encode(bytes),
        ));
    }
    Ok(serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string())))
}

pub fn pairs(items: &[String], what: &str) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for item in items {
        let (key, value) = split_pair(item, what)?;
        map.insert(key, parse_value(&value)?);
    }
    Ok(map)
}

fn output_path(base: &Path, index: usize, count: usize, format: &str) -> PathBuf {
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "output".into());
    let extension = base
        .extension()
        .map(|e| e.to_string_lossy().to_string())
        .unwrap_or_else(|| format.to_string());
    let name = if count == 1 {
        format!("{stem}.{extension}")
    } else {
        format!("{stem}-{index}.{extension}")
    };
    base.with_file_name(name)
}

/// Write base64 images from a JSON result to files and replace them by paths.
fn save_images(result: &mut Value, output: &Path) -> Result<()> {
    let Some(images) = result.get_mut("images").and_then(Value::as_array_mut) else {
        return Ok(());
    };
    let count = images.len();
    for (index, image) in images.iter_mut().enumerate() {
        let Some(data) = image.get("base64").and_then(Value::as_str) else {
            continue;
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(data)?;
        let format = image.get("format").and_then(Value::as_str).unwrap_or("png");
        let path = output_path(output, index, count, format);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        if let Some(object) = image.as_object_mut() {
            object.remove("base64");
            object.insert("path".into(), Value::String(path.display().to_string()));
        }
    }
    Ok(())
}

pub fn run(home: &Path, args: PredictArgs) -> Result<()> {
    let resolved = crate::resolve::resolve_model(&Registry::open(home), &args.model)?;
    let pipeline = load_pipeline(&resolved)?;
    if let Some(engine) = pipeline.text_generation() {
        super::generate::stream_to_terminal(&engine, &pairs(&args.inputs, "inputs")?)?;
        return Ok(());
    }
    let params = pairs(&args.params, "parameters")?;
    let input = match (&pipeline.interface().inputs, &args.data) {
        (InputSpec::Columns(_), Some(data)) => {
            let text = std::fs::read_to_string(data)
                .with_context(|| format!("reading {}", data.display()))?;
            PredictInput::Frame(RawFrame::from_csv(&text)?)
        }
        (InputSpec::Columns(_), None) => {
            bail!("{} is a tabular model: give --data FILE.csv", args.model)
        }
        (InputSpec::Fields(_), _) => PredictInput::Fields(pairs(&args.inputs, "inputs")?),
        (InputSpec::Tensors(_), Some(data)) => {
            let text = std::fs::read_to_string(data)
                .with_context(|| format!("reading {}", data.display()))?;
            if data.extension().is_some_and(|e| e == "csv") {
                PredictInput::Frame(RawFrame::from_csv(&text)?)
            } else {
                let value: Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not JSON", data.display()))?;
                match value {
                    Value::Object(map) => {
                        match ["inputs", "instances"].iter().find_map(|k| map.get(*k)) {
                            Some(inner) => {
                                PredictInput::Frame(RawFrame::from_instances("inputs", inner)?)
                            }
                            None => PredictInput::Fields(map),
                        }
                    }
                    other => PredictInput::Frame(RawFrame::from_instances("inputs", &other)?),
                }
            }
        }
        (InputSpec::Tensors(_), None) => {
            bail!(
                "{} is a tensor model: give --data FILE.json (or .csv)",
                args.model
            )
        }
    };
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("denoising");
    let mut on_progress = |progress: Progress| {
        if bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(progress.total as u64);
        }
        bar.set_position(progress.step as u64);
        true
    };
    let prediction =
        pipeline.predict_with_progress(PredictRequest { input, params }, &mut on_progress)?;
    bar.finish_and_clear();
    let output = match prediction {
        Prediction::Json(mut value) => {
            save_images(
                &mut value,
                args.output.as_deref().unwrap_or(Path::new("output.png")),
            )?;
            value
        }
        Prediction::Tensors(tensors) => {
            let mut map = Map::new();
            for tensor in tensors {
                map.insert(
                    tensor.name.clone(),
                    tensor.data.to_nested_json(&tensor.shape),
                );
            }
            Value::Object(map)
        }
    };
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}
