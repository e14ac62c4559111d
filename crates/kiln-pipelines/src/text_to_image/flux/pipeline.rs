//! The `text_to_image/flux` pipeline: the request schema (with per-variant
//! defaults, aspect ratios and manifest presets), validation with size suggestions,
//! and the prediction result (images as base64 with their seed and timings).

use std::sync::Arc;

use kiln_registry::{Manifest, ResolvedModel};
use serde_json::{Map, Value, json};

use super::components::{FluxComponents, OffloadedFlux};
use super::generate::{GenerationRequest, generate};
use crate::contract::ProgressFn;
use crate::contract::{ModelInterface, Pipeline, PredictRequest, Prediction};
use crate::error::PipelineError;
use crate::lora;
use crate::lora::request::ResolvedLoras;
use crate::schema::{FieldKind, FieldSpec, InputSchema};
use crate::settings::ModelSettings;
use crate::text_to_image::front::{ImageFront, multiple_problem};
use crate::text_to_image::image_io::images_json;
use crate::text_to_image::image_io::{OutputFormat, image_tensor, read_image, to_rgb_images};
use crate::text_to_image::loading::Quantization;
use crate::text_to_image::lora_weights::{LayerVisitor, LoraLayers, LoraMode, SharedWeights};
use crate::text_to_image::{predict_fields, random_seed};

/// The manifest `pipeline` value for FLUX models.
pub const PIPELINE_KIND: &str = "text_to_image/flux";

/// Aspect ratios accepted by `aspect_ratio` (width:height).
pub const ASPECT_RATIOS: [&str; 11] = [
    "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21",
];

/// Largest image, in pixels, unless the manifest says otherwise (about 2 MP).
pub const DEFAULT_MAX_PIXELS: usize = 2048 * 1024;

/// Width and height for an aspect ratio at about one megapixel, multiples of 16.
pub fn size_for_aspect_ratio(ratio: &str) -> Option<(usize, usize)> {
    size_for(ratio, 1.0)
}

/// The size of `ratio` at about `megapixels` (Replicate's FLUX `megapixels`:
/// 1 or 0.25), each side a multiple of 16.
pub fn size_for(ratio: &str, megapixels: f64) -> Option<(usize, usize)> {
    let (w, h) = ratio.split_once(':')?;
    let (w, h): (f64, f64) = (w.parse().ok()?, h.parse().ok()?);
    let scale = (megapixels * 1024.0 * 1024.0 / (w * h)).sqrt();
    let round16 = |x: f64| ((x / 16.0).round() as usize).max(1) * 16;
    Some((round16(w * scale), round16(h * scale)))
}

/// Per-variant defaults: dev (guidance-distilled) or schnell (timestep-distilled).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VariantDefaults {
    pub steps: i64,
    pub guidance: f64,
    pub max_sequence_length: i64,
}

impl VariantDefaults {
    pub fn for_guidance_model(has_guidance: bool) -> Self {
        if has_guidance {
            VariantDefaults {
                steps: 28,
                guidance: 3.5,
                max_sequence_length: 512,
            }
        } else {
            VariantDefaults {
                steps: 4,
                guidance: 0.0,
                max_sequence_length: 256,
            }
        }
    }
}

fn field(name: &str, description: &str, kind: FieldKind, default: Option<Value>) -> FieldSpec {
    FieldSpec {
        name: name.into(),
        description: description.into(),
        kind,
        default,
    }
}

