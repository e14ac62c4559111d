//! `kiln models pull` against a fake Hugging Face Hub: a diffusers pipeline
//! (or a transformers LLM) lands in the HF cache with only the files Kiln
//! loads, loads from there, and pickle-only components are refused.

mod common;

use common::{COMMIT, fixtures, server};
use kiln_pipelines::pull::{PullRequest, pull};

fn request(repo: &str) -> PullRequest {
    PullRequest {
        repo: repo.into(),
        revision: "main".into(),
        variant: None,
        only: None,
    }
}

fn run(request: &PullRequest, cache: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let settings = server().settings(cache);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(pull(&settings.hub, &settings.policy, request))
}

fn files_under(root: &std::path::Path) -> Vec<String> {
    let mut files: Vec<String> = common::repo_listing(root, "")
        .into_iter()
        .filter(|f| root.join(f).exists())
        .collect();
    files.sort();
    files
}

#[test]
fn a_pipeline_is_pulled_into_the_hf_cache_and_loads_from_there() {
    let cache = tempfile::tempdir().unwrap();
    let folder = run(&request("owner/tiny-flux"), cache.path()).unwrap();
    assert_eq!(
        folder,
        cache
            .path()
            .join(format!("hf/models--owner--tiny-flux/snapshots/{COMMIT}"))
    );
    // Everything the fixture folder has (but its test references), and none of
    // the root single file, the pickle or the fp16 variant the repo also lists.
    let expected: Vec<String> = files_under(&fixtures().join("tiny-dev"))
        .into_iter()
        .filter(|f| !f.starts_with("reference/"))
        .collect();
    assert_eq!(files_under(&folder), expected);
    for file in &expected {
        assert_eq!(
            std::fs::read(folder.join(file)).unwrap(),
            std::fs::read(fixtures().join("tiny-dev").join(file)).unwrap(),
            "{file}"
        );
    }
    let manifest = kiln_pipelines::describe_model_folder(&folder)
        .unwrap()
        .expect("a recognised FLUX folder");
    assert_eq!(manifest.pipeline, "text_to_image/flux");

    // A second pull is served from the cache: no new downloads.
    let downloads = server()
        .hits("/owner/tiny-flux/resolve/main/transformer/diffusion_pytorch_model.safetensors");
    run(&request("owner/tiny-flux"), cache.path()).unwrap();
    assert_eq!(
        server()
            .hits("/owner/tiny-flux/resolve/main/transformer/diffusion_pytorch_model.safetensors"),
        downloads
    );
    assert_eq!(
        server().hits("/owner/tiny-flux/resolve/main/flux1-dev.safetensors"),
        0
    );
}

#[test]
fn only_pulls_the_named_components() {
    let cache = tempfile::tempdir().unwrap();
    let mut partial = request("owner/tiny-flux");
    partial.only = Some(vec!["tokenizer".into(), "tokenizer_2".into()]);
    let folder = run(&partial, cache.path()).unwrap();
    let files = files_under(&folder);
    assert!(
        files
            .iter()
            .all(|f| f == "model_index.json" || f.starts_with("tokenizer")),
        "{files:?}"
    );
    assert!(
        files.contains(&"tokenizer_2/tokenizer.json".to_string()),
        "{files:?}"
    );
}

#[test]
fn pickle_only_components_and_non_pipelines_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    let error = run(&request("owner/pickled"), cache.path()).unwrap_err();
    assert!(
        error.contains("transformer") && error.contains("pickled"),
        "{error}"
    );
    assert_eq!(
        server().hits("/owner/pickled/resolve/main/transformer/diffusion_pytorch_model.bin"),
        0
    );
    // The LoRA repo of the fake Hub has no model_index.json or config.json.
    let error = run(&request("owner/repo"), cache.path()).unwrap_err();
    assert!(error.contains("not a diffusers pipeline"), "{error}");
    let error = run(&request("not-a-repo"), cache.path()).unwrap_err();
    assert!(error.starts_with("repo:"), "{error}");
}

#[test]
fn a_transformers_llm_is_pulled_without_pickles_and_loads() {
    let cache = tempfile::tempdir().unwrap();
    let folder = run(&request("owner/tiny-qwen3"), cache.path()).unwrap();
    let source = fixtures().join("../llm/tiny-qwen3");
    let expected: Vec<String> = files_under(&source)
        .into_iter()
        .filter(|f| !f.starts_with("reference/"))
        .collect();
    assert_eq!(files_under(&folder), expected);
    assert!(expected.contains(&"chat_template.jinja".to_string()));
    assert_eq!(
        server().hits("/owner/tiny-qwen3/resolve/main/pytorch_model.bin"),
        0
    );
    let manifest = kiln_pipelines::describe_model_folder(&folder)
        .unwrap()
        .expect("a recognised LLM folder");
    assert_eq!(manifest.pipeline, "text_generation/llm");
    let model = kiln_textgen::LanguageModel::load(
        &kiln_textgen::ModelSource::Folder(folder),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(model.template.is_some());
}
