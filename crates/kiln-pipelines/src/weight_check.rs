//! Checking a model folder's weight files before it is published: pickles are
//! refused, every safetensors and GGUF header is parsed (offsets inside the
//! file, sizes matching dtypes and shapes), and the shapes diffusers component
//! configs imply are compared with the stored ones, so a broken folder fails at
//! `kiln models register`, naming the file and tensor, instead of at load.

use std::path::{Path, PathBuf};

use kiln_engine::gguf::GgufFile;
use kiln_engine::weights::WeightFiles;
use serde_json::Value;

/// Check every weight file under `dir` (or the one file `dir` names).
/// Returns how many weight files were checked.
pub fn check_weight_files(dir: &Path) -> Result<usize, String> {
    let files = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        files_under(dir)?
    };
    let mut checked = 0;
    for file in &files {
        let extension = file
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if kiln_engine::weights::has_pickle_extension(file) {
            return Err(format!(
                "{}: pickle weights can run code when loaded; Kiln reads only safetensors and GGUF (convert it, or leave it out of the folder)",
                relative(dir, file)
            ));
        }
        // Each format's own reader parses the header; its error names the file.
        let parsed = match extension.as_str() {
            "safetensors" => Some(WeightFiles::open(file).map(|_| ())),
            "gguf" => Some(GgufFile::open(file).map(|_| ())),
            _ => None,
        };
        if let Some(parsed) = parsed {
            parsed.map_err(|e| {
                format!(
                    "{}: {}",
                    relative(dir, file),
                    strip_path(&e.to_string(), file)
                )
            })?;
            checked += 1;
        }
    }
    if dir.is_dir() {
        check_component_shapes(dir)?;
    }
    Ok(checked)
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        let entries = std::fs::read_dir(&folder)
            .map_err(|e| format!("{}: cannot list it ({e})", relative(dir, &folder)))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn relative(root: &Path, path: &Path) -> String {
    let shown = path.strip_prefix(root).unwrap_or(path);
    if shown.as_os_str().is_empty() {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        shown.display().to_string()
    }
}

/// Drop the file's absolute path from a message that repeats it.
fn strip_path(message: &str, file: &Path) -> String {
    let shown = file.display().to_string();
    message
        .replacen(&format!("{shown}: "), "", 1)
        .replace(&shown, "the file")
}

/// One stored tensor a component config implies: its name and shape.
type Expected = (String, Vec<usize>);

/// Compare the tensors a diffusers component's config implies with the
/// component's stored shapes (FLUX transformer, UNet, VAE, CLIP and T5 text
/// encoders); components Kiln knows no rule for are left to their loaders.
fn check_component_shapes(dir: &Path) -> Result<(), String> {
    let mut components = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        components.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for component in components {
        let config_path = component.join("config.json");
        let Ok(text) = std::fs::read_to_string(&config_path) else {
            continue;
        };
        let Ok(config) = kiln_engine::json::parse_lenient(&text) else {
            continue;
        };
        let expected = expected_shapes(&config);
        if expected.is_empty() {
            continue;
        }
        let Ok(files) = WeightFiles::open(&component) else {
            continue;
        };
        // Weights in another naming (a BFL or GGUF FLUX file, an ldm GGUF
        // UNet, read through key adapters) are left to their loaders.
        let diffusers_names = expected.iter().any(|(name, _)| {
            files.contains(name) || files.contains(&name.replacen("text_model.", "", 1))
        });
        if !diffusers_names {
            continue;
        }
        for (name, shape) in expected {
            // transformers 5 saves CLIP text models without the `text_model.` prefix.
            let stored = [name.clone(), name.replacen("text_model.", "", 1)]
                .into_iter()
                .find(|n| files.contains(n))
                .unwrap_or_else(|| name.clone());
            let found = files.shape(&stored).map_err(|_| {
                format!(
                    "{}: tensor {name:?} is missing, though config.json implies it",
                    relative(dir, &component)
                )
            })?;
            if found != shape {
                return Err(format!(
                    "{}: tensor {name:?} has shape {found:?}, config.json implies {shape:?}",
                    relative(dir, &component)
                ));
            }
        }
    }
    Ok(())
}

