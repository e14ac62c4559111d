//! Batched products with Q8_0 weights on AVX2 CPUs without AVX-512 VNNI,
//! where candle runs every row through its one-row kernel: activation rows are
//! quantized to Q8_0 exactly as candle quantizes them, and a register-blocked
//! kernel (four rows × two columns) performs, for every output, the very
//! operations of candle's AVX2 `vec_dot_q8_0_q8_0` in the same order, so a
//! batched row equals its one-row product bit for bit, while each weight block
//! is loaded, sign-split and its scale converted once per four rows instead of
//! once per product. (On AVX-512 VNNI CPUs candle repacks Q8_0 weights and its
//! own kernel serves every row count; this module stays out of the way there.)

use half::f16;
use rayon::prelude::*;

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale, then 32 signed bytes.
const BLOCK_BYTES: usize = 2 + QK;
/// Rows of the register tile.
const ROWS: usize = 4;
/// Rows whose quantized values stay in L1 while a task's columns pass.
const ROW_BLOCK: usize = 16;
/// Output columns each parallel task takes.
const COLUMNS_PER_TASK: usize = 32;

/// Whether this CPU takes this kernel: AVX2 and FMA (what candle's one-row
/// kernel needs) and no AVX-512 VNNI (where candle repacks Q8_0).
pub fn applies() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu_op::has_avx2_fma() && !std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activation rows as Q8_0 blocks: each block's scale (rounded through f16,
/// as stored) and its quantized values.
struct QuantizedRows {
    scales: Vec<f32>,
    values: Vec<i8>,
    blocks_per_row: usize,
}

/// candle's `BlockQ8_0::from_float`: `d = amax / 127` stored as f16, values
/// `round(x / d)` with the unrounded `d`.
fn quantize_rows(x: &[f32], k: usize) -> QuantizedRows {
    let blocks_per_row = k / QK;
    let blocks = x.len() / QK;
    let mut scales = Vec::with_capacity(blocks);
    let mut values = vec![0i8; x.len()];
    for (block, out) in x.chunks_exact(QK).zip(values.chunks_exact_mut(QK)) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        scales.push(f16::from_f32(d).to_f32());
        for (q, &v) in out.iter_mut().zip(block) {
            *q = f32::round(v * id) as i8;
        }
    }
    QuantizedRows {
        scales,
        values,
        blocks_per_row,
    }
}

/// Why a product was not computed here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Q8GemmError {
    #[error("q8_0 product: k = {0} is not a multiple of 32")]
    Depth(usize),
    #[error("q8_0 product: {got} weight bytes for {n} × {k}, expected {expected}")]
    WeightBytes {
        got: usize,
        expected: usize,
        n: usize,
        k: usize,
    },
    #[error("q8_0 product: {0} activations are not whole rows of {1}")]
    Rows(usize, usize),
    #[error("q8_0 product: this CPU lacks AVX2 and FMA")]
    Unsupported,
}

/// `x · Wᵀ` for `x` of `m × k` f32 rows and `W` of `n` rows in ggml's Q8_0
/// layout (`weights`: `n · k / 32` blocks of 34 bytes); returns `m × n`.
pub fn matmul(x: &[f32], k: usize, weights: &[u8], n: usize) -> Result<Vec<f32>, Q8GemmError> {
    if k == 0 || !k.is_multiple_of(QK) {
        return Err(Q8GemmError::Depth(k));
    }
    let expected = n * (k / QK) * BLOCK_BYTES;
    if weights.len() != expected {
        return Err(Q8GemmError::WeightBytes {
            got: weights.len(),
            expected,
            n,
            k,
        });
    }
    if !x.len().is_multiple_of(k) {
        return Err(Q8GemmError::Rows(x.len(), k));
    }
    if !crate::cpu_op::has_avx2_fma() {
        return Err(Q8GemmError::Unsupported);
    }
    let m = x.len() / k;
    let rows = quantize_rows(x, k);
    let row_bytes = (k / QK) * BLOCK_BYTES;
    // Column-major partial results per task, scattered into rows afterwards.
    let tasks: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(COLUMNS_PER_TASK)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let end = (start + COLUMNS_PER_TASK).min(n);
            let mut out = vec![0f32; (end - start) * m];
            let columns = &weights[start * row_bytes..end * row_bytes];
            columns_product(&rows, m, columns, row_bytes, &mut out);
            (start, out)
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (start, out) in tasks {
        for (c, column) in out.chunks_exact(m.max(1)).enumerate() {
            for (r, v) in column.iter().enumerate() {
                y[r * n + start + c] = *v;
            }
        }
    }
    Ok(y)
}

