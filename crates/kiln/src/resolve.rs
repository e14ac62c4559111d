//! Turning what a user typed into a loadable model: registry references, model
//! folders with a manifest, and plain folders Kiln recognises (a diffusers FLUX
//! folder) described on the fly.

use std::path::Path;

use anyhow::{Context, Result};
use kiln_registry::{IntegrityCache, ModelRef, Registry, ResolvedModel, Verification};

/// Resolve `text` (`models:/a.b.c@alias`, `a.b.c`, or a folder) and check its
/// files against the manifest.
pub fn resolve_model(registry: &Registry, text: &str) -> Result<ResolvedModel> {
    let resolved = locate_model(registry, text)?;
    IntegrityCache::new()
        .verify(&resolved, Verification::Full)
        .with_context(|| format!("cannot load {text}"))?;
    Ok(resolved)
}

/// Find the folder and manifest `text` names without reading the weights: a
/// server verifies them on every load instead.
pub fn locate_model(registry: &Registry, text: &str) -> Result<ResolvedModel> {
    let reference = ModelRef::parse(text)?;
    if let ModelRef::LocalFolder(path) = &reference
        && path.is_file()
    {
        let manifest = kiln_pipelines::describe_model_folder(path)
            .map_err(anyhow::Error::msg)?
            .with_context(|| {
                format!(
                    "{} is not a model file Kiln recognises (a GGUF LLM)",
                    path.display()
                )
            })?;
        return Ok(ResolvedModel {
            name: None,
            version: None,
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            manifest,
        });
    }
    if let ModelRef::LocalFolder(dir) = &reference
        && dir.is_dir()
        && !dir.join("manifest.json").is_file()
    {
        let manifest = kiln_pipelines::describe_model_folder(dir)
            .map_err(anyhow::Error::msg)?
            .with_context(|| {
                format!(
                    "{} has no manifest.json and is not a model folder Kiln recognises",
                    dir.display()
                )
            })?;
        return Ok(ResolvedModel {
            name: None,
            version: None,
            dir: dir.clone(),
            manifest,
        });
    }
    registry
        .locate(&reference)
        .with_context(|| format!("cannot load {text}"))
}

/// Bytes of the files under `dir`: the estimate of a loaded model's memory.
pub fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => folder_bytes(&entry.path()),
            Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
