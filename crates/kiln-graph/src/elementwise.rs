//! Element-wise kernels on CPU: the scalar functions every unary/binary op and
//! the fused programs share, run over chunks that stay in L1, split across
//! threads for large tensors.

use candle_core::{Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{GraphError, Result};
use crate::ops::{BinaryOp, Instr, UnaryOp};

/// Elements per chunk: a program's registers for one chunk fit in L1.
const CHUNK: usize = 512;
/// Below this many elements one thread does the work.
const PARALLEL_FROM: usize = 1 << 15;

/// Floats the kernels compute in: whole-slice maps, one loop per op so each
/// vectorises (f32 through Kiln's branch-free fast math, f64 through std).
pub trait Float: WithDType + Copy + Send + Sync + PartialOrd + 'static {
    fn of(x: f64) -> Self;
    fn map_unary(op: UnaryOp, src: &[Self], dst: &mut [Self]);
    fn map_binary(op: BinaryOp, a: &[Self], b: &[Self], dst: &mut [Self]);
}

macro_rules! map1 {
    ($src:expr, $dst:expr, |$x:ident| $body:expr) => {
        for (d, &$x) in $dst.iter_mut().zip($src) {
            *d = $body;
        }
    };
}

macro_rules! map2 {
    ($a:expr, $b:expr, $dst:expr, |$x:ident, $y:ident| $body:expr) => {
        for ((d, &$x), &$y) in $dst.iter_mut().zip($a).zip($b) {
            *d = $body;
        }
    };
}

macro_rules! binary_loops {
    ($t:ty, $op:expr, $a:expr, $b:expr, $dst:expr, $pow:expr) => {
        match $op {
            BinaryOp::Add => map2!($a, $b, $dst, |x, y| x + y),
            BinaryOp::Sub => map2!($a, $b, $dst, |x, y| x - y),
            BinaryOp::Mul => map2!($a, $b, $dst, |x, y| x * y),
            BinaryOp::Div => map2!($a, $b, $dst, |x, y| x / y),
            BinaryOp::Pow => map2!($a, $b, $dst, |x, y| $pow(x, y)),
            // NaN propagates as numpy's maximum/minimum do.
            BinaryOp::Max => map2!($a, $b, $dst, |x, y| if x.is_nan() || x > y { x } else { y }),
            BinaryOp::Min => map2!($a, $b, $dst, |x, y| if x.is_nan() || x < y { x } else { y }),
        }
    };
}

fn pow_f32(x: f32, y: f32) -> f32 {
    // Squares and cubes (GELU's x³, variances) without a libm call.
    if y == 2.0 {
        x * x
    } else if y == 3.0 {
        x * x * x
    } else {
        x.powf(y)
    }
}

impl Float for f32 {
    fn of(x: f64) -> f32 {
        x as f32
    }

    #[inline(always)]
    fn map_unary(op: UnaryOp, src: &[f32], dst: &mut [f32]) {
        use kiln_engine::fastmath::{erf, erfc_non_negative, exp_ieee, sigmoid, tanh};
        const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
        match op {
            UnaryOp::Relu => map1!(src, dst, |x| if x > 0.0 { x } else { 0.0 }),
            UnaryOp::Gelu => map1!(src, dst, |x| {
                let tail = erfc_non_negative(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
                if x >= 0.0 {
                    x * (1.0 - 0.5 * tail)
                } else {
                    0.5 * x * tail
                }
            }),
            UnaryOp::GeluTanh => map1!(src, dst, |x| x
                / (1.0 + exp_ieee(-TWO_SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))),
            UnaryOp::Silu => map1!(src, dst, |x| x / (1.0 + exp_ieee(-x))),
            UnaryOp::Tanh => map1!(src, dst, |x| tanh(x)),
            UnaryOp::Sigmoid => map1!(src, dst, |x| sigmoid(x)),
            UnaryOp::Exp => map1!(src, dst, |x| exp_ieee(x)),
            UnaryOp::Log => map1!(src, dst, |x| x.ln()),
            UnaryOp::Sqrt => map1!(src, dst, |x| x.sqrt()),
            UnaryOp::Neg => map1!(src, dst, |x| -x),
            UnaryOp::Abs => map1!(src, dst, |x| x.abs()),
            UnaryOp::Erf => map1!(src, dst, |x| erf(x)),
            UnaryOp::Reciprocal => map1!(src, dst, |x| 1.0 / x),
            UnaryOp::Floor => map1!(src, dst, |x| x.floor()),
            UnaryOp::Ceil => map1!(src, dst, |x| x.ceil()),
            UnaryOp::Not => map1!(src, dst, |x| if x == 0.0 { 1.0 } else { 0.0 }),
        }
    }

    #[inline(always)]
    fn map_binary(op: BinaryOp, a: &[f32], b: &[f32], dst: &mut [f32]) {
        binary_loops!(f32, op, a, b, dst, pow_f32)
    }
}

impl Float for f64 {
    fn of(x: f64) -> f64 {
        x
    }

