//! Graphs built with the Rust API against reference outputs: a Poisson GLM
//! written by hand with the builder matches the exported ONNX GLM's
//! onnxruntime outputs (f64), and a graph saved as JSON + safetensors serves
//! the same numbers after loading.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use kiln_graph::{DType, Dim, Graph, InferenceSession, TensorType};

fn glm_graph() -> Graph {
    // mu = exp(x · beta + intercept + log(exposure))
    let mut g = Graph::new("poisson_glm");
    let x = g
        .input(
            "x",
            TensorType::new(DType::F64, [Dim::sym("rows"), 5.into()]),
        )
        .unwrap();
    let exposure = g
        .input("exposure", TensorType::new(DType::F64, [Dim::sym("rows")]))
        .unwrap();
    let beta = g
        .weight("beta", TensorType::new(DType::F64, [5usize]))
        .unwrap();
    let intercept = g.scalar(-0.7, DType::F64).unwrap();
    let eta = g.matmul(x, beta).unwrap();
    let eta = g.add(eta, intercept).unwrap();
    let offset = g.unary(kiln_graph::UnaryOp::Log, exposure).unwrap();
    let eta = g.add(eta, offset).unwrap();
    let mu = g.unary(kiln_graph::UnaryOp::Exp, eta).unwrap();
    g.output("mu", mu).unwrap();
    g
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/graph/models")
        .join(name)
}

#[test]
fn a_glm_built_in_rust_matches_the_exported_onnx_glm() {
    let onnx = kiln_graph::onnx::import_file(&fixture("glm_poisson.onnx")).unwrap();
    let graph = glm_graph();
    let model = InferenceSession::default()
        .load(&graph, &onnx.weights)
        .unwrap();
    let cases =
        candle_core::safetensors::load(fixture("glm_poisson.cases.safetensors"), &Device::Cpu)
            .unwrap();
    for case in 0..2 {
        let inputs: HashMap<String, Tensor> = ["x", "exposure"]
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    cases[&format!("case{case}.in.{name}")].clone(),
                )
            })
            .collect();
        let mu: Vec<f64> = model.execute(&inputs).unwrap()[0].1.to_vec1().unwrap();
        let expected: Vec<f64> = cases[&format!("case{case}.out.mu")].to_vec1().unwrap();
        for (a, b) in mu.iter().zip(&expected) {
            // f64 end to end: agreement to rounding.
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
        }
    }
}

#[test]
fn a_saved_graph_folder_loads_and_runs_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let graph = glm_graph();
    let beta = Tensor::new(&[0.1f64, -0.2, 0.3, 0.0, 0.5], &Device::Cpu).unwrap();
    let weights = HashMap::from([("beta".to_string(), beta)]);
    std::fs::write(
        dir.path().join("graph.json"),
        kiln_graph::serial::to_json(&graph).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(&weights, dir.path().join("weights.safetensors")).unwrap();

    let text = std::fs::read_to_string(dir.path().join("graph.json")).unwrap();
    let loaded = kiln_graph::serial::from_json(&text).unwrap();
    let stored = kiln_graph::load_safetensors(&[dir.path().join("weights.safetensors")]).unwrap();
    let a = InferenceSession::default().load(&graph, &weights).unwrap();
    let b = InferenceSession::default().load(&loaded, &stored).unwrap();
    let x = Tensor::new(
        &[[1.0f64, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
        &Device::Cpu,
    )
    .unwrap();
    let exposure = Tensor::new(&[1.0f64, 0.5], &Device::Cpu).unwrap();
    let inputs = HashMap::from([("x".to_string(), x), ("exposure".to_string(), exposure)]);
    let ya: Vec<f64> = a.execute(&inputs).unwrap()[0].1.to_vec1().unwrap();
    let yb: Vec<f64> = b.execute(&inputs).unwrap()[0].1.to_vec1().unwrap();
    assert_eq!(ya, yb);
    assert!((ya[1] - (0.5f64.ln() - 0.7).exp()).abs() < 1e-15);
    // A weight of the wrong shape is refused at load, naming it.
    let bad = HashMap::from([(
        "beta".to_string(),
        Tensor::zeros(4, candle_core::DType::F64, &Device::Cpu).unwrap(),
    )]);
    let err = InferenceSession::default()
        .load(&graph, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beta"), "{err}");
}
