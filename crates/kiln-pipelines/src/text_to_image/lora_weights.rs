//! A model's weights shared between concurrent requests, with LoRAs applied
//! one of two ways: at run time (per request and per thread, base weights
//! untouched, requests with different LoRAs side by side) or fused (merged
//! into the weights and kept while requests keep asking for the same set;
//! any other request first restores the exact originals). Used by the flow
//! pipelines (FLUX.1, FLUX.2); a family supplies how to visit its layers.

use std::sync::{Arc, RwLock};

use kiln_engine::lora::AdapterSet;
use kiln_engine::nn::Linear;
use serde_json::{Map, Value};

use crate::error::{PipelineError, ProblemKind};
use crate::lora::request::ResolvedLoras;

/// How a request's LoRAs reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    /// Applied inside each linear layer for this request only.
    Runtime,
    /// Merged into the weights (faster while the same set repeats).
    Fused,
}

impl LoraMode {
    pub fn parse(text: &str) -> Option<LoraMode> {
        match text {
            "runtime" => Some(LoraMode::Runtime),
            "fused" => Some(LoraMode::Fused),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LoraMode::Runtime => "runtime",
            LoraMode::Fused => "fused",
        }
    }

    /// The request's `lora_mode`, else `default`; an unknown value names the field.
    pub fn for_request(
        input: &Map<String, Value>,
        default: LoraMode,
    ) -> Result<LoraMode, PipelineError> {
        match input.get("lora_mode").and_then(Value::as_str) {
            Some(text) => LoraMode::parse(text).ok_or_else(|| {
                PipelineError::invalid(
                    "lora_mode",
                    ProblemKind::Constraint,
                    format!("must be \"runtime\" or \"fused\", got {text:?}"),
                )
            }),
            None => Ok(default),
        }
    }

    /// The manifest config's `lora_mode`, else runtime.
    pub fn for_model(config: &Value) -> LoraMode {
        config["lora_mode"]
            .as_str()
            .and_then(LoraMode::parse)
            .unwrap_or(LoraMode::Runtime)
    }
}

/// Visits every LoRA-targeted layer of some weights.
pub type LayerVisitor<'a> = &'a mut dyn FnMut(&mut Linear) -> candle_core::Result<()>;

/// What fusing needs from a family's weights.
pub trait LoraLayers {
    /// Call `f` on every layer LoRAs may target; `None` when the weights
    /// cannot be rewritten in place (model CPU offload).
    fn visit_lora_layers(&mut self, f: LayerVisitor) -> Option<candle_core::Result<()>>;
}

struct Loaded<W> {
    weights: W,
    /// The key of the fused set (see [`ResolvedLoras::key`]), if any.
    fused: Option<String>,
}

/// A model's weights behind a read-write lock, with the fused LoRA set tracked.
pub struct SharedWeights<W> {
    loaded: RwLock<Loaded<W>>,
    /// The quantization of the denoiser's weights (fused LoRAs need dense ones).
    quantized: Option<&'static str>,
}

fn poisoned<E>(_: E) -> PipelineError {
    PipelineError::Execution("the model is unusable after a panic".into())
}

impl<W: LoraLayers> SharedWeights<W> {
    pub fn new(weights: W) -> Self {
        SharedWeights {
            loaded: RwLock::new(Loaded {
                weights,
                fused: None,
            }),
            quantized: None,
        }
    }

    /// Note that the weights are quantized (`int8`, ...): fused LoRAs are
    /// then refused with a message, runtime ones apply as usual.
    pub fn set_quantized(&mut self, kind: Option<&'static str>) {
        self.quantized = kind;
    }

    /// Run `generate` on the weights with `loras` applied as `mode` says:
    /// runtime adapters are handed to `generate` (it activates them for its
    /// thread); fused ones are merged first, under the write lock.
    pub fn run<T>(
        &self,
        mode: LoraMode,
        loras: Option<&ResolvedLoras>,
        mut generate: impl FnMut(&W, Option<Arc<AdapterSet>>) -> Result<T, PipelineError>,
    ) -> Result<T, PipelineError> {
        if let (LoraMode::Fused, Some(_), Some(kind)) = (mode, loras, self.quantized) {
            return Err(PipelineError::invalid(
                "lora_mode",
                ProblemKind::Constraint,
                format!(
                    "\"fused\" merges LoRAs into dense weights, and this model's are quantized ({kind}); use \"runtime\""
                ),
            ));
        }
        match (mode, loras) {
            // Fusing rewrites the shared weights: one such request at a time.
            (LoraMode::Fused, Some(loras)) => {
                let mut loaded = self.loaded.write().map_err(poisoned)?;
                Self::fuse(&mut loaded, Some((&loras.key, &loras.adapters)))?;
                generate(&loaded.weights, None)
            }
            // Runtime LoRAs (and none) only read the weights.
            _ => {
                let adapters = loras.map(|l| Arc::clone(&l.adapters));
                loop {
                    let loaded = self.loaded.read().map_err(poisoned)?;
                    if loaded.fused.is_none() {
                        break generate(&loaded.weights, adapters);
                    }
                    drop(loaded);
                    // A fused LoRA is left in the weights: take it out first.
                    let mut loaded = self.loaded.write().map_err(poisoned)?;
                    Self::fuse(&mut loaded, None)?;
                }
            }
        }
    }

    /// Make the fused weights hold exactly `wanted` (a set's key and adapters;
    /// `None` for the base model): restore the originals if another set is
    /// fused, then merge `wanted` unless it is already there.
    fn fuse(
        loaded: &mut Loaded<W>,
        wanted: Option<(&str, &AdapterSet)>,
    ) -> Result<(), PipelineError> {
        if loaded.fused.as_deref() == wanted.map(|(key, _)| key) {
            return Ok(());
        }
        let failed = |e: candle_core::Error| PipelineError::Execution(format!("fusing LoRAs: {e}"));
        let offloaded = || {
            PipelineError::invalid(
                "lora_mode",
                ProblemKind::Constraint,
                "\"fused\" needs resident weights, and this model runs with model CPU offload (offload = \"model\"); use \"runtime\"",
            )
        };
        let weights = &mut loaded.weights;
        if loaded.fused.take().is_some() {
            weights
                .visit_lora_layers(&mut |linear| {
                    linear.unmerge();
                    Ok(())
                })
                .ok_or_else(offloaded)?
                .map_err(failed)?;
        }
        if let Some((key, adapters)) = wanted {
            let started = std::time::Instant::now();
            let merged = weights
                .visit_lora_layers(&mut |linear| adapters.merge_into(linear).map(|_| ()))
                .ok_or_else(offloaded)?;
            if let Err(e) = merged {
                // Leave no half-fused weights behind.
                let _ = weights.visit_lora_layers(&mut |linear| {
                    linear.unmerge();
                    Ok(())
                });
                return Err(failed(e));
            }
            tracing::info!(
                layers = adapters.layer_count(),
                seconds = started.elapsed().as_secs_f64(),
                "LoRAs fused"
            );
            loaded.fused = Some(key.to_string());
        }
        Ok(())
    }
}