/// The request schema for one FLUX model.
pub fn input_schema(defaults: VariantDefaults, presets: &[String]) -> InputSchema {
    let int = |min: i64, max: i64| FieldKind::Integer {
        minimum: Some(min),
        maximum: Some(max),
    };
    let num = |min: f64, max: f64| FieldKind::Number {
        minimum: Some(min),
        maximum: Some(max),
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
            "negative_prompt",
            "What to avoid (used when true_cfg_scale > 1)",
            FieldKind::String {
                min_length: None,
                max_length: Some(10_000),
            },
            Some(json!("")),
        ),
        field(
            "width",
            "Width in pixels, a multiple of 16 (default from aspect_ratio)",
            int(16, 4096),
            Some(Value::Null),
        ),
        field(
            "height",
            "Height in pixels, a multiple of 16 (default from aspect_ratio)",
            int(16, 4096),
            Some(Value::Null),
        ),
        field(
            "aspect_ratio",
            "Width:height at about one megapixel when width/height are not given",
            choice(&ASPECT_RATIOS),
            Some(json!("1:1")),
        ),
        field(
            "num_inference_steps",
            "Denoising steps",
            int(1, 100),
            Some(json!(defaults.steps)),
        ),
        field(
            "guidance_scale",
            "Distilled guidance (dev)",
            num(0.0, 20.0),
            Some(json!(defaults.guidance)),
        ),
        field(
            "true_cfg_scale",
            "Classifier-free guidance with negative_prompt when > 1",
            num(1.0, 20.0),
            Some(json!(1.0)),
        ),
        field(
            "seed",
            "Random seed; random when absent, always reported",
            int(0, (1i64 << 53) - 1),
            Some(Value::Null),
        ),
        field(
            "num_outputs",
            "Images to generate",
            int(1, 4),
            Some(json!(1)),
        ),
        field(
            "max_sequence_length",
            "T5 prompt tokens",
            int(1, 512),
            Some(json!(defaults.max_sequence_length)),
        ),
        field(
            "image",
            "Init image for image-to-image: base64, data URL or an allowed file path",
            FieldKind::String {
                min_length: Some(1),
                max_length: None,
            },
            Some(Value::Null),
        ),
        field(
            "strength",
            "Image-to-image strength: 1 ignores the init image",
            num(0.0, 1.0),
            Some(json!(0.6)),
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
            int(1, 100),
            Some(json!(90)),
        ),
        field(
            "vae_tiling",
            "Decode in 512-pixel tiles, one image at a time, to bound memory on large images",
            FieldKind::Boolean,
            Some(json!(false)),
        ),
        // Fields Replicate's FLUX models take, so their clients' inputs apply.
        field(
            "megapixels",
            "Approximate size of an aspect_ratio image in megapixels (Replicate's FLUX field)",
            choice(&["1", "0.25"]),
            Some(json!("1")),
        ),
        field(
            "go_fast",
            "Replicate's fp8 fast path; accepted for compatibility: Kiln runs the weights as loaded either way",
            FieldKind::Boolean,
            Some(json!(false)),
        ),
        field(
            "disable_safety_checker",
            "Accepted for compatibility: Kiln's FLUX pipelines run no safety checker",
            FieldKind::Boolean,
            Some(json!(false)),
        ),
    ];
    fields.extend(lora::request::schema_fields());
    fields.push(field(
        "lora_mode",
        "runtime: LoRAs apply inside each layer for this request only; fused: merged into the weights (faster while the same LoRAs repeat; other requests restore the exact originals first). Default: the model's lora_mode, else runtime",
        choice(&["runtime", "fused"]),
        Some(Value::Null),
    ));
    if !presets.is_empty() {
        let names: Vec<&str> = presets.iter().map(String::as_str).collect();
        fields.push(field(
            "preset",
            "Named parameter set from the model; explicit fields win",
            choice(&names),
            Some(Value::Null),
        ));
    }
    InputSchema { fields }
}

/// A manifest for a FLUX model folder being registered: the pipeline kind, the
/// variant's defaults and a `fast` preset, described from its transformer config.
pub fn manifest_for_folder(dir: &std::path::Path) -> Result<Manifest, String> {
    let config_path = dir.join("transformer/config.json");
    let has_guidance = match std::fs::read_to_string(&config_path) {
        Ok(text) => kiln_engine::json::parse_lenient(&text)
            .map_err(|e| format!("{}: {e}", config_path.display()))?["guidance_embeds"]
            .as_bool()
            .unwrap_or(false),
        Err(_) => true,
    };
    let defaults = VariantDefaults::for_guidance_model(has_guidance);
    let mut manifest = Manifest::new(PIPELINE_KIND);
    let variant = if has_guidance { "dev" } else { "schnell" };
    manifest.description = format!("FLUX.1 [{variant}] text-to-image and image-to-image");
    manifest.config = json!({"variant": variant, "max_pixels": DEFAULT_MAX_PIXELS});
    manifest.presets.insert(
        "fast".into(),
        json!({"num_inference_steps": (defaults.steps / 2).max(1), "width": 512, "height": 512}),
    );
    manifest.signature = input_schema(defaults, &["fast".to_string()]).json_schema("Input");
    Ok(manifest)
}

/// Where the model's weights live between requests.
enum Weights {
    /// Every part loaded on the device.
    Resident(Box<FluxComponents>),
    /// Model CPU offload: each part on the device for its stage only.
    Offloaded(Box<OffloadedFlux>),
}

impl LoraLayers for Weights {
    fn visit_lora_layers(&mut self, f: LayerVisitor) -> Option<candle_core::Result<()>> {
        match self {
            Weights::Resident(components) => Some(components.for_each_lora_linear(f)),
            Weights::Offloaded(_) => None,
        }
    }
}

