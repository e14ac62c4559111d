//! LoRA parity against diffusers on the tiny FLUX.1 [dev] fixture
//! (`fixtures/flux/generate_lora.py`): one LoRA at scale 0.7 from its PEFT,
//! kohya and ai-toolkit files (the same tensors in three namings, the latter two
//! on BFL's fused layers), and two LoRAs at different scales (diffusers'
//! `set_adapters`). Final images (floats in [0, 1]) must match to max abs diff
//! <= 1/255, the 8-bit rounding step; runtime adapters leave the base model
//! untouched, so concurrent requests with different LoRAs each get their own image.

mod common;

use std::collections::HashMap;

use std::sync::Arc;

use candle_core::{DType, Tensor};
use kiln_engine::weights::load_all;
use kiln_pipelines::lora::{self, LoraError, LoraFile, LoraFormat};
use kiln_pipelines::text_to_image::flux::{FluxComponents, GenerationRequest, generate};
use serde_json::Value;

const TOLERANCE: f64 = 1.0 / 255.0;

use common::{fixtures, predict, worst_pixel};

struct Setup {
    components: FluxComponents,
    /// The transformer's and CLIP's linear layers, as LoRAs target them.
    targets: lora::LoraTargets,
    references: HashMap<String, Tensor>,
    index: Value,
}

fn setup() -> Setup {
    let dir = fixtures();
    let mut components = FluxComponents::load(
        &dir.join("tiny-dev"),
        &kiln_engine::parity::device_under_test(),
        DType::F32,
    )
    .unwrap();
    Setup {
        targets: components.lora_targets(),
        components,
        references: load_all(
            &dir.join("lora/references.safetensors"),
            &kiln_engine::parity::device_under_test(),
        )
        .unwrap(),
        index: serde_json::from_str(&std::fs::read_to_string(dir.join("lora/index.json")).unwrap())
            .unwrap(),
    }
}

fn file(name: &str) -> LoraFile {
    lora::read(&fixtures().join(format!("lora/{name}.safetensors"))).unwrap()
}

fn request(setup: &Setup, loras: &[(&LoraFile, f64)]) -> GenerationRequest {
    let call = &setup.index["call"];
    let adapters = if loras.is_empty() {
        None
    } else {
        let (set, report) = lora::flux_adapters(
            loras,
            &setup.targets,
            setup.components.transformer.config(),
            DType::F32,
        )
        .unwrap();
        assert!(report.unmatched.is_empty(), "{report:?}");
        Some(Arc::new(set))
    };
    GenerationRequest {
        prompt: call["prompt"].as_str().unwrap().into(),
        negative_prompt: None,
        width: call["width"].as_u64().unwrap() as usize,
        height: call["height"].as_u64().unwrap() as usize,
        steps: call["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: call["guidance_scale"].as_f64().unwrap(),
        true_cfg_scale: 1.0,
        seed: setup.index["seed"].as_u64().unwrap(),
        num_outputs: 1,
        max_sequence_length: call["max_sequence_length"].as_u64().unwrap() as usize,
        init_image: None,
        vae_tile: None,
        adapters,
    }
}

fn image(setup: &Setup, request: &GenerationRequest) -> Tensor {
    generate(&setup.components.models(), request, &mut |_, _| true)
        .unwrap()
        .images
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    kiln_engine::parity::compare(a, b).unwrap().max_abs
}

#[test]
fn one_lora_in_every_naming_matches_diffusers() {
    let setup = setup();
    let expected = &setup.references["style_0.7"];
    let base = image(&setup, &request(&setup, &[]));
    assert!(max_abs_diff(&base, &setup.references["base"]) <= TOLERANCE);
    assert!(
        max_abs_diff(&base, expected) > 10.0 * TOLERANCE,
        "the LoRA must visibly change the image for this test to mean anything"
    );
    for (name, format) in [
        ("style_peft", LoraFormat::Peft),
        ("style_kohya", LoraFormat::Kohya),
        ("style_aitoolkit", LoraFormat::AiToolkit),
        // B halved, alpha = 2 * rank in diffusers' adapter metadata header.
        ("style_alpha_peft", LoraFormat::Peft),
    ] {
        let lora = file(name);
        assert_eq!(lora.format, format);
        let got = image(&setup, &request(&setup, &[(&lora, 0.7)]));
        let diff = max_abs_diff(&got, expected);
        eprintln!("{name}: max abs diff vs diffusers {diff:.2e}");
        assert!(diff <= TOLERANCE, "{name}: max abs diff {diff}");
    }
}

#[test]
fn loras_apply_the_same_to_a_bfl_single_file_transformer() {
    let mut setup = setup();
    let config = setup.components.transformer.config().clone();
    let files =
        kiln_engine::WeightFiles::open(&fixtures().join("tiny-dev-bfl/flux1-tiny-dev.safetensors"))
            .unwrap();
    let layout = kiln_models::flux::FluxLayout::detect(&files.names()).unwrap();
    assert!(matches!(layout, kiln_models::flux::FluxLayout::Bfl { .. }));
    let backend = kiln_engine::AdaptedWeights::new(files, layout.adapter(&config));
    let vb = candle_nn::VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        kiln_engine::parity::device_under_test(),
    );
    setup.components.transformer = kiln_models::flux::FluxTransformer::load(vb, config).unwrap();
    assert_eq!(
        setup.components.lora_targets().denoiser,
        setup.targets.denoiser
    );
    for name in ["style_peft", "style_kohya", "style_aitoolkit"] {
        let lora = file(name);
        let got = image(&setup, &request(&setup, &[(&lora, 0.7)]));
        let diff = max_abs_diff(&got, &setup.references["style_0.7"]);
        assert!(
            diff <= TOLERANCE,
            "{name} on the BFL layout: max abs diff {diff}"
        );
    }
}

