//! Quantized weights for linear layers: int8 (per-output-channel absmax,
//! LLM.int8-style weight-only), llama.cpp's block types (Q8_0, Q4_K, … through
//! candle's `QTensor`), and the load-time policy that says which layers of a
//! model to quantize while it loads, one layer at a time from the
//! memory-mapped dense file (the full dense model is never in memory).
//! Weights stay quantized in memory; each forward dequantizes the one layer it
//! needs into the compute dtype and runs the dense GEMM, so speed stays close
//! to dense while the resident weights shrink 2× (int8, Q8_0 vs bf16) to 4×+.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use crate::bf16_gemm::PackedBf16;

/// A quantization a user can ask for (`[[models]] config = { quantize = ... }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// Per-output-channel absmax int8.
    Int8,
    /// llama.cpp's 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// llama.cpp's 4-bit k-quant (super-blocks of 256).
    Q4K,
    /// bf16 (round to nearest even), multiplied with AVX512-BF16 where the
    /// CPU has it ([`crate::bf16_gemm`]).
    Bf16,
}

impl QuantKind {
    /// From a config value; unknown names are an error listing the known ones.
    pub fn parse(text: &str) -> std::result::Result<Option<QuantKind>, String> {
        match text.to_ascii_lowercase().as_str() {
            "" | "none" | "f32" | "dense" => Ok(None),
            "int8" => Ok(Some(QuantKind::Int8)),
            "q8_0" => Ok(Some(QuantKind::Q8_0)),
            "q4_k" => Ok(Some(QuantKind::Q4K)),
            "bf16" => Ok(Some(QuantKind::Bf16)),
            "fp8" => Err(
                "fp8 needs FP8 matrix units (a Hopper-class GPU); this build runs fp8 nowhere: use int8, q8_0 or q4_k"
                    .into(),
            ),
            other => Err(format!(
                "unknown quantization {other:?}: use int8, q8_0, q4_k, bf16 or none"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Int8 => "int8",
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4K => "q4_k",
            QuantKind::Bf16 => "bf16",
        }
    }

    /// Input widths this kind can hold (llama.cpp blocks run along a row;
    /// Q4_K falls back to Q5_0's 32-wide blocks, see [`QuantizedWeight::quantize`]).
    fn fits(self, in_dim: usize) -> bool {
        match self {
            QuantKind::Int8 | QuantKind::Bf16 => true,
            QuantKind::Q8_0 | QuantKind::Q4K => in_dim.is_multiple_of(32),
        }
    }
}

/// A linear layer's weight held quantized.
#[derive(Debug, Clone)]
pub enum QuantizedWeight {
    /// `w[o, i] = (qt[i, o] − 128) · scale[i / group, o]`: 8-bit codes as u8,
    /// stored transposed (in × out) so dequantizing streams straight into the
    /// (in × out) matrix a forward multiplies by, with an f32 scale per
    /// `group` inputs of each output. int8: one group (per-output-channel
    /// absmax); Q8_0: groups of 32 holding llama.cpp's blocks value for value
    /// (its f16 scales widened exactly), so they dequantize as fast as int8.
    Grouped {
        kind: QuantKind,
        qt: Tensor,
        scale: Tensor,
        group: usize,
    },
    /// A llama.cpp block type, (out × in) with blocks along each row.
    Ggml(Arc<QTensor>),
    /// bf16 packed for the AVX512-BF16 kernel.
    Bf16(Arc<PackedBf16>),
}

/// Rows (or matrix rows) one parallel task dequantizes.
const ROWS_PER_TASK: usize = 16;

/// Input rows at or below this many multiply 8-bit codes directly.
const DIRECT_ROWS: usize = 4;

/// Outputs one parallel task of the direct product computes.
const OUTPUTS_PER_TASK: usize = 256;

impl QuantizedWeight {
    /// Quantize a dense (out × in) weight.
    pub fn quantize(weight: &Tensor, kind: QuantKind) -> Result<Self> {
        match kind {
            QuantKind::Int8 => {
                let w = weight.to_dtype(DType::F32)?;
                let absmax = w.abs()?.max_keepdim(1)?;
                // An all-zero row keeps a tiny step (its codes are all 128).
                let scale = (absmax.clamp(f32::MIN_POSITIVE, f32::MAX)? / 127.0)?;
                let codes = (w.broadcast_div(&scale)?.round()?.clamp(-127f32, 127f32)? + 128.0)?;
                Ok(QuantizedWeight::Grouped {
                    kind,
                    qt: codes.to_dtype(DType::U8)?.t()?.contiguous()?,
                    scale: scale.t()?.contiguous()?,
                    group: weight.dim(1)?,
                })
            }
            QuantKind::Q8_0 => Self::ggml(weight, GgmlDType::Q8_0),
            // As llama.cpp's quantizer does, rows that are not a whole number
            // of Q4_K's 256-wide super-blocks take Q5_0 instead.
            QuantKind::Q4K if weight.dim(1)?.is_multiple_of(256) => {
                Self::ggml(weight, GgmlDType::Q4K)
            }
            QuantKind::Q4K => Self::ggml(weight, GgmlDType::Q5_0),
            QuantKind::Bf16 => Ok(QuantizedWeight::Bf16(Arc::new(PackedBf16::pack(weight)?))),
        }
    }

    /// A bitsandbytes 8-bit weight as diffusers/transformers save it: int8
    /// codes (out × in, row-major) and `SCB`, each row's absmax, so
    /// `w[o, i] = code · SCB[o] / 127` (bitsandbytes' own dequantization).
    pub fn from_int8_rows(
        codes: &[i8],
        scb: &[f32],
        rows: usize,
        columns: usize,
        device: &Device,
    ) -> Result<Self> {
        if codes.len() != rows * columns || scb.len() != rows {
            candle_core::bail!(
                "{} int8 codes and {} row scales for a {rows}×{columns} weight",
                codes.len(),
                scb.len()
            );
        }
        let mut qt = vec![0u8; rows * columns];
        for (o, row) in codes.chunks_exact(columns).enumerate() {
            for (i, &q) in row.iter().enumerate() {
                qt[i * rows + o] = (i16::from(q) + 128) as u8;
            }
        }
        // bitsandbytes multiplies by the reciprocal of 127 in f32.
        let scale: Vec<f32> = scb.iter().map(|s| s * (1.0f32 / 127.0)).collect();
        Ok(QuantizedWeight::Grouped {
            kind: QuantKind::Int8,
            qt: Tensor::from_vec(qt, (columns, rows), &Device::Cpu)?.to_device(device)?,
            scale: Tensor::from_vec(scale, (1, rows), &Device::Cpu)?.to_device(device)?,
            group: columns,
        })
    }

    /// Blocks as stored in a GGUF file (or quantized by candle): Q8_0 is
    /// regrouped transposed (same values), other types stay blocks.
    pub fn from_blocks(blocks: Arc<QTensor>) -> Result<Self> {
        if blocks.dtype() != GgmlDType::Q8_0 {
            return Ok(QuantizedWeight::Ggml(blocks));
        }
        let (rows, columns) = blocks.shape().dims2()?;
        let data = blocks.data()?;
        let (qt, scale) = q8_0_transposed(&data, rows, columns)?;
        let device = blocks.device();
        Ok(QuantizedWeight::Grouped {
            kind: QuantKind::Q8_0,
            qt: Tensor::from_vec(qt, (columns, rows), &Device::Cpu)?.to_device(&device)?,
            scale: Tensor::from_vec(scale, (columns / Q8_0_GROUP, rows), &Device::Cpu)?
                .to_device(&device)?,
            group: Q8_0_GROUP,
        })
    }

    fn ggml(weight: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let device = weight.device().clone();
        // candle quantizes on the CPU; the blocks then live on `device`.
        let host = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        Self::from_blocks(Arc::new(QTensor::quantize_onto(&host, dtype, &device)?))
    }

    /// The (in × out) matrix a forward multiplies by, in `dtype`: contiguous
    /// for the grouped 8-bit kinds, a transposed view of the block types'.
    pub fn matrix_t(&self, dtype: DType) -> Result<Tensor> {
        match self {
            QuantizedWeight::Grouped {
                qt, scale, group, ..
            } => {
                let dense = match grouped_cpu(qt, scale, *group)? {
                    Some(dense) => dense,
                    None => grouped_generic(qt, scale, *group)?,
                };
                dense.to_dtype(dtype)
            }
            QuantizedWeight::Ggml(t) => {
                let dense = match ggml_cpu(t)? {
                    Some(dense) => dense,
                    None => t.dequantize(&t.device())?,
                };
                dense.to_dtype(dtype)?.t()
            }
            QuantizedWeight::Bf16(packed) => packed.matrix_t()?.to_dtype(dtype),
        }
    }

    /// `x · Wᵀ` straight from the stored weight where that beats widening
    /// it first: bf16 at any number of f32 rows on CPUs with AVX512-BF16, and
    /// 8-bit codes for a few f32 rows (FLUX's modulation runs on one
    /// conditioning vector per image), where dequantizing a whole matrix for
    /// one row costs more than the product. `None` where the
    /// dequantize-then-GEMM path applies (more rows, other kinds, off the CPU).
    pub fn matmul_few_rows(&self, x: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (qt, scale, group) = match self {
            QuantizedWeight::Grouped {
                qt, scale, group, ..
            } => (qt, scale, group),
            QuantizedWeight::Bf16(packed) if x.rank() == 2 => return packed.matmul(x),
            _ => return Ok(None),
        };
        let (rows, inputs) = x.dims2()?;
        if rows > DIRECT_ROWS || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let (code_rows, outputs) = qt.dims2()?;
        if code_rows != inputs || *group == 0 || !inputs.is_multiple_of(*group) {
            return Ok(None);
        }
        let x = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let group = *group;
        let tasks = outputs.div_ceil(OUTPUTS_PER_TASK);
        let parts = with_cpu_grouped(qt, scale, |codes, scales| {
            if codes.len() != inputs * outputs || scales.len() != inputs / group * outputs {
                return None;
            }
            let parts = (0..tasks)
                .into_par_iter()
                .map(|task| {
                    let first = task * OUTPUTS_PER_TASK;
                    let width = OUTPUTS_PER_TASK.min(outputs - first);
                    let mut total = vec![0f32; rows * width];
                    let mut partial = vec![0f32; rows * width];
                    for g in 0..inputs / group {
                        partial.fill(0.0);
                        for i in g * group..(g + 1) * group {
                            let codes = &codes[i * outputs + first..i * outputs + first + width];
                            for (r, partial) in partial.chunks_mut(width).enumerate() {
                                let a = x[r * inputs + i];
                                for (p, &c) in partial.iter_mut().zip(codes) {
                                    *p += a * (f32::from(c) - 128.0);
                                }
                            }
                        }
                        let scales = &scales[g * outputs + first..g * outputs + first + width];
                        for (total, partial) in total.chunks_mut(width).zip(partial.chunks(width)) {
                            for ((t, p), s) in total.iter_mut().zip(partial).zip(scales) {
                                *t += p * s;
                            }
                        }
                    }
                    total
                })
                .collect::<Vec<Vec<f32>>>();
            Some(parts)
        })
        .flatten();
        let Some(parts) = parts else {
            return Ok(None);
        };
        let mut y = vec![0f32; rows * outputs];
        for (task, part) in parts.iter().enumerate() {
            let first = task * OUTPUTS_PER_TASK;
            let width = part.len() / rows.max(1);
            for (r, values) in part.chunks(width.max(1)).enumerate() {
                y[r * outputs + first..r * outputs + first + width].copy_from_slice(values);
            }
        }
        Tensor::from_vec(y, (rows, outputs), &Device::Cpu).map(Some)
    }

    /// The weight as dense (out × in) in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        self.matrix_t(dtype)?.t()?.contiguous()
    }

    /// (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            QuantizedWeight::Grouped { qt, .. } => qt.dims2().map(|(i, o)| (o, i)),
            QuantizedWeight::Ggml(t) => t.shape().dims2(),
            QuantizedWeight::Bf16(packed) => Ok(packed.dims()),
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            QuantizedWeight::Grouped { qt, scale, .. } => qt.elem_count() + 4 * scale.elem_count(),
            QuantizedWeight::Ggml(t) => t.storage_size_in_bytes(),
            QuantizedWeight::Bf16(packed) => packed.bytes(),
        }
    }

    /// What kind of quantization this is, for messages.
    pub fn kind_name(&self) -> String {
        match self {
            QuantizedWeight::Grouped { kind, .. } => kind.name().into(),
            QuantizedWeight::Ggml(t) => format!("{:?}", t.dtype()).to_ascii_lowercase(),
            QuantizedWeight::Bf16(_) => QuantKind::Bf16.name().into(),
        }
    }
}

