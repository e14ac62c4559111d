//! Bad ONNX files and bad execution inputs give clear errors, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kiln_graph::onnx::proto::{ModelProto, NodeProto, StringStringEntryProto, TensorProto};
use kiln_graph::onnx::{import_bytes, import_file};
use kiln_graph::{GraphError, InferenceSession};
use prost::Message;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/graph")
        .join(name)
}

fn decoded(name: &str) -> ModelProto {
    ModelProto::decode(std::fs::read(fixture(name)).unwrap().as_slice()).unwrap()
}

#[test]
fn truncated_and_garbage_files_are_malformed_errors() {
    let bytes = std::fs::read(fixture("models/mlp.onnx")).unwrap();
    for cut in [1, 10, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        match import_bytes(&bytes[..cut], None, "mlp") {
            Err(GraphError::Malformed { .. })
            | Err(GraphError::Invalid(_))
            | Err(GraphError::Import { .. }) => {}
            other => panic!("cut at {cut}: expected a clear error, got {other:?}"),
        }
    }
    let err = import_bytes(b"\xff\xff\xff\xff not protobuf", None, "junk")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not an ONNX model") || err.contains("malformed"),
        "{err}"
    );
    let err = import_bytes(&[], None, "empty").unwrap_err().to_string();
    assert!(err.contains("has no graph"), "{err}");
}

#[test]
fn an_unsupported_operator_is_named_with_its_node() {
    let mut model = decoded("ops/relu.onnx");
    let graph = model.graph.as_mut().unwrap();
    graph.node[0].op_type = "NonMaxSuppression".into();
    graph.node[0].name = "nms_1".into();
    let err = import_bytes(&model.encode_to_vec(), None, "m")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NonMaxSuppression") && err.contains("nms_1"),
        "{err}"
    );

    let mut model = decoded("ops/relu.onnx");
    model.graph.as_mut().unwrap().node[0].domain = "com.microsoft".into();
    let err = import_bytes(&model.encode_to_vec(), None, "m")
        .unwrap_err()
        .to_string();
    assert!(err.contains("com.microsoft"), "{err}");
}

#[test]
fn a_node_reading_an_undefined_value_is_an_import_error() {
    let mut model = decoded("ops/add.onnx");
    model.graph.as_mut().unwrap().node.insert(
        0,
        NodeProto {
            input: vec!["ghost".into()],
            output: vec!["z".into()],
            name: "n0".into(),
            op_type: "Relu".into(),
            ..Default::default()
        },
    );
    let err = import_bytes(&model.encode_to_vec(), None, "m")
        .unwrap_err()
        .to_string();
    assert!(err.contains("ghost") && err.contains("n0"), "{err}");
}

#[test]
fn external_data_cannot_escape_the_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = decoded("ops/add.onnx");
    model.graph.as_mut().unwrap().initializer.push(TensorProto {
        name: "b".into(),
        dims: vec![3, 1],
        data_type: 1,
        data_location: 1,
        external_data: vec![StringStringEntryProto {
            key: "location".into(),
            value: "../../etc/passwd".into(),
        }],
        ..Default::default()
    });
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let err = import_file(&path).unwrap_err().to_string();
    assert!(err.contains("inside the model's folder"), "{err}");
}

#[test]
fn external_data_inside_the_folder_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = decoded("ops/add.onnx");
    let graph = model.graph.as_mut().unwrap();
    graph.input.retain(|i| i.name != "b");
    let values = [0.5f32, -1.0, 2.0];
    let bytes: Vec<u8> = [0f32; 2]
        .iter()
        .chain(values.iter())
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.path().join("weights.bin"), &bytes).unwrap();
    graph.initializer.push(TensorProto {
        name: "b".into(),
        dims: vec![3, 1],
        data_type: 1,
        data_location: 1,
        external_data: vec![
            StringStringEntryProto {
                key: "location".into(),
                value: "weights.bin".into(),
            },
            StringStringEntryProto {
                key: "offset".into(),
                value: "8".into(),
            },
            StringStringEntryProto {
                key: "length".into(),
                value: "12".into(),
            },
        ],
        ..Default::default()
    });
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let imported = import_file(&path).unwrap();
    let model = InferenceSession::default()
        .load(&imported.graph, &imported.weights)
        .unwrap();
    let a = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let out = model
        .execute(&HashMap::from([("a".to_string(), a)]))
        .unwrap();
    let y: Vec<f32> = out[0].1.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&y[..4], &[0.5; 4]);
    assert_eq!(&y[4..8], &[-1.0; 4]);
}

#[test]
fn every_input_problem_is_reported_at_once() {
    let imported = import_file(&fixture("models/encoder.onnx")).unwrap();
    let model = InferenceSession::default()
        .load(&imported.graph, &imported.weights)
        .unwrap();
    // Wrong dtype for `hidden`, a seq length that disagrees with `mask`'s, and an unknown input.
    let hidden = Tensor::zeros((2, 5, 32), candle_core::DType::F64, &Device::Cpu).unwrap();
    let mask = Tensor::zeros((2, 4), candle_core::DType::I64, &Device::Cpu).unwrap();
    let extra = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    let inputs = HashMap::from([
        ("hidden".to_string(), hidden),
        ("mask".to_string(), mask),
        ("bogus".to_string(), extra),
    ]);
    let Err(GraphError::Inputs(problems)) = model.execute(&inputs) else {
        panic!("expected input problems");
    };
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("hidden: has dtype f64, expected f32")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("mask") && t.contains("seq")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|t| t.starts_with("bogus: is not an input")),
        "{text:?}"
    );
    // A missing input and a wrong static width.
    let hidden = Tensor::zeros((1, 3, 31), candle_core::DType::F32, &Device::Cpu).unwrap();
    let Err(GraphError::Inputs(problems)) =
        model.execute(&HashMap::from([("hidden".to_string(), hidden)]))
    else {
        panic!("expected input problems");
    };
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("dimension 2 is 31, expected 32")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|t| t.starts_with("mask: is missing")),
        "{text:?}"
    );
}
