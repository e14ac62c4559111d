//! The `text_to_image/sdxl` pipeline: the request schema (sampler by Cog's or
//! diffusers' name, CFG and its rescale, size conditioning, clip_skip), model
//! defaults and presets from the manifest, validation with size suggestions,
//! and the result (images as base64 with their seed, sampler and timings).

use std::sync::{Arc, RwLock};

use candle_core::DType;
use kiln_registry::{Manifest, ResolvedModel};
use serde_json::{Map, Value, json};

use super::components::SdxlComponents;
use super::generate::{SdxlRequest, generate};
use crate::contract::{ModelInterface, Pipeline, PredictRequest, Prediction, ProgressFn};
use crate::error::{FieldProblem, PipelineError, ProblemKind};
use crate::schema::{FieldKind, FieldSpec, InputSchema};
use crate::text_to_image::front::{ImageFront, multiple_problem};
use crate::text_to_image::image_io::images_json;
use crate::text_to_image::image_io::{
    OutputFormat, image_tensor, mask_tensor, read_image, to_rgb_images,
};
use crate::text_to_image::schedulers::SamplerKind;
use crate::text_to_image::{predict_fields, random_seed};

/// The manifest `pipeline` value for SDXL models.
pub const PIPELINE_KIND: &str = "text_to_image/sdxl";

/// Largest image, in pixels, unless the manifest says otherwise (about 2 MP).
pub const DEFAULT_MAX_PIXELS: usize = 2048 * 1024;

/// Per-model defaults (manifest `config`; diffusers' SDXL defaults otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct SdxlDefaults {
    /// Width and height when not given (the UNet's sample size × 8).
    pub size: usize,
    pub steps: i64,
    pub guidance_scale: f64,
    pub scheduler: String,
}

impl SdxlDefaults {
    fn from_config(config: &Value, size: usize) -> Self {
        SdxlDefaults {
            size: config["default_size"].as_u64().map_or(size, |v| v as usize),
            steps: config["num_inference_steps"].as_i64().unwrap_or(50),
            guidance_scale: config["guidance_scale"].as_f64().unwrap_or(5.0),
            scheduler: config["scheduler"]
                .as_str()
                .unwrap_or("K_EULER")
                .to_string(),
        }
    }
}

/// The request schema for one SDXL model.
pub fn input_schema(defaults: &SdxlDefaults, presets: &[String]) -> InputSchema {
    let size = |name: &str| {
        FieldSpec::new(
            name,
            "Pixels, a multiple of 8",
            FieldKind::integer(8, 4096),
            Some(json!(defaults.size)),
        )
    };
    let optional_int = |name: &str, about: &str| {
        FieldSpec::new(name, about, FieldKind::integer(0, 16384), Some(Value::Null))
    };
    let mut fields = vec![
        FieldSpec::new("prompt", "What to draw", FieldKind::text(10_000), None),
        FieldSpec::new(
            "negative_prompt",
            "What to avoid; absent means zero conditioning (SDXL's default), \"\" encodes the empty prompt",
            FieldKind::text(10_000),
            Some(Value::Null),
        ),
        size("width"),
        size("height"),
        FieldSpec::new(
            "num_inference_steps",
            "Denoising steps",
            FieldKind::integer(1, 500),
            Some(json!(defaults.steps)),
        ),
        FieldSpec::new(
            "guidance_scale",
            "Classifier-free guidance; 1 or less turns it off",
            FieldKind::number(0.0, 50.0),
            Some(json!(defaults.guidance_scale)),
        ),
        FieldSpec::new(
            "guidance_rescale",
            "Rescale guided noise towards the text prediction's spread (0 = off)",
            FieldKind::number(0.0, 1.0),
            Some(json!(0.0)),
        ),
        FieldSpec::new(
            "scheduler",
            "Sampler, by Cog's name or diffusers' class name",
            FieldKind::choice(&SamplerKind::names()),
            Some(json!(defaults.scheduler)),
        ),
        FieldSpec::new(
            "seed",
            "Random seed; random when absent, always reported",
            FieldKind::integer(0, (1i64 << 53) - 1),
            Some(Value::Null),
        ),
        FieldSpec::new(
            "num_outputs",
            "Images to generate",
            FieldKind::integer(1, 4),
            Some(json!(1)),
        ),
        FieldSpec::new(
            "clip_skip",
            "Text-encoder layers to skip from the end",
            FieldKind::integer(0, 10),
            Some(json!(0)),
        ),
        optional_int(
            "original_width",
            "Size conditioning: the original width (default: width)",
        ),
        optional_int(
            "original_height",
            "Size conditioning: the original height (default: height)",
        ),
        optional_int(
            "target_width",
            "Size conditioning: the target width (default: width)",
        ),
        optional_int(
            "target_height",
            "Size conditioning: the target height (default: height)",
        ),
        FieldSpec::new(
            "crop_top",
            "Size conditioning: crop top",
            FieldKind::integer(0, 16384),
            Some(json!(0)),
        ),
        FieldSpec::new(
            "crop_left",
            "Size conditioning: crop left",
            FieldKind::integer(0, 16384),
            Some(json!(0)),
        ),
        FieldSpec::new(
            "image",
            "Init image for image-to-image or inpainting: base64, data URL or an allowed file path; sets the size unless width/height are given",
            FieldKind::String {
                min_length: Some(1),
                max_length: None,
            },
            Some(Value::Null),
        ),
        FieldSpec::new(
            "mask",
            "Inpainting mask, the image's size: white is repainted, black kept",
            FieldKind::String {
                min_length: Some(1),
                max_length: None,
            },
            Some(Value::Null),
        ),
        FieldSpec::new(
            "strength",
            "How far an init image is noised: 1 ignores it (default 0.8)",
            FieldKind::number(0.0, 1.0),
            Some(Value::Null),
        ),
        FieldSpec::new(
            "prompt_strength",
            "Cog's name for strength",
            FieldKind::number(0.0, 1.0),
            Some(Value::Null),
        ),
        FieldSpec::new(
            "vae_tiling",
            "Decode in 512-pixel tiles, one image at a time, to bound memory on large images",
            FieldKind::Boolean,
            Some(json!(false)),
        ),
        FieldSpec::new(
            "disable_safety_checker",
            "Skip the model's safety checker (when it has one)",
            FieldKind::Boolean,
            Some(json!(false)),
        ),
        FieldSpec::new(
            "output_format",
            "Image encoding",
            FieldKind::choice(&["png", "jpeg", "webp"]),
            Some(json!("png")),
        ),
        FieldSpec::new(
            "output_quality",
            "JPEG quality",
            FieldKind::integer(1, 100),
            Some(json!(90)),
        ),
    ];
    fields.extend(crate::lora::request::schema_fields());
    if !presets.is_empty() {
        let names: Vec<&str> = presets.iter().map(String::as_str).collect();
        fields.push(FieldSpec::new(
            "preset",
            "Named parameter set from the model; explicit fields win",
            FieldKind::choice(&names),
            Some(Value::Null),
        ));
    }
    InputSchema { fields }
}

