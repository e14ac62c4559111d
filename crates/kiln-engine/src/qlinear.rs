//! A linear layer over either dense weights (Kiln's [`Linear`]) or llama.cpp's
//! quantized blocks (candle's `QMatMul`: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, ... with
//! its runtime-dispatched AVX2 / AVX-512 kernels), so model code is written once.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

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

impl From<Linear> for AnyLinear {
    fn from(linear: Linear) -> Self {
        AnyLinear::Dense(linear)
    }
}

impl Module for AnyLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            AnyLinear::Dense(linear) => linear.forward(x),
            AnyLinear::Quantized { weight, bias } => {
                let y = weight.forward(x)?;
                match bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            }
        }
    }
}
