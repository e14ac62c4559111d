//! Logit verification, as MAX's: a reference dump of greedy generations (per
//! case the prompt ids, the reference's generated ids, and its logits at every
//! step) is replayed teacher-forced through Kiln, and each step's logits are
//! compared (cosine distance, KL(reference‖Kiln), abs/rel tolerance, argmax).
//!
//! The dump is a folder with `index.json` (`{"cases": [{"name", "input_ids",
//! "output_ids", "logits"}, ...]}`, each naming a tensor) and
//! `references.safetensors` (int64 ids, float32 `(steps, vocab)` logits), as
//! `scripts/llm_reference.py` writes it with transformers.

use std::path::Path;

use candle_core::{DType, Device};
use kiln_engine::parity::{LogitComparison, compare_logits};
use serde_json::Value;

use crate::bundle::LanguageModel;
use crate::error::TextGenError;

/// One recorded generation.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceCase {
    pub name: String,
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    /// Logits at each step: step 0 after the prompt, step t after output t−1.
    pub logits: Vec<Vec<f32>>,
}

fn dump_error(dir: &Path, message: impl std::fmt::Display) -> TextGenError {
    TextGenError::Load(format!("{}: {message}", dir.display()))
}

/// Read a reference dump folder.
pub fn read_reference(dir: &Path) -> Result<Vec<ReferenceCase>, TextGenError> {
    let index_path = dir.join("index.json");
    let index: Value = std::fs::read_to_string(&index_path)
        .map_err(|e| dump_error(&index_path, e))
        .and_then(|t| serde_json::from_str(&t).map_err(|e| dump_error(&index_path, e)))?;
    let tensors = candle_core::safetensors::load(dir.join("references.safetensors"), &Device::Cpu)
        .map_err(|e| dump_error(&dir.join("references.safetensors"), e))?;
    let tensor = |name: &Value| {
        let name = name
            .as_str()
            .ok_or_else(|| dump_error(&index_path, "tensor names must be strings"))?;
        tensors.get(name).ok_or_else(|| {
            dump_error(
                dir,
                format!("references.safetensors has no tensor {name:?}"),
            )
        })
    };
    let ids = |name: &Value| -> Result<Vec<u32>, TextGenError> {
        let t = tensor(name)?;
        let values = t
            .to_dtype(DType::I64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(|e| dump_error(dir, e))?;
        values
            .into_iter()
            .map(|v| {
                u32::try_from(v)
                    .map_err(|_| dump_error(dir, format!("token id {v} is out of range")))
            })
            .collect()
    };
    let cases = index["cases"]
        .as_array()
        .ok_or_else(|| dump_error(&index_path, "`cases` must be a list"))?;
    cases
        .iter()
        .map(|c| {
            let logits = tensor(&c["logits"])?
                .to_dtype(DType::F32)
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(|e| dump_error(dir, e))?;
            let case = ReferenceCase {
                name: c["name"].as_str().unwrap_or("?").to_string(),
                input_ids: ids(&c["input_ids"])?,
                output_ids: ids(&c["output_ids"])?,
                logits,
            };
            if case.logits.len() != case.output_ids.len() || case.input_ids.is_empty() {
                return Err(dump_error(
                    dir,
                    format!(
                        "case {:?}: {} logit rows for {} output ids",
                        case.name,
                        case.logits.len(),
                        case.output_ids.len()
                    ),
                ));
            }
            Ok(case)
        })
        .collect()
}

/// Kiln's logits for every step of `case`, teacher-forced on its outputs.
pub fn teacher_forced_logits(
    model: &LanguageModel,
    case: &ReferenceCase,
) -> Result<Vec<Vec<f32>>, TextGenError> {
    let net = &model.model;
    let mut cache = net.new_cache();
    let mut out = Vec::with_capacity(case.output_ids.len());
    out.push(
        net.next_logits(&case.input_ids, &mut cache)?
            .to_vec1::<f32>()?,
    );
    for &id in &case.output_ids[..case.output_ids.len().saturating_sub(1)] {
        out.push(net.next_logits(&[id], &mut cache)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The worst of each measure over one case's steps.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseReport {
    pub name: String,
    pub steps: usize,
    pub worst_cosine_distance: f64,
    pub worst_kl: f64,
    pub max_abs: f64,
    /// Logits breaking the abs/rel rule, over all steps.
    pub violations: usize,
    /// Steps whose argmax agrees with the reference's.
    pub same_argmax: usize,
}

/// Compare one case.
pub fn verify_case(
    model: &LanguageModel,
    case: &ReferenceCase,
    atol: f64,
    rtol: f64,
) -> Result<CaseReport, TextGenError> {
    let ours = teacher_forced_logits(model, case)?;
    let mut report = CaseReport {
        name: case.name.clone(),
        steps: ours.len(),
        worst_cosine_distance: 0.0,
        worst_kl: 0.0,
        max_abs: 0.0,
        violations: 0,
        same_argmax: 0,
    };
    for (step, (o, r)) in ours.iter().zip(&case.logits).enumerate() {
        let c: LogitComparison = compare_logits(o, r, atol, rtol).map_err(|e| {
            TextGenError::invalid(
                "reference",
                format!("case {:?} step {step}: {e}", case.name),
            )
        })?;
        report.worst_cosine_distance = report.worst_cosine_distance.max(c.cosine_distance);
        report.worst_kl = report.worst_kl.max(c.kl);
        report.max_abs = report.max_abs.max(c.max_abs);
        report.violations += c.violations;
        report.same_argmax += usize::from(c.same_argmax);
    }
    Ok(report)
}
