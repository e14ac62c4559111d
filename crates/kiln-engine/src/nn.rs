//! Building blocks shared by the model code: linear layers (where LoRA adapters
//! attach, and later quantised weights), normalisations with diffusers' exact
//! formulas, and attention with an optional query-chunked path.

use std::sync::Arc;

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::lora::{LowRank, apply_active};
use crate::quant::QuantizedWeight;

/// A linear layer's weight: dense, kept transposed (in × out, contiguous) so
/// every forward is a plain row-major GEMM, or quantized (out × in), one layer
/// dequantized per forward into the compute dtype.
#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(Tensor),
    Quantized {
        weight: QuantizedWeight,
        dtype: DType,
    },
}

/// `y = x W^T + b` over the last dimension. A linear loaded from a checkpoint
/// carries its name, which LoRA adapters target; one loaded under a
/// quantization policy ([`crate::quant::while_loading`]) holds its weight
/// quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    name: Option<Arc<str>>,
    /// The weight before fused LoRAs were merged in, for an exact unfuse.
    unfused: Option<Tensor>,
}

impl Linear {
    /// Load `weight` (out × in) and, when `bias`, `bias` (out); quantized when
    /// the current load policy says so for this layer.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        let name = vb.prefix();
        let weight_name = if name.is_empty() {
            "weight".to_string()
        } else {
            format!("{name}.weight")
        };
        if let Some(weight) = crate::quant::stored_quantized(&weight_name, vb.device())? {
            let stored = weight.dims()?;
            if stored != (out_dim, in_dim) {
                candle_core::bail!(
                    "{weight_name} is stored as {stored:?} {}, the model expects ({out_dim}, {in_dim})",
                    weight.kind_name()
                );
            }
            crate::resident::record(weight.bytes() as i64);
            return Ok(Self::from_quantized(weight, bias, vb.dtype(), Some(&name)));
        }
        let weight = vb.get((out_dim, in_dim), "weight")?;
        Self::from_loaded(&name, weight, bias)
    }

    /// A layer named `name` (`model.layers.0.mlp.up_proj`) from an (out × in)
    /// weight its loader read and counted: quantized when the current load
    /// policy ([`crate::quant::while_loading`]) says so for it, else dense.
    pub fn from_loaded(name: &str, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let in_dim = weight.dim(1)?;
        let mut linear = match crate::quant::for_layer(name, in_dim) {
            Some(kind) => {
                let quantized = QuantizedWeight::quantize(&weight, kind)?;
                // The load counted the dense weight; it keeps the blocks.
                crate::resident::record(
                    quantized.bytes() as i64 - crate::resident::tensor_bytes(&weight),
                );
                Linear {
                    weight: LinearWeight::Quantized {
                        weight: quantized,
                        dtype: weight.dtype(),
                    },
                    bias,
                    name: None,
                    unfused: None,
                }
            }
            None => Self::from_parts(weight, bias)?,
        };
        linear.name = Some(Arc::from(name));
        Ok(linear)
    }

    /// From an (out × in) weight as stored in checkpoints.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear {
            weight: LinearWeight::Dense(weight.t()?.contiguous()?),
            bias,
            name: None,
            unfused: None,
        })
    }

    /// From a quantized weight computing in `dtype` (GGUF checkpoints).
    pub fn from_quantized(
        weight: QuantizedWeight,
        bias: Option<Tensor>,
        dtype: DType,
        name: Option<&str>,
    ) -> Self {
        Linear {
            weight: LinearWeight::Quantized { weight, dtype },
            bias,
            name: name.map(Arc::from),
            unfused: None,
        }
    }

    /// The checkpoint name LoRA adapters target (`transformer_blocks.0.attn.to_q`).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn dims(&self) -> (usize, usize) {
        match &self.weight {
            LinearWeight::Dense(weight_t) => (weight_t.dims()[0], weight_t.dims()[1]),
            LinearWeight::Quantized { weight, .. } => {
                weight.dims().map(|(out, inp)| (inp, out)).unwrap_or((0, 0))
            }
        }
    }

    pub fn in_dim(&self) -> usize {
        self.dims().0
    }

    pub fn out_dim(&self) -> usize {
        self.dims().1
    }

    /// Whether the weight is held quantized (and its kind, e.g. `int8`).
    pub fn quantization(&self) -> Option<String> {
        match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Quantized { weight, .. } => Some(weight.kind_name()),
        }
    }

    /// Bytes the weight and bias hold in memory.
    pub fn resident_bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let weight = match &self.weight {
            LinearWeight::Dense(weight_t) => tensor(weight_t),
            LinearWeight::Quantized { weight, .. } => weight.bytes(),
        };
        weight + self.bias.as_ref().map_or(0, tensor)
    }

    /// Fused mode: add `scale · B A` to the weight (the original is kept).
    /// Quantized weights refuse: fused LoRAs need dense weights.
    pub fn merge(&mut self, update: &LowRank) -> Result<()> {
        if update.in_dim() != self.in_dim() || update.out_dim() != self.out_dim() {
            candle_core::bail!(
                "LoRA update is {}×{} but {} is {}×{}",
                update.out_dim(),
                update.in_dim(),
                self.name().unwrap_or("the layer"),
                self.out_dim(),
                self.in_dim()
            );
        }
        let weight_t = match &self.weight {
            LinearWeight::Dense(weight_t) => weight_t.clone(),
            LinearWeight::Quantized { weight, .. } => candle_core::bail!(
                "{} is quantized ({}): fused LoRAs need dense weights; apply LoRAs at runtime",
                self.name().unwrap_or("the layer"),
                weight.kind_name()
            ),
        };
        if self.unfused.is_none() {
            self.unfused = Some(weight_t.clone());
        }
        let delta_t = update
            .delta(weight_t.device())?
            .t()?
            .to_dtype(weight_t.dtype())?;
        self.weight = LinearWeight::Dense((&weight_t + delta_t)?.contiguous()?);
        Ok(())
    }

    /// Undo every merge exactly, restoring the stored original weight.
    pub fn unmerge(&mut self) {
        if let Some(original) = self.unfused.take() {
            self.weight = LinearWeight::Dense(original);
        }
    }

    /// The weight as (out × in), as checkpoints store it (a transposed view
    /// when dense; dequantized when quantized).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(weight_t) => weight_t.t(),
            LinearWeight::Quantized { weight, dtype } => weight.dequantize(*dtype),
        }
    }

    /// The (in × out) matrix a forward multiplies by: the dense weight, or this
    /// layer's quantized weight dequantized (a transposed view, no copy).
    fn matrix(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(weight_t) => Ok(weight_t.clone()),
            LinearWeight::Quantized { weight, dtype } => weight.matrix_t(*dtype),
        }
    }
}

