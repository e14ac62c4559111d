//! Plumbing shared by Kiln's CPU custom ops (activations, softmax, convolution):
//! the f32 elements of a contiguous operand, and whether the CPU runs the
//! kernels written with AVX2+FMA intrinsics.

use candle_core::{CpuStorage, Layout, Result};

/// The f32 elements of a contiguous CPU operand (callers make their inputs
/// contiguous before applying an op); `op` names the op in the error.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

/// True when this CPU has AVX2 and FMA (the kernels written with AVX2
/// intrinsics may run); AVX-512 CPUs have both.
pub(crate) fn has_avx2_fma() -> bool {
    crate::simd::level() >= crate::simd::Level::Avx2
}
