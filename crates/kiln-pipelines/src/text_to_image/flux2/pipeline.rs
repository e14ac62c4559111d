//! The `text_to_image/flux2` pipeline: FLUX.2-klein's request schema (per
//! variant defaults: distilled 4 steps, base 50 with CFG 4; 1024² unless a
//! reference image or the manifest says otherwise), the RunPod FLUX.2
//! handler's presets with a manifest-named default preset, reference images
//! for editing, LoRAs (runtime or fused), validation that reports every
//! problem at once, and the common image result.

use std::sync::Arc;

use kiln_models::flux2::Flux2Config;
use kiln_registry::{Manifest, ResolvedModel};
use serde_json::{Map, Value, json};

use super::components::{Flux2Components, OffloadedFlux2};
use super::generate::{Flux2Request, generate};
use super::reference::{check_reference_size, reference_tensor};
use crate::contract::{ModelInterface, Pipeline, PredictRequest, Prediction, ProgressFn};
use crate::error::{FieldProblem, PipelineError, ProblemKind};
use crate::lora;
use crate::lora::request::ResolvedLoras;
use crate::schema::{FieldKind, FieldSpec, InputSchema};
use crate::settings::ModelSettings;
use crate::text_to_image::flux::{ASPECT_RATIOS, size_for_aspect_ratio};
use crate::text_to_image::front::{ImageFront, multiple_problem};
use crate::text_to_image::image_io::{OutputFormat, images_json, read_image, to_rgb_images};
use crate::text_to_image::loading::Quantization;
use crate::text_to_image::lora_weights::{LayerVisitor, LoraLayers, LoraMode, SharedWeights};
use crate::text_to_image::{predict_fields, random_seed};

/// The manifest `pipeline` value for FLUX.2 models.
pub const PIPELINE_KIND: &str = "text_to_image/flux2";

/// Largest image, in pixels, unless the manifest says otherwise (about 4 MP,
/// FLUX.2's documented range).
pub const DEFAULT_MAX_PIXELS: usize = 2048 * 2048;

/// Reference images one request may give.
pub const MAX_REFERENCE_IMAGES: usize = 4;

/// The RunPod FLUX.2 handler's preset (its default).
pub fn realistic_character() -> Value {
    json!({"num_inference_steps": 28, "guidance_scale": 2.5, "width": 1024, "height": 1024,
           "max_sequence_length": 512})
}

/// Per-variant defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flux2Defaults {
    pub steps: i64,
    pub guidance: f64,
    /// Width and height without a reference image or aspect ratio.
    pub size: i64,
}

impl Flux2Defaults {
    /// diffusers' defaults (guidance 4.0; 1024²), with 4 steps for
    /// step-distilled models and 50 for base ones, as their model cards run
    /// them; the manifest config's `default_steps`, `default_guidance` and
    /// `default_size` override.
    pub fn for_model(is_distilled: bool, config: &Value) -> Self {
        Flux2Defaults {
            steps: config["default_steps"]
                .as_i64()
                .unwrap_or(if is_distilled { 4 } else { 50 }),
            guidance: config["default_guidance"].as_f64().unwrap_or(4.0),
            size: config["default_size"].as_i64().unwrap_or(1024),
        }
    }
}

fn field(name: &str, description: &str, kind: FieldKind, default: Option<Value>) -> FieldSpec {
    FieldSpec::new(name, description, kind, default)
}

