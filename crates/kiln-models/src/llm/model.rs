//! The decoder-only transformer shared by Llama, Qwen2, Qwen3 and Mistral, as
//! transformers runs it: RMSNorm (f32 statistics), GQA attention with RoPE,
//! optional q/k/v biases, per-head q/k norms and sliding windows, a SwiGLU MLP,
//! tied or untied output head; a per-sequence key/value cache.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::kv_cache::KvCache;
use kiln_engine::activation;
use kiln_engine::qlinear::{AnyLinear, forward_shared};

use super::config::LlmConfig;
use super::rope::{Rope, inverse_frequencies};
use super::weights::LlmWeights;

/// transformers' LlamaRMSNorm: `weight * (x * rsqrt(mean(x²) + eps))`, in f32.
#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(
        w: &LlmWeights,
        name: &str,
        dim: usize,
        eps: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(RmsNorm {
            weight: w
                .dense(name, &[dim], dtype, device)
                .map_err(candle_core::Error::wrap)?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

fn load_err(e: kiln_engine::EngineError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

pub(super) struct Attention {
    q: AnyLinear,
    k: AnyLinear,
    v: AnyLinear,
    pub(super) o: AnyLinear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) window: Option<usize>,
}

struct Mlp {
    gate: AnyLinear,
    up: AnyLinear,
    down: AnyLinear,
}

pub(super) struct DecoderLayer {
    pub(super) input_norm: RmsNorm,
    pub(super) attention: Attention,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
}

/// One sequence's cached keys and values, layer by layer.
pub struct SequenceCache {
    layers: Vec<KvCache>,
    len: usize,
}

impl SequenceCache {
    /// Tokens already processed (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A loaded causal language model.
pub struct CausalLm {
    pub(super) config: LlmConfig,
    embed_tokens: Tensor,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: RmsNorm,
    pub(super) lm_head: AnyLinear,
    pub(super) rope: Rope,
    pub(super) dtype: DType,
    device: Device,
}

impl CausalLm {
    /// Build the model from its weights; every tensor's shape is checked.
    pub fn load(
        config: LlmConfig,
        weights: &LlmWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let embed_tokens = weights
            .dense(
                "model.embed_tokens.weight",
                &[c.vocab_size, h],
                dtype,
                device,
            )
            .map_err(load_err)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let linear = |name: &str, i_dim: usize, o_dim: usize, bias: bool| {
                weights
                    .linear(&format!("{p}.{name}"), i_dim, o_dim, bias, dtype, device)
                    .map_err(load_err)
            };
            let norm = |name: &str, dim: usize| {
                RmsNorm::load(
                    weights,
                    &format!("{p}.{name}.weight"),
                    dim,
                    c.rms_norm_eps,
                    dtype,
                    device,
                )
            };
            let attention = Attention {
                q: linear("self_attn.q_proj", h, c.num_heads * d, c.attention_bias)?,
                k: linear("self_attn.k_proj", h, c.num_kv_heads * d, c.attention_bias)?,
                v: linear("self_attn.v_proj", h, c.num_kv_heads * d, c.attention_bias)?,
                o: linear("self_attn.o_proj", c.num_heads * d, h, false)?,
                q_norm: if c.qk_norm {
                    Some(norm("self_attn.q_norm", d)?)
                } else {
                    None
                },
                k_norm: if c.qk_norm {
                    Some(norm("self_attn.k_norm", d)?)
                } else {
                    None
                },
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: d,
                window: c.sliding_windows.get(i).copied().flatten(),
            };
            layers.push(DecoderLayer {
                input_norm: norm("input_layernorm", h)?,
                attention,
                post_attention_norm: norm("post_attention_layernorm", h)?,
                mlp: Mlp {
                    gate: linear("mlp.gate_proj", h, c.intermediate_size, false)?,
                    up: linear("mlp.up_proj", h, c.intermediate_size, false)?,
                    down: linear("mlp.down_proj", c.intermediate_size, h, false)?,
                },
            });
        }
        let norm = RmsNorm::load(
            weights,
            "model.norm.weight",
            h,
            c.rms_norm_eps,
            dtype,
            device,
        )?;
        let lm_head = if !c.tie_word_embeddings || weights.contains("lm_head.weight") {
            weights
                .linear("lm_head", h, c.vocab_size, false, dtype, device)
                .map_err(load_err)?
        } else if let LlmWeights::Gguf { .. } = weights {
            // Tied GGUF files have no `output.weight`: the (possibly quantized)
            // embedding matrix is the head.
            weights
                .linear("model.embed_tokens", h, c.vocab_size, false, dtype, device)
                .map_err(load_err)?
        } else {
            AnyLinear::Dense(kiln_engine::nn::Linear::from_parts(
                embed_tokens.clone(),
                None,
            )?)
        };
        let rope = Rope::new(
            inverse_frequencies(d, c.rope_theta, &c.rope_scaling),
            dtype,
            device,
        );
        Ok(CausalLm {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache {
            layers: (0..self.layers.len())
                .map(|_| KvCache::new(2, 256))
                .collect(),
            len: 0,
        }
    }

    /// Run `tokens` after what `cache` holds; returns the final hidden states
    /// `(len, hidden)` before the last norm, and optionally every layer's input.
    fn run(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
        mut keep: Option<&mut Vec<Tensor>>,
        keys_valid: usize,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            candle_core::bail!("no tokens to run");
        }
        let start = cache.len;
        let len = tokens.len();
        let mut x = self.embed(tokens)?;
        let (cos, sin) = self.rope.tables(start, len)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if let Some(states) = keep.as_deref_mut() {
                states.push(x.squeeze(0)?);
            }
            let residual = &x;
            let normed = layer.input_norm.forward(&x)?;
            let attended = layer
                .attention
                .forward(&normed, &cos, &sin, start, kv, keys_valid)?;
            x = layer.finish(residual, &attended, Projection::Shared)?;
        }
        cache.len += len;
        x.squeeze(0)
    }

    /// `(1, len, hidden)` embeddings of `tokens` (ids checked against the vocabulary).
    pub(super) fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let ids = Tensor::new(tokens, &self.device)?;
        self.embed_tokens.index_select(&ids, 0)?.unsqueeze(0)
    }

    /// Feed `tokens` and return the logits `(vocab,)` for the token after them.
    pub fn next_logits(&self, tokens: &[u32], cache: &mut SequenceCache) -> Result<Tensor> {
        let hidden = self.run(tokens, cache, None, usize::MAX)?;
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        logits.squeeze(0)?.to_dtype(DType::F32)
    }

    /// Feed `tokens` and return the logits `(len, vocab)` at every position.
    pub fn all_logits(&self, tokens: &[u32], cache: &mut SequenceCache) -> Result<Tensor> {
        let hidden = self.run(tokens, cache, None, usize::MAX)?;
        self.lm_head
            .forward(&self.norm.forward(&hidden)?)?
            .to_dtype(DType::F32)
    }

    /// transformers' `output_hidden_states` for a fresh sequence: the embeddings,
    /// each layer's output, and (last) the final normed output; `layers + 1` tensors
    /// of `(len, hidden)`. Text encoders (FLUX.2's Qwen3) read these.
    pub fn hidden_states(&self, tokens: &[u32]) -> Result<Vec<Tensor>> {
        self.padded_hidden_states(tokens, tokens.len())
    }

    /// As [`CausalLm::hidden_states`] for a sequence right-padded after its
    /// first `valid` tokens, with transformers' attention mask: no query
    /// attends to a pad key, so pad positions read the real tokens only (what
    /// FLUX.2's pipeline feeds its transformer, pads included).
    pub fn padded_hidden_states(&self, tokens: &[u32], valid: usize) -> Result<Vec<Tensor>> {
        if valid == 0 || valid > tokens.len() {
            candle_core::bail!("{valid} valid tokens of {}: need 1 to all", tokens.len());
        }
        let mut cache = self.new_cache();
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        let last = self.run(tokens, &mut cache, Some(&mut states), valid)?;
        states.push(self.norm.forward(&last)?);
        Ok(states)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// How a layer runs projections that read the same input (q/k/v, gate/up):
/// through candle's fused one-row kernel where it has one, or each on its own
/// (the same arithmetic for every row whatever the batch, which the batching
/// engine needs for batch-independent greedy output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Projection {
    Shared,
    Separate,
}

fn project<const N: usize>(
    layers: [&AnyLinear; N],
    x: &Tensor,
    how: Projection,
    what: &str,
) -> Result<[Tensor; N]> {
    let outputs = match how {
        Projection::Shared => forward_shared(&layers, x)?,
        Projection::Separate => layers
            .iter()
            .map(|l| l.forward(x))
            .collect::<Result<Vec<_>>>()?,
    };
    outputs
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{what} projections")))
}

impl DecoderLayer {
    /// The rest of the layer after attention: the residual, the post-attention
    /// norm and the SwiGLU MLP with its residual.
    pub(super) fn finish(
        &self,
        residual: &Tensor,
        attended: &Tensor,
        how: Projection,
    ) -> Result<Tensor> {
        let x1 = (residual + attended)?;
        let normed = self.post_attention_norm.forward(&x1)?;
        let mlp = &self.mlp;
        let [gate, up] = project([&mlp.gate, &mlp.up], &normed, how, "gate/up")?;
        let gated = (activation::silu(&gate)? * up)?;
        x1 + mlp.down.forward(&gated)?
    }
}

impl Attention {
    /// Queries, keys and values `(b, len, heads, head_dim)`, each head normed
    /// where the model has q/k norms, before RoPE.
    pub(super) fn project(&self, x: &Tensor, how: Projection) -> Result<[Tensor; 3]> {
        let (b, len, _) = x.dims3()?;
        let d = self.head_dim;
        let heads = |t: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, len, n, d))?;
            match norm {
                Some(norm) => norm.forward(&t),
                None => Ok(t),
            }
        };
        let [q, k, v] = project([&self.q, &self.k, &self.v], x, how, "q/k/v")?;
        Ok([
            heads(q, self.heads, &self.q_norm)?,
            heads(k, self.kv_heads, &self.k_norm)?,
            heads(v, self.kv_heads, &None)?,
        ])
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        start: usize,
        kv: &mut KvCache,
        keys_valid: usize,
    ) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let d = self.head_dim;
        let [q, k, v] = self
            .project(x, Projection::Shared)?
            .map(|t| t.transpose(1, 2).and_then(|t| t.contiguous()));
        let (q, k, v) = (q?, k?, v?);
        let q = Rope::apply(&q, cos, sin)?;
        let k = Rope::apply(&k, cos, sin)?;
        let (k, v) = kv.append(&k, &v)?;
        let total = k.dim(2)?;
        // Grouped queries share their key/value head: fold the group into the
        // query length instead of copying keys and values per head.
        let groups = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, groups * len, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
        let visible = Visible {
            window: self.window,
            keys_valid,
        };
        if let Some(mask) = causal_mask(len, start, total, visible, groups, x.device())? {
            scores = scores.broadcast_add(&mask)?;
        }
        let probabilities = activation::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probabilities.matmul(&v.contiguous()?)?;
        let out = out
            .reshape((b, self.heads, len, d))?
            .transpose(1, 2)?
            .reshape((b, len, self.heads * d))?;
        self.o.forward(&out)
    }
}

