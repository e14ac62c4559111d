//! The T5 v1.1 encoder (transformers' `T5EncoderModel`), as FLUX uses it for
//! `text_encoder_2`: RMS-style layer norms, unscaled attention with a bucketed
//! relative position bias computed once in the first block, gated-GELU feed-forward.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use kiln_engine::activation;
use kiln_engine::nn::Linear;
use serde::Deserialize;

fn buckets() -> usize {
    32
}
fn max_distance() -> usize {
    128
}
fn eps() -> f64 {
    1e-6
}
fn gated() -> String {
    "gated-gelu".into()
}

/// `text_encoder_2/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "gated")]
    pub feed_forward_proj: String,
}

/// T5's LayerNorm: scale by the root mean square (no centring), in f32.
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(T5LayerNorm {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for T5LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let variance = x32.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x32.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// transformers' `_relative_position_bucket` (bidirectional), with its float32 log.
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let scale = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact
            + ((distance as f32 / max_exact as f32).ln() / scale * (half - max_exact) as f32)
                as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

struct T5Block {
    attn_norm: T5LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: T5LayerNorm,
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    heads: usize,
    d_kv: usize,
}

impl T5Block {
    fn load(vb: VarBuilder, c: &T5Config) -> Result<Self> {
        let inner = c.num_heads * c.d_kv;
        let attn = vb.pp("layer.0.SelfAttention");
        let ff = vb.pp("layer.1.DenseReluDense");
        let gated = c.feed_forward_proj.starts_with("gated");
        let (wi_0, wi_1) = if gated {
            (
                Linear::load(&ff.pp("wi_0"), c.d_model, c.d_ff, false)?,
                Some(Linear::load(&ff.pp("wi_1"), c.d_model, c.d_ff, false)?),
            )
        } else {
            (Linear::load(&ff.pp("wi"), c.d_model, c.d_ff, false)?, None)
        };
        Ok(T5Block {
            attn_norm: T5LayerNorm::load(
                vb.pp("layer.0.layer_norm"),
                c.d_model,
                c.layer_norm_epsilon,
            )?,
            q: Linear::load(&attn.pp("q"), c.d_model, inner, false)?,
            k: Linear::load(&attn.pp("k"), c.d_model, inner, false)?,
            v: Linear::load(&attn.pp("v"), c.d_model, inner, false)?,
            o: Linear::load(&attn.pp("o"), inner, c.d_model, false)?,
            ff_norm: T5LayerNorm::load(
                vb.pp("layer.1.layer_norm"),
                c.d_model,
                c.layer_norm_epsilon,
            )?,
            wi_0,
            wi_1,
            wo: Linear::load(&ff.pp("wo"), c.d_ff, c.d_model, false)?,
            heads: c.num_heads,
            d_kv: c.d_kv,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let normed = self.attn_norm.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&normed)?)?;
        let k = split(self.k.forward(&normed)?)?;
        let v = split(self.v.forward(&normed)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(bias)?;
        let attn = activation::softmax_last_dim(&scores)?.matmul(&v)?;
        let attn = attn
            .transpose(1, 2)?
            .reshape((b, s, self.heads * self.d_kv))?;
        let x = (x + self.o.forward(&attn)?)?;
        let normed = self.ff_norm.forward(&x)?;
        let hidden = match &self.wi_1 {
            Some(wi_1) => {
                (activation::gelu_tanh(&self.wi_0.forward(&normed)?)? * wi_1.forward(&normed)?)?
            }
            None => self.wi_0.forward(&normed)?.relu()?,
        };
        x + self.wo.forward(&hidden)?
    }
}

/// The T5 encoder stack.
pub struct T5Encoder {
    config: T5Config,
    embed: Embedding,
    relative_bias: Tensor,
    blocks: Vec<T5Block>,
    final_norm: T5LayerNorm,
}

impl T5Encoder {
    pub fn load(vb: VarBuilder, config: T5Config) -> Result<Self> {
        let embed_name = if vb.contains_tensor("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let embed = Embedding::new(
            vb.get((config.vocab_size, config.d_model), embed_name)?,
            config.d_model,
        );
        let encoder = vb.pp("encoder");
        let relative_bias = encoder.get(
            (config.relative_attention_num_buckets, config.num_heads),
            "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        )?;
        let blocks = (0..config.num_layers)
            .map(|i| T5Block::load(encoder.pp("block").pp(i), &config))
            .collect::<Result<_>>()?;
        Ok(T5Encoder {
            final_norm: T5LayerNorm::load(
                encoder.pp("final_layer_norm"),
                config.d_model,
                config.layer_norm_epsilon,
            )?,
            config,
            embed,
            relative_bias,
            blocks,
        })
    }

    /// (1, heads, s, s) additive bias from the bucketed relative positions.
    fn position_bias(&self, s: usize, device: &Device) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..s)
            .flat_map(|query| {
                (0..s).map(move |key| {
                    relative_bucket(
                        key as i64 - query as i64,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, s * s, device)?;
        self.relative_bias
            .index_select(&buckets, 0)?
            .reshape((s, s, self.config.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// Encode token ids (batch, seq) to (batch, seq, d_model).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let bias = self.position_bias(s, ids.device())?;
        let mut x = self.embed.forward(ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        self.final_norm.forward(&x)
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_follow_transformers() {
        // Exact range, sign split, log range and the cap.
        assert_eq!(relative_bucket(0, 32, 128), 0);
        assert_eq!(relative_bucket(3, 32, 128), 19);
        assert_eq!(relative_bucket(-3, 32, 128), 3);
        assert_eq!(relative_bucket(-8, 32, 128), 8);
        assert_eq!(relative_bucket(-500, 32, 128), 15);
        assert_eq!(relative_bucket(500, 32, 128), 31);
    }
}
