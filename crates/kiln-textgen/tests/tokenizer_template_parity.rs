//! Tokenizers and chat templates against transformers (`fixtures/llm`): ids
//! and decodes identical for both tokenizer flavours (also rebuilt from GGUF
//! metadata), every templated conversation rendered to the same string and
//! ids, templates' own errors surfaced with their message, and streamed
//! detokenisation whose pieces concatenate to the full decode.

use std::path::PathBuf;

use kiln_engine::gguf::GgufFile;
use kiln_textgen::TextGenError;
use kiln_textgen::template::ChatTemplate;
use kiln_textgen::tokenizer::{IncrementalDecoder, TextTokenizer};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llm")
}

fn json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(path)).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn folder_tokenizer(folder: &str) -> TextTokenizer {
    TextTokenizer::from_file(&fixtures().join(folder).join("tokenizer.json")).unwrap()
}

#[test]
fn both_tokenizer_flavours_encode_and_decode_as_transformers() {
    let cases = json("tokenizer_cases.json");
    for (flavour, folder) in [("llama3", "tiny-llama3"), ("qwen2", "tiny-qwen2")] {
        let tokenizer = folder_tokenizer(folder);
        for case in cases["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let expected = &case[flavour];
            assert_eq!(
                tokenizer.encode(text, false).unwrap(),
                ids(&expected["ids"]),
                "{flavour}: {text:?}"
            );
            assert_eq!(
                tokenizer.encode(text, true).unwrap(),
                ids(&expected["ids_with_special"]),
                "{flavour} with special tokens: {text:?}"
            );
            let with_special = ids(&expected["ids_with_special"]);
            assert_eq!(
                tokenizer.decode(&with_special, false).unwrap(),
                expected["decode_with_special"],
                "{flavour}: {text:?}"
            );
            assert_eq!(
                tokenizer.decode(&with_special, true).unwrap(),
                expected["decode_with_special_skip_special"],
                "{flavour}: {text:?}"
            );
        }
    }
}

#[test]
fn gguf_tokenizers_rebuild_the_folders_ids() {
    let cases = json("tokenizer_cases.json");
    for (flavour, gguf) in [
        ("llama3", "tiny-llama3/gguf/model-q8_0.gguf"),
        ("qwen2", "tiny-qwen2/gguf/model-f32.gguf"),
    ] {
        let file = GgufFile::open(&fixtures().join(gguf)).unwrap();
        let tokenizer = TextTokenizer::from_gguf(&file).unwrap();
        for case in cases["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let expected = &case[flavour];
            // The qwen2 flavour NFC-normalises first; llama.cpp does not, so
            // only strings already in NFC are compared for it.
            if flavour == "qwen2" && text.chars().any(|c| ('\u{300}'..='\u{36f}').contains(&c)) {
                continue;
            }
            assert_eq!(
                tokenizer.encode(text, false).unwrap(),
                ids(&expected["ids"]),
                "GGUF {flavour}: {text:?}"
            );
            assert_eq!(
                tokenizer.encode(text, true).unwrap(),
                ids(&expected["ids_with_special"]),
                "GGUF {flavour} with special tokens: {text:?}"
            );
        }
    }
}

fn template_of(folder: &str) -> ChatTemplate {
    let dir = fixtures().join(folder);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let token = |key: &str| match &config[key] {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(source) => source,
        Err(_) => config["chat_template"].as_str().unwrap().to_string(),
    };
    ChatTemplate::new(&source, token("bos_token"), token("eos_token")).unwrap()
}

#[test]
fn chat_templates_render_exactly_as_transformers() {
    let cases = json("chat_cases.json");
    let mut rendered = 0;
    for (folder, model) in cases["models"].as_object().unwrap() {
        let template = template_of(folder);
        let tokenizer = folder_tokenizer(folder);
        for case in model["cases"].as_array().unwrap() {
            let messages = case["messages"].as_array().unwrap();
            let kwargs: Map<String, Value> =
                case["kwargs"].as_object().cloned().unwrap_or_default();
            let text = template
                .render(
                    messages,
                    case["add_generation_prompt"].as_bool().unwrap(),
                    &kwargs,
                )
                .unwrap_or_else(|e| panic!("{folder}/{}: {e}", case["name"]));
            assert_eq!(
                text,
                case["rendered"].as_str().unwrap(),
                "{folder}/{}",
                case["name"]
            );
            assert_eq!(
                tokenizer.encode(&text, false).unwrap(),
                ids(&case["ids"]),
                "{folder}/{}",
                case["name"]
            );
            rendered += 1;
        }
        for case in model["errors"].as_array().unwrap() {
            let messages = case["messages"].as_array().unwrap();
            let error = template.render(messages, true, &Map::new()).unwrap_err();
            assert_eq!(
                error,
                TextGenError::Template(case["message"].as_str().unwrap().to_string()),
                "{folder}/{}",
                case["name"]
            );
        }
    }
    assert!(rendered >= 15, "only {rendered} conversations checked");
}

#[test]
fn streamed_pieces_concatenate_to_the_full_decode_and_never_split_a_character() {
    let tokenizer = folder_tokenizer("tiny-llama3");
    let text = "naïve café — 東京 🙂 done";
    let ids = tokenizer.encode(text, false).unwrap();
    // Byte-level BPE splits multi-byte characters across tokens here.
    assert!(ids.len() > text.chars().count() / 2);
    let mut decoder = IncrementalDecoder::new();
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = decoder.push(&tokenizer, id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "piece {piece:?} holds a broken character"
        );
        pieces.push(piece);
    }
    pieces.push(decoder.finish(&tokenizer).unwrap());
    assert_eq!(pieces.concat(), tokenizer.decode(&ids, true).unwrap());
    assert_eq!(pieces.concat(), text);
    assert!(
        pieces.iter().filter(|p| p.is_empty()).count() > 0,
        "some tokens end mid-character"
    );
}