/// Inputs per scale in a regrouped Q8_0 weight (llama.cpp's block size).
const Q8_0_GROUP: usize = 32;

/// Q8_0 blocks of an (out × in) weight as (in × out) u8 codes (value + 128)
/// and (in/32 × out) f32 scales.
fn q8_0_transposed(bytes: &[u8], rows: usize, columns: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    const BLOCK_BYTES: usize = 2 + Q8_0_GROUP;
    let per_row = columns / Q8_0_GROUP;
    if !columns.is_multiple_of(Q8_0_GROUP) || bytes.len() != rows * per_row * BLOCK_BYTES {
        candle_core::bail!("{} bytes are not {rows}×{columns} Q8_0 blocks", bytes.len());
    }
    let mut codes = vec![0u8; rows * columns];
    let mut scales = vec![0f32; per_row * rows];
    for (o, row) in bytes.chunks_exact(per_row * BLOCK_BYTES).enumerate() {
        for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            scales[b * rows + o] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            for (j, &q) in block[2..].iter().enumerate() {
                codes[(b * Q8_0_GROUP + j) * rows + o] = (q as i8 as i16 + 128) as u8;
            }
        }
    }
    Ok((codes, scales))
}

/// Grouped codes dequantized with candle ops (any device).
fn grouped_generic(qt: &Tensor, scale: &Tensor, group: usize) -> Result<Tensor> {
    let (inputs, outputs) = qt.dims2()?;
    let groups = inputs / group;
    (qt.to_dtype(DType::F32)? - 128.0)?
        .reshape((groups, group, outputs))?
        .broadcast_mul(&scale.reshape((groups, 1, outputs))?)?
        .reshape((inputs, outputs))
}

