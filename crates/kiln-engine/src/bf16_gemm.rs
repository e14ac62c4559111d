//! bf16 weights for linear layers, multiplied with AVX512-BF16's `vdpbf16ps`
//! (Zen 4/5, Cooper Lake and later Xeons): twice the multiply-adds per
//! instruction of f32 FMA, half the weight memory. Activations stay f32 and
//! are rounded to bf16 (round to nearest even, as torch rounds) only as they
//! enter the product; products accumulate in f32, as oneDNN's bf16 matmul
//! that torch runs on such CPUs does. Norms, activations and attention stay f32.
//!
//! Weights are packed once, at load, into the kernel's layout: panels of 64
//! outputs, each a run of input pairs holding 64 × 2 bf16 (four registers).
//! The kernel keeps a 6-row × 64-output tile of sums in 24 registers. CPUs
//! without AVX512-BF16 widen the weight to f32 and run the f32 GEMM.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_op::DisjointOut;

/// Outputs per packed panel (four 16-lane registers).
const PANEL: usize = 64;
/// Rows per kernel tile.
const TILE_ROWS: usize = 6;
/// Input pairs per cache block: a panel's block (256 KiB) stays in L2.
const BLOCK_PAIRS: usize = 1024;
/// Rows per parallel task: a task reuses its panel block across them.
const TASK_ROWS: usize = 16 * TILE_ROWS;

/// A (out × in) weight as packed bf16 pairs.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    outputs: usize,
    inputs: usize,
    /// `ceil(inputs / 2)`.
    pairs: usize,
    /// Panel p, pair j, output lane l: `words[(p · pairs + j) · PANEL + l]`,
    /// the bf16 of inputs 2j (low half) and 2j + 1 (high half); zero past
    /// the last output or input.
    words: Vec<u32>,
}

fn bf16_bits(x: f32) -> u32 {
    u32::from(half::bf16::from_f32(x).to_bits())
}

impl PackedBf16 {
    /// Round a dense (out × in) weight to bf16 and pack it.
    pub fn pack(weight: &Tensor) -> Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        let dense = weight
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let pairs = inputs.div_ceil(2);
        let panels = outputs.div_ceil(PANEL);
        let mut words = vec![0u32; panels * pairs * PANEL];
        words
            .par_chunks_mut(pairs * PANEL)
            .enumerate()
            .for_each(|(panel, words)| {
                for lane in 0..PANEL.min(outputs - panel * PANEL) {
                    let row = &dense[(panel * PANEL + lane) * inputs..][..inputs];
                    for (pair, values) in row.chunks(2).enumerate() {
                        let high = values.get(1).map_or(0, |&v| bf16_bits(v));
                        words[pair * PANEL + lane] = bf16_bits(values[0]) | (high << 16);
                    }
                }
            });
        Ok(PackedBf16 {
            outputs,
            inputs,
            pairs,
            words,
        })
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        (self.outputs, self.inputs)
    }

    /// Bytes held in memory (padding to whole panels included).
    pub fn bytes(&self) -> usize {
        4 * self.words.len()
    }

    /// The weight widened to f32, (in × out) as the f32 GEMM multiplies by
    /// (CPUs without AVX512-BF16 take this per forward): one input row per
    /// task, written in order.
    pub fn matrix_t(&self) -> Result<Tensor> {
        let mut dense = vec![0f32; self.inputs * self.outputs];
        dense
            .par_chunks_mut(self.outputs.max(1))
            .enumerate()
            .for_each(|(input, row)| {
                let shift = if input % 2 == 0 { 0 } else { 16 };
                for (panel, outputs) in row.chunks_mut(PANEL).enumerate() {
                    let words = &self.words[(panel * self.pairs + input / 2) * PANEL..][..PANEL];
                    for (d, &word) in outputs.iter_mut().zip(words) {
                        *d = f32::from_bits(((word >> shift) & 0xffff) << 16);
                    }
                }
            });
        Tensor::from_vec(dense, (self.inputs, self.outputs), &Device::Cpu)
    }

    /// `x (rows × in) · Wᵀ` in f32 with the bf16 kernel; `None` where this
    /// CPU lacks AVX512-BF16 or `x` is not f32 on the CPU.
    pub fn matmul(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !has_avx512_bf16() || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let (rows, inputs) = x.dims2()?;
        if inputs != self.inputs {
            candle_core::bail!(
                "bf16 matmul: input has {inputs} columns, weight expects {}",
                self.inputs
            );
        }
        x.contiguous()?
            .apply_op1_no_bwd(&Bf16Product { weight: self, rows })
            .map(Some)
    }

    #[cfg(target_arch = "x86_64")]
    fn product(&self, a: &[u32], rows: usize, y: &mut [f32]) {
        let panels = self.outputs.div_ceil(PANEL);
        let row_tasks = rows.div_ceil(TASK_ROWS);
        let y_ptr = DisjointOut::new(y);
        (0..panels * row_tasks).into_par_iter().for_each(|task| {
            let (panel, row_task) = (task / row_tasks, task % row_tasks);
            let first_row = row_task * TASK_ROWS;
            let task_rows = TASK_ROWS.min(rows - first_row);
            let columns = PANEL.min(self.outputs - panel * PANEL);
            let weights = &self.words[panel * self.pairs * PANEL..][..self.pairs * PANEL];
            for first_pair in (0..self.pairs).step_by(BLOCK_PAIRS) {
                let block = BLOCK_PAIRS.min(self.pairs - first_pair);
                for tile in (0..task_rows).step_by(TILE_ROWS) {
                    let row = first_row + tile;
                    let tile_rows = TILE_ROWS.min(task_rows - tile);
                    let tile_spec = Tile {
                        a: &a[row * self.pairs + first_pair..],
                        a_stride: self.pairs,
                        b: &weights[first_pair * PANEL..][..block * PANEL],
                        pairs: block,
                        rows: tile_rows,
                        columns,
                        accumulate: first_pair > 0,
                    };
                    // SAFETY: `has_avx512_bf16` was checked by `matmul`; the
                    // tile's output rows row..row + tile_rows, columns of this
                    // panel, lie inside `y` and no other task writes them.
                    unsafe {
                        let c = y_ptr.get().add(row * self.outputs + panel * PANEL);
                        tile_spec.run(c, self.outputs);
                    }
                }
            }
        });
    }
}