/// Every row against a run of weight rows (`columns`); `out` is column-major
/// (`out[c · m + r]`).
fn columns_product(
    rows: &QuantizedRows,
    m: usize,
    columns: &[u8],
    row_bytes: usize,
    out: &mut [f32],
) {
    let n = columns.len() / row_bytes;
    let kb = rows.blocks_per_row;
    let mut scales = vec![[0f32; 2]; kb];
    // A block of rows small enough to stay in L1 while every column pair of
    // this task passes over it (streaming all rows per pair was bound by L3).
    for row_block in (0..m).step_by(ROW_BLOCK) {
        let row_end = (row_block + ROW_BLOCK).min(m);
        let mut c = 0;
        while c < n {
            let pair = (n - c).min(2);
            let w = &columns[c * row_bytes..(c + pair) * row_bytes];
            // The pair's block scales, converted once for the block of rows.
            for (b, s) in scales.iter_mut().enumerate() {
                for (j, d) in s.iter_mut().enumerate().take(pair) {
                    let at = j * row_bytes + b * BLOCK_BYTES;
                    *d = f16::from_le_bytes([w[at], w[at + 1]]).to_f32();
                }
            }
            pair_product(
                rows,
                (row_block, row_end),
                m,
                w,
                pair,
                row_bytes,
                &scales,
                c,
                out,
            );
            c += pair;
        }
    }
}

