//! One typed settings object per model, built once when the model loads: the
//! process environment (`KILN_DEVICE`, `KILN_DTYPE`, `KILN_OFFLOAD`,
//! `KILN_INPUT_*`, `KILN_LORA_*`) overridden by the model's own config keys
//! (`[[models]] config` in kiln.toml), byte sizes read by one parser (`"1GiB"`
//! or a count) wherever they come from, and a bad value an error at load that
//! names the key, never silently ignored. Requests read these, not the
//! environment.

use std::path::PathBuf;

use candle_core::{DType, Device};
use kiln_engine::units::parse_bytes;
use serde_json::Value;

use crate::lora::sources::{self, LoraSettings};
use crate::text_to_image::image_io::InputSources;

/// Everything a pipeline reads from its environment, resolved for one model.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub device: Device,
    pub dtype: DType,
    /// FLUX model CPU offload (`offload = "model"`).
    pub offload: bool,
    /// Quantize the denoiser's linear layers while loading (`quantize =
    /// "int8"`, `"q8_0"`, `"q4_k"`; `KILN_QUANTIZE`).
    pub quantize: Option<kiln_engine::quant::QuantKind>,
    /// Also quantize the text encoder's (T5's) linear layers.
    pub quantize_text_encoder: bool,
    /// Where input images may come from.
    pub input: InputSources,
    /// Where LoRAs may come from, and their caches.
    pub lora: LoraSettings,
}