/// diffusers' default size: the UNet's `sample_size` times the VAE's scale
/// factor (both from their configs; SDXL's 128 × 8 when a file has none).
fn default_image_size(dir: &std::path::Path) -> usize {
    let config = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| kiln_engine::json::parse_lenient(&text).ok())
    };
    let scale = config("vae/config.json")
        .and_then(|c| c["block_out_channels"].as_array().map(Vec::len))
        .map_or(8, |levels| 1usize << levels.saturating_sub(1));
    config("unet/config.json")
        .and_then(|c| c["sample_size"].as_u64())
        .map_or(1024, |s| s as usize * scale)
}

/// A manifest for an SDXL folder being registered: defaults and a `fast` preset.
pub fn manifest_for_folder(dir: &std::path::Path) -> Result<Manifest, String> {
    let size = default_image_size(dir);
    let mut manifest = Manifest::new(PIPELINE_KIND);
    manifest.description = "Stable Diffusion XL text-to-image".into();
    manifest.config = json!({"max_pixels": DEFAULT_MAX_PIXELS, "default_size": size});
    manifest.presets.insert(
        "fast".into(),
        json!({"num_inference_steps": 20, "scheduler": "DPMSolverMultistep"}),
    );
    let defaults = SdxlDefaults::from_config(&manifest.config, size);
    manifest.signature = input_schema(&defaults, &["fast".to_string()]).json_schema("Input");
    Ok(manifest)
}

/// A loaded SDXL model.
pub struct SdxlPipeline {
    components: RwLock<SdxlComponents>,
    /// The layers LoRAs may target, by name.
    lora_targets: crate::lora::LoraTargets,
    dtype: DType,
    /// Interface, presets, limits and sources, as every image family has them.
    front: ImageFront,
    /// Sizes must be multiples of this: 8 (diffusers' rule) or the VAE's scale
    /// factor when that is larger.
    size_multiple: usize,
}