    #[inline(always)]
    fn map_unary(op: UnaryOp, src: &[f64], dst: &mut [f64]) {
        match op {
            UnaryOp::Relu => map1!(src, dst, |x| if x > 0.0 { x } else { 0.0 }),
            UnaryOp::Gelu => map1!(src, dst, |x| 0.5
                * x
                * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))),
            UnaryOp::GeluTanh => map1!(src, dst, |x| {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }),
            UnaryOp::Silu => map1!(src, dst, |x| x / (1.0 + (-x).exp())),
            UnaryOp::Tanh => map1!(src, dst, |x| x.tanh()),
            UnaryOp::Sigmoid => map1!(src, dst, |x| 1.0 / (1.0 + (-x).exp())),
            UnaryOp::Exp => map1!(src, dst, |x| x.exp()),
            UnaryOp::Log => map1!(src, dst, |x| x.ln()),
            UnaryOp::Sqrt => map1!(src, dst, |x| x.sqrt()),
            UnaryOp::Neg => map1!(src, dst, |x| -x),
            UnaryOp::Abs => map1!(src, dst, |x| x.abs()),
            UnaryOp::Erf => map1!(src, dst, |x| libm::erf(x)),
            UnaryOp::Reciprocal => map1!(src, dst, |x| 1.0 / x),
            UnaryOp::Floor => map1!(src, dst, |x| x.floor()),
            UnaryOp::Ceil => map1!(src, dst, |x| x.ceil()),
            UnaryOp::Not => map1!(src, dst, |x| if x == 0.0 { 1.0 } else { 0.0 }),
        }
    }

    #[inline(always)]
    fn map_binary(op: BinaryOp, a: &[f64], b: &[f64], dst: &mut [f64]) {
        binary_loops!(f64, op, a, b, dst, f64::powf)
    }
}

/// Run `f` on the contiguous elements of a CPU tensor.
pub fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(GraphError::op("elementwise", "runs on CPU tensors"));
    };
    let data = cpu.as_slice::<T>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| GraphError::op("elementwise", "operand is not contiguous"))?;
    Ok(f(&data[start..end]))
}

