//! `kiln predict`: run a model once on a CSV file and print the predictions.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln_pipelines::{PredictInput, PredictRequest, Prediction, RawFrame, load_pipeline};
use kiln_registry::{ModelRef, Registry, Verification};
use serde_json::{Map, Value, json};

#[derive(Args)]
pub struct PredictArgs {
    /// Model reference (`models:/name@alias`, a name, or a model folder).
    model: String,
    /// CSV file with one row per prediction.
    #[arg(long)]
    data: PathBuf,
    /// Parameters as KEY=VALUE (e.g. `-p which=linear`).
    #[arg(short = 'p', long = "param")]
    params: Vec<String>,
}

pub fn run(home: &Path, args: PredictArgs) -> Result<()> {
    let resolved =
        Registry::open(home).resolve(&ModelRef::parse(&args.model)?, Verification::Full)?;
    let pipeline = load_pipeline(&resolved)?;
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let mut params = Map::new();
    for param in &args.params {
        let Some((key, value)) = param.split_once('=') else {
            bail!("parameters are written KEY=VALUE, got {param:?}");
        };
        let value =
            serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        params.insert(key.to_string(), value);
    }
    let prediction = pipeline.predict(PredictRequest {
        input: PredictInput::Frame(RawFrame::from_csv(&text)?),
        params,
    })?;
    let output = match prediction {
        Prediction::Json(value) => value,
        Prediction::Tensors(tensors) => {
            let mut map = Map::new();
            for tensor in tensors {
                map.insert(tensor.name.clone(), tensor.data.to_json());
            }
            Value::Object(map)
        }
    };
    println!("{}", serde_json::to_string_pretty(&json!(output))?);
    Ok(())
}
