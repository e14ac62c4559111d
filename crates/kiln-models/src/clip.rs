//! The CLIP text encoder (transformers' `CLIPTextModel`): causal self-attention
//! layers over token + position embeddings, final LayerNorm, pooled output at the
//! first end-of-text token. Loads checkpoints with or without the `text_model.`
//! prefix (transformers 4.x wrote it, 5.x does not).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use kiln_engine::activation;
use kiln_engine::nn::{LayerNorm, Linear};
use serde::Deserialize;

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}

/// `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Width of `text_projection` (CLIPTextModelWithProjection).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

pub(crate) struct ClipLayer {
    layer_norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick_gelu: bool,
}

/// The sizes one encoder layer is built from (text and vision towers share it).
pub(crate) struct LayerShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    pub quick_gelu: bool,
}

impl ClipLayer {
    fn load(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        Self::load_shape(
            vb,
            &LayerShape {
                hidden: c.hidden_size,
                intermediate: c.intermediate_size,
                heads: c.num_attention_heads,
                eps: c.layer_norm_eps,
                quick_gelu: c.hidden_act == "quick_gelu",
            },
        )
    }

    pub(crate) fn load_shape(vb: VarBuilder, c: &LayerShape) -> Result<Self> {
        let h = c.hidden;
        let attn = vb.pp("self_attn");
        Ok(ClipLayer {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), h, c.eps)?,
            q: Linear::load(&attn.pp("q_proj"), h, h, true)?,
            k: Linear::load(&attn.pp("k_proj"), h, h, true)?,
            v: Linear::load(&attn.pp("v_proj"), h, h, true)?,
            out: Linear::load(&attn.pp("out_proj"), h, h, true)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), h, c.eps)?,
            fc1: Linear::load(&vb.pp("mlp.fc1"), h, c.intermediate, true)?,
            fc2: Linear::load(&vb.pp("mlp.fc2"), c.intermediate, h, true)?,
            heads: c.heads,
            quick_gelu: c.quick_gelu,
        })
    }

    /// One layer; `causal_mask` for text, `None` for images.
    pub(crate) fn forward(&self, x: &Tensor, causal_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let head_dim = h / self.heads;
        let normed = self.layer_norm1.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(self.q.forward(&normed)?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let k = split(self.k.forward(&normed)?)?;
        let v = split(self.v.forward(&normed)?)?;
        let mut scores = q.matmul(&k.t()?.contiguous()?)?;
        if let Some(mask) = causal_mask {
            scores = scores.broadcast_add(mask)?;
        }
        let attn = activation::softmax_last_dim(&scores)?.matmul(&v)?;
        let attn = attn.transpose(1, 2)?.reshape((b, s, h))?;
        let x = (x + self.out.forward(&attn)?)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let hidden = if self.quick_gelu {
            activation::quick_gelu(&hidden)?
        } else {
            activation::gelu_erf(&hidden)?
        };
        x + self.fc2.forward(&hidden)?
    }
}

/// What a forward pass returns.
pub struct ClipTextOutput {
    /// After the final LayerNorm: (batch, seq, hidden).
    pub last_hidden_state: Tensor,
    /// The final-normed state at each sequence's first end-of-text token.
    pub pooled: Tensor,
    /// Every layer's output before the final norm (index 0 = embeddings).
    pub hidden_states: Vec<Tensor>,
    /// `pooled` through `text_projection` (models with one).
    pub text_embeds: Option<Tensor>,
}