/// `x · Wᵀ` as a candle op, reading the activations where they lie.
struct Bf16Product<'a> {
    weight: &'a PackedBf16,
    rows: usize,
}

impl CustomOp1 for Bf16Product<'_> {
    fn name(&self) -> &'static str {
        "kiln-bf16-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu_op::contiguous_f32(storage, layout, self.name())?;
        let outputs = self.weight.outputs;
        let mut y = vec![0f32; self.rows * outputs];
        #[cfg(target_arch = "x86_64")]
        {
            let a = to_bf16_pairs(x, self.rows, self.weight.inputs, self.weight.pairs);
            self.weight.product(&a, self.rows, &mut y);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = x;
        Ok((CpuStorage::F32(y), Shape::from((self.rows, outputs))))
    }
}

/// True when this CPU runs `vdpbf16ps` (and AVX-512 F/BW/VL around it).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::level() >= crate::simd::Level::Avx512
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of f32 as bf16 pairs (`pairs` words per row, the last pair's high
/// half zero for odd widths), rounded to nearest even.
#[cfg(target_arch = "x86_64")]
fn to_bf16_pairs(x: &[f32], rows: usize, inputs: usize, pairs: usize) -> Vec<u32> {
    let mut out = vec![0u32; rows * pairs];
    out.par_chunks_mut(pairs.max(1))
        .zip(x.par_chunks(inputs.max(1)))
        .for_each(|(dst, src)| {
            // SAFETY: callers reach here only after `has_avx512_bf16`.
            unsafe { round_row(src, dst) }
        });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
fn round_row(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let whole = src.len() / 32;
    for i in 0..whole {
        // SAFETY: 32 floats from 32·i and 16 words from 16·i are in bounds
        // (dst holds ceil(len / 2) words).
        unsafe {
            let low = _mm512_loadu_ps(src.as_ptr().add(32 * i));
            let high = _mm512_loadu_ps(src.as_ptr().add(32 * i + 16));
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i).cast(), packed);
        }
    }
    for (pair, values) in src[32 * whole..].chunks(2).enumerate() {
        let high = values.get(1).map_or(0, |&v| bf16_bits(v));
        dst[16 * whole + pair] = bf16_bits(values[0]) | (high << 16);
    }
}

