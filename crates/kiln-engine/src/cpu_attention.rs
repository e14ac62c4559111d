//! Fused scaled-dot-product attention for f32 on CPU, the image models' hot
//! spot after the GEMMs: for each (batch, head, block of queries) one thread
//! computes the block's scores against every key into a cache-sized scratch,
//! takes the softmax in place and multiplies by the values straight into the
//! output, so the `(heads, queries, keys)` score tensor is never
//! materialised (it was written and read three times per layer, tens of MB at
//! 512² and more than a GB at 1024²), and queries, keys and values are read
//! through their strides (the heads split off a projection need no copy).
//!
//! The output is laid out `(batch, queries, heads, head_dim)`, so merging the
//! heads back into `(batch, queries, heads · head_dim)` is free.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use crate::activation::softmax_rows_in_place;
use crate::cpu_op::DisjointOut;

/// Scores per scratch block (1 MiB of f32): a block of queries times every
/// key stays in a core's L2 cache between the two products, with at least
/// `MIN_ROWS` queries so the products keep the GEMM kernel's tile full.
const SCORE_BUDGET: usize = 1 << 18;
/// Fewest queries per block (long sequences: 4160 tokens at 1024²).
const MIN_ROWS: usize = 32;

/// `softmax(scale · q·kᵀ)·v` over `(batch, heads, len, dim)` operands whose
/// last dimension is contiguous; the result is `(batch, q_len, heads, v_dim)`.
pub(crate) struct FusedAttention {
    pub scale: f32,
}

/// One operand: its storage, where it starts, its four dims and the strides
/// of the first three (the last is 1).
struct Operand<'a> {
    data: &'a [f32],
    start: usize,
    dims: [usize; 4],
    strides: [usize; 3],
}

impl<'a> Operand<'a> {
    fn of(storage: &'a CpuStorage, layout: &Layout, name: &str) -> Result<Self> {
        let data = storage.as_slice::<f32>()?;
        let (dims, strides) = (layout.dims(), layout.stride());
        if dims.len() != 4 || strides[3] != 1 {
            candle_core::bail!(
                "fused attention: {name} must be (batch, heads, len, dim) with a contiguous last dim, got shape {dims:?} strides {strides:?}"
            );
        }
        let start = layout.start_offset();
        // The furthest element any index reaches must lie inside the storage.
        let reach: usize = (0..4).map(|i| dims[i].saturating_sub(1) * strides[i]).sum();
        if dims.iter().all(|&d| d > 0) && start + reach >= data.len() {
            candle_core::bail!("fused attention: {name}'s layout reaches past its storage");
        }
        Ok(Operand {
            data,
            start,
            dims: [dims[0], dims[1], dims[2], dims[3]],
            strides: [strides[0], strides[1], strides[2]],
        })
    }

    /// Pointer to row `row` of head `head` in batch `batch`.
    fn row(&self, batch: usize, head: usize, row: usize) -> *const f32 {
        let offset =
            self.start + batch * self.strides[0] + head * self.strides[1] + row * self.strides[2];
        self.data[offset..].as_ptr()
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "kiln-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            Operand::of(qs, ql, "q")?,
            Operand::of(ks, kl, "k")?,
            Operand::of(vs, vl, "v")?,
        );
        let [batch, heads, q_len, dim] = q.dims;
        let [_, _, k_len, v_dim] = v.dims;
        if k.dims != [batch, heads, k_len, dim] || v.dims[..3] != [batch, heads, k_len] {
            candle_core::bail!(
                "fused attention: shapes do not fit: q {:?}, k {:?}, v {:?}",
                q.dims,
                k.dims,
                v.dims
            );
        }
        if k_len == 0 {
            candle_core::bail!("fused attention: no keys to attend to");
        }
        let mut out = vec![0f32; batch * q_len * heads * v_dim];
        let rows_per_block = (SCORE_BUDGET / k_len)
            .clamp(MIN_ROWS, 256)
            .min(q_len.max(1));
        let blocks = q_len.div_ceil(rows_per_block);
        let out_ptr = DisjointOut::new(&mut out);
        let out_row_stride = heads * v_dim;
        (0..batch * heads * blocks).into_par_iter().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, task| {
                let (bh, block) = (task / blocks, task % blocks);
                let (b, h) = (bh / heads, bh % heads);
                let first = block * rows_per_block;
                let rows = rows_per_block.min(q_len - first);
                scores.resize(rows * k_len, 0.0);
                // SAFETY: the operands' reach was checked against their storage
                // in `Operand::of`; `scores` holds rows × k_len elements; this
                // task's output rows (batch b, queries first.., head h) lie
                // inside `out` and no other task writes them.
                unsafe {
                    gemm::gemm(
                        rows,
                        k_len,
                        dim,
                        scores.as_mut_ptr(),
                        1,
                        k_len as isize,
                        false,
                        q.row(b, h, first),
                        1,
                        q.strides[2] as isize,
                        k.row(b, h, 0),
                        k.strides[2] as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    softmax_rows_in_place(scores, k_len);
                    gemm::gemm(
                        rows,
                        v_dim,
                        k_len,
                        out_ptr.get().add(((b * q_len + first) * heads + h) * v_dim),
                        1,
                        out_row_stride as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        k_len as isize,
                        v.row(b, h, 0),
                        1,
                        v.strides[2] as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, q_len, heads, v_dim)),
        ))
    }
}
