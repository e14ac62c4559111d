//! A linear layer over either dense weights (Kiln's [`Linear`]) or llama.cpp's
//! quantized blocks (candle's `QMatMul`: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, ... with
//! its runtime-dispatched AVX2 / AVX-512 kernels), so model code is written once.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use crate::nn::Linear;

/// `y = x W^T + b`, dense or quantized.
#[derive(Debug, Clone)]
pub enum AnyLinear {
    Dense(Linear),
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl AnyLinear {
    /// From a quantized (out × in) weight. F32/F16 tensors stay dense inside QMatMul.
    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(AnyLinear::Quantized {
            weight: QMatMul::from_qtensor(weight)?,
            bias,
        })
    }
}

/// `x W_i^T + b_i` for several layers reading the same `x` (q/k/v, gate/up).
/// Quantized weights of one type go through candle's fused kernel where it has
/// one (one quantization of `x`, one parallel region; AVX-512 VNNI, one row);
/// otherwise each layer runs on its own. Results are the same either way.
pub fn forward_shared(layers: &[&AnyLinear], x: &Tensor) -> Result<Vec<Tensor>> {
    let quantized: Option<Vec<&QTensor>> = layers
        .iter()
        .map(|l| match l {
            AnyLinear::Quantized {
                weight: QMatMul::QTensor(t),
                ..
            } => Some(t.as_ref()),
            _ => None,
        })
        .collect();
    if let Some(tensors) = quantized
        && let Some(outputs) = QTensor::gemv_fused_shared_lhs(&tensors, x)?
    {
        return outputs
            .into_iter()
            .zip(layers)
            .map(|(y, layer)| match layer {
                AnyLinear::Quantized { bias: Some(b), .. } => y.broadcast_add(b),
                _ => Ok(y),
            })
            .collect();
    }
    layers.iter().map(|l| l.forward(x)).collect()
}

impl From<Linear> for AnyLinear {
    fn from(linear: Linear) -> Self {
        AnyLinear::Dense(linear)
    }
}

/// Several rows through a Q8_0 matrix with Kiln's blocked kernel, where it
/// applies (an f32 CPU input of more than one row, an AVX2 CPU without
/// AVX-512 VNNI); `None` leaves the product to candle. Rows come out equal
/// to candle's one-row products (see `q8_gemm`).
fn q8_0_rows(weight: &QMatMul, x: &Tensor) -> Result<Option<Tensor>> {
    let QMatMul::QTensor(t) = weight else {
        return Ok(None);
    };
    let (n, k) = t.shape().dims2()?;
    let rows = x.elem_count() / k.max(1);
    if t.dtype() != GgmlDType::Q8_0
        || rows < 2
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || !crate::q8_gemm::applies()
    {
        return Ok(None);
    }
    let data = t.data()?;
    let input = x.flatten_all()?.to_vec1::<f32>()?;
    let y = crate::q8_gemm::matmul(&input, k, &data, n).map_err(candle_core::Error::wrap)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(y, dims, x.device()).map(Some)
}

impl Module for AnyLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            AnyLinear::Dense(linear) => linear.forward(x),
            AnyLinear::Quantized { weight, bias } => {
                let y = match q8_0_rows(weight, x)? {
                    Some(y) => y,
                    None => weight.forward(x)?,
                };
                match bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shared_forward_equals_separate_forwards() {
        let device = Device::Cpu;
        // Sizes the fused x86 kernel accepts (k a multiple of 256, n of its tile).
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let layers: Vec<AnyLinear> = [512usize, 256, 256]
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let w = Tensor::randn(0f32, 1.0, (n, 512), &device).unwrap();
                    let bias = (i == 1).then(|| Tensor::randn(0f32, 1.0, n, &device).unwrap());
                    AnyLinear::quantized(QTensor::quantize(&w, dtype).unwrap(), bias).unwrap()
                })
                .collect();
            let refs: Vec<&AnyLinear> = layers.iter().collect();
            for rows in [1usize, 3] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, 512), &device).unwrap();
                let shared = forward_shared(&refs, &x).unwrap();
                for (layer, y) in layers.iter().zip(&shared) {
                    let alone = layer.forward(&x).unwrap();
                    assert_eq!(alone.dims(), y.dims());
                    let diff = (alone - y)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(diff < 1e-3, "{dtype:?} rows {rows}: {diff}");
                }
            }
        }
    }
}