#[test]
fn text_encoder_loras_match_diffusers_in_both_namings() {
    let setup = setup();
    let expected = &setup.references["te_0.9"];
    for (name, format) in [
        ("te_peft", LoraFormat::Peft),
        ("te_kohya", LoraFormat::Kohya),
    ] {
        let lora = file(name);
        assert_eq!(lora.format, format);
        let (_, report) = lora::flux_adapters(
            &[(&lora, 0.9)],
            &setup.targets,
            setup.components.transformer.config(),
            DType::F32,
        )
        .unwrap();
        assert!(
            report.unmatched.is_empty(),
            "{name}: {:?}",
            report.unmatched
        );
        assert_eq!(report.layers, setup.targets.text_encoder.len());
        let got = image(&setup, &request(&setup, &[(&lora, 0.9)]));
        let diff = max_abs_diff(&got, expected);
        eprintln!("{name}: max abs diff vs diffusers {diff:.2e}");
        assert!(diff <= TOLERANCE, "{name}: max abs diff {diff}");
    }
}

#[test]
fn two_loras_at_different_scales_match_set_adapters() {
    let setup = setup();
    let (style, detail) = (file("style_peft"), file("detail_peft"));
    let got = image(&setup, &request(&setup, &[(&style, 0.8), (&detail, 1.3)]));
    let diff = max_abs_diff(&got, &setup.references["style_0.8_detail_1.3"]);
    eprintln!("two LoRAs: max abs diff vs diffusers {diff:.2e}");
    assert!(diff <= TOLERANCE, "max abs diff {diff}");
}

