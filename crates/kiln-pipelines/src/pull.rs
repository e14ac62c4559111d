//! `kiln models pull`: a diffusers pipeline repository (or a transformers LLM
//! repository) from the Hugging Face Hub into the HF cache (shared with Python
//! tools), fetching only what Kiln loads: `model_index.json`, each component's
//! configs and tokenizer files, and its safetensors weights (sharded ones with
//! their index); for an LLM the same from the repository's top level. Pickled weights
//! (`.bin`, `.ckpt`, `.pt`, `.pth`) are never fetched, and a component that has
//! nothing else is refused by name. Precision variants (`*.fp16.safetensors`)
//! are skipped unless asked for, as diffusers' `variant=` does.

use std::path::PathBuf;

use kiln_fetch::{Hub, Policy};

/// What to pull.
#[derive(Debug, Clone)]
pub struct PullRequest {
    /// `owner/name` on the Hub.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// A precision variant (`fp16`, `bf16`) to prefer where a component has one.
    pub variant: Option<String>,
    /// Only these components (e.g. `tokenizer`, `tokenizer_2`); all when `None`.
    pub only: Option<Vec<String>>,
}

/// Hosts a pull may reach unless `KILN_PULL_ALLOWED_HOSTS` says otherwise.
pub const DEFAULT_ALLOWED_HOSTS: [&str; 2] = ["huggingface.co", "hf.co"];

/// The download policy for pulls: hosts from `KILN_PULL_ALLOWED_HOSTS` plus the
/// configured endpoint's own (`HF_ENDPOINT` is the operator's choice), internal
/// hosts from `KILN_PULL_PRIVATE_HOSTS`, and at most `KILN_PULL_MAX_BYTES` per
/// file (64 GiB: FLUX's largest shard is ~10 GB).
pub fn policy_from_env(hub: &Hub) -> Policy {
    let mut allowed_hosts =
        kiln_fetch::policy::list_from_env("KILN_PULL_ALLOWED_HOSTS", &DEFAULT_ALLOWED_HOSTS);
    if let Some(host) = hub.endpoint_host() {
        allowed_hosts.push(host);
    }
    Policy {
        allowed_hosts,
        private_hosts: kiln_fetch::policy::list_from_env("KILN_PULL_PRIVATE_HOSTS", &[]),
        max_bytes: std::env::var("KILN_PULL_MAX_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(64 << 30),
        ..Policy::default()
    }
}

/// Extensions of files that can run code when loaded: never fetched.
const PICKLE_EXTENSIONS: [&str; 4] = [".bin", ".ckpt", ".pt", ".pth"];
/// Extensions of configuration and tokenizer files.
const CONFIG_EXTENSIONS: [&str; 4] = [".json", ".txt", ".model", ".jinja"];

/// The components a diffusers `model_index.json` names (entries `[library, class]`
/// with a class; `_class_name` and friends are metadata).
pub fn components(model_index: &serde_json::Value) -> Vec<String> {
    let Some(entries) = model_index.as_object() else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .iter()
        .filter(|(name, _)| !name.starts_with('_'))
        .filter(|(_, value)| {
            value
                .as_array()
                .is_some_and(|pair| pair.len() == 2 && pair[1].is_string())
        })
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names
}

/// A weight file's precision variant: `fp16` in `model.fp16.safetensors`,
/// `model.fp16-00001-of-00002.safetensors` and `model.safetensors.index.fp16.json`.
fn variant_of(file_name: &str) -> Option<&str> {
    let stem = file_name
        .strip_suffix(".safetensors")
        .or_else(|| file_name.strip_suffix(".json"))?;
    let stem = stem.strip_suffix(".safetensors.index").unwrap_or(stem);
    let last = stem.rsplit('.').next().filter(|_| stem.contains('.'))?;
    let last = last.split('-').next().unwrap_or(last);
    (!last.is_empty() && last != "index" && last.chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some(last)
}

fn is_weight_index(file_name: &str) -> bool {
    file_name.contains(".safetensors.index")
}

/// The files of `listing` to fetch for `request`, given the repo's model index.
pub fn select_files(
    listing: &[String],
    model_index: &serde_json::Value,
    request: &PullRequest,
) -> Result<Vec<String>, String> {
    let all = components(model_index);
    if all.is_empty() {
        return Err(format!(
            "{}: model_index.json names no components: not a diffusers pipeline",
            request.repo
        ));
    }
    let wanted: Vec<String> = match &request.only {
        None => all.clone(),
        Some(only) => {
            if let Some(unknown) = only.iter().find(|name| !all.contains(name)) {
                return Err(format!(
                    "only: {} has no component {unknown:?} (it has: {})",
                    request.repo,
                    all.join(", ")
                ));
            }
            only.clone()
        }
    };
    let mut selected = vec!["model_index.json".to_string()];
    for component in &wanted {
        selected.extend(select_folder(
            listing,
            &format!("{component}/"),
            &format!("component {component}"),
            request,
        )?);
    }
    Ok(selected)
}

/// The files of a transformers repository (an LLM: `config.json`,
/// `generation_config.json`, tokenizer files, `chat_template.jinja`,
/// safetensors weights) to fetch. Mistral's duplicate `consolidated.safetensors`
/// is skipped where the transformers shards and their index exist.
pub fn select_transformers_files(
    listing: &[String],
    request: &PullRequest,
) -> Result<Vec<String>, String> {
    if request.only.is_some() {
        return Err(format!(
            "only: {} is a single model, not a pipeline with components",
            request.repo
        ));
    }
    let mut files = select_folder(listing, "", "the model", request)?;
    if files.iter().any(|f| is_weight_index(f)) {
        files.retain(|f| !f.starts_with("consolidated"));
    }
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(format!(
            "{}: no safetensors weights at the top of the repository",
            request.repo
        ));
    }
    Ok(files)
}

/// Configs and weights directly inside `prefix` (`""`: the repo's top level),
/// honouring the variant; `what` names the folder in errors.
fn select_folder(
    listing: &[String],
    prefix: &str,
    what: &str,
    request: &PullRequest,
) -> Result<Vec<String>, String> {
    let files: Vec<&str> = listing
        .iter()
        .filter_map(|f| f.strip_prefix(prefix))
        .filter(|f| !f.contains('/'))
        .collect();
    let mut selected: Vec<String> = files
        .iter()
        .filter(|f| CONFIG_EXTENSIONS.iter().any(|e| f.ends_with(e)) && !is_weight_index(f))
        .map(|f| format!("{prefix}{f}"))
        .collect();
    let weights: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| f.ends_with(".safetensors") || is_weight_index(f))
        .collect();
    let preferred: Vec<&str> = match request.variant.as_deref() {
        Some(variant) if weights.iter().any(|f| variant_of(f) == Some(variant)) => weights
            .iter()
            .copied()
            .filter(|f| variant_of(f) == Some(variant))
            .collect(),
        _ => weights
            .iter()
            .copied()
            .filter(|f| variant_of(f).is_none())
            .collect(),
    };
    let pickled = files
        .iter()
        .any(|f| PICKLE_EXTENSIONS.iter().any(|e| f.ends_with(e)));
    if preferred.is_empty() && pickled {
        return Err(format!(
            "{}: {what} has only pickled weights ({}); Kiln loads safetensors only",
            request.repo,
            PICKLE_EXTENSIONS.join(", ")
        ));
    }
    if preferred.is_empty() && !weights.is_empty() {
        return Err(format!(
            "{}: {what} has weights only in variants ({}); pass --variant",
            request.repo,
            weights.join(", ")
        ));
    }
    selected.extend(preferred.iter().map(|f| format!("{prefix}{f}")));
    Ok(selected)
}

