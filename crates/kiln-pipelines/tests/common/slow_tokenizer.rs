//! A transformers-written CLIP `tokenizer.json` rewritten as the Hub ships CLIP
//! tokenizers: `vocab.json` + `merges.txt` (+ `tokenizer_config.json`). Shared
//! by the tokenizer test binaries (included with `#[path]`).

use std::path::Path;

use serde_json::Value;

/// Write `from`'s tokenizer into `to` in the vocab/merges form.
pub fn write_slow_tokenizer(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let definition: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("tokenizer.json")).unwrap())
            .unwrap();
    std::fs::write(
        to.join("vocab.json"),
        definition["model"]["vocab"].to_string(),
    )
    .unwrap();
    let merges: String = definition["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            format!(
                "{} {}\n",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            )
        })
        .collect();
    std::fs::write(to.join("merges.txt"), format!("#version: 0.2\n{merges}")).unwrap();
    std::fs::copy(
        from.join("tokenizer_config.json"),
        to.join("tokenizer_config.json"),
    )
    .unwrap();
}