/// The CLIP text transformer.
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    /// CLIPTextModelWithProjection's `text_projection` (no bias), when present.
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Load from `vb` rooted at the model (a `text_model.` prefix is detected).
    pub fn load(vb: VarBuilder, config: ClipTextConfig) -> Result<Self> {
        let text_projection = match config.projection_dim {
            Some(dim) if vb.contains_tensor("text_projection.weight") => Some(Linear::load(
                &vb.pp("text_projection"),
                config.hidden_size,
                dim,
                false,
            )?),
            _ => None,
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let h = config.hidden_size;
        let embeddings = vb.pp("embeddings");
        let token_embedding = Embedding::new(
            embeddings.get((config.vocab_size, h), "token_embedding.weight")?,
            h,
        );
        let position_embedding = embeddings.get(
            (config.max_position_embeddings, h),
            "position_embedding.weight",
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipLayer::load(vb.pp("encoder.layers").pp(i), &config))
            .collect::<Result<_>>()?;
        Ok(ClipTextModel {
            final_layer_norm: LayerNorm::load(
                &vb.pp("final_layer_norm"),
                h,
                config.layer_norm_eps,
            )?,
            config,
            token_embedding,
            position_embedding,
            layers,
            text_projection,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Call `f` on every linear layer (LoRA targets; fused LoRAs merge here).
    pub fn for_each_linear(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        for layer in &mut self.layers {
            for linear in [
                &mut layer.q,
                &mut layer.k,
                &mut layer.v,
                &mut layer.out,
                &mut layer.fc1,
                &mut layer.fc2,
            ] {
                f(linear)?;
            }
        }
        Ok(())
    }

    /// The linear layers' checkpoint names (`text_model.encoder.layers.0.self_attn.q_proj`).
    pub fn linear_names(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        let _ = self.for_each_linear(&mut |linear| {
            names.extend(linear.name().map(str::to_string));
            Ok(())
        });
        names
    }

    fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::MIN } else { 0.0 }))
            .collect();
        Tensor::from_vec(values, (1, 1, len, len), device)
    }

    /// Encode token ids (batch, seq); `eos` is the end-of-text id (pooling position).
    pub fn forward(&self, ids: &Tensor, eos: u32) -> Result<ClipTextOutput> {
        let (_, s) = ids.dims2()?;
        let embeddings = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        // In the activations' dtype: bf16/f16 scores cannot add an f32 mask.
        let mask = Self::causal_mask(s, ids.device())?.to_dtype(embeddings.dtype())?;
        let mut hidden_states = vec![embeddings.clone()];
        let mut x = embeddings;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
            hidden_states.push(x.clone());
        }
        let last = self.final_layer_norm.forward(&x)?;
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let pooled = rows
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let position = row.iter().position(|t| *t == eos).unwrap_or(row.len() - 1);
                last.get(b)?.get(position)
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|projection| projection.forward(&pooled))
            .transpose()?;
        Ok(ClipTextOutput {
            pooled,
            last_hidden_state: last,
            hidden_states,
            text_embeds,
        })
    }

    /// The end-of-text id: the config's, or the highest id (CLIP's convention).
    pub fn eos_token_id(&self) -> u32 {
        match self.config.eos_token_id {
            Some(id) if id != 2 => id,
            _ => (self.config.vocab_size - 1) as u32,
        }
    }
}

/// Read an OpenCLIP text tower (SDXL single files: `conditioner.embedders.1.model.`)
/// under transformers' CLIP names: the fused `in_proj` split into q/k/v rows,
/// `ln_1/ln_2/c_fc/c_proj/ln_final` renamed, `text_projection` transposed.
pub fn open_clip_adapter(config: &ClipTextConfig, prefix: &str) -> kiln_engine::KeyAdapter {
    use kiln_engine::{KeyRule, Source};
    let h = config.hidden_size;
    let layer = "text_model.encoder.layers.{i}";
    let block = format!("{prefix}transformer.resblocks.{{i}}");
    let mut rules = Vec::new();
    let mut rule = |pattern: String, source: Source| rules.push(KeyRule { pattern, source });
    for (index, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        for (part, fused) in [("weight", "in_proj_weight"), ("bias", "in_proj_bias")] {
            rule(
                format!("{layer}.self_attn.{name}.{part}"),
                Source::Rows {
                    key: format!("{block}.attn.{fused}"),
                    start: index * h,
                    len: h,
                },
            );
        }
    }
    for (ours, theirs) in [
        ("self_attn.out_proj", "attn.out_proj"),
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ] {
        for part in ["weight", "bias"] {
            rule(
                format!("{layer}.{ours}.{part}"),
                Source::Key(format!("{block}.{theirs}.{part}")),
            );
        }
    }
    rule(
        "text_model.embeddings.token_embedding.weight".into(),
        Source::Key(format!("{prefix}token_embedding.weight")),
    );
    rule(
        "text_model.embeddings.position_embedding.weight".into(),
        Source::Key(format!("{prefix}positional_embedding")),
    );
    for part in ["weight", "bias"] {
        rule(
            format!("text_model.final_layer_norm.{part}"),
            Source::Key(format!("{prefix}ln_final.{part}")),
        );
    }
    rule(
        "text_projection.weight".into(),
        Source::Transposed(Box::new(Source::Key(format!("{prefix}text_projection")))),
    );
    kiln_engine::KeyAdapter {
        rules,
        prefix: prefix.to_string(),
        ..kiln_engine::KeyAdapter::default()
    }
}