/// The request schema for one FLUX.2 model.
pub fn input_schema(defaults: Flux2Defaults, presets: &[String]) -> InputSchema {
    let text = |max: usize| FieldKind::String {
        min_length: Some(1),
        max_length: Some(max),
    };
    let choice = |c: &[&str]| FieldKind::Choice {
        choices: c.iter().map(|s| s.to_string()).collect(),
    };
    let mut fields = vec![
        field(
            "prompt",
            "What to draw",
            FieldKind::String {
                min_length: None,
                max_length: Some(10_000),
            },
            None,
        ),
        field(
            "width",
            "Width in pixels, a multiple of 16 (default: the reference image's, else aspect_ratio's, else the model's)",
            FieldKind::integer(16, 4096),
            Some(Value::Null),
        ),
        field(
            "height",
            "Height in pixels, a multiple of 16 (default as width)",
            FieldKind::integer(16, 4096),
            Some(Value::Null),
        ),
        field(
            "aspect_ratio",
            "Width:height at about one megapixel when width/height are not given",
            choice(&ASPECT_RATIOS),
            Some(Value::Null),
        ),
        field(
            "num_inference_steps",
            "Denoising steps",
            FieldKind::integer(1, 100),
            Some(json!(defaults.steps)),
        ),
        field(
            "guidance_scale",
            "Classifier-free guidance against the empty prompt (base models, when > 1; step-distilled models ignore it)",
            FieldKind::number(0.0, 20.0),
            Some(json!(defaults.guidance)),
        ),
        field(
            "seed",
            "Random seed; random when absent, always reported",
            FieldKind::integer(0, (1i64 << 53) - 1),
            Some(Value::Null),
        ),
        field(
            "num_outputs",
            "Images to generate",
            FieldKind::integer(1, 4),
            Some(json!(1)),
        ),
        field(
            "max_sequence_length",
            "Qwen3 prompt tokens (the prompt is padded to this length)",
            FieldKind::integer(1, 512),
            Some(json!(512)),
        ),
        field(
            "image",
            "A reference image to edit from: base64, data URL, allowed URL or file path (at least 64 pixels a side)",
            text(usize::MAX),
            Some(Value::Null),
        ),
        field(
            "images",
            "Several reference images, as image",
            FieldKind::List {
                max_items: Some(MAX_REFERENCE_IMAGES),
            },
            Some(Value::Null),
        ),
        field(
            "output_format",
            "Image encoding",
            choice(&["png", "jpeg", "webp"]),
            Some(json!("png")),
        ),
        field(
            "output_quality",
            "JPEG quality",
            FieldKind::integer(1, 100),
            Some(json!(90)),
        ),
        field(
            "vae_tiling",
            "Decode in 512-pixel tiles, one image at a time, to bound memory on large images",
            FieldKind::Boolean,
            Some(json!(false)),
        ),
    ];
    fields.extend(lora::request::schema_fields());
    fields.push(field(
        "lora_mode",
        "runtime: LoRAs apply inside each layer for this request only; fused: merged into the weights. Default: the model's lora_mode, else runtime",
        choice(&["runtime", "fused"]),
        Some(Value::Null),
    ));
    if !presets.is_empty() {
        let names: Vec<&str> = presets.iter().map(String::as_str).collect();
        fields.push(field(
            "preset",
            "Named parameter set from the model (the model's default_preset when absent); explicit fields win",
            choice(&names),
            Some(Value::Null),
        ));
    }
    InputSchema { fields }
}

/// A manifest for a FLUX.2 folder being registered: the pipeline kind, the
/// variant's defaults, the RunPod handler's `realistic_character` preset
/// (the default preset of base models, as the handler serves them) and a
/// `fast` one.
pub fn manifest_for_folder(dir: &std::path::Path) -> Result<Manifest, String> {
    let index_path = dir.join("model_index.json");
    let index = std::fs::read_to_string(&index_path)
        .map_err(|e| format!("{}: {e}", index_path.display()))
        .and_then(|text| {
            kiln_engine::json::parse_lenient(&text)
                .map_err(|e| format!("{}: {e}", index_path.display()))
        })?;
    let distilled = index["is_distilled"].as_bool().unwrap_or(false);
    let mut manifest = Manifest::new(PIPELINE_KIND);
    let variant = if distilled { "distilled" } else { "base" };
    manifest.description =
        format!("FLUX.2-klein ({variant}) text-to-image and reference-image editing");
    manifest.config = json!({"variant": variant, "max_pixels": DEFAULT_MAX_PIXELS});
    if !distilled {
        manifest.config["default_preset"] = json!("realistic_character");
    }
    manifest
        .presets
        .insert("realistic_character".into(), realistic_character());
    manifest.presets.insert(
        "fast".into(),
        json!({"num_inference_steps": if distilled { 2 } else { 20 }, "width": 512, "height": 512}),
    );
    let defaults = Flux2Defaults::for_model(distilled, &manifest.config);
    let names: Vec<String> = manifest.presets.keys().cloned().collect();
    manifest.signature = input_schema(defaults, &names).json_schema("Input");
    Ok(manifest)
}

/// Where the model's weights live between requests.
enum Weights {
    Resident(Box<Flux2Components>),
    Offloaded(Box<OffloadedFlux2>),
}

impl LoraLayers for Weights {
    fn visit_lora_layers(&mut self, f: LayerVisitor) -> Option<candle_core::Result<()>> {
        match self {
            Weights::Resident(components) => Some(components.transformer.for_each_linear(f)),
            Weights::Offloaded(_) => None,
        }
    }
}

/// A loaded FLUX.2 model.
pub struct Flux2Pipeline {
    weights: SharedWeights<Weights>,
    /// Bytes the resident weights hold (`None` with model CPU offload).
    resident_bytes: Option<u64>,
    default_lora_mode: LoraMode,
    config: Flux2Config,
    lora_targets: lora::LoraTargets,
    dtype: candle_core::DType,
    /// Sizes must be multiples of this (twice the VAE scale: 16).
    size_multiple: usize,
    defaults: Flux2Defaults,
    front: ImageFront,
}

