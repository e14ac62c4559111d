//! A bare single-file SDXL checkpoint (no tokenizer folders beside it) takes
//! SDXL base's tokenizers from the HF cache, as `kiln models pull
//! stabilityai/stable-diffusion-xl-base-1.0 --only tokenizer,tokenizer_2` leaves
//! them there, in the Hub's vocab.json + merges.txt form, and still generates
//! diffusers' image. Its own test binary: it sets `HF_HOME` for the process.

#[path = "common/sdxl_calls.rs"]
mod sdxl_calls;
#[path = "common/slow_tokenizer.rs"]
mod slow_tokenizer;

use candle_core::DType;
use kiln_engine::parity;
use kiln_engine::weights::load_all;
use kiln_pipelines::text_to_image::sdxl::{SdxlComponents, generate};
use sdxl_calls::{fixture, request_for};
use serde_json::Value;
use slow_tokenizer::write_slow_tokenizer;

#[test]
fn a_bare_single_file_uses_sdxl_base_tokenizers_from_the_hf_cache() {
    let hf_home = tempfile::tempdir().unwrap();
    // SAFETY: this binary's only test sets it before any thread reads the environment.
    unsafe { std::env::set_var("HF_HOME", hf_home.path()) };
    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().with_file_name("tiny-sdxl-single.safetensors"),
        folder.path().join("tiny-sdxl-single.safetensors"),
    )
    .unwrap();
    for part in ["unet", "text_encoder", "text_encoder_2", "vae", "scheduler"] {
        std::fs::create_dir_all(folder.path().join(part)).unwrap();
        let config = if part == "scheduler" {
            "scheduler_config.json"
        } else {
            "config.json"
        };
        std::fs::copy(
            fixture().join(part).join(config),
            folder.path().join(part).join(config),
        )
        .unwrap();
    }
    let device = parity::device_under_test();
    let error = SdxlComponents::load(folder.path(), &device, DType::F32)
        .err()
        .unwrap();
    assert!(
        error.contains(
            "kiln models pull stabilityai/stable-diffusion-xl-base-1.0 --only tokenizer,tokenizer_2"
        ),
        "{error}"
    );

    let snapshot = hf_home
        .path()
        .join("hub/models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/0123abcd");
    for part in ["tokenizer", "tokenizer_2"] {
        write_slow_tokenizer(&fixture().join(part), &snapshot.join(part));
    }
    let components = SdxlComponents::load(folder.path(), &device, DType::F32).unwrap();

    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("reference/index.json")).unwrap(),
    )
    .unwrap();
    let refs = load_all(&fixture().join("reference/references.safetensors"), &device).unwrap();
    let request = request_for(&index["calls"]["euler_cfg_negative"]);
    let generated = generate(&components, &request, &mut |_, _| true).unwrap();
    let diff = parity::compare(&generated.images, &refs["image.euler_cfg_negative"])
        .unwrap()
        .max_abs;
    assert!(diff <= 1.0 / 255.0, "max abs diff {diff}");
}
