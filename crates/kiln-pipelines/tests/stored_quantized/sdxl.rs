//! A GGUF SDXL UNet (issue 17) as city96's convert.py writes one (ldm names
//! without `model.diffusion_model.`, convolutions flattened to rows of 256
//! with `comfy.gguf.orig_shape` recorded, Q8_0 and F16), written by gguf-py
//! from the tiny single file's UNet (`fixtures/gguf/generate.py`), in the
//! `unet/` folder of a diffusers SDXL pipeline: it reads exactly as gguf-py
//! dequantizes it and generates close to the dense model.

use candle_core::DType;
use kiln_engine::parity;
use kiln_pipelines::text_to_image::sdxl::{SdxlComponents, generate};

use super::gguf_reader::{check_against_gguf_py, fixtures};
use super::sdxl_calls::request_for;

#[test]
fn a_gguf_unet_reads_as_gguf_py_does_and_generates_close_to_dense() {
    let gguf = fixtures().join("gguf/sdxl-tiny-unet-Q8_0.gguf");
    assert!(check_against_gguf_py(&gguf, "sdxl") > 48);

    let folder = super::folder_with_scheduler(&serde_json::json!({}));
    let unet = folder.path().join("unet");
    for entry in std::fs::read_dir(&unet).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(path).unwrap();
        }
    }
    std::fs::copy(&gguf, unet.join("sdxl-tiny-unet-Q8_0.gguf")).unwrap();
    let device = parity::device_under_test();
    let mut from_gguf = SdxlComponents::load(folder.path(), &device, DType::F32).unwrap();
    let dense = SdxlComponents::load(&super::fixture(), &device, DType::F32).unwrap();
    let mut q8_0 = 0;
    from_gguf
        .unet
        .for_each_linear(&mut |linear| {
            q8_0 += usize::from(linear.quantization().as_deref() == Some("q8_0"));
            Ok(())
        })
        .unwrap();
    assert!(q8_0 > 10, "{q8_0} linears kept their Q8_0 blocks");

    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(super::fixture().join("reference/index.json")).unwrap(),
    )
    .unwrap();
    let (_, call) = index["calls"].as_object().unwrap().iter().next().unwrap();
    let request = request_for(call);
    let a = generate(&from_gguf, &request, &mut |_, _| true)
        .unwrap()
        .images;
    let b = generate(&dense, &request, &mut |_, _| true).unwrap().images;
    let db = super::gguf_reader::psnr(&a, &b);
    assert!(db >= 30.0, "PSNR {db:.1} dB");
    assert!(from_gguf.resident_bytes < dense.resident_bytes);
}
