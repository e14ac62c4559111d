//! GroupNorm over NCHW tensors (diffusers' VAE/UNet normalisation). On CPU in f32
//! one pass gathers each group's statistics (accumulated in f64) and one pass
//! normalises with the per-channel affine, groups split across threads; candle's
//! composed version is ~6× slower here. Other devices and dtypes use candle's.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// GroupNorm with learned per-channel scale and shift.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    fallback: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn load(vb: &VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let fallback =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(GroupNorm {
            weight,
            bias,
            groups,
            eps,
            fallback,
        })
    }
}

fn normalise_group(data: &mut [f32], weight: &[f32], bias: &[f32], plane: usize, eps: f64) {
    let n = data.len() as f64;
    let (mut sum, mut sum_sq) = (0f64, 0f64);
    for &v in data.iter() {
        let v = f64::from(v);
        sum += v;
        sum_sq += v * v;
    }
    let mean = sum / n;
    let variance = (sum_sq / n - mean * mean).max(0.0);
    let inv_std = 1.0 / (variance + eps).sqrt();
    for (c, channel) in data.chunks_mut(plane).enumerate() {
        let scale = (inv_std * f64::from(weight[c])) as f32;
        let shift = (f64::from(bias[c]) - mean * inv_std * f64::from(weight[c])) as f32;
        for v in channel.iter_mut() {
            *v = *v * scale + shift;
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 || x.rank() != 4 {
            return self.fallback.forward(x);
        }
        let (n, c, h, w) = x.dims4()?;
        if c % self.groups != 0 {
            candle_core::bail!(
                "group norm: {c} channels do not split into {} groups",
                self.groups
            );
        }
        let per_group = c / self.groups;
        let plane = h * w;
        let mut data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let weight = self.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bias = self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let group_len = per_group * plane;
        let threads = std::thread::available_parallelism()
            .map(|t| t.get())
            .unwrap_or(1)
            .min(8);
        let groups_total = n * self.groups;
        let per_thread = groups_total.div_ceil(threads);
        std::thread::scope(|scope| {
            for (t, chunk) in data.chunks_mut(per_thread * group_len).enumerate() {
                let (weight, bias) = (&weight, &bias);
                scope.spawn(move || {
                    for (i, group) in chunk.chunks_mut(group_len).enumerate() {
                        let g = (t * per_thread + i) % self.groups;
                        let channels = g * per_group..(g + 1) * per_group;
                        normalise_group(
                            group,
                            &weight[channels.clone()],
                            &bias[channels],
                            plane,
                            self.eps,
                        );
                    }
                });
            }
        });
        Tensor::from_vec(data, (n, c, h, w), x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    #[test]
    fn matches_candles_group_norm() {
        let device = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &device);
        let _ = vb
            .get_with_hints(
                12,
                "weight",
                candle_nn::Init::Randn {
                    mean: 1.0,
                    stdev: 0.3,
                },
            )
            .unwrap();
        let _ = vb
            .get_with_hints(
                12,
                "bias",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.3,
                },
            )
            .unwrap();
        let norm = GroupNorm::load(&vb, 4, 12, 1e-6).unwrap();
        let x = (Tensor::randn(0f32, 2.0, (2, 12, 7, 5), &device).unwrap() + 3.0).unwrap();
        let ours = norm.forward(&x).unwrap();
        let theirs = norm.fallback.forward(&x).unwrap();
        let diff = crate::parity::compare(&ours, &theirs).unwrap().max_abs;
        assert!(diff < 1e-5, "{diff}");
    }
}