/// Fetch the pipeline into the HF cache; the local snapshot folder.
pub async fn pull(hub: &Hub, policy: &Policy, request: &PullRequest) -> Result<PathBuf, String> {
    let (repo, revision) = (request.repo.as_str(), request.revision.as_str());
    if repo.split('/').count() != 2 || repo.split('/').any(|part| part.is_empty()) {
        return Err(format!("repo: {repo:?} is not an owner/name Hub id"));
    }
    let listing = hub
        .list(repo, revision, policy)
        .await
        .map_err(|e| e.to_string())?;
    if !listing.iter().any(|f| f == "model_index.json") {
        if listing.iter().any(|f| f == "config.json") {
            let files = select_transformers_files(&listing, request)?;
            let mut snapshot = None;
            for file in &files {
                let path = hub
                    .file(repo, revision, file, policy)
                    .await
                    .map_err(|e| e.to_string())?;
                if file == "config.json" {
                    snapshot = path.parent().map(PathBuf::from);
                }
            }
            return snapshot.ok_or_else(|| format!("{repo}: config.json was not fetched"));
        }
        return Err(format!(
            "{repo}: no model_index.json or config.json: not a diffusers pipeline or a transformers model (single-file checkpoints: download the file and `kiln models register --from` its folder)"
        ));
    }
    let index_path = hub
        .file(repo, revision, "model_index.json", policy)
        .await
        .map_err(|e| e.to_string())?;
    let index: serde_json::Value = std::fs::read_to_string(&index_path)
        .map_err(|e| format!("{}: {e}", index_path.display()))
        .and_then(|text| {
            kiln_engine::json::parse_lenient(&text)
                .map_err(|e| format!("{repo}/model_index.json: {e}"))
        })?;
    for file in select_files(&listing, &index, request)? {
        hub.file(repo, revision, &file, policy)
            .await
            .map_err(|e| e.to_string())?;
    }
    index_path
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| format!("{}: no snapshot folder", index_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(variant: Option<&str>, only: Option<&[&str]>) -> PullRequest {
        PullRequest {
            repo: "owner/pipe".into(),
            revision: "main".into(),
            variant: variant.map(String::from),
            only: only.map(|o| o.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn listing() -> Vec<String> {
        [
            "model_index.json",
            "README.md",
            "flux1-dev.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model.fp16-00001-of-00001.safetensors",
            "text_encoder/model.safetensors.index.fp16.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "scheduler/scheduler_config.json",
        ]
        .map(String::from)
        .to_vec()
    }

    fn index() -> serde_json::Value {
        serde_json::json!({
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.30.0",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "image_encoder": [null, null],
            "force_zeros_for_empty_prompt": true
        })
    }

    #[test]
    fn transformers_repos_fetch_configs_tokenizer_template_and_safetensors() {
        let listing: Vec<String> = [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "consolidated.safetensors",
            "pytorch_model.bin",
            "original/consolidated.00.pth",
            "README.md",
        ]
        .map(String::from)
        .to_vec();
        let files = select_transformers_files(&listing, &request(None, None)).unwrap();
        assert_eq!(
            files,
            vec![
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.jinja",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
            ]
        );
        let pickles = vec!["config.json".to_string(), "pytorch_model.bin".to_string()];
        let e = select_transformers_files(&pickles, &request(None, None)).unwrap_err();
        assert!(e.contains("pickled"), "{e}");
        let e =
            select_transformers_files(&listing, &request(None, Some(&["tokenizer"]))).unwrap_err();
        assert!(e.contains("only"), "{e}");
    }

    #[test]
    fn the_endpoints_host_is_allowed() {
        let hub = Hub {
            endpoint: "https://hf-mirror.example:8443".into(),
            token: None,
            cache: std::env::temp_dir(),
            progress: false,
        };
        let policy = policy_from_env(&hub);
        assert!(
            policy.allows_host("hf-mirror.example"),
            "{:?}",
            policy.allowed_hosts
        );
        assert!(
            policy.allows_host("huggingface.co")
                || std::env::var_os("KILN_PULL_ALLOWED_HOSTS").is_some()
        );
        assert!(!policy.allows_host("example.org"));
    }

    #[test]
    fn variants_are_recognised_in_every_naming() {
        assert_eq!(variant_of("model.fp16.safetensors"), Some("fp16"));
        assert_eq!(
            variant_of("model.fp16-00001-of-00002.safetensors"),
            Some("fp16")
        );
        assert_eq!(
            variant_of("model.safetensors.index.fp16.json"),
            Some("fp16")
        );
        assert_eq!(variant_of("model.safetensors"), None);
        assert_eq!(variant_of("model-00001-of-00002.safetensors"), None);
        assert_eq!(variant_of("model.safetensors.index.json"), None);
        assert_eq!(variant_of("diffusion_pytorch_model.safetensors"), None);
    }

    #[test]
    fn only_configs_tokenizers_and_full_precision_safetensors_are_selected() {
        let files = select_files(&listing(), &index(), &request(None, None)).unwrap();
        assert_eq!(
            files,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model-00001-of-00002.safetensors",
                "text_encoder/model-00002-of-00002.safetensors",
                "text_encoder/model.safetensors.index.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
            ]
        );
    }

    #[test]
    fn a_variant_replaces_the_weights_where_it_exists() {
        let files = select_files(&listing(), &index(), &request(Some("fp16"), None)).unwrap();
        assert!(files.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!files.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(files.contains(&"text_encoder/model.safetensors.index.fp16.json".to_string()));
        assert!(!files.contains(&"text_encoder/model.safetensors.index.json".to_string()));
        // A variant nobody has falls back to the full-precision files.
        let files = select_files(&listing(), &index(), &request(Some("bf16"), None)).unwrap();
        assert!(files.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
    }

    #[test]
    fn only_limits_the_components_and_names_unknown_ones() {
        let files =
            select_files(&listing(), &index(), &request(None, Some(&["tokenizer"]))).unwrap();
        assert_eq!(
            files,
            [
                "model_index.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json"
            ]
        );
        let error =
            select_files(&listing(), &index(), &request(None, Some(&["tokenizer_3"]))).unwrap_err();
        assert!(
            error.starts_with("only:") && error.contains("tokenizer_3"),
            "{error}"
        );
        assert!(
            error.contains("scheduler, text_encoder, tokenizer, unet"),
            "{error}"
        );
    }

    #[test]
    fn pickle_only_and_variant_only_components_are_refused() {
        let pickled: Vec<String> = listing()
            .into_iter()
            .filter(|f| !(f.starts_with("unet/") && f.ends_with(".safetensors")))
            .collect();
        let error = select_files(&pickled, &index(), &request(None, None)).unwrap_err();
        assert!(
            error.contains("unet") && error.contains("pickled"),
            "{error}"
        );
        let variant_only: Vec<String> = listing()
            .into_iter()
            .filter(|f| f != "unet/diffusion_pytorch_model.safetensors" && !f.ends_with(".bin"))
            .collect();
        let error = select_files(&variant_only, &index(), &request(None, None)).unwrap_err();
        assert!(
            error.contains("--variant") && error.contains("fp16"),
            "{error}"
        );
        let error = select_files(
            &listing(),
            &serde_json::json!({"_class_name": "X"}),
            &request(None, None),
        )
        .unwrap_err();
        assert!(error.contains("not a diffusers pipeline"), "{error}");
    }
}
