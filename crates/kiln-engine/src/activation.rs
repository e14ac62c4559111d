//! Activations and softmax for f32 on CPU: vectorised (AVX-512 or AVX2+FMA when the
//! CPU has them) and split across threads, where candle's CPU ops call libm's scalar
//! `tanhf`/`expf` per element on one thread (its tanh-GELU is ~4× torch's time).
//! Every other device and dtype goes to candle's own op, so results there are
//! unchanged.
//!
//! Accuracy: see [`crate::fastmath`] for `exp` and `erfc`. The tests below
//! check each kernel against f64 references over wide ranges.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_op::contiguous_f32;
use crate::fastmath::{erfc_non_negative, exp};

/// Elements per parallel work item: large enough that scheduling is noise.
const CHUNK: usize = 1 << 15;

/// One element-wise function, inlined into the vectorised loops below, with
/// the candle op that computes it on other devices and dtypes.
trait Pointwise: Send + Sync + 'static {
    const NAME: &'static str;
    fn apply(x: f32) -> f32;
    fn fallback(x: &Tensor) -> Result<Tensor>;
}

/// x · Φ(x) with the tanh approximation (`gelu(approximate="tanh")`), as
/// x · sigmoid(2u) since ½(1 + tanh u) = sigmoid(2u): no cancellation for any x.
struct GeluTanhKernel;
impl Pointwise for GeluTanhKernel {
    const NAME: &'static str = "kiln-gelu-tanh";

    fn fallback(x: &Tensor) -> Result<Tensor> {
        x.gelu()
    }

    #[inline(always)]
    fn apply(x: f32) -> f32 {
        const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
        let u2 = TWO_SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
        x / (1.0 + exp(-u2))
    }
}

/// x · Φ(x) exactly (`gelu(approximate="none")`), through erfc so the negative
/// tail keeps its relative precision.
struct GeluErfKernel;
impl Pointwise for GeluErfKernel {
    const NAME: &'static str = "kiln-gelu-erf";

    fn fallback(x: &Tensor) -> Result<Tensor> {
        x.gelu_erf()
    }

    #[inline(always)]
    fn apply(x: f32) -> f32 {
        let tail = erfc_non_negative(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
        if x >= 0.0 {
            x * (1.0 - 0.5 * tail)
        } else {
            0.5 * x * tail
        }
    }
}

/// x · sigmoid(x).
struct SiluKernel;
impl Pointwise for SiluKernel {
    const NAME: &'static str = "kiln-silu";

    fn fallback(x: &Tensor) -> Result<Tensor> {
        x.silu()
    }

    #[inline(always)]
    fn apply(x: f32) -> f32 {
        silu_value(x)
    }
}

/// x · sigmoid(x) for one value (inlined into vectorised loops; the fused
/// group norm + SiLU uses it too, so both give the same bits).
#[inline(always)]
pub(crate) fn silu_value(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// x · sigmoid(1.702 x) (CLIP's `quick_gelu`).
struct QuickGeluKernel;
impl Pointwise for QuickGeluKernel {
    const NAME: &'static str = "kiln-quick-gelu";

    fn fallback(x: &Tensor) -> Result<Tensor> {
        x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
    }

    #[inline(always)]
    fn apply(x: f32) -> f32 {
        x / (1.0 + exp(-1.702 * x))
    }
}

#[inline(always)]
fn map_portable<K: Pointwise>(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = K::apply(s);
    }
}

crate::simd_dispatch!(fn map_slice<K: Pointwise>(src: &[f32], dst: &mut [f32]) => map_portable);

fn map_parallel<K: Pointwise>(src: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    // One chunk's work (an LLM decode step's activations) stays on this thread:
    // handing it to rayon wakes a worker that then spins, taking a core from
    // the quantized matmul that follows.
    if src.len() <= CHUNK {
        map_slice::<K>(src, &mut out);
        return out;
    }
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| map_slice::<K>(s, d));
    out
}

/// A candle op around one pointwise kernel (CPU, f32, contiguous).
struct PointwiseOp<K: Pointwise>(std::marker::PhantomData<K>);

