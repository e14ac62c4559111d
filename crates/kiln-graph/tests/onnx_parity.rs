//! Parity with onnxruntime on the fixtures of `fixtures/graph/generate.py`:
//! every single-op model (broadcasting, negative axes, padding, ±inf) and the
//! small exported models (CNN, MLP, encoder, GLM) at two batch sizes, each
//! compiled with and without the optimisation passes and after a round trip
//! through the JSON graph format.
//!
//! Tolerance: |kiln − ort| ≤ 1e-5 + 1e-5·|ort| per element (f32 rounding of
//! differently ordered sums; the end-to-end bound is 1e-5 absolute on
//! outputs of order 1, and large values such as `exp` get the relative term);
//! infinities and NaNs must match exactly; integers and booleans exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use kiln_graph::onnx::import_file;
use kiln_graph::{InferenceSession, SessionOptions};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/graph")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

struct Case {
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
}

fn cases(model: &Path) -> Vec<Case> {
    let path = model.with_extension("cases.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let mut cases: Vec<Case> = Vec::new();
    for (key, tensor) in tensors {
        let mut parts = key.splitn(3, '.');
        let (case, kind, name) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let index: usize = case.trim_start_matches("case").parse().unwrap();
        while cases.len() <= index {
            cases.push(Case {
                inputs: HashMap::new(),
                outputs: HashMap::new(),
            });
        }
        // `in0`/`out0`: a rank-0 value that safetensors stored as shape (1,).
        let tensor = if kind.ends_with('0') {
            tensor.reshape(()).unwrap()
        } else {
            tensor
        };
        let map = if kind.starts_with("in") {
            &mut cases[index].inputs
        } else {
            &mut cases[index].outputs
        };
        map.insert(name.to_string(), tensor);
    }
    cases
}

/// The largest violation of the tolerance, or an error for a mismatch of
/// specials, dtype or shape.
fn compare(label: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "{label}: shape");
    let integral = !matches!(
        reference.dtype(),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16
    );
    let a: Vec<f64> = ours
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = reference
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    if integral {
        assert_eq!(a, b, "{label}: integer/boolean values differ");
        return 0.0;
    }
    let mut worst = 0f64;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if y.is_nan() {
            assert!(x.is_nan(), "{label}[{i}]: expected NaN, got {x}");
            continue;
        }
        if y.is_infinite() {
            assert_eq!(x, y, "{label}[{i}]: expected {y}");
            continue;
        }
        let excess = (x - y).abs() - (1e-5 + 1e-5 * y.abs());
        assert!(x.is_finite(), "{label}[{i}]: got {x}, expected {y}");
        worst = worst.max(excess);
    }
    worst
}

fn check_all(kind: &str) {
    let mut failures = Vec::new();
    for model_path in fixtures(kind) {
        let label = model_path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let imported = match import_file(&model_path) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{label}: import: {e}"));
                continue;
            }
        };
        for options in [
            SessionOptions { optimize: true },
            SessionOptions { optimize: false },
        ] {
            let model = match InferenceSession::new(options.clone())
                .load(&imported.graph, &imported.weights)
            {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{label}: load: {e}"));
                    continue;
                }
            };
            for (i, case) in cases(&model_path).into_iter().enumerate() {
                let outputs = match model.execute(&case.inputs) {
                    Ok(o) => o,
                    Err(e) => {
                        failures.push(format!("{label} case {i}: execute: {e}"));
                        continue;
                    }
                };
                for (name, tensor) in outputs {
                    let expected = &case.outputs[&name];
                    let worst = compare(
                        &format!("{label} case {i} {name} (optimize {})", options.optimize),
                        &tensor,
                        expected,
                    );
                    if worst > 0.0 {
                        failures.push(format!(
                            "{label} case {i} {name}: exceeds tolerance by {worst:e}"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_single_op_fixture_matches_onnxruntime() {
    check_all("ops");
}

#[test]
fn exported_models_match_onnxruntime_at_two_batch_sizes() {
    check_all("models");
}

#[test]
fn compiling_an_exported_mlp_folds_fuses_and_shrinks_it() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/graph/models/mlp.onnx");
    let imported = import_file(&path).unwrap();
    let model = InferenceSession::default()
        .load(&imported.graph, &imported.weights)
        .unwrap();
    let report = model.report();
    assert!(report.nodes_after < report.nodes_before, "{report:?}");
    assert!(report.fused >= 3, "{report:?}");
    let ops: Vec<&str> = model.graph().nodes().iter().map(|n| n.op.name()).collect();
    assert!(ops.contains(&"matmul_bias"), "{ops:?}");
    assert!(ops.contains(&"fused_elementwise"), "{ops:?}");
}
