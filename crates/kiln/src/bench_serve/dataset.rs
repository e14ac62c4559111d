//! Where `kiln bench serve` gets its load: the dataset settings, synthetic
//! and JSONL prompts, a seeded SplitMix64 generator and Poisson arrival times.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where the prompts come from.
#[derive(Clone, Debug)]
pub enum DatasetSpec {
    Random(RandomDataset),
    /// A JSONL file; lines without an output length generate `default_output_len` tokens.
    File {
        path: PathBuf,
        default_output_len: usize,
    },
}

/// Synthetic prompts of about `input_len` tokens asking for `output_len` tokens.
#[derive(Clone, Debug)]
pub struct RandomDataset {
    pub input_len: usize,
    pub output_len: usize,
    /// Lengths are uniform in `[len*(1-ratio), len*(1+ratio)]`.
    pub range_ratio: f64,
    pub prompt_form: RandomPromptForm,
}

#[derive(Clone, Copy, Debug)]
pub enum RandomPromptForm {
    /// Text of random words from a built-in list (about one token per word).
    Words,
    /// Lists of random token ids in `[1, vocab_size)` (exact input length).
    TokenIds { vocab_size: u32 },
}
impl RandomDataset {
    pub(super) fn validate(&self, chat: bool) -> Result<()> {
        if self.input_len == 0 || self.output_len == 0 {
            bail!("--random-input-len and --random-output-len must be at least 1");
        }
        if !(0.0..1.0).contains(&self.range_ratio) {
            bail!(
                "--random-range-ratio must be in [0, 1), not {}",
                self.range_ratio
            );
        }
        if let RandomPromptForm::TokenIds { vocab_size } = self.prompt_form {
            if chat {
                bail!("--prompt-ids needs /v1/completions: chat messages are text");
            }
            if vocab_size < 2 {
                bail!("--vocab-size must be at least 2");
            }
        }
        Ok(())
    }
}
/// Poisson arrivals: exponential gaps with mean `1 / rate`, none at an infinite rate.
pub(super) struct PoissonArrivals {
    rate: f64,
    rng: SplitMix64,
}

impl PoissonArrivals {
    pub(super) fn new(rate: f64, seed: u64) -> Self {
        Self {
            rate,
            rng: SplitMix64::new(seed ^ 0xa771_7a15),
        }
    }

    pub(super) fn next_gap(&mut self) -> Duration {
        if self.rate.is_infinite() {
            return Duration::ZERO;
        }
        // 1 - u is in (0, 1], so the logarithm is finite.
        Duration::from_secs_f64(-(1.0 - self.rng.unit()).ln() / self.rate)
    }
}

// ---------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------

/// One request's prompt and the tokens it asks for.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PlannedPrompt {
    pub(super) prompt: Prompt,
    /// Prompt tokens as planned: exact for token ids, an estimate for text;
    /// used only when the server reports no `usage.prompt_tokens`.
    pub(super) input_len: usize,
    pub(super) output_len: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

/// Common short English words: most tokenizers give each one token (with its
/// leading space), so `n` of them make a prompt of about `n` tokens.
const PROMPT_WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "her", "it", "an", "are", "were", "which", "this", "be", "or", "has", "had",
    "not", "but", "first", "one", "new", "their", "after", "who", "they", "two", "its", "also",
    "time", "year", "city", "school", "world", "house", "water", "music", "river", "game", "team",
    "war", "state", "name", "family", "life", "day", "part", "place", "people", "work", "number",
    "book", "film", "line", "road", "king", "light", "land", "north", "south", "east", "west",
    "great", "small", "long", "old", "high", "early", "last", "each", "other", "many", "over",
    "under", "between", "during", "while", "made", "found", "known", "called", "built", "born",
    "red", "green", "blue", "black", "white", "stone", "tree", "field", "station", "church",
];

pub(super) fn plan_prompts(
    spec: &DatasetSpec,
    count: usize,
    seed: u64,
) -> Result<Vec<PlannedPrompt>> {
    match spec {
        DatasetSpec::Random(random) => Ok(random_prompts(random, count, seed)),
        DatasetSpec::File {
            path,
            default_output_len,
        } => {
            let lines = read_dataset(path, *default_output_len)?;
            Ok(lines.into_iter().cycle().take(count).collect())
        }
    }
}

fn random_prompts(spec: &RandomDataset, count: usize, seed: u64) -> Vec<PlannedPrompt> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| {
            let input_len = sample_len(&mut rng, spec.input_len, spec.range_ratio);
            let output_len = sample_len(&mut rng, spec.output_len, spec.range_ratio);
            let prompt = match spec.prompt_form {
                RandomPromptForm::Words => Prompt::Text(
                    (0..input_len)
                        .map(|_| PROMPT_WORDS[rng.below(PROMPT_WORDS.len() as u64) as usize])
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                RandomPromptForm::TokenIds { vocab_size } => Prompt::TokenIds(
                    (0..input_len)
                        .map(|_| 1 + rng.below(u64::from(vocab_size) - 1) as u32)
                        .collect(),
                ),
            };
            PlannedPrompt {
                prompt,
                input_len,
                output_len,
            }
        })
        .collect()
}