/// Load a `text_to_image/sdxl` model from its folder (`KILN_DEVICE`, `KILN_DTYPE`).
pub fn load(model: &ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError> {
    let load_error = |message: String| PipelineError::Load {
        model: model.display_name(),
        message,
    };
    let settings = crate::settings::ModelSettings::for_image_model(&model.manifest.config)
        .map_err(load_error)?;
    let components = SdxlComponents::load_quantized(
        &model.dir,
        &settings.device,
        settings.dtype,
        crate::text_to_image::loading::Quantization::from_settings(&settings),
    )
    .map_err(load_error)?;
    let mut pipeline = SdxlPipeline::new(
        components,
        &model.manifest,
        default_image_size(&model.dir),
        model.display_name(),
    );
    pipeline.set_settings(&settings);
    pipeline.front.check_default_preset().map_err(load_error)?;
    Ok(Arc::new(pipeline))
}

impl SdxlPipeline {
    pub fn new(
        mut components: SdxlComponents,
        manifest: &Manifest,
        default_size: usize,
        model_name: String,
    ) -> Self {
        let defaults = SdxlDefaults::from_config(&manifest.config, default_size);
        let size_multiple = components.vae_scale_factor().max(8);
        SdxlPipeline {
            size_multiple,
            lora_targets: components.lora_targets(),
            dtype: components.dtype,
            components: RwLock::new(components),
            front: ImageFront::new(
                PIPELINE_KIND,
                manifest,
                DEFAULT_MAX_PIXELS,
                model_name,
                |presets| input_schema(&defaults, presets),
            ),
        }
    }

    /// Apply the preset (explicit fields win), validate, and build the request.
    pub fn prepare(
        &self,
        input: &Map<String, Value>,
    ) -> Result<(SdxlRequest, OutputFormat, u8), PipelineError> {
        let merged = self.front.with_preset(input);
        let values = self.front.schema().validate(&merged)?;
        let int = |k: &str| values.get(k).and_then(Value::as_i64);
        let num = |k: &str| values.get(k).and_then(Value::as_f64);
        let text = |k: &str| values.get(k).and_then(Value::as_str).map(str::to_string);
        let mut problems = Vec::new();
        let sources = &self.front.input_sources;
        // Headers only: every cheap check runs before any pixel is decoded.
        let mut read = |key: &str| match text(key) {
            Some(value) => match read_image(key, &value, sources, self.front.max_pixels as u64) {
                Ok(image) => Some(image),
                Err(PipelineError::InvalidInput(mut found)) => {
                    problems.append(&mut found);
                    None
                }
                Err(_) => None,
            },
            None => None,
        };
        let init = read("image");
        let mask = read("mask");
        // An init image sets the size unless the request gives one.
        let explicit = |key: &str| input.get(key).is_some_and(|v| !v.is_null());
        let image_size = init
            .as_ref()
            .map(|i| (i64::from(i.width), i64::from(i.height)));
        let mut size = |key: &str| -> usize {
            let from_image = match (key, image_size) {
                ("width", Some((w, _))) if !explicit(key) => Some(w),
                ("height", Some((_, h))) if !explicit(key) => Some(h),
                _ => None,
            };
            let multiple = self.size_multiple as i64;
            let value = from_image.or_else(|| int(key)).unwrap_or(multiple);
            problems.extend(multiple_problem(key, value, multiple));
            value as usize
        };
        let (width, height) = (size("width"), size("height"));
        problems.extend(self.front.pixel_limit_problem(width, height));
        match (&init, &mask) {
            (None, Some(_)) => problems.push(FieldProblem::new(
                "mask",
                ProblemKind::Constraint,
                "inpainting needs the image to repaint: give image with mask",
            )),
            (Some(image), Some(mask))
                if (image.width, image.height) != (mask.width, mask.height) =>
            {
                problems.push(FieldProblem::new(
                    "mask",
                    ProblemKind::Constraint,
                    format!(
                        "is {}x{}, the image is {}x{}; they must be the same size",
                        mask.width, mask.height, image.width, image.height
                    ),
                ))
            }
            _ => {}
        }
        let sampler = match SamplerKind::parse(&text("scheduler").unwrap_or_default()) {
            Ok(kind) => Some(kind),
            Err(message) => {
                problems.push(FieldProblem::new(
                    "scheduler",
                    ProblemKind::Constraint,
                    message,
                ));
                None
            }
        };
        if !problems.is_empty() {
            return Err(PipelineError::InvalidInput(problems));
        }
        let or = |key: &str, fallback: usize| int(key).map_or(fallback, |v| v as usize);
        let init_image = init
            .as_ref()
            .map(|image| image_tensor(&image.decode()?, width, height))
            .transpose()?;
        let mask = match mask {
            Some(mask) => {
                let resized = image::imageops::resize(
                    &mask.decode()?,
                    width as u32,
                    height as u32,
                    image::imageops::FilterType::Nearest,
                );
                Some(mask_tensor(&resized)?)
            }
            None => None,
        };
        let request = SdxlRequest {
            prompt: text("prompt").unwrap_or_default(),
            negative_prompt: text("negative_prompt"),
            width,
            height,
            steps: int("num_inference_steps").unwrap_or(50) as usize,
            guidance_scale: num("guidance_scale").unwrap_or(5.0),
            guidance_rescale: num("guidance_rescale").unwrap_or(0.0),
            sampler: sampler.unwrap_or(SamplerKind::Euler),
            seed: int("seed").map(|s| s as u64).unwrap_or_else(random_seed),
            num_outputs: int("num_outputs").unwrap_or(1) as usize,
            clip_skip: int("clip_skip").unwrap_or(0) as usize,
            original_size: (or("original_height", height), or("original_width", width)),
            crop_top_left: (or("crop_top", 0), or("crop_left", 0)),
            target_size: (or("target_height", height), or("target_width", width)),
            init_image,
            mask,
            strength: num("prompt_strength")
                .or_else(|| num("strength"))
                .unwrap_or(0.8),
            vae_tile: (values.get("vae_tiling").and_then(Value::as_bool) == Some(true))
                .then_some(512),
            adapters: None,
        };
        let format = OutputFormat::parse(&text("output_format").unwrap_or_default())
            .unwrap_or(OutputFormat::Png);
        let quality = int("output_quality").unwrap_or(90) as u8;
        Ok((request, format, quality))
    }

    /// Use `settings` for LoRA sources instead of the environment's.
    pub fn set_lora_settings(&mut self, settings: crate::lora::sources::LoraSettings) {
        self.front.lora_settings = settings;
    }

    /// Where inputs and LoRAs may come from, as the model's settings say.
    pub fn set_settings(&mut self, settings: &crate::settings::ModelSettings) {
        self.front.set_settings(settings);
    }

    /// Generate with a per-step callback (progress; return false to cancel).
    pub fn run(
        &self,
        input: &Map<String, Value>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Value, PipelineError> {
        let (mut request, format, quality) = self.prepare(input)?;
        let loras =
            crate::lora::request::resolve(input, &self.front.lora_settings, &|file, scale| {
                crate::lora::adapters(&[(file, scale)], &self.lora_targets, None, self.dtype)
            })?;
        request.adapters = loras.as_ref().map(|l| Arc::clone(&l.adapters));
        // Generation only reads the weights (LoRAs apply at run time, per
        // thread): requests run side by side, up to the model's concurrency.
        let components = self
            .components
            .read()
            .map_err(|_| PipelineError::Execution("the model is unusable after a panic".into()))?;
        let generated = generate(&components, &request, on_step)?;
        let mut images = to_rgb_images(&generated.images)?;
        let started = std::time::Instant::now();
        let check = input.get("disable_safety_checker").and_then(Value::as_bool) != Some(true);
        let mut filtered = 0;
        if let (Some(safety), true) = (&components.safety, check) {
            let verdicts = safety.check(&images)?;
            let before = images.len();
            images = images
                .into_iter()
                .zip(&verdicts)
                .filter(|(_, verdict)| !verdict.nsfw)
                .map(|(image, _)| image)
                .collect();
            filtered = before - images.len();
            if images.is_empty() {
                return Err(PipelineError::invalid(
                    "prompt",
                    ProblemKind::Constraint,
                    "the safety checker flagged every generated image (NSFW content detected); try again with another prompt or seed",
                ));
            }
        }
        let safety_s = started.elapsed().as_secs_f64();
        drop(components);
        let started = std::time::Instant::now();
        let encoded = images_json(&images, format, quality)?;
        let mut output = self.front.result(
            encoded,
            request.seed,
            (request.width, request.height),
            &generated.timings,
            &[
                ("safety_s", safety_s),
                ("encode_s", started.elapsed().as_secs_f64()),
            ],
        );
        output["scheduler"] = input.get("scheduler").cloned().unwrap_or(json!(null));
        output["nsfw_filtered"] = json!(filtered);
        if let Some(loras) = loras {
            output["loras"] = loras.report;
        }
        Ok(output)
    }
}

impl Pipeline for SdxlPipeline {
    fn interface(&self) -> &ModelInterface {
        self.front.interface()
    }

    fn resident_bytes(&self) -> Option<u64> {
        self.components
            .read()
            .ok()
            .map(|components| components.resident_bytes)
    }

    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        predict_fields(request, "SDXL", None, |input, on_step| {
            self.run(input, on_step)
        })
    }

    fn predict_with_progress(
        &self,
        request: PredictRequest,
        progress: ProgressFn,
    ) -> Result<Prediction, PipelineError> {
        predict_fields(request, "SDXL", Some(progress), |input, on_step| {
            self.run(input, on_step)
        })
    }
}
