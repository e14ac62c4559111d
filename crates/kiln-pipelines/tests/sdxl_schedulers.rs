//! The discrete-time samplers against diffusers (`fixtures/sdxl/generate_schedulers.py`):
//! every sampler SDXL offers, epsilon and v-prediction, Karras sigmas, the three
//! timestep spacings, and long runs (DPM-Solver's and PNDM's multistep
//! histories). Each case is driven as diffusers' SDXL pipeline drives it, with
//! a fixed analytic "model", from a seeded torch-compatible generator whose
//! stream the ancestral sampler continues. Timesteps must match (fractional
//! Karras timesteps to 1e-3), and the samples after the first step and at the
//! end to 1e-5 of their magnitude: float32 arithmetic in a different order.

use std::path::Path;

use candle_core::Tensor;
use kiln_engine::rng::TorchGenerator;
use kiln_engine::weights::load_all;
use kiln_pipelines::text_to_image::schedulers::{DiscreteConfig, SamplerKind};
use serde_json::Value;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl/schedulers")
}

fn model(x: &Tensor, t: f64) -> Tensor {
    x.affine(0.5 * (0.01 * t).cos(), 0.1 * (0.003 * t).sin())
        .unwrap()
}

fn check(case: &str, what: &str, ours: &Tensor, reference: &Tensor) {
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let diff = kiln_engine::parity::compare(ours, reference)
        .unwrap()
        .max_abs;
    eprintln!("{case} {what}: {diff:.2e} (scale {scale:.2})");
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "{case} {what}: max abs diff {diff:.3e} (scale {scale:.3})"
    );
}

#[test]
fn every_sampler_matches_diffusers() {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("index.json")).unwrap())
            .unwrap();
    let references = load_all(
        &fixtures().join("references.safetensors"),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap();
    let shape: Vec<usize> = serde_json::from_value(index["shape"].clone()).unwrap();
    let cases = index["cases"].as_object().unwrap();
    assert!(cases.len() >= 20);
    for (case, info) in cases {
        let config: DiscreteConfig = serde_json::from_value(info["config"].clone()).unwrap();
        let kind = SamplerKind::parse(info["sampler"].as_str().unwrap()).unwrap();
        let steps = info["steps"].as_u64().unwrap() as usize;
        let mut sampler = kind.build(&config, steps).unwrap();
        let expected: Vec<f64> = serde_json::from_value(info["timesteps"].clone()).unwrap();
        let timesteps = sampler.timesteps().to_vec();
        assert_eq!(
            timesteps.len(),
            expected.len(),
            "{case}: timesteps {timesteps:?}"
        );
        for (ours, theirs) in timesteps.iter().zip(&expected) {
            assert!(
                (ours - theirs).abs() <= 1e-3,
                "{case}: timesteps {timesteps:?} vs {expected:?}"
            );
        }
        let sigma = info["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (sampler.init_noise_sigma() - sigma).abs() <= 1e-5 * sigma,
            "{case}: init_noise_sigma"
        );

        let mut generator = TorchGenerator::new(index["seed"].as_u64().unwrap());
        let n: usize = shape.iter().product();
        let mut latents = Tensor::from_vec(
            generator.randn(n),
            shape.as_slice(),
            &kiln_engine::parity::device_under_test(),
        )
        .unwrap()
        .affine(sampler.init_noise_sigma(), 0.0)
        .unwrap();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = sampler.scale_model_input(&latents, i).unwrap();
            let output = model(&input, t);
            latents = sampler.step(&output, i, &latents, &mut generator).unwrap();
            if i == 0 {
                check(
                    case,
                    "first step",
                    &latents,
                    &references[&format!("{case}.first")],
                );
            }
        }
        check(
            case,
            "final sample",
            &latents,
            &references[&format!("{case}.final")],
        );
        eprintln!("{case}: ok");
    }
}
