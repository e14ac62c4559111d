//! GGUF FLUX checkpoints (issue 17) written by the `gguf` Python package
//! (`fixtures/gguf/generate.py`, city96's layout: BFL names, arch "flux"):
//! every stored type reads exactly as gguf-py dequantizes it; a Q8_0 file
//! loads its blocks as stored and generates the very image Kiln's own Q8_0
//! quantization of the same dense weights does; a mixed-type file (BF16, F16,
//! Q4_0, Q5_1) generates close to dense; bad files fail naming the problem.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_engine::gguf::GgufFile;
use kiln_engine::quant::QuantKind;
use kiln_pipelines::text_to_image::flux::{FluxComponents, generate};
use kiln_pipelines::text_to_image::loading::Quantization;

fn fixtures() -> PathBuf {
    super::gguf_reader::fixtures()
}

/// tiny-dev with its transformer weights replaced by `gguf`.
pub fn folder_with_transformer(gguf: &Path) -> tempfile::TempDir {
    super::gguf_reader::tiny_dev_with_transformer(&[gguf.to_path_buf()])
}

fn images(components: &FluxComponents) -> Tensor {
    generate(
        &components.models(),
        &super::quantized::flux1_request(3, 7),
        &mut |_, _| true,
    )
    .unwrap()
    .images
}

fn load(dir: &Path, denoiser: Option<QuantKind>) -> FluxComponents {
    FluxComponents::load_quantized(
        dir,
        &Device::Cpu,
        DType::F32,
        Quantization {
            denoiser,
            text_encoder: false,
        },
    )
    .unwrap()
}

#[test]
fn every_stored_type_reads_exactly_as_gguf_py_dequantizes_it() {
    let checked = super::gguf_reader::check_against_gguf_py(
        &fixtures().join("gguf/flux1-tiny-dev-mixed.gguf"),
        "flux",
    );
    let file = GgufFile::open(&fixtures().join("gguf/flux1-tiny-dev-mixed.gguf")).unwrap();
    assert_eq!(checked, file.tensor_names().len());
    assert_eq!(file.string("general.architecture").unwrap(), "flux");
}

#[test]
fn a_q8_0_gguf_generates_exactly_what_kilns_own_q8_0_does() {
    let folder = folder_with_transformer(&fixtures().join("gguf/flux1-tiny-dev-Q8_0.gguf"));
    let mut from_gguf = load(folder.path(), None);
    let own = load(&fixtures().join("flux/tiny-dev"), Some(QuantKind::Q8_0));
    let mut quantized = 0;
    from_gguf
        .transformer
        .for_each_linear(&mut |linear| {
            if linear.quantization().is_some() {
                assert_eq!(linear.quantization().as_deref(), Some("q8_0"));
                quantized += 1;
            }
            Ok(())
        })
        .unwrap();
    assert!(quantized > 20, "{quantized} linears kept their Q8_0 blocks");
    let (a, b) = (images(&from_gguf), images(&own));
    assert_eq!(kiln_engine::parity::compare(&a, &b).unwrap().max_abs, 0.0);
    assert_eq!(from_gguf.resident_bytes, own.resident_bytes);
}

#[test]
fn a_mixed_type_gguf_generates_close_to_the_dense_model() {
    let folder = folder_with_transformer(&fixtures().join("gguf/flux1-tiny-dev-mixed.gguf"));
    let mut mixed = load(folder.path(), None);
    let dense = load(&fixtures().join("flux/tiny-dev"), None);
    let db = super::gguf_reader::psnr(&images(&mixed), &images(&dense));
    assert!(db >= 25.0, "PSNR {db:.1} dB");
    // The block-typed linears keep their 4.5 (Q4_0) or 6 (Q5_1) bits a
    // weight (under a quarter of f32 with the f32 bias); BF16/F16 layers
    // compute dense in f32.
    let mut kinds = std::collections::BTreeMap::new();
    mixed
        .transformer
        .for_each_linear(&mut |linear| {
            if let Some(kind) = linear.quantization() {
                let dense_bytes = linear.in_dim() * linear.out_dim() * 4;
                assert!(linear.resident_bytes() * 4 <= dense_bytes, "{kind}");
                *kinds.entry(kind).or_insert(0) += 1;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(kinds.keys().cloned().collect::<Vec<_>>(), ["q4_0", "q5_1"]);
    assert!(mixed.resident_bytes < dense.resident_bytes);
}

#[test]
fn bad_gguf_files_fail_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    // An unknown tensor type id (99) in an otherwise valid header.
    let mut bytes = std::fs::read(fixtures().join("gguf/flux1-tiny-dev-Q8_0.gguf")).unwrap();
    let file = GgufFile::open(&fixtures().join("gguf/flux1-tiny-dev-Q8_0.gguf")).unwrap();
    drop(file);
    let name = b"double_blocks.0.img_attn.proj.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // name, then n_dims (u32), dims (u64 each), then the type (u32).
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let bad = dir.path().join("flux1-bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let folder = folder_with_transformer(&bad);
    let err = FluxComponents::load(folder.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(
        err.contains("flux1-bad.gguf") && err.contains("99"),
        "{err}"
    );

    // The SDXL UNet's GGUF where a FLUX transformer belongs.
    let folder = folder_with_transformer(&fixtures().join("gguf/sdxl-tiny-unet-Q8_0.gguf"));
    let err = FluxComponents::load(folder.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(err.contains("not a FLUX transformer"), "{err}");

    // Two GGUF files and no safetensors: which one is meant is unclear.
    let folder = folder_with_transformer(&fixtures().join("gguf/flux1-tiny-dev-Q8_0.gguf"));
    std::fs::copy(
        fixtures().join("gguf/flux1-tiny-dev-mixed.gguf"),
        folder.path().join("transformer/flux1-tiny-dev-mixed.gguf"),
    )
    .unwrap();
    let err = FluxComponents::load(folder.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(err.contains("2 GGUF files"), "{err}");
}