/// A length uniform in `[len*(1-ratio), len*(1+ratio)]` (at least 1), as
/// vLLM's random dataset draws them.
fn sample_len(rng: &mut SplitMix64, len: usize, ratio: f64) -> usize {
    let low = ((len as f64 * (1.0 - ratio)) as usize).max(1);
    let high = ((len as f64 * (1.0 + ratio)) as usize).max(low);
    low + rng.below((high - low + 1) as u64) as usize
}

fn read_dataset(path: &Path, default_output_len: usize) -> Result<Vec<PlannedPrompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let prompts = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            dataset_line(line, default_output_len)
                .with_context(|| format!("{} line {}", path.display(), index + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

/// `{"prompt": "...", "max_tokens": N}` (or `output_len`), or ShareGPT's
/// `{"conversations": [{"value": "..."}, ...]}` whose first turn is the prompt.
fn dataset_line(line: &str, default_output_len: usize) -> Result<PlannedPrompt> {
    let record: Value = serde_json::from_str(line).context("not a JSON object")?;
    let text = record["prompt"]
        .as_str()
        .or_else(|| record["conversations"][0]["value"].as_str())
        .context("no \"prompt\" string (or ShareGPT \"conversations\")")?;
    let output_len = match record
        .get("max_tokens")
        .or_else(|| record.get("output_len"))
    {
        Some(value) => value
            .as_u64()
            .filter(|&n| n > 0)
            .context("max_tokens/output_len must be a positive integer")?
            as usize,
        None => default_output_len,
    };
    Ok(PlannedPrompt {
        prompt: Prompt::Text(text.to_owned()),
        input_len: text.split_whitespace().count(),
        output_len,
    })
}
/// A small seeded generator (SplitMix64): the same seed gives the same
/// prompts and arrival times on every machine.
pub(super) struct SplitMix64(u64);

impl SplitMix64 {
    pub(super) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` for `n > 0` (the modulo bias is below 2^-40 for the sizes used here).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_lengths_stay_in_the_range_and_prompts_follow_the_seed() {
        let spec = RandomDataset {
            input_len: 100,
            output_len: 10,
            range_ratio: 0.5,
            prompt_form: RandomPromptForm::Words,
        };
        let prompts = random_prompts(&spec, 50, 1);
        assert!(prompts.iter().all(|p| (50..=150).contains(&p.input_len)));
        assert!(prompts.iter().all(|p| (5..=15).contains(&p.output_len)));
        let Prompt::Text(text) = &prompts[0].prompt else {
            panic!("words make text")
        };
        assert_eq!(text.split(' ').count(), prompts[0].input_len);
        assert_eq!(prompts, random_prompts(&spec, 50, 1));
        assert_ne!(prompts, random_prompts(&spec, 50, 2));
        let ids = RandomDataset {
            prompt_form: RandomPromptForm::TokenIds { vocab_size: 5 },
            range_ratio: 0.0,
            ..spec
        };
        for prompt in random_prompts(&ids, 20, 0) {
            let Prompt::TokenIds(ids) = prompt.prompt else {
                panic!("ids")
            };
            assert_eq!(ids.len(), 100);
            assert!(ids.iter().all(|&id| (1..5).contains(&id)));
        }
    }

    #[test]
    fn poisson_gaps_average_one_over_the_rate() {
        let mut arrivals = PoissonArrivals::new(50.0, 0);
        let mean = (0..20_000)
            .map(|_| arrivals.next_gap().as_secs_f64())
            .sum::<f64>()
            / 20_000.0;
        assert!((mean - 0.02).abs() < 0.001, "mean gap {mean}");
        assert_eq!(
            PoissonArrivals::new(f64::INFINITY, 0).next_gap(),
            Duration::ZERO
        );
    }

    #[test]
    fn dataset_lines_take_a_prompt_or_a_sharegpt_conversation() {
        let plain = dataset_line(r#"{"prompt": "a b c", "max_tokens": 7}"#, 64).unwrap();
        assert_eq!(plain.prompt, Prompt::Text("a b c".into()));
        assert_eq!((plain.input_len, plain.output_len), (3, 7));
        let share = dataset_line(
            r#"{"conversations": [{"from": "human", "value": "hi there"}, {"value": "x"}]}"#,
            64,
        )
        .unwrap();
        assert_eq!(share.prompt, Prompt::Text("hi there".into()));
        assert_eq!(share.output_len, 64);
        assert!(dataset_line(r#"{"prompt": "a", "max_tokens": 0}"#, 64).is_err());
        assert!(dataset_line(r#"{"text": "a"}"#, 64).is_err());
    }
}