/// One operand of a fused program, read at an output index.
enum Operand<'a, T> {
    /// As many elements as the output.
    Full(&'a [T]),
    /// The output's trailing dims (a bias): element `i % len`.
    Suffix(&'a [T]),
    Scalar(T),
}

/// Where an instruction reads an operand from within one chunk.
#[derive(Clone, Copy)]
enum Slot {
    /// A full-size operand, read in place.
    Operand(usize),
    /// A register: a materialised suffix/scalar operand or an instruction result.
    Register(usize),
}

#[inline(always)]
fn run_chunk_generic<T: Float>(
    program: &[Instr],
    operands: &[Operand<T>],
    start: usize,
    out: &mut [T],
    regs: &mut Vec<Vec<T>>,
) {
    let n = out.len();
    let leaves = operands.len();
    // Registers: one per operand that is not read in place, one per instruction.
    regs.resize_with(leaves + program.len(), Vec::new);
    let mut slots = [Slot::Register(0); 64];
    let mut heap_slots = Vec::new();
    let slots: &mut [Slot] = if leaves + program.len() <= 64 {
        &mut slots[..leaves + program.len()]
    } else {
        heap_slots.resize(leaves + program.len(), Slot::Register(0));
        &mut heap_slots
    };
    for (r, operand) in operands.iter().enumerate() {
        match operand {
            Operand::Full(_) => slots[r] = Slot::Operand(r),
            Operand::Suffix(data) => {
                let reg = &mut regs[r];
                reg.clear();
                // Whole runs of the repeated operand, not an index per element.
                let len = data.len();
                let mut pos = start % len;
                while reg.len() < n {
                    let take = (len - pos).min(n - reg.len());
                    reg.extend_from_slice(&data[pos..pos + take]);
                    pos = 0;
                }
                slots[r] = Slot::Register(r);
            }
            Operand::Scalar(v) => {
                let reg = &mut regs[r];
                reg.clear();
                reg.resize(n, *v);
                slots[r] = Slot::Register(r);
            }
        }
    }
    let last = program.len() - 1;
    for (i, instr) in program.iter().enumerate() {
        let dst_index = leaves + i;
        slots[dst_index] = Slot::Register(dst_index);
        // The last instruction writes the output; others their register.
        let mut target = if i == last {
            Vec::new()
        } else {
            std::mem::take(&mut regs[dst_index])
        };
        if i != last {
            target.resize(n, T::of(0.0));
        }
        {
            let read = |slot: Slot| -> &[T] {
                match slot {
                    Slot::Operand(r) => match &operands[r] {
                        Operand::Full(data) => &data[start..start + n],
                        _ => &[],
                    },
                    Slot::Register(r) => &regs[r][..n],
                }
            };
            let dst: &mut [T] = if i == last { out } else { &mut target[..n] };
            match *instr {
                Instr::Scalar(v) => dst.fill(T::of(v)),
                Instr::Unary(op, a) => T::map_unary(op, read(slots[a]), dst),
                Instr::Binary(op, a, b) => T::map_binary(op, read(slots[a]), read(slots[b]), dst),
            }
        }
        if i != last {
            regs[dst_index] = target;
        }
    }
}

kiln_engine::simd_dispatch!(
    fn run_chunk<T: Float>(
        program: &[Instr],
        operands: &[Operand<T>],
        start: usize,
        out: &mut [T],
        regs: &mut Vec<Vec<T>>,
    ) => run_chunk_generic
);

/// Evaluate a program over operands broadcast to `dims`; the last register is
/// the result.
fn run_program<T: Float>(program: &[Instr], inputs: &[Tensor], dims: &[usize]) -> Result<Tensor> {
    let total: usize = dims.iter().product();
    // Operands that are neither full-size, a trailing-dims suffix, nor a scalar
    // are materialised at the output's shape first.
    let mut owned: Vec<Tensor> = Vec::with_capacity(inputs.len());
    for t in inputs {
        let len = t.elem_count();
        let suffix_ok = t.dims().len() <= dims.len()
            && dims[dims.len() - t.dims().len()..]
                .iter()
                .zip(t.dims())
                .all(|(a, b)| a == b);
        let t = if len == total || len == 1 || (suffix_ok && len > 0) {
            t.contiguous()?
        } else {
            t.broadcast_as(dims)?.contiguous()?
        };
        owned.push(t);
    }
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut operands = Vec::with_capacity(owned.len());
    for (t, (storage, layout)) in owned.iter().zip(&guards) {
        let Storage::Cpu(cpu) = &**storage else {
            return Err(GraphError::op("fused_elementwise", "runs on CPU tensors"));
        };
        let data: &[T] = T::cpu_storage_as_slice(cpu)?;
        let (s, e) = layout
            .contiguous_offsets()
            .ok_or_else(|| GraphError::op("fused_elementwise", "operand is not contiguous"))?;
        let data = &data[s..e];
        let len = t.elem_count();
        operands.push(if len == 1 {
            Operand::Scalar(data[0])
        } else if len == total {
            Operand::Full(data)
        } else {
            Operand::Suffix(data)
        });
    }
    let mut out = vec![T::of(0.0); total];
    if total >= PARALLEL_FROM {
        out.par_chunks_mut(CHUNK * 8)
            .enumerate()
            .for_each(|(block, part)| {
                let mut regs = Vec::new();
                for (j, chunk) in part.chunks_mut(CHUNK).enumerate() {
                    run_chunk(
                        program,
                        &operands,
                        block * CHUNK * 8 + j * CHUNK,
                        chunk,
                        &mut regs,
                    );
                }
            });
    } else {
        let mut regs = Vec::new();
        for (j, chunk) in out.chunks_mut(CHUNK).enumerate() {
            run_chunk(program, &operands, j * CHUNK, chunk, &mut regs);
        }
    }
    drop(guards);
    Ok(Tensor::from_vec(out, dims, &candle_core::Device::Cpu)?)
}

/// Evaluate a fused element-wise program (or one op written as a program) over
/// float operands, broadcasting them numpy-style.
pub fn evaluate(program: &[Instr], inputs: &[Tensor]) -> Result<Tensor> {
    if program.is_empty() {
        return Err(GraphError::op("fused_elementwise", "has an empty program"));
    }
    let mut dims: Vec<usize> = Vec::new();
    for t in inputs {
        dims = crate::types::broadcast_static("fused_elementwise", &dims, t.dims())?;
    }
    let dtype = inputs
        .first()
        .map(Tensor::dtype)
        .ok_or_else(|| GraphError::op("fused_elementwise", "has no operands"))?;
    match dtype {
        candle_core::DType::F32 => run_program::<f32>(program, inputs, &dims),
        candle_core::DType::F64 => run_program::<f64>(program, inputs, &dims),
        candle_core::DType::F16 | candle_core::DType::BF16 => {
            let widened: Vec<Tensor> = inputs
                .iter()
                .map(|t| t.to_dtype(candle_core::DType::F32))
                .collect::<candle_core::Result<_>>()?;
            Ok(run_program::<f32>(program, &widened, &dims)?.to_dtype(dtype)?)
        }
        other => Err(GraphError::op(
            "fused_elementwise",
            format!("computes in floats, got {other:?}"),
        )),
    }
}

/// `cond ? x : y` for f32 branches that are scalars or full-size (a mask
/// filling with -inf), without broadcasting the scalar to a full tensor first;
/// `None` when the operands do not have that form.
pub fn select_f32(cond: &Tensor, x: &Tensor, y: &Tensor, dims: &[usize]) -> Result<Option<Tensor>> {
    let total: usize = dims.iter().product();
    let usable = |t: &Tensor| {
        t.dtype() == candle_core::DType::F32 && (t.elem_count() == 1 || t.dims() == dims)
    };
    if cond.dtype() != candle_core::DType::U8
        || !usable(x)
        || !usable(y)
        || cond.elem_count() != total
    {
        return Ok(None);
    }
    let pick = |t: &Tensor| -> Result<(Option<f32>, Tensor)> {
        Ok(if t.elem_count() == 1 && total != 1 {
            (Some(t.flatten_all()?.to_vec1::<f32>()?[0]), t.clone())
        } else {
            (None, t.contiguous()?)
        })
    };
    let ((xs, xt), (ys, yt)) = (pick(x)?, pick(y)?);
    let out = with_slice::<u8, _>(cond, |c| {
        with_slice::<f32, _>(&xt, |xv| {
            with_slice::<f32, _>(&yt, |yv| {
                let mut out = vec![0f32; total];
                out.par_chunks_mut(CHUNK * 8)
                    .enumerate()
                    .for_each(|(block, part)| {
                        let start = block * CHUNK * 8;
                        for (i, o) in part.iter_mut().enumerate() {
                            let j = start + i;
                            *o = if c[j] != 0 {
                                xs.unwrap_or_else(|| xv[j])
                            } else {
                                ys.unwrap_or_else(|| yv[j])
                            };
                        }
                    });
                out
            })
        })
    })???;
    Ok(Some(Tensor::from_vec(
        out,
        dims,
        &candle_core::Device::Cpu,
    )?))
}

#[inline(always)]
fn unary_pieces_f32(op: UnaryOp, data: &mut [f32]) {
    let mut scratch = [0f32; CHUNK];
    for piece in data.chunks_mut(CHUNK) {
        let n = piece.len();
        scratch[..n].copy_from_slice(piece);
        f32::map_unary(op, &scratch[..n], piece);
    }
}

kiln_engine::simd_dispatch!(
    /// Apply `op` to f32 data in place (an epilogue), in L1-sized pieces,
    /// vectorised for this CPU (AVX-512, AVX2 or portable).
    pub fn unary_in_place_f32(op: UnaryOp, data: &mut [f32]) => unary_pieces_f32
);

/// One unary op on a float tensor.
pub fn unary(op: UnaryOp, x: &Tensor) -> Result<Tensor> {
    evaluate(&[Instr::Unary(op, 0)], std::slice::from_ref(x))
}

/// One binary op on float tensors.
pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    evaluate(&[Instr::Binary(op, 0, 1)], &[a.clone(), b.clone()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_program_broadcasts_suffix_and_scalar_operands() {
        let x = Tensor::new(&[[1f32, -2.0, 3.0], [4.0, -5.0, 6.0]], &Device::Cpu).unwrap();
        let bias = Tensor::new(&[0.5f32, 0.5, -10.0], &Device::Cpu).unwrap();
        // relu(x + bias) * 2
        let program = [
            Instr::Binary(BinaryOp::Add, 0, 1),
            Instr::Unary(UnaryOp::Relu, 2),
            Instr::Scalar(2.0),
            Instr::Binary(BinaryOp::Mul, 3, 4),
        ];
        let y = evaluate(&program, &[x, bias]).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            vec![vec![3.0, 0.0, 0.0], vec![9.0, 0.0, 0.0]]
        );
    }

    #[test]
    fn column_broadcasts_are_materialised() {
        let x = Tensor::new(&[[1f64, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let col = Tensor::new(&[[10f64], [20.0]], &Device::Cpu).unwrap();
        let y = binary(BinaryOp::Sub, &x, &col).unwrap();
        assert_eq!(
            y.to_vec2::<f64>().unwrap(),
            vec![vec![-9.0, -8.0], vec![-17.0, -16.0]]
        );
    }
}