impl Linear {
    /// `rows` (n × in) times the weight: straight from the 8-bit codes for a
    /// few rows (modulation vectors), else a GEMM over the dense or
    /// dequantized matrix.
    fn product(&self, rows: &Tensor) -> Result<Tensor> {
        if let LinearWeight::Quantized { weight, .. } = &self.weight
            && let Some(y) = weight.matmul_few_rows(rows)?
        {
            return Ok(y);
        }
        rows.matmul(&self.matrix()?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match x.dims() {
            [b, s, d] => {
                let rows = x.reshape((b * s, *d))?;
                let y = self.product(&rows)?;
                let y = match &self.name {
                    Some(name) => apply_active(name, &rows, y)?,
                    None => y,
                };
                y.reshape((*b, *s, ()))?
            }
            [_, _] => {
                let y = self.product(x)?;
                match &self.name {
                    Some(name) => apply_active(name, x, y)?,
                    None => y,
                }
            }
            _ => x.broadcast_matmul(&self.matrix()?)?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension without learned scale/shift, using candle's
/// fused kernel (statistics in f32 for f32 inputs).
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
    candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, eps as f32)
}

/// LayerNorm with optional weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: Some(vb.get(dim, "weight")?),
            bias: Some(vb.get(dim, "bias")?),
            eps,
        })
    }

    pub fn plain(eps: f64) -> Self {
        LayerNorm {
            weight: None,
            bias: None,
            eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = layer_norm_plain(x, self.eps)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(w)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }
}

/// diffusers' RMSNorm: `x * rsqrt(mean(x²) + eps) * weight`, statistics in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight.to_dtype(x.dtype())?,
            self.eps as f32,
        )
    }
}

