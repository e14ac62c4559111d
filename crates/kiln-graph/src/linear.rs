//! `act(a · w + bias)` in one output buffer on CPU (f32): the output starts as
//! the bias rows, the GEMM accumulates into it, and the activation runs in
//! place, so the fused node makes one allocation and one extra pass at most.

use candle_core::{DType as CDType, Device, Tensor};
use rayon::prelude::*;

use crate::elementwise::{unary_in_place_f32, with_slice};
use crate::error::Result;
use crate::ops::UnaryOp;

/// Rows per parallel piece of the activation pass.
const ROWS_PER_TASK: usize = 64;

/// Whether the fused kernel takes these operands: f32, a 2-D weight, a bias
/// over the last axis (or a scalar).
pub fn fits(a: &Tensor, w: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> bool {
    let rows = &a.dims()[..a.rank().saturating_sub(1)];
    let residual_fits = residual.is_none_or(|r| {
        r.dtype() == CDType::F32
            && r.rank() == a.rank()
            && &r.dims()[..rows.len()] == rows
            && r.dims().last() == w.dims().get(1)
    });
    residual_fits
        && a.dtype() == CDType::F32
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
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = a.dims().to_vec();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let n = w.dims()[1];
    let bias: Vec<f32> = bias.flatten_all()?.to_vec1()?;
    // The output starts as the bias rows (plus the residual, when fused).
    let mut out = match residual {
        Some(r) => with_slice::<f32, _>(r, |r| r.to_vec())?,
        None => vec![0f32; m * n],
    };
    let add = residual.is_some();
    out.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            match (bias.len() == 1, add) {
                (true, false) => row.fill(bias[0]),
                (true, true) => row.iter_mut().for_each(|v| *v += bias[0]),
                (false, false) => row.copy_from_slice(&bias),
                (false, true) => row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b),
            }
        }
    });
    let w = w.contiguous()?;
    with_slice::<f32, _>(a, |lhs| {
        with_slice::<f32, _>(&w, |rhs| {
            kiln_engine::cpu_gemm::gemm_accumulate(&mut out, n, lhs, rhs, n, (m, n, k))
        })
    })??;
    if let Some(act) = activation {
        out.par_chunks_mut(n * ROWS_PER_TASK)
            .for_each(|rows| unary_in_place_f32(act, rows));
    }
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n);
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
}

/// Batched f32 matmul `[.., m, k] · [.., k, n]` with equal batch dims: the
/// batches split across threads, each GEMM on its own thread (attention's many
/// small products parallelise better this way than one GEMM at a time).
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let (ad, bd) = (a.dims(), b.dims());
    if a.dtype() != CDType::F32 || b.dtype() != CDType::F32 || ad.len() < 3 || ad.len() != bd.len()
    {
        return Ok(None);
    }
    let rank = ad.len();
    if ad[..rank - 2] != bd[..rank - 2] || ad[rank - 1] != bd[rank - 2] {
        return Ok(None);
    }
    let batches: usize = ad[..rank - 2].iter().product();
    let (m, k, n) = (ad[rank - 2], ad[rank - 1], bd[rank - 1]);
    let mut out = vec![0f32; batches * m * n];
    let b = b.contiguous()?;
    with_slice::<f32, _>(a, |lhs| {
        with_slice::<f32, _>(&b, |rhs| {
            out.par_chunks_mut((m * n).max(1))
                .zip(lhs.par_chunks((m * k).max(1)))
                .zip(rhs.par_chunks((k * n).max(1)))
                .for_each(|((dst, l), r)| {
                    kiln_engine::cpu_gemm::gemm_accumulate_on(dst, n, l, r, n, (m, n, k), 1)
                });
        })
    })??;
    let mut dims = ad[..rank - 1].to_vec();
    dims.push(n);
    Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
}
