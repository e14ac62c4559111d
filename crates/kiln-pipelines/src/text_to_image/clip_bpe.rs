//! CLIP's tokenizer from the `vocab.json` + `merges.txt` pair that the Hub's
//! FLUX.1 and SDXL repos ship (they carry no `tokenizer.json`), built exactly as
//! transformers' `CLIPTokenizer` builds its backend: byte-level BPE with a
//! `</w>` end-of-word suffix, NFC + whitespace-collapsing + lower-casing
//! normalisation, CLIP's split pattern, and `<|startoftext|> … <|endoftext|>`
//! around every prompt. Tested in `tests/clip_vocab_tokenizers.rs`.

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// CLIP's pre-tokenisation pattern (transformers' `CLIPTokenizer`).
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A token's text from `tokenizer_config.json` (a string or `{"content": …}`).
fn config_token(config: &Value, key: &str, default: &str) -> String {
    match &config[key] {
        Value::String(token) => token.clone(),
        Value::Object(token) => token
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    }
}

/// Build the tokenizer from `folder/vocab.json` and `folder/merges.txt`.
pub fn from_vocab_and_merges(folder: &Path) -> Result<Tokenizer, String> {
    let read = |name: &str| {
        let path = folder.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let vocab_path = folder.join("vocab.json");
    let vocab: serde_json::Map<String, Value> = serde_json::from_str(&read("vocab.json")?)
        .map_err(|e| format!("{}: {e}", vocab_path.display()))?;
    if let Some((token, _)) = vocab.iter().find(|(_, id)| !id.is_u64()) {
        return Err(format!(
            "{}: the id of {token:?} is not a non-negative integer",
            vocab_path.display()
        ));
    }
    let merges_path = folder.join("merges.txt");
    let mut merges = Vec::new();
    for (number, line) in read("merges.txt")?.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        match line.split_once(' ') {
            Some((left, right))
                if !left.is_empty() && !right.is_empty() && !right.contains(' ') =>
            {
                merges.push(json!([left, right]))
            }
            _ => {
                return Err(format!(
                    "{} line {}: a merge is two tokens separated by one space",
                    merges_path.display(),
                    number + 1
                ));
            }
        }
    }
    let config: Value = read("tokenizer_config.json")
        .ok()
        .and_then(|text| kiln_engine::json::parse_lenient(&text).ok())
        .unwrap_or_default();
    let bos = config_token(&config, "bos_token", "<|startoftext|>");
    let eos = config_token(&config, "eos_token", "<|endoftext|>");
    let unk = config_token(&config, "unk_token", "<|endoftext|>");
    let id = |token: &str| {
        vocab.get(token).and_then(Value::as_u64).ok_or_else(|| {
            format!(
                "{}: no id for the special token {token:?}",
                vocab_path.display()
            )
        })
    };
    let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
    let mut specials = vec![(bos.clone(), bos_id), (eos.clone(), eos_id)];
    if unk != bos && unk != eos {
        specials.push((unk.clone(), id(&unk)?));
    }
    let added: Vec<Value> = specials
        .iter()
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let definition = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
                           "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    definition
        .to_string()
        .parse::<Tokenizer>()
        .map_err(|e| format!("{}: {e}", folder.display()))
}
