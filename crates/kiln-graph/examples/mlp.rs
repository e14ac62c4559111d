//! Build a small MLP with the Graph API, compile it, save it in the JSON graph
//! format with its weights, and run it twice with different batch sizes:
//! `cargo run -p kiln-graph --example mlp -- [OUT_DIR]`. Serve the saved
//! folder with `kiln serve OUT_DIR` (its `graph.json` and `weights.safetensors`).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use kiln_graph::{DType, Dim, Graph, InferenceSession, TensorType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // y = softmax(gelu(x · w1 + b1) · w2 + b2), x: [batch, 4].
    let mut g = Graph::new("mlp");
    let x = g.input(
        "x",
        TensorType::new(DType::F32, [Dim::sym("batch"), 4.into()]),
    )?;
    let w1 = g.weight("w1", TensorType::new(DType::F32, [4usize, 8]))?;
    let b1 = g.weight("b1", TensorType::new(DType::F32, [8usize]))?;
    let w2 = g.weight("w2", TensorType::new(DType::F32, [8usize, 3]))?;
    let b2 = g.weight("b2", TensorType::new(DType::F32, [3usize]))?;
    let h = g.matmul(x, w1)?;
    let h = g.add(h, b1)?;
    let h = g.gelu(h)?;
    let logits = g.matmul(h, w2)?;
    let logits = g.add(logits, b2)?;
    let probs = g.softmax(logits, -1)?;
    g.output("probs", probs)?;
    // A shape mistake is caught here, naming the op and both shapes:
    // g.matmul(x, w2) fails with "matmul: inner dimensions differ: [batch, 4] · [8, 3] (4 vs 8)".

    let device = &Device::Cpu;
    let weights: HashMap<String, Tensor> = [
        ("w1", Tensor::randn(0f32, 0.5, (4, 8), device)?),
        ("b1", Tensor::zeros(8, candle_core::DType::F32, device)?),
        ("w2", Tensor::randn(0f32, 0.5, (8, 3), device)?),
        ("b2", Tensor::zeros(3, candle_core::DType::F32, device)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let model = InferenceSession::default().load(&g, &weights)?;
    println!("compiled: {:?}", model.report());
    for batch in [1, 3] {
        let x = Tensor::randn(0f32, 1.0, (batch, 4), device)?;
        let outputs = model.execute(&HashMap::from([("x".to_string(), x)]))?;
        println!(
            "batch {batch}: probs = {:?}",
            outputs[0].1.to_vec2::<f32>()?
        );
    }

    if let Some(dir) = std::env::args().nth(1) {
        let dir = std::path::Path::new(&dir);
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("graph.json"), kiln_graph::serial::to_json(&g)?)?;
        candle_core::safetensors::save(&weights, dir.join("weights.safetensors"))?;
        println!("saved {}", dir.display());
    }
    Ok(())
}