#[test]
fn concurrent_requests_with_different_loras_each_get_their_own_image() {
    let setup = setup();
    let (style, detail) = (file("style_peft"), file("detail_peft"));
    let one = request(&setup, &[(&style, 0.7)]);
    let two = request(&setup, &[(&style, 0.8), (&detail, 1.3)]);
    let none = request(&setup, &[]);
    let models = setup.components.models();
    let images: Vec<Tensor> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&one, &two, &none]
            .into_iter()
            .map(|r| {
                let models = &models;
                scope.spawn(move || generate(models, r, &mut |_, _| true).unwrap().images)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(max_abs_diff(&images[0], &setup.references["style_0.7"]) <= TOLERANCE);
    assert!(max_abs_diff(&images[1], &setup.references["style_0.8_detail_1.3"]) <= TOLERANCE);
    assert!(max_abs_diff(&images[2], &setup.references["base"]) <= TOLERANCE);
}

#[test]
fn pipeline_requests_with_different_runtime_loras_run_side_by_side() {
    // Through the pipeline (its lock included): each request's first step
    // waits until the other has also taken a step, which a lock held for the
    // whole generation would never allow.
    let setup = setup();
    let pipeline = pipeline_with(local_lora_settings());
    let style = call_input(
        &setup,
        serde_json::json!({"lora_weights": "style_peft.safetensors", "lora_scale": 0.7}),
    );
    let detail = call_input(
        &setup,
        serde_json::json!({"lora_weights": "detail_peft.safetensors", "lora_scale": 1.3}),
    );
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let arrived = AtomicUsize::new(0);
    let (met_a, met_b) = (AtomicBool::new(false), AtomicBool::new(false));
    let run = |input: &Value, met: &AtomicBool| {
        let mut first = true;
        let mut on_step = |_, _| {
            if first {
                first = false;
                arrived.fetch_add(1, Ordering::SeqCst);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while arrived.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                met.store(arrived.load(Ordering::SeqCst) == 2, Ordering::SeqCst);
            }
            true
        };
        pipeline
            .run(input.as_object().unwrap(), &mut on_step)
            .unwrap()
    };
    let outputs: Vec<Value> = std::thread::scope(|scope| {
        let a = scope.spawn(|| run(&style, &met_a));
        let b = scope.spawn(|| run(&detail, &met_b));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert!(met_a.into_inner() && met_b.into_inner());
    assert_eq!(outputs[0]["loras"][0]["scale"], 0.7);
    assert_eq!(outputs[1]["loras"][0]["scale"], 1.3);
}

#[test]
fn loras_that_do_not_fit_are_clear_errors() {
    let setup = setup();
    let config = setup.components.transformer.config();
    // A LoRA for other layers only.
    let stranger = lora::parse(
        [
            (
                "transformer.some.other.layer.lora_A.weight".to_string(),
                Tensor::zeros(
                    (2, 4),
                    DType::F32,
                    &kiln_engine::parity::device_under_test(),
                )
                .unwrap(),
            ),
            (
                "transformer.some.other.layer.lora_B.weight".to_string(),
                Tensor::zeros(
                    (4, 2),
                    DType::F32,
                    &kiln_engine::parity::device_under_test(),
                )
                .unwrap(),
            ),
        ]
        .into(),
    )
    .unwrap();
    let err =
        lora::flux_adapters(&[(&stranger, 1.0)], &setup.targets, config, DType::F32).unwrap_err();
    assert!(matches!(err, LoraError::NoMatch(_)), "{err}");
    // Pickle and truncated files are refused before parsing.
    let dir = tempfile::tempdir().unwrap();
    let pickle = dir.path().join("lora.ckpt");
    std::fs::write(&pickle, b"\x80\x04garbage").unwrap();
    assert!(matches!(lora::read(&pickle), Err(LoraError::Unsupported(m)) if m.contains("pickle")));
    let truncated = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(fixtures().join("lora/style_peft.safetensors")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        lora::read(&truncated),
        Err(LoraError::Unreadable { .. })
    ));
    // A LoRA whose shapes do not fit the layer is refused before any
    // generation, naming the module, both shapes and the likely cause.
    let wrong = lora::parse(
        [
            (
                "transformer.proj_out.lora_A.weight".to_string(),
                Tensor::zeros(
                    (2, 5),
                    DType::F32,
                    &kiln_engine::parity::device_under_test(),
                )
                .unwrap(),
            ),
            (
                "transformer.proj_out.lora_B.weight".to_string(),
                Tensor::zeros(
                    (4, 2),
                    DType::F32,
                    &kiln_engine::parity::device_under_test(),
                )
                .unwrap(),
            ),
        ]
        .into(),
    )
    .unwrap();
    let err = lora::flux_adapters(&[(&wrong, 1.0)], &setup.targets, config, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proj_out") && err.contains("4×5") && err.contains("64×32"),
        "{err}"
    );
    // Layers without a recorded shape still fail the generation with the layer's name.
    let mut unshaped = setup.targets.clone();
    unshaped.shapes.clear();
    let (set, _) = lora::flux_adapters(&[(&wrong, 1.0)], &unshaped, config, DType::F32).unwrap();
    let mut bad = request(&setup, &[]);
    bad.adapters = Some(Arc::new(set));
    let err = match generate(&setup.components.models(), &bad, &mut |_, _| true) {
        Ok(_) => panic!("a misfit LoRA must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("proj_out"), "{err}");
}

#[test]
fn the_lora_target_list_is_every_linear_of_the_transformer() {
    let setup = setup();
    let files = kiln_engine::WeightFiles::open(&fixtures().join("tiny-dev/transformer")).unwrap();
    let mut matrices: Vec<String> = files
        .names()
        .into_iter()
        .filter(|n| n.ends_with(".weight") && files.shape(n).unwrap().len() == 2)
        .map(|n| n.trim_end_matches(".weight").to_string())
        .collect();
    matrices.sort();
    let mut targets = setup.targets.denoiser.clone();
    targets.sort();
    assert_eq!(targets, matrices);
}

#[test]
fn requests_name_loras_by_file_with_cog_and_runpod_aliases() {
    let pipeline = pipeline_with(local_lora_settings());
    let setup = setup();
    let call = &setup.index["call"];
    let base = serde_json::json!({
        "prompt": call["prompt"], "width": call["width"], "height": call["height"],
        "num_inference_steps": call["num_inference_steps"], "guidance_scale": call["guidance_scale"],
        "max_sequence_length": call["max_sequence_length"], "seed": setup.index["seed"],
    });
    let with = |extra: Value| {
        let mut input = base.clone();
        input
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        input
    };
    let listed = predict(
        &pipeline,
        with(serde_json::json!({"loras": [{"source": "style_peft.safetensors", "scale": 0.7}]})),
    )
    .unwrap();
    let cog = predict(
        &pipeline,
        with(serde_json::json!({"lora_weights": "style_kohya.safetensors", "lora_scale": 0.7})),
    )
    .unwrap();
    let runpod = predict(&pipeline, with(serde_json::json!({"lora_path": fixtures().join("lora/style_aitoolkit.safetensors").to_str().unwrap(), "lora_scale": 0.7}))).unwrap();
    for output in [&listed, &cog, &runpod] {
        let worst = worst_pixel(output, &setup.references["style_0.7"]);
        // 8-bit PNG: rounding adds up to half a level to the 1/255 parity bound.
        assert!(worst <= 1.5 / 255.0, "worst pixel error {worst}");
        assert_eq!(
            output["loras"][0]["unmatched_modules"],
            serde_json::json!([])
        );
    }
    assert_eq!(listed["loras"][0]["format"], "diffusers/PEFT");
    assert_eq!(cog["loras"][0]["format"], "kohya");
    assert_eq!(runpod["loras"][0]["format"], "ai-toolkit/BFL");
    let two = predict(&pipeline, with(serde_json::json!({"lora_weights": "style_peft.safetensors", "lora_scale": 0.8, "extra_lora": "detail_peft.safetensors", "extra_lora_scale": 1.3}))).unwrap();
    let worst = worst_pixel(&two, &setup.references["style_0.8_detail_1.3"]);
    assert!(worst <= 1.5 / 255.0, "two LoRAs: worst pixel error {worst}");

    // Bad sources are errors naming the field.
    let outside = predict(
        &pipeline,
        with(serde_json::json!({"lora_weights": "/etc/passwd"})),
    )
    .unwrap_err();
    assert!(
        outside.contains("lora_weights") && outside.contains("KILN_LORA_DIRS"),
        "{outside}"
    );
    let escape = predict(&pipeline, with(serde_json::json!({"loras": [{"source": "../tiny-dev/transformer/diffusion_pytorch_model.safetensors"}]}))).unwrap_err();
    assert!(
        escape.contains("loras[0]")
            && escape.contains("../tiny-dev/transformer/diffusion_pytorch_model.safetensors is not a file in the LoRA folders"),
        "{escape}"
    );
    let missing = predict(
        &pipeline,
        with(serde_json::json!({"lora_weights": "/etc/no-such-lora.safetensors"})),
    )
    .unwrap_err();
    let existing = predict(
        &pipeline,
        with(serde_json::json!({"lora_weights": "/etc/passwd"})),
    )
    .unwrap_err();
    assert_eq!(
        missing.replace("/etc/no-such-lora.safetensors", "X"),
        existing.replace("/etc/passwd", "X"),
        "a client cannot tell a missing file from one outside the folders"
    );
    let url = predict(
        &pipeline,
        with(serde_json::json!({"lora_weights": "https://example.com/x.safetensors"})),
    )
    .unwrap_err();
    assert!(
        url.contains("lora_weights") && url.contains("not in the allowed hosts"),
        "{url}"
    );
    let missing = predict(
        &pipeline,
        with(serde_json::json!({"loras": [{"scale": 1.0}]})),
    )
    .unwrap_err();
    assert!(
        missing.contains("loras[0]") && missing.contains("source"),
        "{missing}"
    );
    let not_lora = predict(
        &pipeline,
        with(serde_json::json!({"lora_weights": "references.safetensors"})),
    )
    .unwrap_err();
    assert!(
        not_lora.contains("lora_weights") && not_lora.contains("unknown LoRA format"),
        "{not_lora}"
    );
}

/// The tiny-dev pipeline, reading LoRAs as `settings` say.
fn pipeline_with(
    settings: kiln_pipelines::lora::sources::LoraSettings,
) -> kiln_pipelines::text_to_image::flux::FluxPipeline {
    let dir = fixtures().join("tiny-dev");
    let manifest = kiln_pipelines::text_to_image::flux::manifest_for_folder(&dir).unwrap();
    let components =
        FluxComponents::load(&dir, &kiln_engine::parity::device_under_test(), DType::F32).unwrap();
    let mut pipeline = kiln_pipelines::text_to_image::flux::FluxPipeline::new(
        components,
        &manifest,
        "tiny".into(),
    );
    pipeline.set_lora_settings(settings);
    pipeline
}

/// Settings reading LoRA files from the fixture folder (no environment: tests
/// run in parallel threads).
fn local_lora_settings() -> kiln_pipelines::lora::sources::LoraSettings {
    let mut settings = common::server().settings(&std::env::temp_dir().join("kiln-lora-tests"));
    settings.dirs = vec![fixtures().join("lora")];
    settings
}

/// The fixture's call as request fields, plus `extra`.
fn call_input(setup: &Setup, extra: Value) -> Value {
    let call = &setup.index["call"];
    let mut input = serde_json::json!({
        "prompt": call["prompt"], "width": call["width"], "height": call["height"],
        "num_inference_steps": call["num_inference_steps"], "guidance_scale": call["guidance_scale"],
        "max_sequence_length": call["max_sequence_length"], "seed": setup.index["seed"],
    });
    input
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    input
}

#[test]
fn url_loras_apply_like_local_ones_and_bad_ones_fail_alone() {
    let server = common::server();
    let cache = tempfile::tempdir().unwrap();
    let pipeline = pipeline_with(server.settings(cache.path()));
    let setup = setup();
    let input = |lora: String| {
        call_input(
            &setup,
            serde_json::json!({"lora_weights": lora, "lora_scale": 0.7}),
        )
    };
    let refused = predict(&pipeline, input(server.url("/redirect/loopback"))).unwrap_err();
    assert!(refused.contains("internal address"), "{refused}");
    let output = predict(
        &pipeline,
        input(server.url("/files/style.safetensors?case=pipeline")),
    )
    .unwrap();
    let worst = worst_pixel(&output, &setup.references["style_0.7"]);
    assert!(worst <= 1.5 / 255.0, "worst pixel error {worst}");
    let report = &output["loras"][0];
    assert_eq!(report["format"], "diffusers/PEFT");
    assert_eq!(report["sha256"].as_str().map(str::len), Some(64));
}

#[test]
fn fused_mode_requests_match_diffusers_and_other_requests_see_exact_base_weights() {
    let pipeline = pipeline_with(local_lora_settings());
    let setup = setup();
    // 8-bit PNG: rounding adds up to half a level to the 1/255 parity bound.
    let bound = 1.5 / 255.0;
    let base_before = predict(&pipeline, call_input(&setup, serde_json::json!({}))).unwrap();
    let style = serde_json::json!({"lora_weights": "style_peft.safetensors", "lora_scale": 0.7, "lora_mode": "fused"});
    let fused = predict(&pipeline, call_input(&setup, style.clone())).unwrap();
    assert_eq!(fused["lora_mode"], "fused");
    assert!(worst_pixel(&fused, &setup.references["style_0.7"]) <= bound);
    // The same set again stays fused and gives the same image.
    let again = predict(&pipeline, call_input(&setup, style)).unwrap();
    assert_eq!(again["images"][0]["base64"], fused["images"][0]["base64"]);
    // A base request restores the exact original weights first.
    let base_after = predict(&pipeline, call_input(&setup, serde_json::json!({}))).unwrap();
    assert_eq!(
        base_after["images"][0]["base64"],
        base_before["images"][0]["base64"]
    );
    // Another set replaces the fused one; runtime requests are unaffected by it.
    let two = predict(&pipeline, call_input(&setup, serde_json::json!({
        "loras": [{"source": "style_peft.safetensors", "scale": 0.8}, {"source": "detail_peft.safetensors", "scale": 1.3}],
        "lora_mode": "fused",
    }))).unwrap();
    assert!(worst_pixel(&two, &setup.references["style_0.8_detail_1.3"]) <= bound);
    let runtime = predict(
        &pipeline,
        call_input(
            &setup,
            serde_json::json!({
                "lora_weights": "te_peft.safetensors", "lora_scale": 0.9,
            }),
        ),
    )
    .unwrap();
    assert_eq!(runtime["lora_mode"], "runtime");
    assert!(worst_pixel(&runtime, &setup.references["te_0.9"]) <= bound);
    let bad_mode = predict(
        &pipeline,
        call_input(&setup, serde_json::json!({"lora_mode": "merged"})),
    )
    .unwrap_err();
    assert!(bad_mode.contains("lora_mode"), "{bad_mode}");
}

#[test]
fn fused_loras_match_runtime_ones_and_unfuse_exactly() {
    let mut setup = setup();
    let style = file("style_peft");
    let base_before = image(&setup, &request(&setup, &[]));
    let (set, _) = lora::flux_adapters(
        &[(&style, 0.7)],
        &setup.targets,
        setup.components.transformer.config(),
        DType::F32,
    )
    .unwrap();
    let mut merged = 0;
    setup
        .components
        .transformer
        .for_each_linear(&mut |linear| {
            merged += usize::from(set.merge_into(linear)?);
            Ok(())
        })
        .unwrap();
    assert_eq!(merged, set.layer_count(), "every adapted layer was fused");
    let fused = image(&setup, &request(&setup, &[]));
    let diff = max_abs_diff(&fused, &setup.references["style_0.7"]);
    eprintln!("fused: max abs diff vs diffusers {diff:.2e}");
    assert!(diff <= TOLERANCE, "fused: {diff}");
    setup
        .components
        .transformer
        .for_each_linear(&mut |linear| {
            linear.unmerge();
            Ok(())
        })
        .unwrap();
    let base_after = image(&setup, &request(&setup, &[]));
    assert_eq!(
        max_abs_diff(&base_before, &base_after),
        0.0,
        "unfuse restores the exact weights"
    );
}

#[test]
fn an_offloaded_model_applies_runtime_loras_and_refuses_fused_ones() {
    let dir = fixtures().join("tiny-dev");
    let mut manifest = kiln_pipelines::text_to_image::flux::manifest_for_folder(&dir).unwrap();
    manifest.config["offload"] = serde_json::json!("model");
    let (parts, targets) = kiln_pipelines::text_to_image::flux::OffloadedFlux::open(
        &dir,
        &kiln_engine::parity::device_under_test(),
        DType::F32,
        Default::default(),
    )
    .unwrap();
    let mut pipeline = kiln_pipelines::text_to_image::flux::FluxPipeline::offloaded(
        parts,
        targets,
        &manifest,
        "tiny".into(),
    );
    pipeline.set_lora_settings(local_lora_settings());
    let setup = setup();
    let style = serde_json::json!({"lora_weights": "style_peft.safetensors", "lora_scale": 0.7});
    let runtime = predict(&pipeline, call_input(&setup, style.clone())).unwrap();
    assert!(worst_pixel(&runtime, &setup.references["style_0.7"]) <= 1.5 / 255.0);
    let mut fused = style;
    fused["lora_mode"] = serde_json::json!("fused");
    let refused = predict(&pipeline, call_input(&setup, fused)).unwrap_err();
    assert!(
        refused.contains("lora_mode") && refused.contains("offload"),
        "{refused}"
    );
}

#[path = "flux2/lora.rs"]
mod flux2_lora;
