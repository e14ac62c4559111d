//! The `kiln` binary with LLMs: register a transformers folder and a GGUF
//! file, stream transformers' greedy text, refuse broken files at
//! registration, and verify logits against a reference dump.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, kiln, ok};

fn llm_fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/llm")
        .join(path)
}

fn llm_reference(model: &str, case: &str) -> serde_json::Value {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(llm_fixture(model).join("reference/index.json")).unwrap(),
    )
    .unwrap();
    index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .cloned()
        .unwrap()
}

#[test]
fn a_registered_llm_folder_and_gguf_file_stream_transformers_greedy_text() {
    let home = tempfile::tempdir().unwrap();
    let case = llm_reference("tiny-llama3", "short");
    let prompt = format!("prompt={}", case["prompt"].as_str().unwrap());
    let greedy = [
        "-i",
        "template=false",
        "-i",
        "temperature=0",
        "-i",
        "max_tokens=12",
        "-i",
        "ignore_eos=true",
    ];
    let folder = llm_fixture("tiny-llama3");
    let registered = ok(
        home.path(),
        &[
            "models",
            "register",
            "main.llm.llama",
            "--from",
            folder.to_str().unwrap(),
        ],
    );
    assert!(
        registered.contains("registered models:/main.llm.llama/1"),
        "{registered}"
    );
    let mut args = vec!["predict", "main.llm.llama", "-i", prompt.as_str()];
    args.extend(greedy);
    let out = kiln(home.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", case["output_text"].as_str().unwrap())
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[length: 13 prompt + 12 generated tokens")
    );

    // The same weights as one f32 GGUF file: registered as its only artifact.
    let gguf = llm_fixture("tiny-llama3/gguf/model-f32.gguf");
    ok(
        home.path(),
        &[
            "models",
            "register",
            "main.llm.llama_gguf",
            "--from",
            gguf.to_str().unwrap(),
        ],
    );
    let shown = ok(home.path(), &["models", "show", "main.llm.llama_gguf"]);
    let size = std::fs::metadata(&gguf).unwrap().len();
    assert!(
        shown.contains(&format!("{size} bytes")) && shown.contains("text_generation/llm"),
        "{shown}"
    );
    let mut args = vec!["predict", "main.llm.llama_gguf", "-i", prompt.as_str()];
    args.extend(greedy);
    let out = kiln(home.path(), &args);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", case["output_text"].as_str().unwrap())
    );
    // A bad field is named.
    let error = fails(
        home.path(),
        &[
            "predict",
            "main.llm.llama",
            "-i",
            "prompt=hi",
            "-i",
            "temperature=7",
        ],
    );
    assert!(error.contains("temperature"), "{error}");
}

#[test]
fn broken_llm_files_are_refused_at_registration_naming_the_file() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // A GGUF file cut short.
    let bytes = std::fs::read(llm_fixture("tiny-qwen2/gguf/model-q8_0.gguf")).unwrap();
    let truncated = work.path().join("cut.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = fails(
        home.path(),
        &[
            "models",
            "register",
            "main.llm.cut",
            "--from",
            truncated.to_str().unwrap(),
        ],
    );
    assert!(
        error.contains("cut.gguf") && error.contains("truncated"),
        "{error}"
    );
    // A GGUF header that lies about its counts.
    let mut lying = bytes[..32].to_vec();
    lying[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let lies = work.path().join("lies.gguf");
    std::fs::write(&lies, &lying).unwrap();
    let error = fails(
        home.path(),
        &[
            "models",
            "register",
            "main.llm.lies",
            "--from",
            lies.to_str().unwrap(),
        ],
    );
    assert!(error.contains("lies.gguf"), "{error}");

    let copy = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(llm_fixture("tiny-qwen3"))
            .unwrap()
            .flatten()
        {
            if entry.path().is_file() {
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
        }
        dir
    };
    // No tokenizer.
    let no_tokenizer = copy("no-tokenizer");
    std::fs::remove_file(no_tokenizer.join("tokenizer.json")).unwrap();
    let error = fails(
        home.path(),
        &[
            "models",
            "register",
            "main.llm.notok",
            "--from",
            no_tokenizer.to_str().unwrap(),
        ],
    );
    assert!(error.contains("tokenizer.json"), "{error}");
    // A safetensors header that is not JSON.
    let corrupt = copy("corrupt");
    let weights = corrupt.join("model.safetensors");
    let mut data = std::fs::read(&weights).unwrap();
    data[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&weights, data).unwrap();
    let error = fails(
        home.path(),
        &[
            "models",
            "register",
            "main.llm.corrupt",
            "--from",
            corrupt.to_str().unwrap(),
        ],
    );
    assert!(error.contains("model.safetensors"), "{error}");
    // A config whose sizes do not match the weights.
    let wrong = copy("wrong-shape");
    let config_path = wrong.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(48);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let error = fails(
        home.path(),
        &[
            "models",
            "register",
            "main.llm.wrong",
            "--from",
            wrong.to_str().unwrap(),
        ],
    );
    assert!(
        error.contains("gate_proj") && error.contains("48"),
        "{error}"
    );
    let listed = ok(home.path(), &["models", "list"]);
    assert!(!listed.contains("main.llm"), "{listed}");
}

#[test]
fn verify_passes_on_matching_weights_and_fails_past_the_thresholds() {
    let home = tempfile::tempdir().unwrap();
    let reference = llm_fixture("tiny-llama3/reference");
    let folder = llm_fixture("tiny-llama3");
    let table = ok(
        home.path(),
        &[
            "verify",
            folder.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
            "--strict",
        ],
    );
    for case in ["short", "long", "chat"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(case) && l.ends_with("pass")),
            "{table}"
        );
    }
    // Q4_0 blocks move the logits well past a strict KL bound.
    let q4 = llm_fixture("tiny-llama3/gguf/model-q4_0.gguf");
    let out = kiln(
        home.path(),
        &[
            "verify",
            q4.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
            "--max-kl",
            "1e-6",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the thresholds"));
}