/// Run `f` over a grouped weight's codes and scales as CPU slices (borrowed
/// from candle's storage); `None` off the CPU or for unexpected storage.
fn with_cpu_grouped<R>(
    qt: &Tensor,
    scale: &Tensor,
    f: impl FnOnce(&[u8], &[f32]) -> R,
) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    if !qt.device().is_cpu() {
        return None;
    }
    let (codes, codes_layout) = qt.storage_and_layout();
    let (scales, scales_layout) = scale.storage_and_layout();
    let (Storage::Cpu(CpuStorage::U8(codes)), Storage::Cpu(CpuStorage::F32(scales))) =
        (&*codes, &*scales)
    else {
        return None;
    };
    let (c0, c1) = codes_layout.contiguous_offsets()?;
    let (s0, s1) = scales_layout.contiguous_offsets()?;
    Some(f(&codes[c0..c1], &scales[s0..s1]))
}

/// Grouped codes (in × out) and scales to f32 (in × out) on the CPU in one
/// parallel pass; `None` off the CPU.
fn grouped_cpu(qt: &Tensor, scale: &Tensor, group: usize) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let (rows, columns) = qt.dims2()?;
    if group == 0 {
        return Ok(None);
    }
    let out = with_cpu_grouped(qt, scale, |codes, scales| {
        if scales.len() != rows.div_ceil(group) * columns {
            return None;
        }
        let mut out = vec![0f32; rows * columns];
        out.par_chunks_mut(columns * ROWS_PER_TASK)
            .zip(codes.par_chunks(columns * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (dst, src))| {
                let first = task * ROWS_PER_TASK;
                for (r, (dst, src)) in dst.chunks_mut(columns).zip(src.chunks(columns)).enumerate()
                {
                    let g = (first + r) / group;
                    let scales = &scales[g * columns..(g + 1) * columns];
                    for ((d, &q), &s) in dst.iter_mut().zip(src).zip(scales) {
                        *d = (f32::from(q) - 128.0) * s;
                    }
                }
            });
        Some(out)
    })
    .flatten();
    out.map(|out| Tensor::from_vec(out, (rows, columns), qt.device()))
        .transpose()
}

