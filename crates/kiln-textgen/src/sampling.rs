//! Choosing the next token: repetition (transformers' rule), presence and
//! frequency penalties (OpenAI's), temperature, top-k, top-p and min-p, then a
//! draw from a seeded generator (or the argmax when greedy); log-probabilities
//! of the raw logits for `logprobs`.

use kiln_engine::TorchGenerator;

use crate::error::TextGenError;

/// How one request samples.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Drop tokens below `min_p` × the top probability (0: off).
    pub min_p: f32,
    /// transformers' repetition penalty over prompt and output tokens (1: off).
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty over output tokens (0: off).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty over output tokens (0: off).
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Every range rule at once, naming the field (OpenAI's ranges where OpenAI
    /// has the field, vLLM's otherwise).
    pub fn validate(&self) -> Result<(), TextGenError> {
        let rules: [(&str, bool, &str); 6] = [
            (
                "temperature",
                (0.0..=2.0).contains(&self.temperature),
                "must be between 0 and 2",
            ),
            (
                "top_p",
                self.top_p > 0.0 && self.top_p <= 1.0,
                "must be greater than 0 and at most 1",
            ),
            (
                "min_p",
                (0.0..=1.0).contains(&self.min_p),
                "must be between 0 and 1",
            ),
            (
                "repetition_penalty",
                self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
                "must be greater than 0",
            ),
            (
                "presence_penalty",
                (-2.0..=2.0).contains(&self.presence_penalty),
                "must be between -2 and 2",
            ),
            (
                "frequency_penalty",
                (-2.0..=2.0).contains(&self.frequency_penalty),
                "must be between -2 and 2",
            ),
        ];
        for (field, ok, rule) in rules {
            if !ok {
                return Err(TextGenError::invalid(field, rule));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// One request's sampler: the parameters and its random stream.
pub struct Sampler {
    params: SamplingParams,
    generator: TorchGenerator,
}

/// `log_softmax(logits)` in f64 accumulation.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

/// The `k` largest entries as (id, value), largest first (ties: lower id first).
pub fn top_entries(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut entries: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let k = k.min(entries.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < entries.len() {
        entries.select_nth_unstable_by(k - 1, order);
        entries.truncate(k);
    }
    entries.sort_by(order);
    entries
}

impl Sampler {
    /// A sampler seeded with `params.seed`, or from the clock when absent.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Sampler {
            params,
            generator: TorchGenerator::new(seed),
        }
    }

    /// Penalise `logits` in place for tokens seen before.
    fn penalise(&self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                *l = if *l < 0.0 {
                    *l * p.repetition_penalty
                } else {
                    *l / p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, f32>::new();
            for &t in output {
                *counts.entry(t).or_default() += 1.0;
            }
            for (t, count) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * count + p.presence_penalty;
                }
            }
        }
    }

    /// The next token for these raw `logits`, given the prompt and output so far.
    pub fn sample(&mut self, raw: &[f32], prompt: &[u32], output: &[u32]) -> u32 {
        let mut logits = raw.to_vec();
        self.penalise(&mut logits, prompt, output);
        let p = &self.params;
        if p.is_greedy() {
            return top_entries(&logits, 1).first().map(|e| e.0).unwrap_or(0);
        }
        let filtering = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        let mut candidates: Vec<(u32, f32)> = if filtering {
            let k = if p.top_k > 0 { p.top_k } else { logits.len() };
            top_entries(&logits, k)
        } else {
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect()
        };
        let temperature = p.temperature;
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut weights: Vec<f64> = candidates
            .iter()
            .map(|c| f64::from((c.1 - max) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        if p.top_p < 1.0 {
            // Sorted largest first: keep through the token that reaches top_p.
            let mut cumulative = 0.0;
            let mut keep = weights.len();
            for (i, w) in weights.iter().enumerate() {
                cumulative += w;
                if cumulative >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
            weights.truncate(keep);
        }
        if p.min_p > 0.0 {
            let top = weights.iter().copied().fold(0.0, f64::max);
            let floor = top * f64::from(p.min_p);
            let kept: Vec<usize> = (0..weights.len())
                .filter(|&i| weights[i] >= floor)
                .collect();
            candidates = kept.iter().map(|&i| candidates[i]).collect();
            weights = kept.iter().map(|&i| weights[i]).collect();
        }
        let total: f64 = weights.iter().sum();
        let draw = self.generator.uniform_f64() * total;
        let mut cumulative = 0.0;
        for (c, w) in candidates.iter().zip(&weights) {
            cumulative += w;
            if draw < cumulative {
                return c.0;
            }
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_seeds_reproduce() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        assert_eq!(Sampler::new(params(0.0)).sample(&logits, &[], &[]), 1);
        let draws = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..32)
                .map(|_| s.sample(&logits, &[], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
    }

    #[test]
    fn filters_leave_only_allowed_tokens() {
        let logits = [3.0f32, 2.9, 0.0, -5.0];
        let mut top_k = Sampler::new(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        let mut top_p = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        let mut min_p = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        });
        for _ in 0..200 {
            assert!(top_k.sample(&logits, &[], &[]) < 2);
            assert_eq!(top_p.sample(&logits, &[], &[]), 0);
            assert!(min_p.sample(&logits, &[], &[]) < 2);
        }
    }

    #[test]
    fn penalties_follow_transformers_and_openai() {
        let s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..params(1.0)
        });
        let mut logits = vec![4.0f32, -4.0, 1.0];
        s.penalise(&mut logits, &[0], &[1, 1]);
        // token 0: prompt only → /2; token 1: negative → ×2, then 2×0.25 + 0.5.
        assert_eq!(logits, vec![2.0, -9.0, 1.0]);
    }

    #[test]
    fn log_softmax_is_normalised_and_ranges_are_checked() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let bad = SamplingParams {
            temperature: 3.0,
            ..SamplingParams::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), Some("temperature"));
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), Some("top_p"));
    }
}
