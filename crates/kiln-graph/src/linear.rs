//! `act(a · w + bias)` in one output buffer on CPU (f32): the output starts as
//! the bias rows, the GEMM accumulates into it, and the activation runs in
//! place, so the fused node makes one allocation and one extra pass at most.

use candle_core::{DType as CDType, Device, Tensor};
use rayon::prelude::*;

use crate::elementwise::{Float, with_slice};
use crate::error::Result;
use crate::ops::UnaryOp;

/// Rows per parallel piece of the activation pass.
const ROWS_PER_TASK: usize = 64;

/// Whether the fused kernel takes these operands: f32, a 2-D weight, a bias
/// over the last axis (or a scalar).
pub fn fits(a: &Tensor, w: &Tensor, bias: &Tensor) -> bool {
    a.dtype() == CDType::F32
        && w.dtype() == CDType::F32
        && bias.dtype() == CDType::F32
        && a.rank() >= 2
        && w.rank() == 2
        && a.dims()[a.rank() - 1] == w.dims()[0]
        && (bias.elem_count() == 1 || (bias.rank() == 1 && bias.dims()[0] == w.dims()[1]))
}

pub fn matmul_bias(
    a: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    activation: Option<UnaryOp>,
) -> Result<Tensor> {
    let dims = a.dims().to_vec();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let n = w.dims()[1];
    let bias: Vec<f32> = bias.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; m * n];
    if bias.len() == 1 {
        out.fill(bias[0]);
    } else {
        out.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
            for row in rows.chunks_mut(n) {
                row.copy_from_slice(&bias);
            }
        });
    }
    let w = w.contiguous()?;
    with_slice::<f32, _>(a, |lhs| {
        with_slice::<f32, _>(&w, |rhs| {
            kiln_engine::cpu_gemm::gemm_accumulate(&mut out, n, lhs, rhs, n, (m, n, k))
        })
    })??;
    if let Some(act) = activation {
        out.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
            let mut scratch = vec![0f32; rows.len()];
            scratch.copy_from_slice(rows);
            f32::map_unary(act, &scratch, rows);
        });
    }
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n);
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
}
