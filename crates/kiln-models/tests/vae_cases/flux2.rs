//! FLUX.2's VAE (`AutoencoderKLFlux2`: 32 latent channels, a 3-level tiny
//! config here) and its latent normalisation against diffusers, on the tiny
//! random fixture `fixtures/flux2/tiny-vae` (`fixtures/flux2/generate_vae.py`):
//! encode (posterior mean and std), decode, and the pipeline's
//! patchify + BatchNorm standardisation and its inverse.
//! Tolerance: cosine distance <= 1e-5 and max abs diff <= 1e-4 (f32; the
//! convolutions' summation order differs from torch's).

use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_nn::VarBuilder;
use kiln_engine::parity;
use kiln_engine::weights::load_all;
use kiln_models::vae::{AutoencoderKl, LatentNorm, VaeConfig, patchify, unpatchify};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux2/tiny-vae")
}

fn close(name: &str, ours: &candle_core::Tensor, theirs: &candle_core::Tensor) {
    let c = parity::compare(ours, theirs).unwrap();
    assert!(
        c.cosine_distance <= 1e-5 && c.max_abs <= 1e-4,
        "{name}: cosine distance {:.2e}, max abs {:.2e}",
        c.cosine_distance,
        c.max_abs
    );
}

#[test]
fn the_flux2_vae_and_its_latent_normalisation_match_diffusers() {
    let device = parity::device_under_test();
    let config = VaeConfig::from_file(&fixture().join("config.json")).unwrap();
    assert_eq!((config.latent_channels, config.batch_norm_eps), (32, 1e-4));
    let tensors = load_all(
        &fixture().join("diffusion_pytorch_model.safetensors"),
        &device,
    )
    .unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
    let vae = AutoencoderKl::load(vb.clone(), config.clone()).unwrap();
    let norm = LatentNorm::load(vb, config.latent_channels, config.batch_norm_eps).unwrap();
    let refs = load_all(&fixture().join("reference.safetensors"), &device).unwrap();

    let posterior = vae.encode(&refs["image"]).unwrap();
    close("encoded.mean", &posterior.mean, &refs["encoded.mean"]);
    close("encoded.std", &posterior.std, &refs["encoded.std"]);
    close(
        "decoded",
        &vae.decode(&refs["latent"]).unwrap(),
        &refs["decoded"],
    );

    let normalized = norm.normalize(&patchify(&posterior.mean).unwrap()).unwrap();
    // 32×48 pixels, a 3-level VAE (4×): 8×12 latents, 4×6 patches.
    assert_eq!(normalized.dims(), &[1, 128, 4, 6]);
    close("normalized", &normalized, &refs["normalized"]);
    let back = unpatchify(&norm.denormalize(&refs["normalized"]).unwrap()).unwrap();
    close("denormalized", &back, &refs["denormalized"]);
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let device = candle_core::Device::Cpu;
    let odd = candle_core::Tensor::zeros((1, 4, 3, 4), DType::F32, &device).unwrap();
    assert!(patchify(&odd).is_err());
    let six = candle_core::Tensor::zeros((1, 6, 2, 2), DType::F32, &device).unwrap();
    assert!(unpatchify(&six).is_err());
    let mut config: VaeConfig = serde_json::from_str(r#"{"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#).unwrap();
    config.decoder_block_out_channels = Some(vec![8]);
    assert!(
        config
            .validate()
            .unwrap_err()
            .contains("decoder_block_out_channels")
    );
}
