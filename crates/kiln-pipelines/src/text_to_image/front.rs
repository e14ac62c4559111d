//! What every text-to-image pipeline shares around its own model: the
//! interface (an object of fields in, `images` out), presets merged under the
//! request's explicit fields, the pixel limit, where input images and LoRAs
//! may come from, and the result's common part (model, images, seed, size,
//! per-stage timings). A model family adds its schema fields, its components
//! and its denoising loop.

use kiln_registry::Manifest;
use serde_json::{Map, Value, json};

use crate::contract::{InputSpec, ModelInterface};
use crate::error::{FieldProblem, ProblemKind};
use crate::frame::{ColumnSpec, ColumnType, Signature};
use crate::lora::sources::LoraSettings;
use crate::schema::InputSchema;
use crate::settings::ModelSettings;
use crate::text_to_image::generation::Timings;
use crate::text_to_image::image_io::InputSources;

/// The family-independent half of a text-to-image pipeline.
pub struct ImageFront {
    interface: ModelInterface,
    schema: InputSchema,
    presets: Map<String, Value>,
    /// The preset applied when a request names none (the manifest config's
    /// `default_preset`).
    default_preset: Option<String>,
    /// Largest image, in pixels (the manifest's `max_pixels`).
    pub max_pixels: usize,
    /// The name results report.
    pub model_name: String,
    /// Where LoRA sources may come from.
    pub lora_settings: LoraSettings,
    /// Where input images may come from.
    pub input_sources: InputSources,
}

impl ImageFront {
    /// The front of a `kind` pipeline: `schema` gets the manifest's preset
    /// names (for its `preset` field); `max_pixels` from the manifest's config,
    /// else `default_max_pixels`. Sources start closed until
    /// [`ImageFront::set_settings`].
    pub fn new(
        kind: &str,
        manifest: &Manifest,
        default_max_pixels: usize,
        model_name: String,
        schema: impl FnOnce(&[String]) -> InputSchema,
    ) -> Self {
        let presets: Map<String, Value> = manifest.presets.clone().into_iter().collect();
        let preset_names: Vec<String> = presets.keys().cloned().collect();
        let schema = schema(&preset_names);
        ImageFront {
            interface: ModelInterface {
                pipeline: kind.into(),
                inputs: InputSpec::Fields(schema.clone()),
                params: InputSchema::default(),
                outputs: Signature {
                    inputs: vec![ColumnSpec {
                        name: "images".into(),
                        column_type: ColumnType::String,
                        required: true,
                    }],
                    outputs: vec![],
                },
            },
            schema,
            default_preset: manifest.config["default_preset"]
                .as_str()
                .map(str::to_string),
            presets,
            max_pixels: manifest.config["max_pixels"]
                .as_u64()
                .map_or(default_max_pixels, |v| v as usize),
            model_name,
            lora_settings: LoraSettings::default(),
            input_sources: InputSources::default(),
        }
    }

    /// A `default_preset` the manifest names but does not define.
    pub fn check_default_preset(&self) -> Result<(), String> {
        match &self.default_preset {
            Some(name) if !self.presets.contains_key(name) => Err(format!(
                "default_preset {name:?} is not one of the model's presets ({})",
                self.presets.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            _ => Ok(()),
        }
    }

    pub fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    pub fn schema(&self) -> &InputSchema {
        &self.schema
    }

    /// The request's fields over its preset's (explicit fields win); a
    /// request without `preset` gets the model's default preset, if any.
    pub fn with_preset(&self, input: &Map<String, Value>) -> Map<String, Value> {
        let mut merged = Map::new();
        let name = match input.get("preset") {
            Some(Value::String(name)) => Some(name.as_str()),
            None | Some(Value::Null) => self.default_preset.as_deref(),
            Some(_) => None,
        };
        if let Some(name) = name
            && let Some(Value::Object(preset)) = self.presets.get(name)
        {
            merged.extend(preset.clone());
        }
        merged.extend(input.clone());
        merged
    }

    /// Where inputs and LoRAs may come from, as the model's settings say.
    pub fn set_settings(&mut self, settings: &ModelSettings) {
        self.lora_settings = settings.lora.clone();
        self.input_sources = settings.input.clone();
    }

    /// The result every family returns: `images` (encoded), the `seed`, the
    /// size and the stage timings, with `stages` (the family's own, e.g. the
    /// safety checker) added to the timings.
    pub fn result(
        &self,
        images: Vec<Value>,
        seed: u64,
        (width, height): (usize, usize),
        timings: &Timings,
        stages: &[(&str, f64)],
    ) -> Value {
        let mut times = json!({
            "text_encoding_s": timings.text_encoding_s,
            "denoising_s": timings.denoising_s,
            "vae_decode_s": timings.vae_s,
        });
        for (name, seconds) in stages {
            times[*name] = json!(seconds);
        }
        json!({
            "model": self.model_name,
            "images": images,
            "seed": seed,
            "width": width,
            "height": height,
            "timings": times,
        })
    }
}

/// The problem with a size field `key` that is not a multiple of `multiple`,
/// naming the nearest valid values.
pub fn multiple_problem(key: &str, value: i64, multiple: i64) -> Option<FieldProblem> {
    if value % multiple == 0 {
        return None;
    }
    let low = (value / multiple) * multiple;
    let nearest = if low >= multiple {
        format!("{low} or {}", low + multiple)
    } else {
        multiple.to_string()
    };
    Some(FieldProblem::new(
        key,
        ProblemKind::Constraint,
        format!("must be a multiple of {multiple}, got {value}; nearest valid: {nearest}"),
    ))
}

impl ImageFront {
    /// The problem with a `width`×`height` image above the pixel limit.
    pub fn pixel_limit_problem(&self, width: usize, height: usize) -> Option<FieldProblem> {
        (width * height > self.max_pixels).then(|| {
            FieldProblem::new(
                "width",
                ProblemKind::Constraint,
                format!(
                    "{width}x{height} is {} pixels; the limit is {}",
                    width * height,
                    self.max_pixels
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_off_the_grid_name_the_nearest_valid_values() {
        assert!(multiple_problem("width", 512, 16).is_none());
        let problem = multiple_problem("width", 500, 16).unwrap();
        assert_eq!(problem.field, "width");
        assert!(
            problem.message.contains("496 or 512"),
            "{}",
            problem.message
        );
        let small = multiple_problem("height", 7, 16).unwrap();
        assert!(
            small.message.ends_with("nearest valid: 16"),
            "{}",
            small.message
        );
    }
}