impl<K: Pointwise> CustomOp1 for PointwiseOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = map_parallel::<K>(contiguous_f32(storage, layout, K::NAME)?);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

fn fast_path(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// `K` on CPU f32 tensors, candle's op elsewhere.
fn pointwise<K: Pointwise>(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?
            .apply_op1_no_bwd(&PointwiseOp::<K>(std::marker::PhantomData))
    } else {
        K::fallback(x)
    }
}

/// GELU with the tanh approximation (candle's `gelu`, torch's `approximate="tanh"`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    pointwise::<GeluTanhKernel>(x)
}

/// Exact GELU (candle's `gelu_erf`, torch's default `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    pointwise::<GeluErfKernel>(x)
}

/// SiLU (swish): x · sigmoid(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    pointwise::<SiluKernel>(x)
}

/// CLIP's quick GELU: x · sigmoid(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    pointwise::<QuickGeluKernel>(x)
}

/// Lanes of the softmax reductions: one AVX-512 register, two AVX2 ones.
const SOFTMAX_LANES: usize = 16;

/// The largest value of a row, in independent lanes so the reduction vectorises.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; SOFTMAX_LANES];
    let mut chunks = row.chunks_exact(SOFTMAX_LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    chunks.remainder().iter().fold(
        lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        |a, &b| a.max(b),
    )
}

/// Divide a row of exponentials by their sum: blocks of 1024 summed in f32
/// lanes, blocks added in f64, so long rows (attention over thousands of
/// tokens) keep a relative error near 1e-7.
#[inline(always)]
fn normalise_by_sum(row: &mut [f32]) {
    let mut sum = 0f64;
    for block in row.chunks(1024) {
        let mut lanes = [0f32; SOFTMAX_LANES];
        let mut chunks = block.chunks_exact(SOFTMAX_LANES);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += v;
            }
        }
        sum += f64::from(chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>());
    }
    let inverse = (1.0 / sum) as f32;
    for d in row.iter_mut() {
        *d *= inverse;
    }
}

#[inline(always)]
fn softmax_rows_body(src: &[f32], dst: &mut [f32], row: usize) {
    for (s, d) in src.chunks(row).zip(dst.chunks_mut(row)) {
        let max = row_max(s);
        for (d, &s) in d.iter_mut().zip(s) {
            *d = exp(s - max);
        }
        normalise_by_sum(d);
    }
}

crate::simd_dispatch!(fn softmax_rows(src: &[f32], dst: &mut [f32], row: usize) => softmax_rows_body);

#[inline(always)]
fn softmax_rows_in_place_body(data: &mut [f32], row: usize) {
    for r in data.chunks_mut(row) {
        let max = row_max(r);
        for d in r.iter_mut() {
            *d = exp(*d - max);
        }
        normalise_by_sum(r);
    }
}

