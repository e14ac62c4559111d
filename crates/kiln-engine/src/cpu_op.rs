//! Plumbing shared by Kiln's CPU custom ops (activations, softmax, convolution):
//! the f32 elements of a contiguous operand, and whether the CPU runs the
//! AVX2+FMA code paths.

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

/// True when this CPU has AVX2 and FMA (the `#[target_feature]` paths may run).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