/// A CPU block tensor's rows dequantized in parallel (candle's own
/// dequantization runs on one thread); `None` for types without a fast path.
fn ggml_cpu(t: &QTensor) -> Result<Option<Tensor>> {
    use candle_core::quantized::k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K,
        BlockQ6K, BlockQ8_0,
    };
    if !t.device().is_cpu() {
        return Ok(None);
    }
    let (rows, columns) = t.shape().dims2()?;
    let data = t.data()?;
    let out = match t.dtype() {
        GgmlDType::Q8_0 => blocks_to_f32::<BlockQ8_0>(&data, rows, columns),
        GgmlDType::Q4_0 => blocks_to_f32::<BlockQ4_0>(&data, rows, columns),
        GgmlDType::Q4_1 => blocks_to_f32::<BlockQ4_1>(&data, rows, columns),
        GgmlDType::Q5_0 => blocks_to_f32::<BlockQ5_0>(&data, rows, columns),
        GgmlDType::Q5_1 => blocks_to_f32::<BlockQ5_1>(&data, rows, columns),
        GgmlDType::Q2K => blocks_to_f32::<BlockQ2K>(&data, rows, columns),
        GgmlDType::Q3K => blocks_to_f32::<BlockQ3K>(&data, rows, columns),
        GgmlDType::Q4K => blocks_to_f32::<BlockQ4K>(&data, rows, columns),
        GgmlDType::Q5K => blocks_to_f32::<BlockQ5K>(&data, rows, columns),
        GgmlDType::Q6K => blocks_to_f32::<BlockQ6K>(&data, rows, columns),
        _ => None,
    };
    out.map(|out| Tensor::from_vec(out, (rows, columns), &Device::Cpu))
        .transpose()
}

