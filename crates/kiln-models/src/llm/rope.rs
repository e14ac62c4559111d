//! Rotary position embeddings as transformers computes them: inverse frequencies
//! `1 / theta^(2i/d)` with the config's rescaling (linear, Llama 3.1's banded one,
//! or GGUF's per-frequency factors), cos/sin tables in f32, rotate-half pairing.

use candle_core::{DType, Device, Result, Tensor};

use super::config::RopeScaling;

/// transformers' `_compute_default_rope_parameters` plus the rescaling.
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)) in f32.
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta as f32).powf(exponent)
        })
        .collect();
    match scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Factors(factors) => base
            .iter()
            .enumerate()
            .map(|(i, f)| f / factors.get(i).copied().unwrap_or(1.0))
            .collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// Precomputed cos/sin rows, one per position, grown on demand.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

impl Rope {
    pub fn new(inv_freq: Vec<f32>, dtype: DType, device: &Device) -> Self {
        Rope {
            inv_freq,
            device: device.clone(),
            dtype,
        }
    }

    /// cos and sin, each `(len, head_dim / 2)`, for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        self.tables_at(start..start + len)
    }

    /// cos and sin, each `(positions, head_dim / 2)`, one row per position given
    /// (the tokens of a batch, each at its own sequence's position).
    pub fn tables_at(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for position in positions {
            for &f in &self.inv_freq {
                // transformers multiplies in f32 (inv_freq @ position_ids).
                let angle = f * position as f32;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Rotate `(batch, heads, len, head_dim)` queries or keys (rotate-half pairing).
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
    }

    /// Rotate `(batch, len, heads, head_dim)` queries or keys, the same
    /// arithmetic as [`Rope::apply`] in token-major layout.
    pub fn apply_token_major(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rescaling_keeps_high_and_divides_low_frequencies() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inverse_frequencies(128, 500000.0, &RopeScaling::None);
        let scaled = inverse_frequencies(128, 500000.0, &scaling);
        assert_eq!(plain[0], scaled[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() <= plain[63] * 1e-6);
        let linear = inverse_frequencies(16, 10000.0, &RopeScaling::Linear { factor: 2.0 });
        assert_eq!(
            linear[3],
            inverse_frequencies(16, 10000.0, &RopeScaling::None)[3] / 2.0
        );
    }
}
