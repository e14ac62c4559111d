//! The AutoencoderKL against diffusers on the tiny random fixtures
//! (`fixtures/flux`, made by `fixtures/flux/generate.py`): encode (posterior mean
//! and std) and decode from the diffusers folder and from the BFL `ae.safetensors`
//! must give diffusers' tensors, and so must tiled decode.
//! Tolerance: cosine distance <= 1e-5 and max abs diff <= 1e-4 on every tensor.
//!
//! `reference/vae_tiled.safetensors` (diffusers' `tiled_decode`, tile 32 px /
//! 4 latents) was made, from the repo root, by:
//!
//! ```python
//! import torch
//! from diffusers import AutoencoderKL
//! from safetensors.torch import load_file, save_file
//! torch.set_num_threads(1)
//! torch.use_deterministic_algorithms(True)
//! root = "fixtures/flux/tiny-dev"
//! vae = AutoencoderKL.from_pretrained(f"{root}/vae", torch_dtype=torch.float32).eval()
//! for p in vae.parameters():
//!     p.data = p.data.clone()  # fresh aligned memory, as generate.py does
//! vae.enable_tiling()
//! vae.tile_sample_min_size = 32
//! vae.tile_latent_min_size = 4
//! square = load_file(f"{root}/reference/references.safetensors")["vae.latent"]  # (1,16,8,8)
//! wide = torch.randn((2, 16, 5, 7), generator=torch.Generator("cpu").manual_seed(99))
//! out = {"square.latent": square, "wide.latent": wide}
//! with torch.no_grad():
//!     out["square.decoded"] = vae.decode(square).sample.contiguous()
//!     out["wide.decoded"] = vae.decode(wide).sample.contiguous()
//! save_file(out, f"{root}/reference/vae_tiled.safetensors")
//! ```

/// FLUX.2's VAE and latent normalisation (in this binary to save a link).
#[path = "vae_cases/flux2.rs"]
mod flux2;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use kiln_engine::parity::{self, Tolerance};
use kiln_engine::weights::load_all;
use kiln_engine::{AdaptedWeights, Source, WeightFiles};
use kiln_models::vae::{AutoencoderKl, VaeConfig, VaeLayout, bfl_vae_adapter, detect_vae_layout};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux")
}

fn references(file: &str) -> HashMap<String, Tensor> {
    load_all(
        &fixtures().join("tiny-dev/reference").join(file),
        &kiln_engine::parity::device_under_test(),
    )
    .unwrap()
}

/// (cosine distance, max abs diff).
fn distance(ours: &Tensor, theirs: &Tensor) -> (f64, f64) {
    let c = parity::compare(ours, theirs).unwrap();
    (c.cosine_distance, c.max_abs)
}

fn compare(name: &str, ours: &Tensor, theirs: &Tensor) {
    match parity::check(name, ours, theirs, Tolerance::INTERMEDIATE) {
        Ok(c) => eprintln!(
            "{name}: cosine distance {:e}, max abs diff {:e}",
            c.cosine_distance, c.max_abs
        ),
        Err(problem) => panic!("{problem}"),
    }
}

fn config() -> VaeConfig {
    VaeConfig::from_file(&fixtures().join("tiny-dev/vae/config.json")).unwrap()
}

fn try_load(weights: &Path, config: VaeConfig) -> candle_core::Result<AutoencoderKl> {
    let files = WeightFiles::open(weights).unwrap();
    let adapter = detect_vae_layout(&files.names()).adapter(&config);
    let backend = AdaptedWeights::new(files, adapter);
    let vb = VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        kiln_engine::parity::device_under_test(),
    );
    AutoencoderKl::load(vb, config)
}

fn diffusers_vae() -> AutoencoderKl {
    try_load(&fixtures().join("tiny-dev/vae"), config()).unwrap()
}

fn bfl_vae() -> AutoencoderKl {
    try_load(&fixtures().join("tiny-dev-bfl/ae.safetensors"), config()).unwrap()
}

fn matches_diffusers(vae: &AutoencoderKl, layout: &str) {
    let refs = references("references.safetensors");
    let get = |name: &str| refs[&format!("vae.{name}")].clone();
    let posterior = vae.encode(&get("image")).unwrap();
    compare(
        &format!("{layout} latent mean"),
        &posterior.mean,
        &get("latent_mean"),
    );
    compare(
        &format!("{layout} latent std"),
        &posterior.std,
        &get("latent_std"),
    );
    let decoded = vae.decode(&get("latent")).unwrap();
    compare(&format!("{layout} decoded"), &decoded, &get("decoded"));
}