/// Sinusoidal timestep embedding, diffusers' `get_timestep_embedding` with
/// `flip_sin_to_cos=True, downscale_freq_shift=0` (FLUX's and SDXL's):
/// `[cos, sin]` of `t · exp(−ln(10000)·i/half)`, in float32 as torch computes it.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let device = t.device();
    let exponents: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln() as f32) * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(exponents, (1, half), device)?;
    let args = t
        .to_dtype(candle_core::DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// Scaled dot-product attention over `(batch, heads, seq, head_dim)` tensors.
///
/// f32 on CPU runs the fused kernel ([`crate::cpu_attention`]): no score
/// tensor, strided inputs read in place, and a result that is a transposed
/// view of `(batch, seq, heads, head_dim)`, so merging heads costs nothing.
/// Elsewhere the scores are materialised; with `chunk`, queries are processed
/// `chunk` at a time so the score matrix never exceeds `chunk × seq` per head.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, chunk: Option<usize>) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32) {
        let last_contiguous = |t: &Tensor| -> Result<Tensor> {
            match t.stride().last() {
                Some(1) => Ok(t.clone()),
                _ => t.contiguous(),
            }
        };
        let fused = crate::cpu_attention::FusedAttention {
            scale: scale as f32,
        };
        return last_contiguous(q)?
            .apply_op3_no_bwd(&last_contiguous(k)?, &last_contiguous(v)?, &fused)?
            .transpose(1, 2);
    }
    attention_materialised(q, k, v, scale, chunk)
}

/// [`attention`] with the score matrix computed, softmaxed and multiplied in
/// three passes (every device and dtype).
fn attention_materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let k_t = k.t()?.contiguous()?;
    let one = |q: &Tensor| -> Result<Tensor> {
        let scores = (q * scale)?.contiguous()?.matmul(&k_t)?;
        let probabilities = crate::activation::softmax_last_dim(&scores)?;
        probabilities.matmul(&v.contiguous()?)
    };
    let len = q.dim(2)?;
    match chunk {
        Some(size) if size > 0 && size < len => {
            let mut parts = Vec::with_capacity(len.div_ceil(size));
            let mut start = 0;
            while start < len {
                let n = size.min(len - start);
                parts.push(one(&q.narrow(2, start, n)?)?);
                start += n;
            }
            Tensor::cat(&parts, 2)
        }
        _ => one(q),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn chunked_attention_equals_full_attention() {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 10, 8), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 10, 8), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 10, 8), &device).unwrap();
        let scale = 1.0 / 8f64.sqrt();
        let full = attention_materialised(&q, &k, &v, scale, None).unwrap();
        let chunked = attention_materialised(&q, &k, &v, scale, Some(3)).unwrap();
        assert!(max_difference(&full, &chunked) < 1e-6);
    }

    /// The fused CPU kernel against the materialised path: several batches,
    /// head widths (64, 128, the VAE's single 512-wide head), query lengths
    /// that leave a partial block, key lengths past one scratch block, value
    /// widths unlike the key width, and heads split off a projection (strided,
    /// not contiguous) as the models pass them.
    #[test]
    fn fused_attention_matches_materialised_attention() {
        let device = Device::Cpu;
        let cases = [
            (1, 2, 10, 10, 8, 8),
            (2, 3, 77, 77, 64, 64),
            (1, 2, 300, 1100, 128, 128),
            (1, 1, 70, 70, 512, 512),
            (2, 2, 5, 33, 16, 24),
        ];
        for (batch, heads, q_len, k_len, dim, v_dim) in cases {
            // Projections (batch, len, heads · dim) split into heads: strided views.
            let split = |len: usize, width: usize| {
                Tensor::randn(0f32, 1.0, (batch, len, heads * width), &device)
                    .unwrap()
                    .reshape((batch, len, heads, width))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            };
            let (q, k, v) = (split(q_len, dim), split(k_len, dim), split(k_len, v_dim));
            let fused = attention(&q, &k, &v, None).unwrap();
            let scale = 1.0 / (dim as f64).sqrt();
            let reference = attention_materialised(&q, &k, &v, scale, None).unwrap();
            assert_eq!(fused.dims(), reference.dims());
            let diff = max_difference(&fused, &reference);
            assert!(
                diff < 2e-5,
                "case {:?}: {diff}",
                (batch, heads, q_len, k_len, dim)
            );
        }
    }

    #[test]
    fn fused_attention_refuses_mismatched_shapes() {
        let device = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &device).unwrap();
        let k = Tensor::zeros((1, 2, 4, 16), DType::F32, &device).unwrap();
        let err = attention(&q, &k, &k, None).unwrap_err().to_string();
        assert!(err.contains("shapes do not fit"), "{err}");
    }

    #[test]
    fn layer_norm_has_zero_mean_unit_variance() {
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let y = layer_norm_plain(&x, 0.0).unwrap().to_vec2::<f32>().unwrap();
        let mean: f32 = y[0].iter().sum::<f32>() / 4.0;
        let var: f32 = y[0].iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }
}