/// One kernel call: up to 6 rows of activations (pairs, row stride
/// `a_stride` words) against one panel block.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    a: &'a [u32],
    a_stride: usize,
    b: &'a [u32],
    pairs: usize,
    rows: usize,
    columns: usize,
    /// Add to what the output holds (later input blocks) rather than overwrite.
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// # Safety
    /// The CPU has AVX512-BF16; `c` points at `rows` rows of `columns` floats,
    /// `c_stride` apart, that only this call writes.
    unsafe fn run(&self, c: *mut f32, c_stride: usize) {
        assert!(self.rows >= 1 && self.rows <= TILE_ROWS && self.columns <= PANEL);
        assert!(self.b.len() >= self.pairs * PANEL);
        assert!(self.a.len() >= (self.rows - 1) * self.a_stride + self.pairs);
        // SAFETY: as the caller promised; the asserts bound every read.
        unsafe {
            match self.rows {
                1 => self.kernel::<1>(c, c_stride),
                2 => self.kernel::<2>(c, c_stride),
                3 => self.kernel::<3>(c, c_stride),
                4 => self.kernel::<4>(c, c_stride),
                5 => self.kernel::<5>(c, c_stride),
                _ => self.kernel::<6>(c, c_stride),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn kernel<const ROWS: usize>(&self, c: *mut f32, c_stride: usize) {
        use std::arch::x86_64::*;
        let lanes = |register: usize| -> __mmask16 {
            let valid = self.columns.saturating_sub(16 * register).min(16);
            ((1u32 << valid) - 1) as __mmask16
        };
        let masks = [lanes(0), lanes(1), lanes(2), lanes(3)];
        let mut sums = [[_mm512_setzero_ps(); 4]; ROWS];
        if self.accumulate {
            for (r, row) in sums.iter_mut().enumerate() {
                for (k, sum) in row.iter_mut().enumerate() {
                    // SAFETY: masked lanes stay inside the tile's columns.
                    *sum = unsafe { _mm512_maskz_loadu_ps(masks[k], c.add(r * c_stride + 16 * k)) };
                }
            }
        }
        let (a, b) = (self.a.as_ptr(), self.b.as_ptr());
        for pair in 0..self.pairs {
            // SAFETY: pair < pairs and r < ROWS are inside the asserted bounds.
            unsafe {
                let w: [__m512bh; 4] = std::array::from_fn(|k| {
                    std::mem::transmute(_mm512_loadu_si512(b.add(pair * PANEL + 16 * k).cast()))
                });
                for (r, row) in sums.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                        *a.add(r * self.a_stride + pair) as i32,
                    ));
                    for (sum, w) in row.iter_mut().zip(&w) {
                        *sum = _mm512_dpbf16_ps(*sum, x, *w);
                    }
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            for (k, sum) in row.iter().enumerate() {
                // SAFETY: masked lanes stay inside the tile's columns.
                unsafe { _mm512_mask_storeu_ps(c.add(r * c_stride + 16 * k), masks[k], *sum) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    /// The product of the bf16-rounded operands in f64.
    fn reference(x: &[f32], w: &[f32], (rows, outputs, inputs): (usize, usize, usize)) -> Vec<f64> {
        let mut y = vec![0f64; rows * outputs];
        for r in 0..rows {
            for o in 0..outputs {
                y[r * outputs + o] = (0..inputs)
                    .map(|i| {
                        f64::from(round(x[r * inputs + i])) * f64::from(round(w[o * inputs + i]))
                    })
                    .sum();
            }
        }
        y
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn packing_round_trips_the_rounded_weights() {
        let (outputs, inputs) = (70, 9);
        let w = pseudo(outputs * inputs, 1);
        let packed = PackedBf16::pack(
            &Tensor::from_vec(w.clone(), (outputs, inputs), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let back = packed
            .matrix_t()
            .unwrap()
            .t()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected: Vec<f32> = w.iter().map(|&v| round(v)).collect();
        assert_eq!(back, expected);
    }

    /// Every tile shape (rows 1–6 and more, partial panels, odd widths,
    /// several input blocks) against the f64 product of the rounded operands:
    /// only f32 accumulation separates them.
    #[test]
    fn kernel_matches_the_rounded_product() {
        if !has_avx512_bf16() {
            eprintln!(
                "skipped: this CPU has no AVX512-BF16 (the f32 fallback is tested elsewhere)"
            );
            return;
        }
        for (rows, outputs, inputs) in [
            (1, 1, 1),
            (5, 63, 7),
            (7, 64, 32),
            (100, 130, 33),
            (13, 65, 4500),
        ] {
            let x = pseudo(rows * inputs, 2);
            let w = pseudo(outputs * inputs, 3);
            let packed = PackedBf16::pack(
                &Tensor::from_vec(w.clone(), (outputs, inputs), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let xt = Tensor::from_vec(x.clone(), (rows, inputs), &Device::Cpu).unwrap();
            let y = packed
                .matmul(&xt)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let expected = reference(&x, &w, (rows, outputs, inputs));
            let scale = (inputs as f64).sqrt() * 0.1;
            for (i, (&got, &want)) in y.iter().zip(&expected).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * scale.max(1.0),
                    "{rows}x{outputs}x{inputs} at {i}: {got} vs {want}"
                );
            }
        }
    }
}