fn blocks_to_f32<B: candle_core::quantized::GgmlType + Sync>(
    bytes: &[u8],
    rows: usize,
    columns: usize,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let block_bytes = std::mem::size_of::<B>();
    if !columns.is_multiple_of(B::BLCK_SIZE)
        || bytes.len() != rows * (columns / B::BLCK_SIZE) * block_bytes
        || bytes.as_ptr().align_offset(std::mem::align_of::<B>()) != 0
    {
        return None;
    }
    // SAFETY: candle keeps a CPU QTensor's blocks as a `Vec<B>` and hands out
    // its bytes; the length and alignment were just checked, and the block
    // types are `repr(C)` plain data valid for any bit pattern.
    let blocks: &[B] = unsafe {
        std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / block_bytes)
    };
    let per_row = columns / B::BLCK_SIZE;
    let mut out = vec![0f32; rows * columns];
    out.par_chunks_mut(columns * ROWS_PER_TASK)
        .zip(blocks.par_chunks(per_row * ROWS_PER_TASK))
        .for_each(|(ys, xs)| B::to_float(xs, ys));
    Some(out)
}

/// Which layers of a model quantize while it loads.
#[derive(Clone, Copy)]
pub struct LoadPolicy {
    pub kind: QuantKind,
    /// Layers (by checkpoint name) that stay dense: norms, embeddings,
    /// modulation, final layers, as bitsandbytes/diffusers keep them.
    pub keep_dense: fn(&str) -> bool,
}

thread_local! {
    static POLICY: RefCell<Option<LoadPolicy>> = const { RefCell::new(None) };
}

/// Run `load` with `policy` applying to the linear layers it loads on this
/// thread (restored afterwards, also on panic).
pub fn while_loading<T>(policy: Option<LoadPolicy>, load: impl FnOnce() -> T) -> T {
    struct Restore(Option<LoadPolicy>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            POLICY.with(|p| *p.borrow_mut() = previous);
        }
    }
    let previous = POLICY.with(|p| p.replace(policy));
    let _restore = Restore(previous);
    load()
}

/// Where a load finds linear weights already quantized, under the model's own
/// tensor names: a GGUF file's block matrices, a bitsandbytes 8-bit file's
/// int8 rows.
pub trait StoredQuantized {
    fn quantized(&self, name: &str, device: &Device) -> Result<Option<QuantizedWeight>>;
}

thread_local! {
    static STORED: RefCell<Option<Arc<dyn StoredQuantized>>> = const { RefCell::new(None) };
}

