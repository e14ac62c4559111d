//! Loading helpers the text-to-image pipelines share: JSON configs, weight
//! folders, and var builders over adapted (renamed/fused) weights.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kiln_engine::{AdaptedWeights, KeyAdapter, WeightFiles};
use serde::de::DeserializeOwned;

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn var_builder(
    files: WeightFiles,
    adapter: KeyAdapter,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(AdaptedWeights::new(files, adapter)),
        dtype,
        device.clone(),
    )
}

pub(crate) fn open(path: &Path) -> Result<WeightFiles, String> {
    WeightFiles::open(path).map_err(|e| e.to_string())
}
