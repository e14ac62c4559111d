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

/// Floats the kernels compute in.
pub trait Float: WithDType + Copy + Send + Sync + PartialOrd {
    fn unary(op: UnaryOp, x: Self) -> Self;
    fn binary(op: BinaryOp, a: Self, b: Self) -> Self;
    fn of(x: f64) -> Self;
}

macro_rules! float_impl {
    ($t:ty, $erf:path) => {
        impl Float for $t {
            #[inline(always)]
            fn unary(op: UnaryOp, x: $t) -> $t {
                match op {
                    UnaryOp::Relu => {
                        if x > 0.0 {
                            x
                        } else {
                            0.0
                        }
                    }
                    UnaryOp::Gelu => {
                        0.5 * x * (1.0 + $erf(x * std::f64::consts::FRAC_1_SQRT_2 as $t))
                    }
                    UnaryOp::GeluTanh => {
                        let c = (2.0 / std::f64::consts::PI).sqrt() as $t;
                        0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
                    }
                    UnaryOp::Silu => x / (1.0 + (-x).exp()),
                    UnaryOp::Tanh => x.tanh(),
                    UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                    UnaryOp::Exp => x.exp(),
                    UnaryOp::Log => x.ln(),
                    UnaryOp::Sqrt => x.sqrt(),
                    UnaryOp::Neg => -x,
                    UnaryOp::Abs => x.abs(),
                    UnaryOp::Erf => $erf(x),
                    UnaryOp::Reciprocal => 1.0 / x,
                    UnaryOp::Floor => x.floor(),
                    UnaryOp::Ceil => x.ceil(),
                    UnaryOp::Not => {
                        if x == 0.0 {
                            1.0
                        } else {
                            0.0
                        }
                    }
                }
            }

            #[inline(always)]
            fn binary(op: BinaryOp, a: $t, b: $t) -> $t {
                match op {
                    BinaryOp::Add => a + b,
                    BinaryOp::Sub => a - b,
                    BinaryOp::Mul => a * b,
                    BinaryOp::Div => a / b,
                    BinaryOp::Pow => a.powf(b),
                    // NaN propagates as numpy's maximum/minimum do.
                    BinaryOp::Max => {
                        if a.is_nan() || a > b {
                            a
                        } else {
                            b
                        }
                    }
                    BinaryOp::Min => {
                        if a.is_nan() || a < b {
                            a
                        } else {
                            b
                        }
                    }
                }
            }

            fn of(x: f64) -> $t {
                x as $t
            }
        }
    };
}

float_impl!(f32, libm::erff);
float_impl!(f64, libm::erf);

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

fn run_chunk<T: Float>(
    program: &[Instr],
    operands: &[Operand<T>],
    start: usize,
    out: &mut [T],
    regs: &mut Vec<Vec<T>>,
) {
    let n = out.len();
    let count = operands.len() + program.len();
    regs.resize_with(count, Vec::new);
    for (r, operand) in operands.iter().enumerate() {
        let reg = &mut regs[r];
        reg.clear();
        match operand {
            Operand::Full(data) => reg.extend_from_slice(&data[start..start + n]),
            Operand::Suffix(data) => {
                let len = data.len();
                reg.extend((start..start + n).map(|i| data[i % len]));
            }
            Operand::Scalar(v) => reg.resize(n, *v),
        }
    }
    for (i, instr) in program.iter().enumerate() {
        let dst = operands.len() + i;
        let (done, rest) = regs.split_at_mut(dst);
        let target = &mut rest[0];
        target.clear();
        match *instr {
            Instr::Scalar(v) => target.resize(n, T::of(v)),
            Instr::Unary(op, a) => target.extend(done[a].iter().map(|&x| T::unary(op, x))),
            Instr::Binary(op, a, b) => target.extend(
                done[a]
                    .iter()
                    .zip(done[b].iter())
                    .map(|(&x, &y)| T::binary(op, x, y)),
            ),
        }
    }
    out.copy_from_slice(&regs[count - 1][..n]);
}

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