#[test]
fn vae_matches_diffusers_from_the_diffusers_folder() {
    matches_diffusers(&diffusers_vae(), "diffusers");
}

#[test]
fn vae_matches_diffusers_from_the_bfl_single_file() {
    let files = WeightFiles::open(&fixtures().join("tiny-dev-bfl/ae.safetensors")).unwrap();
    assert_eq!(
        detect_vae_layout(&files.names()),
        VaeLayout::Bfl {
            prefix: String::new()
        }
    );
    matches_diffusers(&bfl_vae(), "bfl");
}

#[test]
fn tiled_decode_matches_diffusers_tiled_decode() {
    let vae = diffusers_vae();
    let refs = references("vae_tiled.safetensors");
    for case in ["square", "wide"] {
        let latent = &refs[&format!("{case}.latent")];
        let tiled = vae.decode_tiled(latent, 32).unwrap();
        compare(
            &format!("{case} tiled decode"),
            &tiled,
            &refs[&format!("{case}.decoded")],
        );
    }
}

#[test]
fn tiled_decode_with_one_tile_is_plain_decode() {
    let vae = diffusers_vae();
    let latent = references("references.safetensors")["vae.latent"].clone();
    let plain = vae.decode(&latent).unwrap();
    for tile in [64, 128] {
        let tiled = vae.decode_tiled(&latent, tile).unwrap();
        let (_, max_abs) = distance(&tiled, &plain);
        assert_eq!(max_abs, 0.0, "tile {tile}");
    }
}

#[test]
fn small_tiles_approximate_plain_decode() {
    let vae = diffusers_vae();
    let latent = references("references.safetensors")["vae.latent"].clone();
    let plain = vae.decode(&latent).unwrap();
    let tiled = vae.decode_tiled(&latent, 32).unwrap();
    assert_eq!(tiled.dims(), plain.dims());
    let values: Vec<f32> = tiled.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    let (cosine_distance, max_abs) = distance(&tiled, &plain);
    eprintln!("tiled (32 px) vs plain: cosine distance {cosine_distance:e}, max abs {max_abs:e}");
    // Each 4×4-latent tile sees only itself (GroupNorm statistics and the
    // mid-block attention are per tile), and this random tiny VAE depends on
    // context a lot: diffusers' own tiled decode is 0.42 away in cosine distance
    // (max abs 2.37) from its plain decode here, and ours measures the same.
    assert!(cosine_distance < 0.5, "{cosine_distance}");
}

#[test]
fn tiles_too_small_or_uneven_are_refused() {
    let vae = diffusers_vae();
    let latent = references("references.safetensors")["vae.latent"].clone();
    let error = vae.decode_tiled(&latent, 8).unwrap_err().to_string();
    assert!(error.contains("too small"), "{error}");
    // 48 px: latent tiles of 6 every 4, crops of 36 px: diffusers' output would
    // not be 64×64.
    let error = vae.decode_tiled(&latent, 48).unwrap_err().to_string();
    assert!(error.contains("multiple of 32"), "{error}");
}

#[test]
fn sliced_decode_equals_batched_decode() {
    let vae = diffusers_vae();
    let refs = references("vae_tiled.safetensors");
    let latent = &refs["wide.latent"];
    let batched = vae.decode(latent).unwrap();
    let sliced = vae.decode_sliced(latent).unwrap();
    let (_, max_abs) = distance(&sliced, &batched);
    eprintln!("sliced vs batched: max abs {max_abs:e}");
    assert!(max_abs <= 1e-5, "{max_abs}");
}

#[test]
fn wrong_shaped_weight_names_the_tensor() {
    let mut config = config();
    config.latent_channels = 8;
    for weights in [
        fixtures().join("tiny-dev/vae"),
        fixtures().join("tiny-dev-bfl/ae.safetensors"),
    ] {
        let error = try_load(&weights, config.clone())
            .expect_err("a shape error")
            .to_string();
        assert!(
            error.contains("encoder.conv_out.weight") && error.contains("[16, 16, 3, 3]"),
            "{error}"
        );
    }
}

