//! Plumbing shared by Kiln's CPU custom ops (activations, softmax, attention,
//! convolution, bf16 GEMM): the f32 elements of a contiguous operand, whether
//! the CPU runs the kernels written with AVX2+FMA intrinsics, and the output
//! pointer parallel tasks share when each writes its own part.

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

/// An output buffer's base pointer shared by parallel tasks that each write a
/// disjoint part of it (tiles, blocks, rows): the callers' SAFETY comments say
/// which part each task owns.
#[derive(Clone, Copy)]
pub(crate) struct DisjointOut(*mut f32);

// SAFETY: the pointer is only written through by tasks owning disjoint
// parts, and the buffer outlives the parallel loops that use it.
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    pub(crate) fn new(buffer: &mut [f32]) -> Self {
        DisjointOut(buffer.as_mut_ptr())
    }

    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
