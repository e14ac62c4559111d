//! The `text_generation/llm` pipeline: a Llama/Qwen/Mistral model from a Hub
//! folder or a GGUF file behind Kiln's text-generation engine. Streaming
//! protocols (OpenAI chat and completions) take the engine itself through
//! [`Pipeline::text_generation`]; one-answer protocols (Cog, RunPod, KServe,
//! SageMaker, `kiln predict`) go through `predict`, which collects the stream.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_registry::{Manifest, ResolvedModel};
use kiln_textgen::{
    BatchConfig, BatchEngine, GenerationEvent, GenerationRequest, LanguageModel, ModelSource,
    SerialEngine, TextGenError, TextGeneration,
};
use serde_json::{Map, Value, json};

use crate::contract::{
    InputSpec, ModelInterface, Pipeline, PredictRequest, Prediction, ProgressFn,
};
use crate::error::{PipelineError, ProblemKind};
use crate::frame::{ColumnSpec, ColumnType, Signature};
use crate::schema::{FieldKind, FieldSpec, InputSchema};
use crate::text_to_image::predict_fields;

pub const PIPELINE_KIND: &str = "text_generation/llm";

/// Whether `path` (a folder, or a `.gguf` file) holds an LLM Kiln runs.
pub fn is_llm_source(path: &Path) -> bool {
    ModelSource::is_language_model(path)
}

/// A manifest for an LLM folder or GGUF file, after checking its config, weight
/// headers, tokenizer and template; a GGUF file's name is recorded in
/// `config.gguf` (the registry stores the file itself as the artifact).
pub fn manifest_for_source(path: &Path) -> Result<Manifest, String> {
    if let Some(source) = ModelSource::detect(path) {
        source.check().map_err(|e| e.to_string())?;
    }
    let mut manifest = Manifest::new(PIPELINE_KIND);
    manifest.description = "Text generation (Llama, Qwen, Mistral)".into();
    manifest.config = match ModelSource::detect(path) {
        Some(ModelSource::Gguf(file)) => {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| format!("{}: not a file name", file.display()))?;
            json!({"gguf": name})
        }
        Some(ModelSource::Folder(_)) => json!({}),
        None => {
            return Err(format!(
                "{}: not an LLM folder or GGUF file",
                path.display()
            ));
        }
    };
    manifest.signature = input_schema().json_schema("Input");
    Ok(manifest)
}

fn field(name: &str, description: &str, kind: FieldKind) -> FieldSpec {
    FieldSpec::new(name, description, kind, Some(Value::Null))
}

/// The fields one-answer protocols accept (OpenAI's names).
pub fn input_schema() -> InputSchema {
    InputSchema {
        fields: vec![
            field(
                "prompt",
                "Text to continue (or the user turn, with the chat template)",
                FieldKind::text(1 << 20),
            ),
            field(
                "system_prompt",
                "A system message, when the prompt is sent as a chat",
                FieldKind::text(1 << 20),
            ),
            field(
                "messages",
                "OpenAI-style chat messages instead of a prompt",
                FieldKind::List {
                    max_items: Some(1024),
                },
            ),
            field(
                "max_tokens",
                "Tokens to generate at most",
                FieldKind::Integer {
                    minimum: Some(1),
                    maximum: None,
                },
            ),
            field("temperature", "0 is greedy", FieldKind::number(0.0, 2.0)),
            field(
                "top_p",
                "Nucleus sampling mass",
                FieldKind::number(0.0, 1.0),
            ),
            field(
                "top_k",
                "Sample from the k most likely tokens (-1: all)",
                FieldKind::Integer {
                    minimum: Some(-1),
                    maximum: None,
                },
            ),
            field(
                "min_p",
                "Drop tokens below min_p × the top probability",
                FieldKind::number(0.0, 1.0),
            ),
            field(
                "repetition_penalty",
                "transformers' repetition penalty",
                FieldKind::Number {
                    minimum: Some(0.0),
                    maximum: None,
                },
            ),
            field(
                "presence_penalty",
                "OpenAI's presence penalty",
                FieldKind::number(-2.0, 2.0),
            ),
            field(
                "frequency_penalty",
                "OpenAI's frequency penalty",
                FieldKind::number(-2.0, 2.0),
            ),
            field(
                "seed",
                "Seed for reproducible sampling",
                FieldKind::Integer {
                    minimum: None,
                    maximum: None,
                },
            ),
            field(
                "stop",
                "Stop strings (not returned)",
                FieldKind::List {
                    max_items: Some(16),
                },
            ),
            FieldSpec::new(
                "ignore_eos",
                "Keep generating past end-of-sequence tokens",
                FieldKind::Boolean,
                Some(Value::Null),
            ),
            FieldSpec::new(
                "template",
                "Apply the chat template to prompt (true for models that have one)",
                FieldKind::Boolean,
                Some(Value::Null),
            ),
        ],
    }
}