/// One setting's source: the model's config key, else the environment variable.
struct Lookup<'a> {
    config: &'a Value,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Lookup<'_> {
    /// The text of `key` (a string, number or list joined by `,`), else `var`.
    fn text(&self, key: &str, var: &str) -> Option<(String, String)> {
        match self.config.get(key) {
            Some(Value::String(s)) => Some((s.clone(), format!("config `{key}`"))),
            Some(Value::Number(n)) => Some((n.to_string(), format!("config `{key}`"))),
            Some(Value::Array(items)) => Some((
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
                    .join(","),
                format!("config `{key}`"),
            )),
            _ => (self.env)(var).map(|v| (v, var.to_string())),
        }
    }

    fn bytes(&self, key: &str, var: &str, default: u64) -> Result<u64, String> {
        match self.text(key, var) {
            Some((text, from)) => parse_bytes(&text).map_err(|e| format!("{from}: {e}")),
            None => Ok(default),
        }
    }

    fn list(&self, key: &str, var: &str, default: &[String]) -> Vec<String> {
        match self.text(key, var) {
            Some((text, _)) => text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            None => default.to_vec(),
        }
    }

    /// Folders: a list, or one string split at `:` (as `PATH` is).
    fn dirs(&self, key: &str, var: &str) -> Vec<PathBuf> {
        let text = match self.config.get(key) {
            Some(Value::Array(items)) => {
                return items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(PathBuf::from)
                    .collect();
            }
            Some(Value::String(s)) => Some(s.clone()),
            _ => (self.env)(var),
        };
        text.map(|t| {
            t.split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
    }
}

/// The compute dtype and denoiser quantization an image model loads with for
/// `dtype` on `device`: on a CPU, bf16 is f32 compute with the denoiser's
/// linear weights in bf16 (unless `quantize` names another quantization),
/// multiplied by the AVX512-BF16 kernel where the CPU has it.
pub fn image_precision(
    device: &Device,
    dtype: DType,
    quantize: Option<kiln_engine::quant::QuantKind>,
) -> (DType, Option<kiln_engine::quant::QuantKind>) {
    if device.is_cpu() && dtype == DType::BF16 {
        (
            DType::F32,
            quantize.or(Some(kiln_engine::quant::QuantKind::Bf16)),
        )
    } else {
        (dtype, quantize)
    }
}

impl ModelSettings {
    /// The settings of a model whose (manifest plus `[[models]] config`)
    /// config is `config`, over this process's environment.
    pub fn for_model(config: &Value) -> Result<Self, String> {
        Self::resolve(config, &|var| std::env::var(var).ok())
    }

    /// [`ModelSettings::for_model`] for an image pipeline, where `dtype = bf16`
    /// on a CPU means the denoiser's linear weights in bf16 through the
    /// AVX512-BF16 kernel (`quantize = "bf16"` unless another quantization is
    /// set) and f32 for everything else: candle's CPU bf16 ops widen to f32
    /// per call and run slower than f32. See docs/serving.md.
    pub fn for_image_model(config: &Value) -> Result<Self, String> {
        Self::for_model(config).map(Self::cpu_bf16_as_weights)
    }

    fn cpu_bf16_as_weights(mut self) -> Self {
        (self.dtype, self.quantize) = image_precision(&self.device, self.dtype, self.quantize);
        self
    }

    /// As [`ModelSettings::for_model`], with the environment given.
    pub fn resolve(config: &Value, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let get = Lookup { config, env };
        let device_name = get
            .text("device", "KILN_DEVICE")
            .map(|(v, _)| v)
            .unwrap_or_default();
        let device = kiln_engine::device::select_device(&device_name).map_err(|e| e.to_string())?;
        let dtype = match get.text("dtype", "KILN_DTYPE") {
            Some((name, from)) => {
                kiln_engine::device::parse_dtype(&name).map_err(|e| format!("{from}: {e}"))?
            }
            None => DType::F32,
        };
        let offload = match get.text("offload", "KILN_OFFLOAD") {
            None => false,
            Some((value, from)) => match value.as_str() {
                "none" | "" => false,
                "model" => true,
                other => {
                    return Err(format!(
                        "offload must be \"none\" or \"model\", got {other:?} ({from})"
                    ));
                }
            },
        };
        let quantize = match get.text("quantize", "KILN_QUANTIZE") {
            None => None,
            Some((value, from)) => {
                kiln_engine::quant::QuantKind::parse(&value).map_err(|e| format!("{from}: {e}"))?
            }
        };
        let quantize_text_encoder = match get.config.get("quantize_text_encoder") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(value)) => *value,
            Some(other) => {
                return Err(format!(
                    "config `quantize_text_encoder` must be true or false, got {other}"
                ));
            }
        };
        // The defaults live with each type; settings only override them.
        let mut input = InputSources {
            dirs: get.dirs("input_dirs", "KILN_INPUT_DIRS"),
            ..InputSources::default()
        };
        let policy = &mut input.policy;
        policy.allowed_hosts = get.list(
            "input_allowed_hosts",
            "KILN_INPUT_ALLOWED_HOSTS",
            &policy.allowed_hosts,
        );
        policy.private_hosts = get.list(
            "input_private_hosts",
            "KILN_INPUT_PRIVATE_HOSTS",
            &policy.private_hosts,
        );
        policy.max_bytes =
            get.bytes("input_max_bytes", "KILN_INPUT_MAX_BYTES", policy.max_bytes)?;

        let mut lora = LoraSettings {
            dirs: get.dirs("lora_dirs", sources::LORA_DIRS),
            ..LoraSettings::default()
        };
        lora.cache_dir = get
            .text("lora_cache_dir", "KILN_LORA_CACHE_DIR")
            .map(|(dir, _)| PathBuf::from(dir))
            .or_else(|| env("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kiln/loras")))
            .or_else(|| env("HOME").map(|d| PathBuf::from(d).join(".cache/kiln/loras")))
            .unwrap_or(lora.cache_dir);
        lora.disk_budget = get.bytes(
            "lora_disk_cache_bytes",
            "KILN_LORA_DISK_CACHE_BYTES",
            lora.disk_budget,
        )?;
        let policy = &mut lora.policy;
        policy.allowed_hosts = get.list(
            "lora_allowed_hosts",
            sources::ALLOWED_HOSTS,
            &policy.allowed_hosts,
        );
        policy.private_hosts = get.list(
            "lora_private_hosts",
            "KILN_LORA_PRIVATE_HOSTS",
            &policy.private_hosts,
        );
        policy.max_bytes = get.bytes("lora_max_bytes", "KILN_LORA_MAX_BYTES", policy.max_bytes)?;
        lora.policy = std::mem::take(&mut lora.policy)
            .with_token_from_env("civitai.com", &["CIVITAI_TOKEN", "CIVITAI_API_TOKEN"])
            .with_token_from_env("huggingface.co", &["HF_TOKEN"]);
        Ok(ModelSettings {
            device,
            dtype,
            offload,
            quantize,
            quantize_text_encoder,
            input,
            lora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |var| {
            pairs
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn bf16_on_a_cpu_is_bf16_denoiser_weights_over_f32() {
        let vars = env(&[("KILN_DTYPE", "bf16")]);
        let image = ModelSettings::resolve(&Value::Null, &vars)
            .unwrap()
            .cpu_bf16_as_weights();
        assert_eq!(image.dtype, DType::F32);
        assert_eq!(image.quantize, Some(kiln_engine::quant::QuantKind::Bf16));
        // An explicit quantization wins; the compute dtype is still f32.
        let int8 = ModelSettings::resolve(&json!({"quantize": "int8"}), &vars)
            .unwrap()
            .cpu_bf16_as_weights();
        assert_eq!(
            (int8.dtype, int8.quantize),
            (DType::F32, Some(kiln_engine::quant::QuantKind::Int8))
        );
        // Other models keep the dtype as given.
        let plain = ModelSettings::resolve(&Value::Null, &vars).unwrap();
        assert_eq!((plain.dtype, plain.quantize), (DType::BF16, None));
    }

    #[test]
    fn quantization_reads_config_then_environment_and_refuses_what_cannot_run() {
        let vars = env(&[("KILN_QUANTIZE", "q8_0")]);
        let from_env = ModelSettings::resolve(&Value::Null, &vars).unwrap();
        assert_eq!(from_env.quantize, Some(kiln_engine::quant::QuantKind::Q8_0));
        let config = json!({"quantize": "int8", "quantize_text_encoder": true});
        let from_config = ModelSettings::resolve(&config, &vars).unwrap();
        assert_eq!(
            (from_config.quantize, from_config.quantize_text_encoder),
            (Some(kiln_engine::quant::QuantKind::Int8), true)
        );
        let none = env(&[]);
        let err = ModelSettings::resolve(&json!({"quantize": "fp8"}), &none)
            .err()
            .unwrap();
        assert!(
            err.contains("config `quantize`") && err.contains("FP8"),
            "{err}"
        );
        let err = ModelSettings::resolve(&json!({"quantize": "int4"}), &none)
            .err()
            .unwrap();
        assert!(err.contains("int8, q8_0, q4_k"), "{err}");
        let both = ModelSettings::resolve(&json!({"quantize": "int8", "offload": "model"}), &none)
            .unwrap();
        assert!(both.offload && both.quantize == Some(kiln_engine::quant::QuantKind::Int8));
        let err = ModelSettings::resolve(&json!({"quantize_text_encoder": "yes"}), &none)
            .err()
            .unwrap();
        assert!(err.contains("quantize_text_encoder"), "{err}");
    }

    #[test]
    fn model_config_overrides_the_environment_and_sizes_parse_one_way() {
        let vars = env(&[
            ("KILN_LORA_MAX_BYTES", "1GiB"),
            ("KILN_INPUT_DIRS", "/srv/a:/srv/b"),
            ("KILN_LORA_ALLOWED_HOSTS", "example.com"),
        ]);
        let from_env = ModelSettings::resolve(&Value::Null, &vars).unwrap();
        assert_eq!(from_env.lora.policy.max_bytes, 1 << 30);
        assert_eq!(
            from_env.input.dirs,
            vec![PathBuf::from("/srv/a"), PathBuf::from("/srv/b")]
        );
        assert_eq!(from_env.lora.policy.allowed_hosts, vec!["example.com"]);
        assert!(!from_env.offload);

        let config = json!({"lora_max_bytes": "512MiB", "input_dirs": ["/data/in"],
                            "lora_allowed_hosts": ["a.org", "b.org"], "offload": "model",
                            "input_max_bytes": 1000});
        let per_model = ModelSettings::resolve(&config, &vars).unwrap();
        assert_eq!(per_model.lora.policy.max_bytes, 512 << 20);
        assert_eq!(per_model.input.dirs, vec![PathBuf::from("/data/in")]);
        assert_eq!(per_model.lora.policy.allowed_hosts, vec!["a.org", "b.org"]);
        assert_eq!(per_model.input.policy.max_bytes, 1000);
        assert!(per_model.offload);
    }

    #[test]
    fn a_bad_value_is_an_error_naming_where_it_came_from() {
        let vars = env(&[("KILN_LORA_MAX_BYTES", "lots")]);
        let err = ModelSettings::resolve(&Value::Null, &vars).unwrap_err();
        assert!(err.contains("KILN_LORA_MAX_BYTES"), "{err}");
        let err = ModelSettings::resolve(&json!({"offload": "gpu"}), &env(&[])).unwrap_err();
        assert!(err.contains("config `offload`"), "{err}");
    }
}
