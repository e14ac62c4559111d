//! Layer norm over the trailing axes with scale and bias in one pass per row
//! (f32 on CPU; statistics in f64 as torch's CPU kernel accumulates them wider).

use candle_core::{DType as CDType, Device, Tensor};
use rayon::prelude::*;

use crate::elementwise::with_slice;
use crate::error::Result;

/// Whether the one-pass kernel takes these operands: f32 with scale and bias
/// of the normalised width (or absent bias).
pub fn fits(x: &Tensor, width: usize, scale: &Tensor, bias: Option<&Tensor>) -> bool {
    x.dtype() == CDType::F32
        && scale.dtype() == CDType::F32
        && scale.elem_count() == width
        && bias.is_none_or(|b| b.dtype() == CDType::F32 && b.elem_count() == width)
}

pub fn layer_norm(
    x: &Tensor,
    width: usize,
    scale: &Tensor,
    bias: Option<&Tensor>,
    epsilon: f64,
) -> Result<Tensor> {
    let scale: Vec<f32> = scale.flatten_all()?.to_vec1()?;
    let bias: Vec<f32> = match bias {
        Some(b) => b.flatten_all()?.to_vec1()?,
        None => vec![0.0; width],
    };
    let out = with_slice::<f32, _>(x, |data| {
        let mut out = vec![0f32; data.len()];
        out.par_chunks_mut(width.max(1))
            .zip(data.par_chunks(width.max(1)))
            .with_min_len(16)
            .for_each(|(dst, src)| {
                let (mut sum, mut sum_sq) = (0f64, 0f64);
                for &v in src {
                    let v = f64::from(v);
                    sum += v;
                    sum_sq += v * v;
                }
                let count = src.len() as f64;
                let mean = sum / count;
                let var = (sum_sq / count - mean * mean).max(0.0);
                let inv = (1.0 / (var + epsilon).sqrt()) as f32;
                let mean = mean as f32;
                for (((d, &v), &s), &b) in dst.iter_mut().zip(src).zip(&scale).zip(&bias) {
                    *d = (v - mean) * inv * s + b;
                }
            });
        out
    })?;
    Ok(Tensor::from_vec(out, x.dims(), &Device::Cpu)?)
}
