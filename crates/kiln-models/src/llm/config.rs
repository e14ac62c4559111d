//! An LLM's sizes and variants as transformers writes them in `config.json`
//! (4.x: `rope_theta`/`rope_scaling` top-level; 5.x: `rope_parameters`), for the
//! Llama, Qwen2, Qwen3 and Mistral families, or read from GGUF metadata.

use serde_json::{Map, Value};

/// The architectures Kiln runs, keyed by transformers' `architectures` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmFamily {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
}

/// `architectures[0]` / `model_type` → family.
const FAMILIES: &[(&str, &str, LlmFamily)] = &[
    ("LlamaForCausalLM", "llama", LlmFamily::Llama),
    ("Qwen2ForCausalLM", "qwen2", LlmFamily::Qwen2),
    ("Qwen3ForCausalLM", "qwen3", LlmFamily::Qwen3),
    ("MistralForCausalLM", "mistral", LlmFamily::Mistral),
];

impl LlmFamily {
    /// transformers' `model_type` (also GGUF's `general.architecture`).
    pub fn model_type(self) -> &'static str {
        FAMILIES
            .iter()
            .find(|(_, _, f)| *f == self)
            .map(|(_, t, _)| *t)
            .unwrap_or("llama")
    }

    pub fn from_model_type(name: &str) -> Option<Self> {
        FAMILIES.iter().find(|(_, t, _)| *t == name).map(|f| f.2)
    }

    pub fn from_architecture(name: &str) -> Option<Self> {
        FAMILIES.iter().find(|(a, _, _)| *a == name).map(|f| f.2)
    }

    /// Every architecture name this build runs.
    pub fn known_architectures() -> Vec<&'static str> {
        FAMILIES.iter().map(|f| f.0).collect()
    }
}

/// How RoPE's inverse frequencies are rescaled for longer contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (inverse frequencies too).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's wavelength-banded rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors as GGUF's `rope_freqs.weight` stores them.
    Factors(Vec<f32>),
}

/// Everything the model code needs to know about one LLM.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    pub family: LlmFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The context length the model was trained for.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Each layer's attention window (`None`: full causal attention).
    pub sliding_windows: Vec<Option<usize>>,
}

/// A `config.json` Kiln cannot run, with the key and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config.json: {0}")]
pub struct LlmConfigError(pub String);

fn error(message: impl Into<String>) -> LlmConfigError {
    LlmConfigError(message.into())
}

fn usize_key(c: &Map<String, Value>, key: &str) -> Result<Option<usize>, LlmConfigError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| error(format!("`{key}` must be a non-negative integer, not {v}"))),
    }
}

fn required_usize(c: &Map<String, Value>, key: &str) -> Result<usize, LlmConfigError> {
    match usize_key(c, key)? {
        Some(0) => Err(error(format!("`{key}` must be at least 1"))),
        Some(v) => Ok(v),
        None => Err(error(format!("`{key}` is missing"))),
    }
}

fn f64_key(c: &Map<String, Value>, key: &str) -> Result<Option<f64>, LlmConfigError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| error(format!("`{key}` must be a number, not {v}"))),
    }
}

fn bool_key(c: &Map<String, Value>, key: &str) -> Result<Option<bool>, LlmConfigError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(error(format!("`{key}` must be true or false, not {v}"))),
    }
}

