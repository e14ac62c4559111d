//! LoRAs as requests name them: the schema fields (`loras`, Cog's
//! `lora_weights`/`lora_scale`/`extra_lora`/`extra_lora_scale`, the RunPod
//! FLUX.2 handler's `lora_path`), their parsing with errors naming the field,
//! and resolution (source → cached parsed file → model adapters) with the
//! per-LoRA report every response carries.

use std::sync::Arc;

use kiln_engine::lora::AdapterSet;
use serde_json::{Map, Value, json};

use super::sources::{LoraCache, LoraSettings, locate};
use super::{LoraError, LoraFile, LoraReport};
use crate::error::{FieldProblem, PipelineError, ProblemKind};
use crate::schema::{FieldKind, FieldSpec};

/// A request's LoRAs, read and mapped onto the model's layers.
pub struct ResolvedLoras {
    pub adapters: Arc<AdapterSet>,
    /// Identifies the set: each file's path, modification time and scale.
    pub key: String,
    /// What was applied, for the response.
    pub report: Value,
}

/// The request fields that name LoRAs.
pub fn schema_fields() -> Vec<FieldSpec> {
    let scale = |name: &str, about: &str| {
        FieldSpec::new(
            name,
            about,
            FieldKind::number(-10.0, 10.0),
            Some(json!(1.0)),
        )
    };
    let source = |name: &str, about: &str| {
        FieldSpec::new(
            name,
            about,
            FieldKind::String {
                min_length: Some(1),
                max_length: Some(4096),
            },
            Some(Value::Null),
        )
    };
    vec![
        FieldSpec::new(
            "loras",
            "LoRAs to apply: [{\"source\": file in KILN_LORA_DIRS, https URL, CivitAI URL or Hugging Face owner/repo[/file], \"scale\": 1.0}, ...]",
            FieldKind::List {
                max_items: Some(MAX_LORAS),
            },
            Some(Value::Null),
        ),
        source(
            "lora_weights",
            "A LoRA: a file in KILN_LORA_DIRS, an https or CivitAI URL, or a Hugging Face id (Cog's name); scaled by lora_scale",
        ),
        scale("lora_scale", "Scale of lora_weights / lora_path"),
        source(
            "extra_lora",
            "A second LoRA (Cog's name); scaled by extra_lora_scale",
        ),
        scale("extra_lora_scale", "Scale of extra_lora"),
        source(
            "lora_path",
            "A LoRA, as lora_weights (RunPod FLUX.2 handler's name); scaled by lora_scale",
        ),
    ]
}

/// Maps one parsed file at a user scale onto a model's layers.
pub type AdapterBuilder<'a> =
    dyn Fn(&LoraFile, f64) -> Result<(AdapterSet, LoraReport), LoraError> + 'a;

/// Resolve the request's LoRAs: locate each source, read it through the
/// shared cache, map it with `build`. `None` when the request names none.
pub fn resolve(
    input: &Map<String, Value>,
    settings: &LoraSettings,
    build: &AdapterBuilder,
) -> Result<Option<ResolvedLoras>, PipelineError> {
    let wanted = lora_requests(input)?;
    if wanted.is_empty() {
        return Ok(None);
    }
    let cache = LoraCache::shared();
    let mut files = Vec::with_capacity(wanted.len());
    let mut problems = Vec::new();
    for (field, source, scale) in &wanted {
        match locate(field, source, settings)
            .and_then(|located| cache.get(field, &located.path).map(|file| (file, located)))
        {
            Ok((file, located)) => files.push((file, located, *scale)),
            Err(PipelineError::InvalidInput(mut found)) => problems.append(&mut found),
            Err(other) => return Err(other),
        }
    }
    if !problems.is_empty() {
        return Err(PipelineError::InvalidInput(problems));
    }
    let mut reports = Vec::with_capacity(files.len());
    let mut key = String::new();
    let mut set = AdapterSet::default();
    for ((file, located, scale), (field, source, _)) in files.iter().zip(&wanted) {
        let (one, report) = build(file.as_ref(), *scale).map_err(|e| {
            PipelineError::invalid(field.clone(), ProblemKind::Constraint, e.to_string())
        })?;
        set.extend(one);
        tracing::info!(%source, format = file.format.name(), matched = report.matched, unmatched = report.unmatched.len(), "LoRA applied");
        let stamp = std::fs::metadata(&located.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        key.push_str(&format!("{}|{stamp}|{scale};", located.path.display()));
        let mut entry = json!({
            "source": source,
            "scale": scale,
            "format": file.format.name(),
            "matched_modules": report.matched,
            "unmatched_modules": report.unmatched,
            "layers": report.layers,
        });
        if let Some(origin) = &located.origin {
            entry["resolved"] = json!(origin);
        }
        if let Some(sha256) = &located.sha256 {
            entry["sha256"] = json!(sha256);
        }
        reports.push(entry);
    }
    Ok(Some(ResolvedLoras {
        adapters: Arc::new(set),
        key,
        report: Value::Array(reports),
    }))
}

/// Most LoRAs one request may apply.
pub const MAX_LORAS: usize = 4;

/// (field, source, scale) for each LoRA the input asks for, in order.
pub fn lora_requests(
    input: &Map<String, Value>,
) -> Result<Vec<(String, String, f64)>, PipelineError> {
    let number = |key: &str| input.get(key).and_then(Value::as_f64).unwrap_or(1.0);
    let text = |key: &str| {
        input
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    };
    let mut out = Vec::new();
    let mut problems = Vec::new();
    if let Some(Value::Array(items)) = input.get("loras") {
        for (i, item) in items.iter().enumerate() {
            let field = format!("loras[{i}]");
            let source = item
                .get("source")
                .or_else(|| item.get("path"))
                .and_then(Value::as_str);
            let scale = match item.get("scale") {
                None | Some(Value::Null) => Some(1.0),
                Some(v) => v.as_f64().filter(|s| s.is_finite() && s.abs() <= 10.0),
            };
            match (source, scale) {
                (Some(source), Some(scale)) => out.push((field, source.to_string(), scale)),
                (None, _) => problems.push(FieldProblem::new(
                    field,
                    ProblemKind::Malformed,
                    "each LoRA is an object with \"source\" (a file) and an optional \"scale\"",
                )),
                (_, None) => problems.push(FieldProblem::new(
                    field,
                    ProblemKind::Constraint,
                    "scale must be a number between -10 and 10",
                )),
            }
        }
    }
    for (key, scale_key) in [
        ("lora_weights", "lora_scale"),
        ("lora_path", "lora_scale"),
        ("extra_lora", "extra_lora_scale"),
    ] {
        if let Some(source) = text(key) {
            out.push((key.to_string(), source, number(scale_key)));
        }
    }
    if out.len() > MAX_LORAS {
        problems.push(FieldProblem::new(
            "loras",
            ProblemKind::Constraint,
            format!("at most {MAX_LORAS} LoRAs per request, got {}", out.len()),
        ));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(PipelineError::InvalidInput(problems))
    }
}
