//! Print an ONNX model's graph before and after compilation:
//! `cargo run -p kiln-graph --example describe -- model.onnx`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: describe MODEL.onnx")?;
    let imported = kiln_graph::onnx::import_file(std::path::Path::new(&path))?;
    println!(
        "# imported\n{}",
        kiln_graph::compile::describe(&imported.graph)
    );
    let model = kiln_graph::InferenceSession::default().load(&imported.graph, &imported.weights)?;
    println!(
        "# compiled ({:?})\n{}",
        model.report(),
        kiln_graph::compile::describe(model.graph())
    );
    Ok(())
}