crate::simd_dispatch!(
    /// Softmax over each `row`-long row of `data`, in place (the fused
    /// attention's score rows), vectorised for this CPU.
    pub(crate) fn softmax_rows_in_place(data: &mut [f32], row: usize) => softmax_rows_in_place_body
);

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "kiln-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let row = layout.dims().last().copied().unwrap_or(1).max(1);
        let src = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; src.len()];
        let rows_per_item = (CHUNK / row).max(1);
        if src.len() <= rows_per_item * row {
            softmax_rows(src, &mut out, row);
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        out.par_chunks_mut(rows_per_item * row)
            .zip(src.par_chunks(rows_per_item * row))
            .for_each(|(d, s)| softmax_rows(s, d, row));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Softmax over the last dimension (candle_nn's `softmax_last_dim`).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) && x.rank() > 0 {
        x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        (-4000..=4000).map(|i| i as f32 * 0.0025).collect()
    }

    fn worst_relative(ours: &[f32], reference: impl Fn(f64) -> f64, inputs: &[f32]) -> f64 {
        inputs
            .iter()
            .zip(ours)
            .map(|(&x, &y)| {
                let r = reference(f64::from(x));
                (f64::from(y) - r).abs() / r.abs().max(1e-30)
            })
            .fold(0.0, f64::max)
    }

    fn erf(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.28 is too coarse for a reference; integrate instead.
        let steps = 20_000;
        let h = x / steps as f64;
        let f = |t: f64| (-t * t).exp();
        let mut sum = f(0.0) + f(x);
        for i in 1..steps {
            sum += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        sum * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_f64() {
        let inputs: Vec<f32> = (-870..880).map(|i| i as f32 * 0.1 + 0.013).collect();
        let ours: Vec<f32> = inputs.iter().map(|&x| exp(x)).collect();
        let worst = worst_relative(&ours, f64::exp, &inputs);
        assert!(worst < 4.0 * f64::from(f32::EPSILON), "{worst}");
        assert_eq!(exp(-200.0), exp(-87.0));
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn activations_match_f64_references() {
        let inputs = grid();
        let x = Tensor::new(inputs.as_slice(), &Device::Cpu).unwrap();
        let sqrt_2_over_pi = (2.0 / std::f64::consts::PI).sqrt();
        type Reference = Box<dyn Fn(f64) -> f64>;
        let cases: [(Tensor, Reference, f64); 4] = [
            (
                gelu_tanh(&x).unwrap(),
                Box::new(move |v| {
                    0.5 * v * (1.0 + (sqrt_2_over_pi * (v + 0.044715 * v * v * v)).tanh())
                }),
                1e-5,
            ),
            (
                gelu_erf(&x).unwrap(),
                Box::new(|v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))),
                1e-5,
            ),
            (
                silu(&x).unwrap(),
                Box::new(|v| v / (1.0 + (-v).exp())),
                1e-6,
            ),
            (
                quick_gelu(&x).unwrap(),
                Box::new(|v| v / (1.0 + (-1.702 * v).exp())),
                1e-6,
            ),
        ];
        for (i, (ours, reference, tolerance)) in cases.into_iter().enumerate() {
            let ours = ours.to_vec1::<f32>().unwrap();
            // Relative error where the value is not tiny; absolute near zero.
            let worst = inputs
                .iter()
                .zip(&ours)
                .map(|(&v, &y)| {
                    let r = reference(f64::from(v));
                    (f64::from(y) - r).abs() / r.abs().max(1e-3)
                })
                .fold(0.0, f64::max);
            assert!(worst < tolerance, "case {i}: {worst}");
        }
    }

    #[test]
    fn matches_candle_on_strided_and_multi_chunk_input() {
        let x = Tensor::randn(0f32, 3.0, (3, 40_000), &Device::Cpu).unwrap();
        let strided = x.t().unwrap();
        for (ours, theirs) in [
            (gelu_tanh(&strided).unwrap(), strided.gelu().unwrap()),
            (silu(&strided).unwrap(), strided.silu().unwrap()),
            (gelu_erf(&x).unwrap(), x.gelu_erf().unwrap()),
        ] {
            assert_eq!(ours.dims(), theirs.dims());
            let diff = crate::parity::compare(&ours, &theirs).unwrap().max_abs;
            assert!(diff < 1e-5, "{diff}");
        }
    }

    #[test]
    fn softmax_matches_an_f64_reference() {
        for shape in [(2usize, 5usize, 7usize), (3, 4, 1000), (1, 2, 40_000)] {
            let x = (Tensor::randn(0f32, 4.0, shape, &Device::Cpu).unwrap() + 50.0).unwrap();
            for input in [x.clone(), x.transpose(1, 2).unwrap()] {
                let ours = softmax_last_dim(&input).unwrap();
                let row = input.dims()[2];
                let values = input.contiguous().unwrap().flatten_all().unwrap();
                let values = values.to_vec1::<f32>().unwrap();
                let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (v, o) in values.chunks(row).zip(ours.chunks(row)) {
                    let max = v
                        .iter()
                        .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
                    let e: Vec<f64> = v.iter().map(|&b| (f64::from(b) - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for (reference, &ours) in e.iter().map(|e| e / sum).zip(o) {
                        let error = (f64::from(ours) - reference).abs();
                        assert!(
                            error <= 1e-7 + 2e-6 * reference,
                            "{shape:?}: {ours} vs {reference}"
                        );
                    }
                }
            }
        }
    }
}
