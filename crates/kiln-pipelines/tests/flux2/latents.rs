//! FLUX.2's latent preparation against `Flux2KleinPipeline`
//! (`fixtures/flux2/generate_latents.py`): the seeded noise in the patchified
//! shape (to a few ULP: see below), packing exactly, and the 4-axis image and
//! text position ids.

use std::path::{Path, PathBuf};

use candle_core::Device;
use kiln_engine::TorchGenerator;
use kiln_pipelines::text_to_image::flux2::latents::{
    latent_ids, noise, noise_shape, pack, text_ids, unpack,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux2/latents.safetensors")
}

fn rows(t: &candle_core::Tensor) -> Vec<[f64; 4]> {
    t.to_vec2::<f64>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0], r[1], r[2], r[3]])
        .collect()
}

#[test]
fn noise_packing_and_position_ids_match_the_flux2_pipeline() {
    let refs = candle_core::safetensors::load(fixture(), &Device::Cpu).unwrap();
    let shape = noise_shape(1, 32, (64, 96), 8);
    assert_eq!(shape, (1, 128, 4, 6));
    let drawn = noise(&mut TorchGenerator::new(7), shape, &Device::Cpu).unwrap();
    // torch's vectorised normal sampler (Box-Muller through SIMD log/cos)
    // rounds differently on different x86 vector widths: the same draw to
    // within a few ULP, not bit for bit across CPUs.
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (ours, expected) = (flat(&drawn), flat(&refs["noise"]));
    assert_eq!(ours.len(), expected.len());
    let worst = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("noise: max abs difference from torch {worst:e}");
    assert!(worst <= 1e-6, "noise differs by up to {worst}");
    // Packing is a permutation: diffusers' own noise packs to its tensor exactly.
    assert_eq!(flat(&pack(&refs["noise"]).unwrap()), flat(&refs["packed"]));
    let packed = pack(&drawn).unwrap();
    assert_eq!(flat(&unpack(&packed, 4, 6).unwrap()), ours);
    assert!(unpack(&packed, 5, 6).is_err());
    assert_eq!(latent_ids(4, 6), rows(&refs["latent_ids"]));
    assert_eq!(text_ids(5), rows(&refs["text_ids"]));
}
