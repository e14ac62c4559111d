//! Kiln's GGUF reader against gguf-py's own dequantization of the same files
//! (`fixtures/gguf/dequantized.safetensors`), shared by the FLUX and SDXL tests.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kiln_engine::gguf::GgufFile;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Each tensor of `gguf` (read by Kiln, in its original shape) against
/// gguf-py's dequantization stored as `{prefix}.NAME`; returns how many.
pub fn check_against_gguf_py(gguf: &Path, prefix: &str) -> usize {
    let file = GgufFile::open(gguf).unwrap();
    let reference = kiln_engine::weights::load_all(
        &fixtures().join("gguf/dequantized.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    for name in file.tensor_names() {
        let Some(expected) = reference.get(&format!("{prefix}.{name}")) else {
            continue;
        };
        let got = file.model_tensor(&name, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.dims(), expected.dims(), "{name}");
        let diff = (got - expected)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
        checked += 1;
    }
    checked
}