/// A loaded LLM.
pub struct TextGenerationPipeline {
    engine: Arc<dyn TextGeneration>,
    interface: ModelInterface,
}

/// Where a resolved model's weights are: its folder, or the GGUF file named in
/// the manifest (kept inside the model's folder).
fn model_source(model: &ResolvedModel) -> Result<ModelSource, String> {
    match model.manifest.config.get("gguf").and_then(Value::as_str) {
        Some(name) => {
            let relative = Path::new(name);
            if relative.components().count() != 1
                || !matches!(
                    relative.components().next(),
                    Some(std::path::Component::Normal(_))
                )
            {
                return Err(format!(
                    "config.gguf {name:?} must be a file name inside the model folder"
                ));
            }
            Ok(ModelSource::Gguf(model.dir.join(relative)))
        }
        None => Ok(ModelSource::Folder(PathBuf::from(&model.dir))),
    }
}

/// The batching settings in a model's config (`max_batch_size`,
/// `max_num_batched_tokens`, `kv_cache_bytes`, `kv_cache_block_size`,
/// `prefix_caching`); the server sizes the model's slots from them.
pub fn batch_config(model: &ResolvedModel) -> Result<BatchConfig, String> {
    BatchConfig::from_json(&model.manifest.config).map_err(|e| format!("config.{e}"))
}

