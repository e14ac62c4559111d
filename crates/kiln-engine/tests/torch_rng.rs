//! The generator against streams recorded from torch (`fixtures/flux/rng`, made by
//! `fixtures/flux/generate.py` on a machine whose torch CPU capability is AVX2):
//! every element must be bit-identical.

use std::path::Path;

use candle_core::Device;
use kiln_engine::TorchGenerator;
use kiln_engine::weights::load_all;

#[test]
fn randn_and_rand_match_torch_bit_for_bit() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux/rng");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let tensors = load_all(&dir.join("streams.safetensors"), &Device::Cpu).unwrap();
    let mut checked = 0;
    let mut report = Vec::new();
    for stream in index["streams"].as_array().unwrap() {
        let name = stream["name"].as_str().unwrap();
        let seed = stream["seed"].as_u64().unwrap();
        let n: usize = stream["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .product();
        if stream["op"] == "raw" {
            let expected: Vec<i64> = tensors[name].flatten_all().unwrap().to_vec1().unwrap();
            let mut generator = TorchGenerator::new(seed);
            let ours: Vec<i64> = (0..n).map(|_| i64::from(generator.next_u32())).collect();
            assert_eq!(ours, expected, "{name}");
            checked += 1;
            continue;
        }
        let expected: Vec<f32> = tensors[name].flatten_all().unwrap().to_vec1().unwrap();
        let ours = match stream["op"].as_str().unwrap() {
            "normal" => TorchGenerator::new(seed).randn(n),
            "uniform" => TorchGenerator::new(seed).rand(n),
            other => panic!("unknown op {other}"),
        };
        let same = ours
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        if same != n {
            let worst = ours
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            report.push(format!("{name}: {same}/{n} identical, max diff {worst:e}"));
        }
        checked += 1;
    }
    assert!(checked >= 6, "expected the recorded streams");
    assert!(report.is_empty(), "{}", report.join("\n"));
}
