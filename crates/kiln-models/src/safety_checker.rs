//! diffusers' `StableDiffusionSafetyChecker`: a CLIP ViT vision tower
//! (patch embedding, class token, pre/post LayerNorm, the CLIP encoder
//! without a mask), `visual_projection`, and cosine similarities to 17
//! concept and 3 special-care embeddings against their thresholds, with the
//! special-care adjustment and the 3-decimal rounding of the reference code.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use kiln_engine::conv::Conv2d;
use kiln_engine::nn::{LayerNorm, Linear};
use serde::Deserialize;

use crate::clip::{ClipLayer, LayerShape};

/// `vision_config` of the checker's `config.json` (transformers' CLIPVisionConfig).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "hidden")]
    pub hidden_size: usize,
    #[serde(default = "intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "heads")]
    pub num_attention_heads: usize,
    #[serde(default = "image_size")]
    pub image_size: usize,
    #[serde(default = "patch_size")]
    pub patch_size: usize,
    #[serde(default = "act")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

// transformers' CLIPVisionConfig defaults (ViT-B/32), used when a key is absent.
fn hidden() -> usize {
    768
}
fn intermediate() -> usize {
    3072
}
fn layers() -> usize {
    12
}
fn heads() -> usize {
    12
}
fn image_size() -> usize {
    224
}
fn patch_size() -> usize {
    32
}
fn act() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

/// The checker's `config.json` (a CLIPConfig).
#[derive(Debug, Clone, Deserialize)]
pub struct SafetyCheckerConfig {
    pub vision_config: ClipVisionConfig,
    #[serde(default = "projection")]
    pub projection_dim: usize,
}

fn projection() -> usize {
    768
}

/// The CLIP ViT image tower; returns the pooled (post-LayerNorm class token) output.
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
}

impl ClipVisionModel {
    pub fn load(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let h = c.hidden_size;
        let embeddings = vb.pp("embeddings");
        let positions = (c.image_size / c.patch_size).pow(2) + 1;
        let shape = LayerShape {
            hidden: h,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            quick_gelu: c.hidden_act == "quick_gelu",
        };
        Ok(ClipVisionModel {
            class_embedding: embeddings.get(h, "class_embedding")?,
            patch_embedding: Conv2d::from_parts(
                embeddings.get((h, 3, c.patch_size, c.patch_size), "patch_embedding.weight")?,
                None,
                c.patch_size,
                0,
            ),
            position_embedding: Embedding::new(
                embeddings.get((positions, h), "position_embedding.weight")?,
                h,
            ),
            pre_layrnorm: LayerNorm::load(&vb.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| ClipLayer::load_shape(vb.pp("encoder.layers").pp(i), &shape))
                .collect::<Result<_>>()?,
            post_layernorm: LayerNorm::load(&vb.pp("post_layernorm"), h, c.layer_norm_eps)?,
        })
    }

    /// Pooled output for `pixels` (B, 3, S, S), normalised as CLIP expects.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self.class_embedding.reshape((1, 1, ()))?.broadcast_as((
            b,
            1,
            self.class_embedding.dim(0)?,
        ))?;
        let tokens = Tensor::cat(&[&class, &patches], 1)?;
        let ids = Tensor::arange(0u32, tokens.dim(1)? as u32, tokens.device())?;
        let mut x = tokens.broadcast_add(&self.position_embedding.forward(&ids)?)?;
        x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        self.post_layernorm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// Per image: whether it was flagged, and its largest concept score.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyVerdict {
    pub nsfw: bool,
    pub special_care: bool,
    /// Concept scores (cosine − threshold + adjustment, rounded to 3 decimals).
    pub concept_scores: Vec<f64>,
}

pub struct SafetyChecker {
    vision: ClipVisionModel,
    visual_projection: Linear,
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    concept_thresholds: Vec<f32>,
    special_thresholds: Vec<f32>,
    pub config: SafetyCheckerConfig,
}

fn round3(x: f64) -> f64 {
    // numpy/Python round(): half to even at the third decimal.
    (x * 1000.0).round_ties_even() / 1000.0
}

/// Cosine similarity of each row of `a` with each row of `b`.
fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let unit = |t: &Tensor| -> Result<Tensor> {
        t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
    };
    unit(a)?.matmul(&unit(b)?.t()?)
}

impl SafetyChecker {
    pub fn load(vb: VarBuilder, config: SafetyCheckerConfig) -> Result<Self> {
        let h = config.vision_config.hidden_size;
        let p = config.projection_dim;
        let concepts = vb.get_unchecked("concept_embeds")?.dim(0)?;
        let special = vb.get_unchecked("special_care_embeds")?.dim(0)?;
        // Checkpoints saved before transformers 5.6 nest the tower once more.
        let tower = if vb.contains_tensor("vision_model.vision_model.embeddings.class_embedding") {
            "vision_model.vision_model"
        } else {
            "vision_model"
        };
        Ok(SafetyChecker {
            vision: ClipVisionModel::load(vb.pp(tower), &config.vision_config)?,
            visual_projection: Linear::load(&vb.pp("visual_projection"), h, p, false)?,
            concept_embeds: vb.get((concepts, p), "concept_embeds")?,
            special_care_embeds: vb.get((special, p), "special_care_embeds")?,
            concept_thresholds: vb.get(concepts, "concept_embeds_weights")?.to_vec1()?,
            special_thresholds: vb.get(special, "special_care_embeds_weights")?.to_vec1()?,
            config,
        })
    }

    /// The projected image embeddings of CLIP-normalised `pixels`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.vision.forward(pixels)?)
    }

    /// diffusers' verdict for each image.
    pub fn check(&self, pixels: &Tensor) -> Result<Vec<SafetyVerdict>> {
        let embeds = self.image_embeds(pixels)?;
        let special = cosine(&embeds, &self.special_care_embeds)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        let concepts = cosine(&embeds, &self.concept_embeds)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        Ok(special
            .iter()
            .zip(&concepts)
            .map(|(special, concepts)| {
                // A special-care hit raises every later score by 0.01, as in diffusers' loop.
                let mut adjustment = 0.0;
                let mut special_care = false;
                for (cos, threshold) in special.iter().zip(&self.special_thresholds) {
                    if round3(f64::from(cos - threshold) + adjustment) > 0.0 {
                        special_care = true;
                        adjustment = 0.01;
                    }
                }
                let concept_scores: Vec<f64> = concepts
                    .iter()
                    .zip(&self.concept_thresholds)
                    .map(|(cos, threshold)| round3(f64::from(cos - threshold) + adjustment))
                    .collect();
                SafetyVerdict {
                    nsfw: concept_scores.iter().any(|s| *s > 0.0),
                    special_care,
                    concept_scores,
                }
            })
            .collect())
    }
}
