//! The FlowMatchEuler schedule against diffusers' (`fixtures/flux/*/reference`):
//! sigmas and timesteps bit for bit, from each variant's own scheduler_config.json.

use std::path::{Path, PathBuf};

use kiln_pipelines::text_to_image::schedulers::FlowMatchEulerConfig;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux")
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn schedules_match_diffusers_bit_for_bit() {
    let mut checked = 0;
    for variant in ["tiny-dev", "tiny-schnell"] {
        let dir = fixtures().join(variant);
        let config: FlowMatchEulerConfig = serde_json::from_str(
            &std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).unwrap(),
        )
        .unwrap();
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference/index.json")).unwrap(),
        )
        .unwrap();
        for run in index["cases"]["scheduler"]["runs"].as_array().unwrap() {
            let steps = run["num_inference_steps"].as_u64().unwrap() as usize;
            let seq = run["image_seq_len"].as_u64().unwrap() as usize;
            let schedule = config.schedule(steps, seq);
            assert_eq!(schedule.sigmas, floats(&run["sigmas"]), "{variant} {run}");
            assert_eq!(
                schedule.timesteps,
                floats(&run["timesteps"]),
                "{variant} {run}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "expected the recorded schedules, checked {checked}"
    );
}

#[test]
fn flux2_empirical_mu_and_its_schedules_match_diffusers() {
    // fixtures/flux2/generate_schedule.py: compute_empirical_mu, then the
    // scheduler's set_timesteps(sigmas=linspace, mu=mu), for sizes on both
    // sides of the 4300-token branch and several step counts.
    use kiln_pipelines::text_to_image::schedulers::empirical_mu;
    let path = fixtures().join("../flux2/schedule.json");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let config: FlowMatchEulerConfig =
        serde_json::from_value(recorded["scheduler_config"].clone()).unwrap();
    let cases = recorded["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let seq = case["image_seq_len"].as_u64().unwrap() as usize;
        let steps = case["steps"].as_u64().unwrap() as usize;
        let mu = empirical_mu(seq, steps);
        let expected = case["mu"].as_f64().unwrap();
        assert!(
            (mu - expected).abs() <= 1e-12 * expected.abs().max(1.0),
            "{seq}/{steps}: mu {mu} vs {expected}"
        );
        let schedule = config.schedule_with_mu(steps, mu);
        assert_eq!(schedule.sigmas, floats(&case["sigmas"]), "{seq}/{steps}");
        assert_eq!(
            schedule.timesteps,
            floats(&case["timesteps"]),
            "{seq}/{steps}"
        );
    }
}