/// Which keys a query may see besides the earlier ones: those inside the
/// sliding window, and none at or past `keys_valid` (right padding).
#[derive(Debug, Clone, Copy)]
struct Visible {
    window: Option<usize>,
    keys_valid: usize,
}

/// The additive mask `(groups · len, total)` for queries at positions
/// `start..start + len` over keys `0..total`: future keys, keys outside the
/// window (`query − key ≥ window`) and pad keys get the lowest f32 as
/// transformers' eager attention adds. `None` when nothing is masked.
fn causal_mask(
    len: usize,
    start: usize,
    total: usize,
    rules: Visible,
    groups: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let visible = |q: usize, k: usize| {
        k <= q && k < rules.keys_valid && rules.window.is_none_or(|w| q - k < w)
    };
    let any_masked = (0..len).any(|i| (0..total).any(|k| !visible(start + i, k)));
    if !any_masked {
        return Ok(None);
    }
    let mut mask = Vec::with_capacity(groups * len * total);
    for _ in 0..groups {
        for i in 0..len {
            for k in 0..total {
                mask.push(if visible(start + i, k) { 0.0 } else { f32::MIN });
            }
        }
    }
    Tensor::from_vec(mask, (groups * len, total), device).map(Some)
}

/// Every tensor (transformers naming) a model of `config` reads, with its shape.
pub fn expected_tensors(c: &LlmConfig) -> Vec<(String, Vec<usize>)> {
    let (h, d) = (c.hidden_size, c.head_dim);
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
        ("lm_head.weight".to_string(), vec![c.vocab_size, h]),
    ];
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight", vec![h]);
        push("post_attention_layernorm.weight", vec![h]);
        push("self_attn.q_proj.weight", vec![c.num_heads * d, h]);
        push("self_attn.k_proj.weight", vec![c.num_kv_heads * d, h]);
        push("self_attn.v_proj.weight", vec![c.num_kv_heads * d, h]);
        push("self_attn.o_proj.weight", vec![h, c.num_heads * d]);
        if c.attention_bias {
            push("self_attn.q_proj.bias", vec![c.num_heads * d]);
            push("self_attn.k_proj.bias", vec![c.num_kv_heads * d]);
            push("self_attn.v_proj.bias", vec![c.num_kv_heads * d]);
        }
        if c.qk_norm {
            push("self_attn.q_norm.weight", vec![d]);
            push("self_attn.k_norm.weight", vec![d]);
        }
        push("mlp.gate_proj.weight", vec![c.intermediate_size, h]);
        push("mlp.up_proj.weight", vec![c.intermediate_size, h]);
        push("mlp.down_proj.weight", vec![h, c.intermediate_size]);
    }
    out
}

/// The largest value of the last dimension, as an index (greedy decoding).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
