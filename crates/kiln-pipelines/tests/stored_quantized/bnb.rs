//! FLUX transformers saved by diffusers with bitsandbytes 8-bit weights
//! (`fixtures/bnb/generate.py`: `BitsAndBytesConfig(load_in_8bit=True)` then
//! `save_pretrained`): the int8 rows load as stored, every weight equal to
//! bitsandbytes' own dequantization (within f32 rounding of its product
//! order), the image stays close to the dense model's, and 4-bit or other
//! quantization configs are refused naming them.

use std::path::PathBuf;

use candle_core::{DType, Device};
use kiln_pipelines::text_to_image::flux::{FluxComponents, generate};

fn fixtures() -> PathBuf {
    super::gguf_reader::fixtures()
}

/// tiny-dev with `transformer/` replaced by the bitsandbytes save.
fn bnb_folder() -> tempfile::TempDir {
    let save = fixtures().join("bnb/tiny-dev-transformer-bnb8");
    let files: Vec<PathBuf> = std::fs::read_dir(save)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    super::gguf_reader::tiny_dev_with_transformer(&files)
}

#[test]
fn a_bitsandbytes_8bit_save_loads_its_int8_rows_as_bitsandbytes_reads_them() {
    let folder = bnb_folder();
    let mut bnb = FluxComponents::load(folder.path(), &Device::Cpu, DType::F32).unwrap();
    let reference = kiln_engine::weights::load_all(
        &fixtures().join("bnb/dequantized.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    let mut worst = 0f32;
    bnb.transformer
        .for_each_linear(&mut |linear| {
            let name = format!("{}.weight", linear.name().unwrap_or_default());
            let Some(expected) = reference.get(&name) else {
                return Ok(());
            };
            assert_eq!(linear.quantization().as_deref(), Some("int8"), "{name}");
            let got = linear.weight()?;
            let diff = (got - expected)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let scale = expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            worst = worst.max(diff / scale.max(f32::MIN_POSITIVE));
            checked += 1;
            Ok(())
        })
        .unwrap();
    // Every Linear diffusers converted (bitsandbytes skips none in FLUX).
    assert_eq!(checked, reference.len());
    // One f32 rounding of code · SCB / 127 in another order.
    assert!(worst <= 2.5e-7, "worst relative difference {worst:e}");

    let request = super::quantized::flux1_request(3, 7);
    let dense =
        FluxComponents::load(&fixtures().join("flux/tiny-dev"), &Device::Cpu, DType::F32).unwrap();
    let images = |c: &FluxComponents| {
        generate(&c.models(), &request, &mut |_, _| true)
            .unwrap()
            .images
    };
    let db = super::gguf_reader::psnr(&images(&bnb), &images(&dense));
    assert!(db >= 30.0, "PSNR {db:.1} dB");
    assert!(bnb.resident_bytes < dense.resident_bytes);
}

#[test]
fn four_bit_and_unknown_quantization_configs_are_refused_naming_them() {
    let folder = bnb_folder();
    let config_path = folder.path().join("transformer/config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["quantization_config"]["load_in_8bit"] = false.into();
    config["quantization_config"]["load_in_4bit"] = true.into();
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = FluxComponents::load(folder.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(
        err.contains("4-bit") && err.contains("nf4") && err.contains("q4_k"),
        "{err}"
    );

    config["quantization_config"] =
        serde_json::json!({"quant_method": "torchao", "quant_type": "int8wo"});
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = FluxComponents::load(folder.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(err.contains("torchao"), "{err}");
}