/// Load a `text_generation/llm` model (`KILN_DEVICE`, `KILN_DTYPE`): on the
/// CPU behind the continuous-batching engine, elsewhere one sequence at a time.
pub fn load(model: &ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError> {
    let load_error = |message: String| PipelineError::Load {
        model: model.display_name(),
        message,
    };
    let settings =
        crate::settings::ModelSettings::for_model(&model.manifest.config).map_err(load_error)?;
    let (device, dtype) = (settings.device, settings.dtype);
    let source = model_source(model).map_err(load_error)?;
    let batching = batch_config(model).map_err(load_error)?;
    let language_model =
        LanguageModel::load(&source, dtype, &device).map_err(|e| load_error(e.to_string()))?;
    let engine: Arc<dyn TextGeneration> = if device.is_cpu() {
        let weight_bytes = source.weight_bytes();
        Arc::new(
            BatchEngine::start(language_model, batching, weight_bytes)
                .map_err(|e| load_error(e.to_string()))?,
        )
    } else {
        Arc::new(SerialEngine::start(language_model).map_err(|e| load_error(e.to_string()))?)
    };
    Ok(Arc::new(TextGenerationPipeline::new(engine)))
}

impl TextGenerationPipeline {
    pub fn new(engine: Arc<dyn TextGeneration>) -> Self {
        TextGenerationPipeline {
            engine,
            interface: ModelInterface {
                pipeline: PIPELINE_KIND.into(),
                inputs: InputSpec::Fields(input_schema()),
                params: InputSchema::default(),
                outputs: Signature {
                    inputs: vec![ColumnSpec {
                        name: "text".into(),
                        column_type: ColumnType::String,
                        required: true,
                    }],
                    outputs: vec![],
                },
            },
        }
    }

    fn run(
        &self,
        input: &Map<String, Value>,
        on_token: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Value, PipelineError> {
        let request = generation_request(self.engine.model(), input)?;
        let total = request.max_tokens;
        let mut stream = self.engine.submit(request).map_err(pipeline_error)?;
        let mut text = String::new();
        let mut step = 0;
        while let Some(event) = stream.next_blocking() {
            match event {
                GenerationEvent::Token { text: piece, .. } => {
                    text.push_str(&piece);
                    step += 1;
                    if !on_token(step, total) {
                        return Err(PipelineError::Stopped);
                    }
                }
                GenerationEvent::Finished {
                    text: rest,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    details,
                } => {
                    text.push_str(&rest);
                    return Ok(json!({
                        "text": text,
                        "finish_reason": reason.as_str(),
                        "usage": details.usage_json(prompt_tokens, completion_tokens),
                        "timings": details.timings_json(prompt_tokens, completion_tokens),
                    }));
                }
                GenerationEvent::Failed(e) => return Err(pipeline_error(e)),
            }
        }
        Err(PipelineError::Execution(
            "the generation engine stopped".into(),
        ))
    }
}

/// A generation request from the one-answer fields (schema-checked first):
/// shared by `predict` and the CLI's streaming `kiln predict` / `kiln chat`.
pub fn generation_request(
    model: &LanguageModel,
    input: &Map<String, Value>,
) -> Result<GenerationRequest, PipelineError> {
    let mut fields = input_schema().validate(input)?;
    fields.retain(|_, v| !v.is_null());
    let prompt = prompt_ids(model, &fields).map_err(pipeline_error)?;
    model
        .build_request(prompt, &fields, false)
        .map_err(pipeline_error)
}

/// The prompt's ids: `messages` through the template; `prompt` through the
/// template as a user turn (with `system_prompt`) when the model has one and
/// `template` is not false; otherwise as plain text.
fn prompt_ids(
    model: &LanguageModel,
    fields: &Map<String, Value>,
) -> Result<Vec<u32>, TextGenError> {
    if let Some(messages) = fields.get("messages") {
        if fields.contains_key("prompt") {
            return Err(TextGenError::invalid(
                "prompt",
                "give either prompt or messages, not both",
            ));
        }
        let messages = kiln_textgen::prompt::normalise_messages(messages)?;
        return model.chat_prompt(&messages, true, &Map::new());
    }
    let prompt = fields
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or_else(|| TextGenError::invalid("prompt", "is required (or give messages)"))?;
    let templated = fields
        .get("template")
        .and_then(Value::as_bool)
        .unwrap_or(true)
        && model.template.is_some();
    if !templated {
        return model.text_prompt(prompt);
    }
    let mut messages = Vec::new();
    if let Some(system) = fields.get("system_prompt").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    model.chat_prompt(&messages, true, &Map::new())
}

/// A text-generation error as a pipeline error: the caller's mistakes become
/// validation problems naming the field.
pub fn pipeline_error(e: TextGenError) -> PipelineError {
    if e.is_client_error() {
        let field = e.field().unwrap_or("input").to_string();
        let message = match &e {
            TextGenError::Invalid { message, .. } => message.clone(),
            other => other.to_string(),
        };
        return PipelineError::invalid(field, ProblemKind::Constraint, message);
    }
    match e {
        TextGenError::Load(message) => PipelineError::Load {
            model: "llm".into(),
            message,
        },
        other => PipelineError::Execution(other.to_string()),
    }
}

impl Pipeline for TextGenerationPipeline {
    fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        predict_fields(request, "an LLM", None, |input, on_token| {
            self.run(input, on_token)
        })
    }

    fn predict_with_progress(
        &self,
        request: PredictRequest,
        progress: ProgressFn,
    ) -> Result<Prediction, PipelineError> {
        predict_fields(request, "an LLM", Some(progress), |input, on_token| {
            self.run(input, on_token)
        })
    }

    fn text_generation(&self) -> Option<Arc<dyn TextGeneration>> {
        Some(Arc::clone(&self.engine))
    }
}