fn usize_of(config: &Value, key: &str) -> Option<usize> {
    config
        .get(key)?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
}

fn expected_shapes(config: &Value) -> Vec<Expected> {
    let class = config
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let architecture = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("");
    let first_block = || {
        config
            .get("block_out_channels")
            .and_then(|b| b.get(0))
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
    };
    let mut out = Vec::new();
    match class {
        "FluxTransformer2DModel" => {
            if let (Some(heads), Some(head_dim), Some(channels), Some(joint)) = (
                usize_of(config, "num_attention_heads"),
                usize_of(config, "attention_head_dim"),
                usize_of(config, "in_channels"),
                usize_of(config, "joint_attention_dim"),
            ) {
                let inner = heads * head_dim;
                out.push(("x_embedder.weight".into(), vec![inner, channels]));
                out.push(("context_embedder.weight".into(), vec![inner, joint]));
                if let Some(layers) = usize_of(config, "num_layers").filter(|n| *n > 0) {
                    out.push((
                        format!("transformer_blocks.{}.norm1.linear.weight", layers - 1),
                        vec![6 * inner, inner],
                    ));
                }
                if let Some(layers) = usize_of(config, "num_single_layers").filter(|n| *n > 0) {
                    out.push((
                        format!(
                            "single_transformer_blocks.{}.norm.linear.weight",
                            layers - 1
                        ),
                        vec![3 * inner, inner],
                    ));
                }
            }
        }
        "Flux2Transformer2DModel" => {
            if let (Some(heads), Some(head_dim), Some(channels), Some(joint)) = (
                usize_of(config, "num_attention_heads"),
                usize_of(config, "attention_head_dim"),
                usize_of(config, "in_channels"),
                usize_of(config, "joint_attention_dim"),
            ) {
                let inner = heads * head_dim;
                let ratio = config
                    .get("mlp_ratio")
                    .and_then(Value::as_f64)
                    .unwrap_or(3.0);
                let mlp = (inner as f64 * ratio) as usize;
                out.push(("x_embedder.weight".into(), vec![inner, channels]));
                out.push(("context_embedder.weight".into(), vec![inner, joint]));
                out.push((
                    "double_stream_modulation_img.linear.weight".into(),
                    vec![6 * inner, inner],
                ));
                out.push((
                    "single_stream_modulation.linear.weight".into(),
                    vec![3 * inner, inner],
                ));
                if let Some(layers) = usize_of(config, "num_single_layers").filter(|n| *n > 0) {
                    out.push((
                        format!(
                            "single_transformer_blocks.{}.attn.to_qkv_mlp_proj.weight",
                            layers - 1
                        ),
                        vec![3 * inner + 2 * mlp, inner],
                    ));
                }
            }
        }
        "UNet2DConditionModel" => {
            if let (Some(first), Some(input), Some(output)) = (
                first_block(),
                usize_of(config, "in_channels"),
                usize_of(config, "out_channels"),
            ) {
                out.push(("conv_in.weight".into(), vec![first, input, 3, 3]));
                out.push(("conv_out.weight".into(), vec![output, first, 3, 3]));
            }
        }
        "AutoencoderKL" | "AutoencoderKLFlux2" => {
            if class == "AutoencoderKLFlux2"
                && let Some(latent) = usize_of(config, "latent_channels")
            {
                // The BatchNorm over 2×2-patchified latents.
                out.push(("bn.running_mean".into(), vec![4 * latent]));
                out.push(("bn.running_var".into(), vec![4 * latent]));
            }
            if let (Some(first), Some(input), Some(output), Some(latent)) = (
                first_block(),
                usize_of(config, "in_channels"),
                usize_of(config, "out_channels"),
                usize_of(config, "latent_channels"),
            ) {
                out.push(("encoder.conv_in.weight".into(), vec![first, input, 3, 3]));
                // The decoder's widths may differ (FLUX.2's decoder_block_out_channels).
                let decoder: Vec<usize> = ["decoder_block_out_channels", "block_out_channels"]
                    .iter()
                    .find_map(|key| config.get(*key).and_then(Value::as_array))
                    .map(|widths| {
                        widths
                            .iter()
                            .filter_map(Value::as_u64)
                            .filter_map(|v| usize::try_from(v).ok())
                            .collect()
                    })
                    .unwrap_or_default();
                if let (Some(&top), Some(&bottom)) = (decoder.first(), decoder.last()) {
                    out.push(("decoder.conv_out.weight".into(), vec![output, top, 3, 3]));
                    out.push(("decoder.conv_in.weight".into(), vec![bottom, latent, 3, 3]));
                }
            }
        }
        _ => {}
    }
    match architecture {
        "CLIPTextModel" | "CLIPTextModelWithProjection" => {
            if let (Some(vocab), Some(hidden)) = (
                usize_of(config, "vocab_size"),
                usize_of(config, "hidden_size"),
            ) {
                out.push((
                    "text_model.embeddings.token_embedding.weight".into(),
                    vec![vocab, hidden],
                ));
            }
        }
        "T5EncoderModel" => {
            if let (Some(vocab), Some(width)) =
                (usize_of(config, "vocab_size"), usize_of(config, "d_model"))
            {
                out.push(("shared.weight".into(), vec![vocab, width]));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>)]) {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape) in tensors {
            let bytes = shape.iter().product::<usize>() * 4;
            header.insert(
                (*name).into(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(&header);
        file.resize(file.len() + offset, 0);
        std::fs::write(path, file).unwrap();
    }

    #[test]
    fn pickles_and_truncated_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("model.safetensors"), &[("w", vec![2, 2])]);
        assert_eq!(check_weight_files(dir.path()), Ok(1));

        std::fs::write(dir.path().join("training_args.bin"), b"\x80\x04junk").unwrap();
        let err = check_weight_files(dir.path()).unwrap_err();
        assert!(err.starts_with("training_args.bin: pickle"), "{err}");
        std::fs::remove_file(dir.path().join("training_args.bin")).unwrap();

        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("model.safetensors"),
            &bytes[..bytes.len() - 3],
        )
        .unwrap();
        let err = check_weight_files(dir.path()).unwrap_err();
        assert!(err.starts_with("model.safetensors: "), "{err}");
        assert!(!err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn shapes_are_checked_against_component_configs() {
        let dir = tempfile::tempdir().unwrap();
        let vae = dir.path().join("vae");
        std::fs::create_dir_all(&vae).unwrap();
        std::fs::write(
            vae.join("config.json"),
            r#"{"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                "latent_channels": 4, "block_out_channels": [8, 16], "scaling_factor": Infinity}"#,
        )
        .unwrap();
        let good = [
            ("encoder.conv_in.weight", vec![8, 3, 3, 3]),
            ("decoder.conv_out.weight", vec![3, 8, 3, 3]),
            ("decoder.conv_in.weight", vec![16, 4, 3, 3]),
        ];
        write_safetensors(&vae.join("diffusion_pytorch_model.safetensors"), &good);
        assert_eq!(check_weight_files(dir.path()), Ok(1));

        let mut bad = good.clone();
        bad[2].1 = vec![16, 16, 3, 3];
        write_safetensors(&vae.join("diffusion_pytorch_model.safetensors"), &bad);
        let err = check_weight_files(dir.path()).unwrap_err();
        assert!(
            err.contains("vae")
                && err.contains("decoder.conv_in.weight")
                && err.contains("[16, 4, 3, 3]"),
            "{err}"
        );
    }
}
