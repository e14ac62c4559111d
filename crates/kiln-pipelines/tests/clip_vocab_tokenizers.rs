//! CLIP tokenizers from the Hub's `vocab.json` + `merges.txt` (no
//! `tokenizer.json`, as the FLUX.1 and SDXL repos ship them) give exactly the
//! ids of the transformers-written `tokenizer.json` of the same vocabulary, and
//! malformed files are errors that name the file.

#[path = "common/slow_tokenizer.rs"]
mod slow_tokenizer;

use std::path::{Path, PathBuf};

use kiln_pipelines::text_to_image::flux::PromptTokenizer;
use slow_tokenizer::write_slow_tokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn error(folder: &Path) -> String {
    PromptTokenizer::load_clip(folder).err().expect("an error")
}

#[test]
fn ids_equal_the_transformers_written_tokenizer_json() {
    for fixture in [
        fixtures().join("sdxl/tiny-sdxl/tokenizer"),
        fixtures().join("sdxl/tiny-sdxl/tokenizer_2"),
        fixtures().join("flux/tiny-dev/tokenizer"),
    ] {
        let slow = tempfile::tempdir().unwrap();
        write_slow_tokenizer(&fixture, slow.path());
        let ours = PromptTokenizer::load_clip(slow.path()).unwrap();
        let reference = PromptTokenizer::load_clip(&fixture).unwrap();
        for prompt in [
            "a photo of a cat",
            "A PHOTO   of\ta Cat, wearing a hat!!",
            "it's 2 o'clock; naïve café ☕ <|endoftext|> done",
            "",
            "photophotophoto photo's 12345",
        ] {
            assert_eq!(
                ours.ids(prompt, 77).unwrap(),
                reference.ids(prompt, 77).unwrap(),
                "{} {prompt:?}",
                fixture.display()
            );
        }
    }
}

#[test]
fn malformed_files_are_named() {
    let slow = tempfile::tempdir().unwrap();
    write_slow_tokenizer(&fixtures().join("sdxl/tiny-sdxl/tokenizer"), slow.path());
    std::fs::write(slow.path().join("merges.txt"), "#version: 0.2\na b\nabc\n").unwrap();
    let message = error(slow.path());
    assert!(message.contains("merges.txt line 3"), "{message}");
    std::fs::write(
        slow.path().join("vocab.json"),
        r#"{"a": 0, "<|endoftext|>": 1}"#,
    )
    .unwrap();
    std::fs::write(slow.path().join("merges.txt"), "").unwrap();
    let message = error(slow.path());
    assert!(message.contains("<|startoftext|>"), "{message}");
    std::fs::write(slow.path().join("vocab.json"), r#"{"a": -1}"#).unwrap();
    let message = error(slow.path());
    assert!(
        message.contains("vocab.json") && message.contains("\"a\""),
        "{message}"
    );
    std::fs::remove_file(slow.path().join("vocab.json")).unwrap();
    let message = error(slow.path());
    assert!(
        message.contains("no tokenizer.json, nor vocab.json"),
        "{message}"
    );
}