/// Load a `text_to_image/flux2` model from its folder.
pub fn load(model: &ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError> {
    Ok(Arc::new(Flux2Pipeline::open(model)?))
}

impl Flux2Pipeline {
    /// Load a `text_to_image/flux2` model from its folder, as its manifest's
    /// config says (device, dtype, offload, sources, LoRA mode, presets).
    pub fn open(model: &ResolvedModel) -> Result<Self, PipelineError> {
        let load_error = |message: String| PipelineError::Load {
            model: model.display_name(),
            message,
        };
        let settings =
            ModelSettings::for_image_model(&model.manifest.config).map_err(load_error)?;
        let text_layers = match &model.manifest.config["text_encoder_out_layers"] {
            Value::Null => None,
            value => Some(
                serde_json::from_value::<Vec<usize>>(value.clone())
                    .map_err(|e| load_error(format!("config text_encoder_out_layers: {e}")))?,
            ),
        };
        let (device, dtype) = (&settings.device, settings.dtype);
        let quantization = Quantization::from_settings(&settings);
        let mut resident_bytes = None;
        let (weights, targets, facts) = if settings.offload {
            let (parts, targets) =
                OffloadedFlux2::open(&model.dir, text_layers, device, dtype, quantization)
                    .map_err(load_error)?;
            tracing::info!(model = %model.display_name(), "model CPU offload: parts load per stage");
            let facts = super::Flux2Parts::facts(&parts).clone();
            (Weights::Offloaded(Box::new(parts)), targets, facts)
        } else {
            let mut components = Flux2Components::load_quantized(
                &model.dir,
                text_layers,
                device,
                dtype,
                quantization,
            )
            .map_err(load_error)?;
            let targets = components.lora_targets();
            let facts = components.facts.clone();
            resident_bytes = Some(components.resident_bytes);
            (Weights::Resident(Box::new(components)), targets, facts)
        };
        let defaults = Flux2Defaults::for_model(facts.is_distilled, &model.manifest.config);
        let mut front = ImageFront::new(
            PIPELINE_KIND,
            &model.manifest,
            DEFAULT_MAX_PIXELS,
            model.display_name(),
            |presets| input_schema(defaults, presets),
        );
        front.check_default_preset().map_err(load_error)?;
        front.set_settings(&settings);
        let mut weights = SharedWeights::new(weights);
        weights.set_quantized(settings.quantize.map(|kind| kind.name()));
        Ok(Flux2Pipeline {
            weights,
            resident_bytes,
            default_lora_mode: LoraMode::for_model(&model.manifest.config),
            config: facts.config.clone(),
            lora_targets: targets,
            dtype,
            size_multiple: 2 * facts.vae_scale,
            defaults,
            front,
        })
    }

    /// Apply the preset (explicit fields win), validate, and build the request.
    pub fn prepare(
        &self,
        input: &Map<String, Value>,
    ) -> Result<(Flux2Request, OutputFormat, u8), PipelineError> {
        let merged = self.front.with_preset(input);
        let mut problems = Vec::new();
        let values = match self.front.schema().validate(&merged) {
            Ok(values) => values,
            Err(PipelineError::InvalidInput(found)) => {
                problems = found;
                merged.clone()
            }
            Err(other) => return Err(other),
        };
        let int = |k: &str| values.get(k).and_then(Value::as_i64);
        let text = |k: &str| values.get(k).and_then(Value::as_str).map(str::to_string);
        // Reference images: headers first, every cheap check before decoding.
        let mut sources: Vec<(String, String)> = Vec::new();
        if let Some(image) = text("image") {
            sources.push(("image".into(), image));
        }
        if let Some(Value::Array(items)) = values.get("images") {
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(image) => sources.push((format!("images[{i}]"), image.to_string())),
                    None => problems.push(FieldProblem::new(
                        format!("images[{i}]"),
                        ProblemKind::Type {
                            expected: "an image string (base64, data URL, URL or file path)".into(),
                            found: crate::schema::json_kind(item).into(),
                        },
                        "must be an image string",
                    )),
                }
            }
        }
        if sources.len() > MAX_REFERENCE_IMAGES {
            problems.push(FieldProblem::new(
                "images",
                ProblemKind::Constraint,
                format!("at most {MAX_REFERENCE_IMAGES} reference images in all"),
            ));
        }
        let mut references = Vec::new();
        if problems.is_empty() {
            for (field, source) in &sources {
                let read = read_image(
                    field,
                    source,
                    &self.front.input_sources,
                    self.front.max_pixels as u64,
                )
                .and_then(|image| {
                    check_reference_size(field, image.width, image.height).map(|_| image)
                });
                match read {
                    Ok(image) => references.push(image),
                    Err(PipelineError::InvalidInput(mut found)) => problems.append(&mut found),
                    Err(other) => return Err(other),
                }
            }
        }
        // Size: explicit, else the last reference image's, else the aspect
        // ratio's, else the model's default.
        let multiple = self.size_multiple;
        let from_reference = references
            .last()
            .map(|image| super::reference_size(image.width, image.height, multiple));
        let from_ratio = text("aspect_ratio").and_then(|r| size_for_aspect_ratio(&r));
        let default = self.defaults.size as usize;
        let (fallback_w, fallback_h) = from_reference.or(from_ratio).unwrap_or((default, default));
        let mut size = |key: &str, fallback: usize| match int(key) {
            Some(v) => {
                problems.extend(multiple_problem(key, v, multiple as i64));
                v as usize
            }
            None => fallback,
        };
        let width = size("width", fallback_w);
        let height = size("height", fallback_h);
        problems.extend(self.front.pixel_limit_problem(width, height));
        if !problems.is_empty() {
            return Err(PipelineError::InvalidInput(problems));
        }
        let reference_images = references
            .iter()
            .map(|image| reference_tensor(&image.decode()?, multiple))
            .collect::<Result<Vec<_>, _>>()?;
        let format = OutputFormat::parse(&text("output_format").unwrap_or_default())
            .unwrap_or(OutputFormat::Png);
        Ok((
            Flux2Request {
                prompt: text("prompt").unwrap_or_default(),
                width,
                height,
                steps: int("num_inference_steps").unwrap_or(self.defaults.steps) as usize,
                guidance_scale: values
                    .get("guidance_scale")
                    .and_then(Value::as_f64)
                    .unwrap_or(self.defaults.guidance),
                seed: int("seed").map(|s| s as u64).unwrap_or_else(random_seed),
                num_outputs: int("num_outputs").unwrap_or(1) as usize,
                max_sequence_length: int("max_sequence_length").unwrap_or(512) as usize,
                reference_images,
                vae_tile: (values.get("vae_tiling").and_then(Value::as_bool) == Some(true))
                    .then_some(512),
                adapters: None,
            },
            format,
            int("output_quality").unwrap_or(90) as u8,
        ))
    }

    fn resolve_loras(
        &self,
        input: &Map<String, Value>,
    ) -> Result<Option<ResolvedLoras>, PipelineError> {
        lora::request::resolve(input, &self.front.lora_settings, &|file, scale| {
            lora::flux2_adapters(
                &[(file, scale)],
                &self.lora_targets,
                &self.config,
                self.dtype,
            )
        })
    }

    /// Use `settings` for LoRA sources instead of the model's.
    pub fn set_lora_settings(&mut self, settings: lora::sources::LoraSettings) {
        self.front.lora_settings = settings;
    }

    /// Generate with a per-step callback (progress; return false to cancel).
    pub fn run(
        &self,
        input: &Map<String, Value>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Value, PipelineError> {
        let (request, format, quality) = self.prepare(input)?;
        let mode = LoraMode::for_request(input, self.default_lora_mode)?;
        let loras = self.resolve_loras(input)?;
        let generated = self
            .weights
            .run(mode, loras.as_ref(), |weights, adapters| {
                let request = Flux2Request {
                    adapters,
                    ..request.clone()
                };
                match weights {
                    Weights::Resident(components) => {
                        generate(components.as_ref(), &request, on_step)
                    }
                    Weights::Offloaded(parts) => generate(parts.as_ref(), &request, on_step),
                }
            })?;
        let started = std::time::Instant::now();
        let images = to_rgb_images(&generated.images)?;
        let encoded = images_json(&images, format, quality)?;
        let mut output = self.front.result(
            encoded,
            request.seed,
            (request.width, request.height),
            &generated.timings,
            &[("encode_s", started.elapsed().as_secs_f64())],
        );
        if let Some(loras) = loras {
            output["loras"] = loras.report;
            output["lora_mode"] = json!(mode.name());
        }
        Ok(output)
    }
}

impl Pipeline for Flux2Pipeline {
    fn interface(&self) -> &ModelInterface {
        self.front.interface()
    }

    fn resident_bytes(&self) -> Option<u64> {
        self.resident_bytes
    }

    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        predict_fields(request, "FLUX.2", None, |input, on_step| {
            self.run(input, on_step)
        })
    }

    fn predict_with_progress(
        &self,
        request: PredictRequest,
        progress: ProgressFn,
    ) -> Result<Prediction, PipelineError> {
        predict_fields(request, "FLUX.2", Some(progress), |input, on_step| {
            self.run(input, on_step)
        })
    }
}