/// RoPE's parameters: transformers 5's `rope_parameters`, else 4.x's top-level
/// `rope_theta` plus `rope_scaling`.
fn rope_from(c: &Map<String, Value>) -> Result<(f64, RopeScaling), LlmConfigError> {
    let parameters = match c.get("rope_parameters") {
        Some(Value::Object(p)) => Some(p),
        None | Some(Value::Null) => None,
        Some(_) => return Err(error("`rope_parameters` must be an object")),
    };
    let theta = parameters
        .map(|p| f64_key(p, "rope_theta"))
        .transpose()?
        .flatten()
        .or(f64_key(c, "rope_theta")?)
        .unwrap_or(10_000.0);
    let scaling = match (parameters, c.get("rope_scaling")) {
        (Some(p), _) => Some(p),
        (None, Some(Value::Object(s))) => Some(s),
        (None, None | Some(Value::Null)) => None,
        (None, Some(_)) => return Err(error("`rope_scaling` must be an object")),
    };
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = |key: &str| -> Result<f64, LlmConfigError> {
        f64_key(s, key)?.ok_or_else(|| error(format!("rope scaling `{kind}` needs `{key}`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: factor("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor("factor")?,
            low_freq_factor: factor("low_freq_factor")?,
            high_freq_factor: factor("high_freq_factor")?,
            original_max_position_embeddings: factor("original_max_position_embeddings")?,
        },
        other => {
            return Err(error(format!(
                "rope scaling type {other:?} is not supported (supported: default, linear, llama3)"
            )));
        }
    };
    Ok((theta, scaling))
}

impl LlmConfig {
    /// Parse a transformers `config.json` document.
    pub fn from_json(config: &Value) -> Result<Self, LlmConfigError> {
        let c = config
            .as_object()
            .ok_or_else(|| error("must be a JSON object"))?;
        let architecture = c
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        let model_type = c.get("model_type").and_then(Value::as_str);
        let family = architecture
            .and_then(LlmFamily::from_architecture)
            .or_else(|| model_type.and_then(LlmFamily::from_model_type))
            .ok_or_else(|| {
                error(format!(
                    "architecture {:?} (model_type {:?}) is not one Kiln runs; supported: {}",
                    architecture.unwrap_or("?"),
                    model_type.unwrap_or("?"),
                    LlmFamily::known_architectures().join(", ")
                ))
            })?;
        let hidden_size = required_usize(c, "hidden_size")?;
        let num_heads = required_usize(c, "num_attention_heads")?;
        let num_kv_heads = usize_key(c, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(error(format!(
                "`num_attention_heads` {num_heads} must be a multiple of `num_key_value_heads` {num_kv_heads}"
            )));
        }
        let head_dim = match usize_key(c, "head_dim")? {
            Some(d) => d,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(error(format!(
                        "`hidden_size` {hidden_size} is not a multiple of `num_attention_heads` {num_heads} and no `head_dim` is given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(error(format!(
                "`head_dim` {head_dim} must be even for RoPE"
            )));
        }
        let num_layers = required_usize(c, "num_hidden_layers")?;
        let (rope_theta, rope_scaling) = rope_from(c)?;
        let sliding_windows = sliding_windows(c, family, num_layers)?;
        Ok(LlmConfig {
            family,
            vocab_size: required_usize(c, "vocab_size")?,
            hidden_size,
            intermediate_size: required_usize(c, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64_key(c, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_key(c, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: bool_key(c, "tie_word_embeddings")?.unwrap_or(false),
            attention_bias: bool_key(c, "attention_bias")?.unwrap_or(family == LlmFamily::Qwen2),
            qk_norm: family == LlmFamily::Qwen3,
            sliding_windows,
        })
    }

    /// Query heads that share one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Which layers attend within a window, as transformers decides it: Mistral
/// everywhere when `sliding_window` is set; Qwen2/3 only with
/// `use_sliding_window`, from layer `max_window_layers` on; an explicit
/// `layer_types` list wins.
fn sliding_windows(
    c: &Map<String, Value>,
    family: LlmFamily,
    layers: usize,
) -> Result<Vec<Option<usize>>, LlmConfigError> {
    let window = usize_key(c, "sliding_window")?;
    if let Some(Value::Array(types)) = c.get("layer_types") {
        if types.len() != layers {
            return Err(error(format!(
                "`layer_types` lists {} layers but `num_hidden_layers` is {layers}",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                    error("`layer_types` has sliding layers but no `sliding_window`")
                }),
                _ => Err(error(format!("`layer_types` entry {t} is not supported"))),
            })
            .collect();
    }
    Ok(match family {
        LlmFamily::Mistral => vec![window; layers],
        LlmFamily::Qwen2 | LlmFamily::Qwen3 => {
            if bool_key(c, "use_sliding_window")?.unwrap_or(false) {
                let from = usize_key(c, "max_window_layers")?.unwrap_or(layers);
                (0..layers)
                    .map(|i| if i >= from { window } else { None })
                    .collect()
            } else {
                vec![None; layers]
            }
        }
        LlmFamily::Llama => vec![None; layers],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        })
    }

    #[test]
    fn transformers_4_and_5_rope_layouts_read_the_same() {
        let v4 = LlmConfig::from_json(&llama()).unwrap();
        let mut five = llama();
        let o = five.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_scaling");
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}),
        );
        let v5 = LlmConfig::from_json(&five).unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v4.rope_theta, 500000.0);
        assert_eq!(v4.head_dim, 16);
        assert_eq!(v4.kv_groups(), 2);
    }

    #[test]
    fn unsupported_values_name_the_key() {
        let mut c = llama();
        c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = LlmConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
        let mut c = llama();
        c["num_key_value_heads"] = json!(3);
        let e = LlmConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut c = llama();
        c["architectures"] = json!(["GPT2LMHeadModel"]);
        c["model_type"] = json!("gpt2");
        let e = LlmConfig::from_json(&c).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
        let mut c = llama();
        c.as_object_mut().unwrap().remove("hidden_size");
        let e = LlmConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }

    #[test]
    fn sliding_windows_follow_transformers() {
        let mut c = llama();
        c["architectures"] = json!(["MistralForCausalLM"]);
        c["sliding_window"] = json!(8);
        assert_eq!(
            LlmConfig::from_json(&c).unwrap().sliding_windows,
            vec![Some(8), Some(8)]
        );
        c["architectures"] = json!(["Qwen2ForCausalLM"]);
        assert_eq!(
            LlmConfig::from_json(&c).unwrap().sliding_windows,
            vec![None, None]
        );
        c["use_sliding_window"] = json!(true);
        c["max_window_layers"] = json!(1);
        assert_eq!(
            LlmConfig::from_json(&c).unwrap().sliding_windows,
            vec![None, Some(8)]
        );
    }
}