/// Rows `rows_range` against one column pair starting at column `c`.
#[allow(clippy::too_many_arguments)]
fn pair_product(
    rows: &QuantizedRows,
    (first, end): (usize, usize),
    m: usize,
    w: &[u8],
    pair: usize,
    row_bytes: usize,
    scales: &[[f32; 2]],
    c: usize,
    out: &mut [f32],
) {
    let mut r = first;
    while r < end {
        let quad = (end - r).min(ROWS);
        let mut tile = [[0f32; 2]; ROWS];
        #[cfg(target_arch = "x86_64")]
        {
            let operands = x86::Operands {
                rows,
                first_row: r,
                weights: w,
                row_bytes,
                scales,
            };
            // SAFETY: `matmul` checked AVX2 and FMA.
            unsafe { operands.tile(quad, pair, &mut tile) };
        }
        for (i, row) in tile.iter().take(quad).enumerate() {
            for (j, v) in row.iter().take(pair).enumerate() {
                out[(c + j) * m + r + i] = *v;
            }
        }
        r += quad;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK_BYTES, QK, QuantizedRows, ROWS};

    /// candle's `hsum_float_8`.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let res = _mm256_extractf128_ps(x, 1);
        let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// One register tile's inputs: rows `first_row..` of the quantized
    /// activations against the (one or two) weight rows in `weights`, whose
    /// block scales are `scales[block][column]`.
    pub(super) struct Operands<'a> {
        pub(super) rows: &'a QuantizedRows,
        pub(super) first_row: usize,
        pub(super) weights: &'a [u8],
        pub(super) row_bytes: usize,
        pub(super) scales: &'a [[f32; 2]],
    }

    impl Operands<'_> {
        /// `quad` rows × `pair` columns into `out`, through a kernel whose
        /// tile size is a constant (so its accumulators stay in registers).
        ///
        /// # Safety
        /// The CPU has AVX2 and FMA; `quad <= 4`, `pair <= 2`, and the rows
        /// and weights exist.
        pub(super) unsafe fn tile(&self, quad: usize, pair: usize, out: &mut [[f32; 2]; ROWS]) {
            // SAFETY: forwarded from the caller.
            unsafe {
                match (quad, pair) {
                    (4, 2) => self.kernel::<4, 2>(out),
                    (3, 2) => self.kernel::<3, 2>(out),
                    (2, 2) => self.kernel::<2, 2>(out),
                    (1, 2) => self.kernel::<1, 2>(out),
                    (4, _) => self.kernel::<4, 1>(out),
                    (3, _) => self.kernel::<3, 1>(out),
                    (2, _) => self.kernel::<2, 1>(out),
                    _ => self.kernel::<1, 1>(out),
                }
            }
        }

        /// For each output, candle's `vec_dot_q8_0_q8_0` loop: `acc +=
        /// (dw·dx) · madd(maddubs(|w|, sign(x, w)), 1)` block by block, then
        /// `hsum`.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn kernel<const R: usize, const C: usize>(&self, out: &mut [[f32; 2]; ROWS]) {
            let rows = self.rows;
            let kb = rows.blocks_per_row;
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let x_values: [&[i8]; R] = std::array::from_fn(|i| {
                let row = self.first_row + i;
                &rows.values[row * kb * QK..(row + 1) * kb * QK]
            });
            let x_scales: [&[f32]; R] = std::array::from_fn(|i| {
                let row = self.first_row + i;
                &rows.scales[row * kb..(row + 1) * kb]
            });
            let w_rows: [&[u8]; C] = std::array::from_fn(|j| {
                &self.weights[j * self.row_bytes..(j + 1) * self.row_bytes]
            });
            for b in 0..kb {
                let dw = self.scales[b];
                let mut wq = [_mm256_setzero_si256(); C];
                let mut aw = [_mm256_setzero_si256(); C];
                for j in 0..C {
                    let block = &w_rows[j][b * BLOCK_BYTES + 2..(b + 1) * BLOCK_BYTES];
                    // SAFETY: the block holds 32 value bytes.
                    wq[j] = unsafe { _mm256_loadu_si256(block.as_ptr() as *const __m256i) };
                    aw[j] = _mm256_sign_epi8(wq[j], wq[j]);
                }
                for i in 0..R {
                    let dx = x_scales[i][b];
                    let xq = &x_values[i][b * QK..(b + 1) * QK];
                    // SAFETY: 32 values.
                    let x = unsafe { _mm256_loadu_si256(xq.as_ptr() as *const __m256i) };
                    for j in 0..C {
                        let d = _mm256_set1_ps(dw[j] * dx);
                        let sy = _mm256_sign_epi8(x, wq[j]);
                        let dot = _mm256_maddubs_epi16(aw[j], sy);
                        let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
                        acc[i][j] = _mm256_fmadd_ps(d, q, acc[i][j]);
                    }
                }
            }
            for i in 0..R {
                for j in 0..C {
                    out[i][j] = hsum(acc[i][j]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn batched_rows_equal_candles_one_row_products_bit_for_bit() {
        // Elsewhere candle's one-row products take other kernels (VNNI tiles).
        if !applies() {
            return;
        }
        let device = Device::Cpu;
        for (m, n, k) in [(1usize, 5usize, 64usize), (7, 33, 96), (16, 70, 512)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let data = q.data().unwrap();
            let ours = matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), k, &data, n).unwrap();
            let candle = QMatMul::from_qtensor(q).unwrap();
            for r in 0..m {
                let one = candle
                    .forward(&x.narrow(0, r, 1).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got = &ours[r * n..(r + 1) * n];
                for (c, (a, b)) in one.iter().zip(got).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "({m},{n},{k}) row {r} col {c}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        assert_eq!(matmul(&[0.0; 40], 40, &[], 0), Err(Q8GemmError::Depth(40)));
        assert!(matches!(
            matmul(&[0.0; 64], 32, &[0u8; 10], 1),
            Err(Q8GemmError::WeightBytes { .. })
        ));
        assert_eq!(
            matmul(&[0.0; 40], 32, &[0u8; 34], 1),
            Err(Q8GemmError::Rows(40, 32))
        );
    }
}