/// Run `load` with the linear layers it loads on this thread taking their
/// weights from `stored` as stored when it has them (restored afterwards).
pub fn while_reading_quantized<T>(
    stored: Option<Arc<dyn StoredQuantized>>,
    load: impl FnOnce() -> T,
) -> T {
    struct Restore(Option<Arc<dyn StoredQuantized>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            STORED.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = STORED.with(|s| s.replace(stored));
    let _restore = Restore(previous);
    load()
}

/// Weight `name` as stored quantized, when the current load reads a file
/// that holds it so.
pub(crate) fn stored_quantized(name: &str, device: &Device) -> Result<Option<QuantizedWeight>> {
    let stored = STORED.with(|s| s.borrow().clone());
    match stored {
        Some(stored) => stored.quantized(name, device),
        None => Ok(None),
    }
}

/// The quantization the current load asks of layer `name` of input width
/// `in_dim`, if any.
pub(crate) fn for_layer(name: &str, in_dim: usize) -> Option<QuantKind> {
    POLICY.with(|p| {
        p.borrow().and_then(|policy| {
            (!(policy.keep_dense)(name) && policy.kind.fits(in_dim)).then_some(policy.kind)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &Tensor, b: &Tensor) -> f32 {
        let dot = (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn each_kind_round_trips_close_to_the_dense_weight() {
        let w = Tensor::randn(0f32, 0.05, (64, 512), &Device::Cpu).unwrap();
        for (kind, bound) in [
            (QuantKind::Int8, 0.9999),
            (QuantKind::Q8_0, 0.9999),
            (QuantKind::Q4K, 0.99),
        ] {
            let q = QuantizedWeight::quantize(&w, kind).unwrap();
            let back = q.dequantize(DType::F32).unwrap();
            assert_eq!(back.dims(), w.dims());
            let c = cosine(&back, &w);
            assert!(c >= bound, "{kind:?}: cosine {c}");
            assert!(
                q.bytes() < 512 * 64 * 4 / 3,
                "{kind:?}: {} bytes",
                q.bytes()
            );
        }
        // int8 is exact where the row's values are multiples of its step.
        let exact =
            Tensor::new(&[[-127f32, 0.0, 63.5 * 2.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let q = QuantizedWeight::quantize(&exact, QuantKind::Int8).unwrap();
        let back = q.dequantize(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back, vec![vec![-127.0, 0.0, 127.0], vec![0.0, 0.0, 0.0]]);
    }

    #[test]
    fn the_parallel_cpu_dequantization_equals_candles() {
        let w = Tensor::randn(0f32, 1.0, (50, 512), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let t = QTensor::quantize(&w, dtype).unwrap();
            let fast = ggml_cpu(&t).unwrap().expect("a fast path");
            let reference = t.dequantize(&Device::Cpu).unwrap();
            let diff = (fast - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
        }
        for kind in [QuantKind::Int8, QuantKind::Q8_0] {
            let q = QuantizedWeight::quantize(&w, kind).unwrap();
            let QuantizedWeight::Grouped {
                qt, scale, group, ..
            } = &q
            else {
                panic!("{kind:?} is grouped")
            };
            let fast = grouped_cpu(qt, scale, *group)
                .unwrap()
                .expect("a fast path");
            let generic = grouped_generic(qt, scale, *group).unwrap();
            let diff = (&fast - generic).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{kind:?}");
            assert_eq!(q.kind_name(), kind.name());
            if kind == QuantKind::Q8_0 {
                // Regrouped Q8_0 holds candle's blocks value for value.
                let blocks = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
                let reference = blocks.dequantize(&Device::Cpu).unwrap();
                let diff = (fast.t().unwrap() - reference)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "Q8_0 values");
            }
        }
    }

    #[test]
    fn a_few_rows_multiply_the_codes_as_the_dequantized_matrix_does() {
        let w = Tensor::randn(0f32, 0.05, (300, 512), &Device::Cpu).unwrap();
        for kind in [QuantKind::Int8, QuantKind::Q8_0] {
            let q = QuantizedWeight::quantize(&w, kind).unwrap();
            for rows in [1, 3] {
                let x = Tensor::randn(0f32, 1.0, (rows, 512), &Device::Cpu).unwrap();
                let direct = q.matmul_few_rows(&x).unwrap().expect("a direct product");
                let gemm = x.matmul(&q.matrix_t(DType::F32).unwrap()).unwrap();
                assert_eq!(direct.dims(), &[rows, 300]);
                let diff = (&direct - &gemm).unwrap().abs().unwrap().max_all().unwrap();
                let scale = gemm.abs().unwrap().max_all().unwrap();
                let relative = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
                assert!(relative < 1e-5, "{kind:?} × {rows} rows: {relative:e}");
            }
            let many = Tensor::zeros((DIRECT_ROWS + 1, 512), DType::F32, &Device::Cpu).unwrap();
            assert!(q.matmul_few_rows(&many).unwrap().is_none());
        }
    }

    #[test]
    fn kinds_parse_with_clear_errors() {
        assert_eq!(QuantKind::parse("INT8").unwrap(), Some(QuantKind::Int8));
        assert_eq!(QuantKind::parse("none").unwrap(), None);
        assert!(QuantKind::parse("fp8").unwrap_err().contains("FP8"));
        assert!(
            QuantKind::parse("q3")
                .unwrap_err()
                .contains("int8, q8_0, q4_k")
        );
        assert!(!QuantKind::Q4K.fits(300) && QuantKind::Q8_0.fits(320));
        // Q4_K rows narrower than its super-block fall back to Q5_0.
        let narrow = Tensor::randn(0f32, 1.0, (8, 320), &Device::Cpu).unwrap();
        let q = QuantizedWeight::quantize(&narrow, QuantKind::Q4K).unwrap();
        assert_eq!(q.kind_name(), "q5_0");
        assert!(QuantKind::Q4K.fits(320));
    }
}
