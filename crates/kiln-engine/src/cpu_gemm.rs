//! The f32 GEMM Kiln's own CPU kernels call directly (the convolution's
//! im2col chunks, the graph runtime's matmul + bias + activation), accumulating
//! into an output that already holds the bias, on every rayon thread.

/// `dst (m × n, row stride dst_rs) += lhs (m × k, contiguous) · rhs (k × n, row stride rhs_rs)`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_accumulate(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
    (m, n, k): (usize, usize, usize),
) {
    gemm_accumulate_on(
        dst,
        dst_rs,
        lhs,
        rhs,
        rhs_rs,
        (m, n, k),
        rayon::current_num_threads(),
    )
}

/// [`gemm_accumulate`] on `threads` threads (1: on the caller's thread, for
/// callers that already split their work across threads).
#[allow(clippy::too_many_arguments)]
pub fn gemm_accumulate_on(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
    (m, n, k): (usize, usize, usize),
    threads: usize,
) {
    assert!(m == 0 || n == 0 || (dst.len() >= (m - 1) * dst_rs + n));
    assert!(lhs.len() >= m * k && (k == 0 || n == 0 || rhs.len() >= (k - 1) * rhs_rs + n));
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices;
    // `dst` is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
