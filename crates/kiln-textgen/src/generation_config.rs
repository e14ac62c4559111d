//! `generation_config.json` defaults, applied as transformers' `generate` does:
//! sampling only when `do_sample` is true, else greedy; EOS ids as a number or
//! a list.

use serde_json::Value;

use crate::sampling::SamplingParams;

/// A model's generation defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationDefaults {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

fn ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl GenerationDefaults {
    /// Read a `generation_config.json` document (unknown keys ignored).
    pub fn from_json(value: &Value) -> Self {
        let f = |key: &str| value.get(key).and_then(Value::as_f64).map(|v| v as f32);
        let u = |key: &str| value.get(key).and_then(Value::as_u64).map(|v| v as usize);
        GenerationDefaults {
            do_sample: value
                .get("do_sample")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: u("top_k"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: u("max_new_tokens"),
            eos_token_ids: ids(value.get("eos_token_id")),
            bos_token_id: ids(value.get("bos_token_id")).first().copied(),
        }
    }

    /// The parameters a request starts from before its own fields apply:
    /// transformers samples only with `do_sample`; its top_k default is 50.
    pub fn sampling(&self) -> SamplingParams {
        let base = SamplingParams::default();
        if !self.do_sample {
            return SamplingParams {
                temperature: 0.0,
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                ..base
            };
        }
        SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(50),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn llama3_instruct_defaults_sample_and_list_every_eos() {
        let d = GenerationDefaults::from_json(&json!({
            "do_sample": true, "temperature": 0.6, "top_p": 0.9,
            "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000
        }));
        assert_eq!(d.eos_token_ids, vec![128001, 128008, 128009]);
        let s = d.sampling();
        assert_eq!((s.temperature, s.top_p, s.top_k), (0.6, 0.9, 50));
        let greedy = GenerationDefaults::from_json(&json!({"eos_token_id": 2, "temperature": 0.7}));
        assert_eq!(greedy.eos_token_ids, vec![2]);
        assert!(greedy.sampling().is_greedy());
    }
}
