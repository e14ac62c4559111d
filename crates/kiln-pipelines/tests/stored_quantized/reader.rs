//! What the stored-quantization tests share: Kiln's GGUF reader against
//! gguf-py's own dequantization of the same files
//! (`fixtures/gguf/dequantized.safetensors`), tiny-dev folders with their
//! transformer replaced, and PSNR.

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
        let diff = kiln_engine::parity::compare(&got, expected)
            .unwrap()
            .max_abs;
        assert_eq!(diff, 0.0, "{name}");
        checked += 1;
    }
    checked
}

/// tiny-dev with its transformer weights replaced by `files` (tiny-dev's
/// config.json is copied first; a file of the same name replaces it), as a
/// user lays out city96's GGUF or a bitsandbytes save. (The SDXL test binary
/// shares this module but not this helper.)
#[allow(dead_code)]
pub fn tiny_dev_with_transformer(files: &[PathBuf]) -> tempfile::TempDir {
    let source = fixtures().join("flux/tiny-dev");
    let folder = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "transformer" {
            std::os::unix::fs::symlink(entry.path(), folder.path().join(entry.file_name()))
                .unwrap();
        }
    }
    let transformer = folder.path().join("transformer");
    std::fs::create_dir(&transformer).unwrap();
    let config = source.join("transformer/config.json");
    for file in std::iter::once(&config).chain(files) {
        std::fs::copy(file, transformer.join(file.file_name().unwrap())).unwrap();
    }
    folder
}

/// PSNR of `a` against `b`, both images in [0, 1].
pub fn psnr(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let mse = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    10.0 * (1.0 / mse.max(1e-12)).log10()
}
