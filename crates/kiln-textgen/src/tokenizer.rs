//! The text tokenizer: a Hub folder's `tokenizer.json` through `tokenizers`, or
//! the byte-level BPE that a GGUF file describes in its metadata (tokens, merges,
//! token types and pre-tokenizer name), rebuilt as llama.cpp reads it.

use std::path::Path;

use kiln_engine::gguf::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::TextGenError;

/// Llama 3's pre-tokenizer regex (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's (llama.cpp's `qwen2`): single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Encodes prompts and decodes generated ids.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Whether `encode(.., add_special_tokens = true)` prepends BOS (GGUF's
    /// `add_bos_token`; folders' post-processors do it themselves).
    prepend_bos: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

fn tokenizer_error(path: &Path, message: impl std::fmt::Display) -> TextGenError {
    TextGenError::Load(format!("{}: {message}", path.display()))
}

impl TextTokenizer {
    /// `tokenizer.json` of a Hub folder.
    pub fn from_file(path: &Path) -> Result<Self, TextGenError> {
        if !path.is_file() {
            return Err(tokenizer_error(
                path,
                "no tokenizer.json: an LLM folder needs its tokenizer (the Hub repo's tokenizer.json)",
            ));
        }
        let inner = Tokenizer::from_file(path).map_err(|e| tokenizer_error(path, e))?;
        Ok(TextTokenizer {
            inner,
            prepend_bos: None,
        })
    }

    /// The tokenizer a GGUF file carries (`tokenizer.ggml.model = "gpt2"`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TextGenError> {
        let path = file.path();
        let fail = |m: String| tokenizer_error(path, m);
        let engine = |e: kiln_engine::EngineError| fail(e.to_string());
        let model = file.string("tokenizer.ggml.model").map_err(engine)?;
        if model != "gpt2" {
            return Err(fail(format!(
                "tokenizer.ggml.model {model:?} is not supported (Kiln reads byte-level BPE, \"gpt2\")"
            )));
        }
        let tokens = file.strings("tokenizer.ggml.tokens").map_err(engine)?;
        let merges = file.strings("tokenizer.ggml.merges").map_err(engine)?;
        let types = match file.value("tokenizer.ggml.token_type") {
            Some(_) => file.integers("tokenizer.ggml.token_type").map_err(engine)?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| fail(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<_, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(false)
            .build()
            .map_err(|e| fail(format!("BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = file.opt_string("tokenizer.ggml.pre").map_err(engine)?;
        let split = match pre.as_deref() {
            Some("llama-bpe" | "llama3" | "smaug-bpe") => Some(LLAMA3_SPLIT),
            Some("qwen2") => Some(QWEN2_SPLIT),
            _ => None,
        };
        let pre_tokenizer = match split {
            Some(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| fail(format!("pre-tokenizer: {e}")))?;
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ]))
            }
            None => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(token, t)| AddedToken::from(token.clone(), *t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&specials);
        let bos = file
            .opt_usize("tokenizer.ggml.bos_token_id")
            .map_err(engine)?;
        let add_bos = file
            .opt_bool("tokenizer.ggml.add_bos_token")
            .map_err(engine)?;
        let prepend_bos = match (bos, add_bos) {
            (Some(id), Some(true)) => Some(id as u32),
            _ => None,
        };
        Ok(TextTokenizer { inner, prepend_bos })
    }

    /// Token ids of `text`; with `add_special_tokens` the tokenizer's own
    /// additions (BOS for Llama 3) are made, as transformers' `tokenizer(text)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextGenError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TextGenError::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        // Unconditionally, as transformers and llama.cpp do (a prompt that
        // already starts with BOS gets a second one).
        if add_special_tokens && let Some(bos) = self.prepend_bos {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextGenError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextGenError::Tokenizer(e.to_string()))
    }

    /// The id of a token spelled exactly `token` (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The spelling of one id (byte-level symbols as stored).
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is one of the special (added, special) tokens.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of generated ids into text pieces without ever
/// splitting a UTF-8 character: the concatenated pieces equal the full decode
/// (vLLM's and TGI's prefix/read offsets).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, TextGenError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever text is still held back at the end (an incomplete character is
    /// emitted as the replacement character, as the full decode shows it).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, TextGenError> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(
            if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
                full[prefix.len()..].to_string()
            } else {
                String::new()
            },
        )
    }
}