/// A loaded FLUX model.
pub struct FluxPipeline {
    weights: SharedWeights<Weights>,
    /// How LoRAs apply unless a request says otherwise (`lora_mode` in the
    /// model's config: `runtime` or `fused`).
    default_lora_mode: LoraMode,
    /// The transformer's config and dtype, for building LoRA adapters without
    /// taking the components' lock.
    transformer_config: kiln_models::flux::FluxConfig,
    /// The linear layers LoRAs may target, by name.
    lora_targets: lora::LoraTargets,
    dtype: candle_core::DType,
    /// Bytes the resident weights hold (`None` with model CPU offload).
    resident_bytes: Option<u64>,
    /// Interface, presets, limits and sources, as every image family has them.
    front: ImageFront,
}

/// Load a `text_to_image/flux` model from its folder.
pub fn load(model: &ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError> {
    let load_error = |message: String| PipelineError::Load {
        model: model.display_name(),
        message,
    };
    let settings = ModelSettings::for_image_model(&model.manifest.config).map_err(load_error)?;
    let (device, dtype) = (&settings.device, settings.dtype);
    let mut pipeline = if settings.offload {
        let (parts, targets) = OffloadedFlux::open(
            &model.dir,
            device,
            dtype,
            Quantization::from_settings(&settings),
        )
        .map_err(load_error)?;
        tracing::info!(model = %model.display_name(), "model CPU offload: parts load per stage");
        FluxPipeline::offloaded(parts, targets, &model.manifest, model.display_name())
    } else {
        let components = FluxComponents::load_quantized(
            &model.dir,
            device,
            dtype,
            Quantization::from_settings(&settings),
        )
        .map_err(load_error)?;
        FluxPipeline::new(components, &model.manifest, model.display_name())
    };
    pipeline.set_settings(&settings);
    pipeline.front.check_default_preset().map_err(load_error)?;
    pipeline
        .weights
        .set_quantized(settings.quantize.map(|kind| kind.name()));
    Ok(Arc::new(pipeline))
}

impl FluxPipeline {
    /// A pipeline over resident components.
    pub fn new(mut components: FluxComponents, manifest: &Manifest, model_name: String) -> Self {
        let config = components.transformer.config().clone();
        let targets = components.lora_targets();
        let dtype = components.dtype;
        let resident_bytes = Some(components.resident_bytes);
        let mut pipeline = Self::with_weights(
            Weights::Resident(Box::new(components)),
            config,
            targets,
            dtype,
            manifest,
            model_name,
        );
        pipeline.resident_bytes = resident_bytes;
        pipeline
    }

    /// A pipeline with model CPU offload (see [`OffloadedFlux`]).
    pub fn offloaded(
        parts: OffloadedFlux,
        lora_targets: lora::LoraTargets,
        manifest: &Manifest,
        model_name: String,
    ) -> Self {
        let config = parts.config().clone();
        let dtype = parts.dtype();
        Self::with_weights(
            Weights::Offloaded(Box::new(parts)),
            config,
            lora_targets,
            dtype,
            manifest,
            model_name,
        )
    }

    fn with_weights(
        weights: Weights,
        transformer_config: kiln_models::flux::FluxConfig,
        lora_targets: lora::LoraTargets,
        dtype: candle_core::DType,
        manifest: &Manifest,
        model_name: String,
    ) -> Self {
        let defaults = VariantDefaults::for_guidance_model(transformer_config.guidance_embeds);
        FluxPipeline {
            transformer_config,
            lora_targets,
            dtype,
            resident_bytes: None,
            weights: SharedWeights::new(weights),
            default_lora_mode: LoraMode::for_model(&manifest.config),
            front: ImageFront::new(
                PIPELINE_KIND,
                manifest,
                DEFAULT_MAX_PIXELS,
                model_name,
                |presets| input_schema(defaults, presets),
            ),
        }
    }

    /// Apply the preset (explicit fields win), validate, and build the request.
    pub fn prepare(
        &self,
        input: &Map<String, Value>,
    ) -> Result<(GenerationRequest, OutputFormat, u8), PipelineError> {
        let merged = self.front.with_preset(input);
        // Schema problems and the size rules below are reported together.
        let mut problems = Vec::new();
        let values = match self.front.schema().validate(&merged) {
            Ok(values) => values,
            Err(PipelineError::InvalidInput(found)) => {
                problems = found;
                merged.clone()
            }
            Err(other) => return Err(other),
        };
        let get_i = |k: &str| values.get(k).and_then(Value::as_i64);
        let get_f = |k: &str| values.get(k).and_then(Value::as_f64);
        let get_s = |k: &str| values.get(k).and_then(Value::as_str).map(str::to_string);
        let ratio = get_s("aspect_ratio").unwrap_or_else(|| "1:1".into());
        let megapixels = get_s("megapixels")
            .and_then(|m| m.parse::<f64>().ok())
            .unwrap_or(1.0);
        let (ratio_w, ratio_h) = size_for(&ratio, megapixels).unwrap_or((1024, 1024));
        let mut size = |key: &str, fallback: usize| -> usize {
            match get_i(key) {
                Some(v) => match multiple_problem(key, v, 16) {
                    Some(problem) => {
                        problems.push(problem);
                        fallback
                    }
                    None => v as usize,
                },
                None => fallback,
            }
        };
        let width = size("width", ratio_w);
        let height = size("height", ratio_h);
        problems.extend(self.front.pixel_limit_problem(width, height));
        let init_image = match get_s("image").filter(|_| problems.is_empty()) {
            Some(text) => {
                match read_image(
                    "image",
                    &text,
                    &self.front.input_sources,
                    self.front.max_pixels as u64,
                ) {
                    Ok(image) => Some(image),
                    Err(PipelineError::InvalidInput(mut p)) => {
                        problems.append(&mut p);
                        None
                    }
                    Err(other) => return Err(other),
                }
            }
            None => None,
        };
        if !problems.is_empty() {
            return Err(PipelineError::InvalidInput(problems));
        }
        let strength = get_f("strength").unwrap_or(0.6);
        let init_image = init_image
            .map(|image| image_tensor(&image.decode()?, width, height).map(|t| (t, strength)))
            .transpose()?;
        let negative = get_s("negative_prompt").filter(|s| !s.is_empty());
        let seed = get_i("seed").map(|s| s as u64).unwrap_or_else(random_seed);
        let format = OutputFormat::parse(&get_s("output_format").unwrap_or_default())
            .unwrap_or(OutputFormat::Png);
        let quality = get_i("output_quality").unwrap_or(90) as u8;
        Ok((
            GenerationRequest {
                prompt: get_s("prompt").unwrap_or_default(),
                negative_prompt: negative,
                width,
                height,
                steps: get_i("num_inference_steps").unwrap_or(28) as usize,
                guidance_scale: get_f("guidance_scale").unwrap_or(3.5),
                true_cfg_scale: get_f("true_cfg_scale").unwrap_or(1.0),
                seed,
                num_outputs: get_i("num_outputs").unwrap_or(1) as usize,
                max_sequence_length: get_i("max_sequence_length").unwrap_or(512) as usize,
                init_image,
                vae_tile: (values.get("vae_tiling").and_then(Value::as_bool) == Some(true))
                    .then_some(512),
                adapters: None,
            },
            format,
            quality,
        ))
    }

    /// Resolve the request's LoRAs onto the transformer's and CLIP's layers.
    fn resolve_loras(
        &self,
        input: &Map<String, Value>,
    ) -> Result<Option<ResolvedLoras>, PipelineError> {
        lora::request::resolve(input, &self.front.lora_settings, &|file, scale| {
            lora::flux_adapters(
                &[(file, scale)],
                &self.lora_targets,
                &self.transformer_config,
                self.dtype,
            )
        })
    }

    /// Use `settings` for LoRA sources instead of the environment's.
    pub fn set_lora_settings(&mut self, settings: lora::sources::LoraSettings) {
        self.front.lora_settings = settings;
    }

    /// Where inputs and LoRAs may come from, as the model's settings say.
    pub fn set_settings(&mut self, settings: &ModelSettings) {
        self.front.set_settings(settings);
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
                let request = GenerationRequest {
                    adapters,
                    ..request.clone()
                };
                match weights {
                    Weights::Resident(components) => {
                        generate(&components.models(), &request, on_step)
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

impl Pipeline for FluxPipeline {
    fn interface(&self) -> &ModelInterface {
        self.front.interface()
    }

    fn resident_bytes(&self) -> Option<u64> {
        self.resident_bytes
    }

    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        predict_fields(request, "FLUX", None, |input, on_step| {
            self.run(input, on_step)
        })
    }

    fn predict_with_progress(
        &self,
        request: PredictRequest,
        progress: ProgressFn,
    ) -> Result<Prediction, PipelineError> {
        predict_fields(request, "FLUX", Some(progress), |input, on_step| {
            self.run(input, on_step)
        })
    }
}