#[test]
fn config_defaults_are_diffusers_and_sdxl_shift_is_null() {
    let config: VaeConfig =
        serde_json::from_str(r#"{"shift_factor": null, "sample_size": [1024, 1024]}"#).unwrap();
    assert_eq!(config.shift_factor, None);
    assert_eq!(config.sample_size, 1024);
    assert_eq!(config.latent_channels, 4);
    assert!(config.use_quant_conv && config.use_post_quant_conv && config.mid_block_add_attention);
    assert!(config.validate().is_ok());
    let tiny = self::config();
    assert_eq!(
        (tiny.shift_factor, tiny.scaling_factor),
        (Some(0.1159), 0.3611)
    );
    assert_eq!(tiny.downscale_factor(), 8);
    let mismatched: VaeConfig =
        serde_json::from_str(r#"{"block_out_channels": [64, 128]}"#).unwrap();
    let error = mismatched.validate().unwrap_err();
    assert!(error.contains("down_block_types"), "{error}");
}

fn flux_like() -> VaeConfig {
    serde_json::from_str(
        r#"{"block_out_channels": [128, 256, 512, 512], "latent_channels": 16,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                 "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                               "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 2}"#,
    )
    .unwrap()
}

#[test]
fn bfl_decoder_levels_are_reversed_and_shortcuts_renamed() {
    let adapter = bfl_vae_adapter(&flux_like(), "first_stage_model.");
    let key = |name: &str| match adapter.source(name) {
        Source::Key(key) => key,
        other => panic!("{other:?}"),
    };
    let pairs = [
        (
            "decoder.up_blocks.0.resnets.2.conv1.weight",
            "decoder.up.3.block.2.conv1.weight",
        ),
        (
            "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
            "decoder.up.0.block.0.nin_shortcut.bias",
        ),
        (
            "decoder.up_blocks.1.upsamplers.0.conv.weight",
            "decoder.up.2.upsample.conv.weight",
        ),
        (
            "encoder.down_blocks.2.downsamplers.0.conv.bias",
            "encoder.down.2.downsample.conv.bias",
        ),
        (
            "encoder.down_blocks.1.resnets.1.norm2.weight",
            "encoder.down.1.block.1.norm2.weight",
        ),
        (
            "encoder.mid_block.attentions.0.to_out.0.weight",
            "encoder.mid.attn_1.proj_out.weight",
        ),
        (
            "decoder.mid_block.attentions.0.group_norm.bias",
            "decoder.mid.attn_1.norm.bias",
        ),
        (
            "decoder.mid_block.resnets.1.norm2.weight",
            "decoder.mid.block_2.norm2.weight",
        ),
        ("encoder.conv_norm_out.bias", "encoder.norm_out.bias"),
        ("decoder.conv_in.weight", "decoder.conv_in.weight"),
        ("post_quant_conv.weight", "post_quant_conv.weight"),
    ];
    for (ours, theirs) in pairs {
        assert_eq!(key(ours), format!("first_stage_model.{theirs}"), "{ours}");
    }
}

#[test]
fn bfl_adapter_reproduces_the_fixture_mapping() {
    let text = std::fs::read_to_string(fixtures().join("tiny-dev-bfl/mapping.json")).unwrap();
    let mapping: serde_json::Value = serde_json::from_str(&text).unwrap();
    let adapter = bfl_vae_adapter(&config(), "");
    let rows = mapping["ae"].as_array().unwrap();
    assert!(!rows.is_empty());
    for row in rows {
        let bfl = row[0].as_str().unwrap();
        let diffusers = row[2][0].as_str().unwrap();
        assert_eq!(
            adapter.source(diffusers),
            Source::Key(bfl.into()),
            "{diffusers}"
        );
    }
}

#[test]
fn layouts_are_detected_with_their_prefix() {
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        detect_vae_layout(&names(&[
            "first_stage_model.encoder.down.0.block.0.conv1.weight"
        ])),
        VaeLayout::Bfl {
            prefix: "first_stage_model.".into()
        }
    );
    assert_eq!(
        detect_vae_layout(&names(&["vae.decoder.mid_block.resnets.0.conv1.weight"])),
        VaeLayout::Diffusers {
            prefix: "vae.".into()
        }
    );
    let files = WeightFiles::open(&fixtures().join("tiny-dev/vae")).unwrap();
    assert_eq!(
        detect_vae_layout(&files.names()),
        VaeLayout::Diffusers {
            prefix: String::new()
        }
    );
}
