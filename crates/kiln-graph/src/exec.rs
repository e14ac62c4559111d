//! Running one op on concrete tensors (CPU): candle's ops, Kiln's convolution,
//! and the graph crate's element-wise and pooling kernels.

use candle_core::{D, DType as CDType, Device, Tensor};

use crate::elementwise;
use crate::error::{GraphError, Result};
use crate::infer::{slice_range, window_count};
use crate::ops::{BinaryOp, CompareOp, Instr, Op, PoolKind, ReduceOp, UnaryOp};
use crate::pool;
use crate::types::{DType, broadcast_static, normalize_axis};
use crate::{linear, norm};

/// The entries of a 1-D (or scalar) integer tensor at run time.
fn ints(op: &str, t: &Tensor) -> Result<Vec<i64>> {
    if !matches!(
        t.dtype(),
        CDType::I64 | CDType::I32 | CDType::U32 | CDType::U8
    ) {
        return Err(GraphError::op(
            op,
            format!("expects an integer list, got {:?}", t.dtype()),
        ));
    }
    Ok(t.flatten_all()?.to_dtype(CDType::I64)?.to_vec1::<i64>()?)
}

fn axis_of(op: &str, axis: i64, rank: usize) -> Result<usize> {
    normalize_axis(op, axis, rank)
}

/// Compute `op` on `inputs`; `out_dtypes` are the graph's result dtypes (bool
/// results come back as u8).
pub fn run(op: &Op, inputs: &[Tensor], out_dtypes: &[DType]) -> Result<Vec<Tensor>> {
    let name = op.name();
    let x = &inputs[0];
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::MatMul => one(matmul(&inputs[0], &inputs[1])?),
        Op::MatMulBias { activation } => {
            let residual = inputs.get(3);
            if linear::fits(&inputs[0], &inputs[1], &inputs[2], residual) {
                return Ok(vec![linear::matmul_bias(
                    &inputs[0],
                    &inputs[1],
                    &inputs[2],
                    *activation,
                    residual,
                )?]);
            }
            let product = matmul(&inputs[0], &inputs[1])?;
            let mut operands = vec![product, inputs[2].clone()];
            let mut program = vec![Instr::Binary(BinaryOp::Add, 0, 1)];
            if let Some(act) = activation {
                program.push(Instr::Unary(*act, 2));
            }
            if let Some(residual) = residual {
                operands.push(residual.clone());
                program = vec![
                    Instr::Binary(BinaryOp::Add, 0, 1),
                    Instr::Binary(BinaryOp::Add, 3, 2),
                ];
            }
            one(elementwise::evaluate(&program, &operands)?)
        }
        Op::Binary { kind } => one(binary(*kind, x, &inputs[1])?),
        Op::Compare { kind } => {
            let dims = broadcast_static(name, x.dims(), inputs[1].dims())?;
            let (a, b) = (
                x.broadcast_as(dims.as_slice())?,
                inputs[1].broadcast_as(dims.as_slice())?,
            );
            one(match kind {
                CompareOp::Equal => a.eq(&b)?,
                CompareOp::Less => a.lt(&b)?,
                CompareOp::LessOrEqual => a.le(&b)?,
                CompareOp::Greater => a.gt(&b)?,
                CompareOp::GreaterOrEqual => a.ge(&b)?,
            })
        }
        Op::Unary { kind } => one(unary(*kind, x)?),
        Op::Clip => {
            let (lo, hi) = (&inputs[1], &inputs[2]);
            one(x.broadcast_maximum(lo)?.broadcast_minimum(hi)?)
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let axis = axis_of(name, *axis, x.rank())?;
            let log = matches!(op, Op::LogSoftmax { .. });
            one(softmax(x, axis, log)?)
        }
        Op::Reduce { kind, keepdims } => {
            let axes: Vec<usize> = match inputs.get(1) {
                Some(a) => ints(name, a)?
                    .into_iter()
                    .map(|a| axis_of(name, a, x.rank()))
                    .collect::<Result<_>>()?,
                None => (0..x.rank()).collect(),
            };
            one(reduce(*kind, x, &axes, *keepdims)?)
        }
        Op::ArgMax { axis, keepdims } => {
            let axis = axis_of(name, *axis, x.rank())?;
            let idx = x.argmax_keepdim(axis)?.to_dtype(CDType::I64)?;
            one(if *keepdims { idx } else { idx.squeeze(axis)? })
        }
        Op::LayerNorm { axis, epsilon } => {
            let axis = axis_of(name, *axis, x.rank())?;
            let outer: usize = x.dims()[..axis].iter().product();
            let inner: usize = x.dims()[axis..].iter().product();
            if norm::fits(x, inner, &inputs[1], inputs.get(2)) {
                return Ok(vec![norm::layer_norm(
                    x,
                    inner,
                    &inputs[1],
                    inputs.get(2),
                    *epsilon,
                )?]);
            }
            let flat = x.reshape((outer, inner))?;
            let normalized =
                kiln_engine::nn::layer_norm_plain(&flat, *epsilon)?.reshape(x.dims())?;
            let mut y = normalized.broadcast_mul(&inputs[1])?;
            if let Some(bias) = inputs.get(2) {
                y = y.broadcast_add(bias)?;
            }
            one(y)
        }
        Op::RmsNorm { epsilon } => {
            let width = x.dim(D::Minus1)?;
            let scale = inputs[1].broadcast_as(width)?.contiguous()?;
            one(rms_norm_last_axis(x, &scale, *epsilon)?)
        }
        Op::BatchNorm { epsilon } => {
            let (scale, bias, mean, var) = (&inputs[1], &inputs[2], &inputs[3], &inputs[4]);
            let c = x.dim(1)?;
            let mut shape = vec![1usize; x.rank()];
            shape[1] = c;
            let inv = var.affine(1.0, *epsilon)?.sqrt()?.recip()?.mul(scale)?;
            let shift = bias.sub(&mean.mul(&inv)?)?;
            let program = [
                Instr::Binary(BinaryOp::Mul, 0, 1),
                Instr::Binary(BinaryOp::Add, 3, 2),
            ];
            one(elementwise::evaluate(
                &program,
                &[
                    x.clone(),
                    inv.reshape(shape.as_slice())?,
                    shift.reshape(shape.as_slice())?,
                ],
            )?)
        }
        Op::GroupNorm { groups, epsilon } => {
            let dims = x.dims().to_vec();
            let (n, c) = (dims[0], dims[1]);
            let grouped = x.reshape((n * groups, ()))?;
            let normalized =
                kiln_engine::nn::layer_norm_plain(&grouped, *epsilon)?.reshape(dims.as_slice())?;
            let mut shape = vec![1usize; dims.len()];
            shape[1] = c;
            one(normalized
                .broadcast_mul(&inputs[1].reshape(shape.as_slice())?)?
                .broadcast_add(&inputs[2].reshape(shape.as_slice())?)?)
        }
        Op::Conv2d {
            strides,
            pads,
            dilations,
            groups,
        } => one(conv2d(
            x,
            &inputs[1],
            inputs.get(2),
            *strides,
            *pads,
            *dilations,
            *groups,
        )?),
        Op::Pool2d {
            kind,
            kernel,
            strides,
            pads,
            count_include_pad,
            ceil_mode,
        } => {
            let (h, w) = (x.dim(2)?, x.dim(3)?);
            let out_h = window_count(
                name,
                h,
                kernel[0],
                strides[0],
                1,
                pads[0] + pads[2],
                *ceil_mode,
            )?;
            let out_w = window_count(
                name,
                w,
                kernel[1],
                strides[1],
                1,
                pads[1] + pads[3],
                *ceil_mode,
            )?;
            let spec = pool::Window {
                kernel: *kernel,
                strides: *strides,
                pads: *pads,
                out: [out_h, out_w],
                count_include_pad: *count_include_pad,
            };
            one(pool::pool2d(x, *kind == PoolKind::Max, &spec)?)
        }
        Op::Reshape { allow_zero } => {
            let target = ints(name, &inputs[1])?;
            one(x.reshape(reshape_dims(name, x.dims(), &target, *allow_zero)?)?)
        }
        Op::Flatten { axis } => {
            let axis = normalize_axis(name, *axis, x.rank() + 1)?;
            let outer: usize = x.dims()[..axis].iter().product();
            one(x.reshape((outer, ()))?)
        }
        Op::Transpose { perm } => one(x.permute(perm.as_slice())?),
        Op::Concat { axis } => {
            let axis = axis_of(name, *axis, x.rank())?;
            one(Tensor::cat(inputs, axis)?)
        }
        Op::Split { axis, outputs } => {
            let axis = axis_of(name, *axis, x.rank())?;
            let n = x.dim(axis)?;
            let sizes: Vec<usize> = match inputs.get(1) {
                Some(s) => ints(name, s)?
                    .into_iter()
                    .map(|s| s.max(0) as usize)
                    .collect(),
                None => {
                    let part = n.div_ceil((*outputs).max(1));
                    (0..*outputs)
                        .map(|i| part.min(n.saturating_sub(i * part)))
                        .collect()
                }
            };
            if sizes.iter().sum::<usize>() != n || sizes.len() != *outputs {
                return Err(GraphError::op(
                    name,
                    format!("sizes {sizes:?} do not split {n} into {outputs}"),
                ));
            }
            let mut start = 0;
            let mut parts = Vec::with_capacity(sizes.len());
            for s in sizes {
                parts.push(x.narrow(axis, start, s)?);
                start += s;
            }
            Ok(parts)
        }
        Op::Slice => one(slice(x, inputs)?),
        Op::Gather { axis } => {
            let axis = axis_of(name, *axis, x.rank())?;
            let n = x.dim(axis)? as i64;
            let idx = inputs[1].to_dtype(CDType::I64)?;
            let flat: Vec<i64> = idx.flatten_all()?.to_vec1::<i64>()?;
            let mut fixed = Vec::with_capacity(flat.len());
            for i in flat {
                let j = if i < 0 { i + n } else { i };
                if j < 0 || j >= n {
                    return Err(GraphError::op(
                        name,
                        format!("index {i} is out of range for a dimension of {n}"),
                    ));
                }
                fixed.push(j);
            }
            let selector = Tensor::from_vec(fixed, idx.elem_count(), &Device::Cpu)?;
            let picked = x.contiguous()?.index_select(&selector, axis)?;
            let mut dims = x.dims()[..axis].to_vec();
            dims.extend_from_slice(idx.dims());
            dims.extend_from_slice(&x.dims()[axis + 1..]);
            one(picked.reshape(dims)?)
        }
        Op::Unsqueeze => {
            let axes = ints(name, &inputs[1])?;
            let rank = x.rank() + axes.len();
            let axes: Vec<usize> = axes
                .iter()
                .map(|&a| axis_of(name, a, rank))
                .collect::<Result<_>>()?;
            let mut rest = x.dims().iter();
            let dims: Vec<usize> = (0..rank)
                .map(|d| {
                    if axes.contains(&d) {
                        1
                    } else {
                        rest.next().copied().unwrap_or(1)
                    }
                })
                .collect();
            one(x.reshape(dims)?)
        }
        Op::Squeeze => {
            let axes: Vec<usize> = match inputs.get(1) {
                Some(a) => ints(name, a)?
                    .into_iter()
                    .map(|a| axis_of(name, a, x.rank()))
                    .collect::<Result<_>>()?,
                None => (0..x.rank()).filter(|&d| x.dims()[d] == 1).collect(),
            };
            if let Some(&bad) = axes.iter().find(|&&a| x.dims()[a] != 1) {
                return Err(GraphError::op(
                    name,
                    format!("axis {bad} of {:?} is not 1", x.dims()),
                ));
            }
            let dims: Vec<usize> = (0..x.rank())
                .filter(|d| !axes.contains(d))
                .map(|d| x.dims()[d])
                .collect();
            one(x.reshape(dims)?)
        }
        Op::Expand => {
            let target: Vec<usize> = ints(name, &inputs[1])?
                .into_iter()
                .map(|d| d.max(0) as usize)
                .collect();
            let dims = broadcast_static(name, x.dims(), &target)?;
            one(x.broadcast_as(dims)?)
        }
        Op::Where => {
            let dims = broadcast_static(name, x.dims(), inputs[1].dims())?;
            let dims = broadcast_static(name, &dims, inputs[2].dims())?;
            let cond = x.broadcast_as(dims.as_slice())?.contiguous()?;
            if let Some(y) = elementwise::select_f32(&cond, &inputs[1], &inputs[2], &dims)? {
                return one(y);
            }
            one(cond.where_cond(
                &inputs[1].broadcast_as(dims.as_slice())?.contiguous()?,
                &inputs[2].broadcast_as(dims.as_slice())?.contiguous()?,
            )?)
        }
        Op::Cast { to } => one(cast(x, *to)?),
        Op::Shape { start, end } => {
            let rank = x.rank() as i64;
            let clamp = |i: i64| (if i < 0 { i + rank } else { i }).clamp(0, rank) as usize;
            let (s, e) = (clamp(*start), clamp(end.unwrap_or(rank)));
            let dims: Vec<i64> = if s < e {
                x.dims()[s..e].iter().map(|&d| d as i64).collect()
            } else {
                Vec::new()
            };
            let len = dims.len();
            one(Tensor::from_vec(dims, len, &Device::Cpu)?)
        }
        Op::ConstantOfShape { value, dtype } => {
            let dims: Vec<usize> = ints(name, x)?
                .into_iter()
                .map(|d| d.max(0) as usize)
                .collect();
            one(Tensor::full(*value, dims, &Device::Cpu)?.to_dtype(dtype.storage())?)
        }
        Op::Range => {
            let scalar =
                |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(CDType::F64)?.to_scalar::<f64>()?) };
            let (start, limit, delta) = (
                scalar(&inputs[0])?,
                scalar(&inputs[1])?,
                scalar(&inputs[2])?,
            );
            if delta == 0.0 {
                return Err(GraphError::op(name, "delta must not be 0"));
            }
            let count = ((limit - start) / delta).ceil().max(0.0) as usize;
            if count > 1 << 31 {
                return Err(GraphError::op(
                    name,
                    format!("{count} elements is too many"),
                ));
            }
            let values: Vec<f64> = (0..count).map(|i| start + i as f64 * delta).collect();
            one(Tensor::from_vec(values, count, &Device::Cpu)?.to_dtype(x.dtype())?)
        }
        Op::Identity => one(x.clone()),
        Op::Fused { program } => one(elementwise::evaluate(program, inputs)?),
    }
    .and_then(|outs: Vec<Tensor>| {
        if outs.len() != out_dtypes.len() {
            return Err(GraphError::op(name, "produced the wrong number of results"));
        }
        Ok(outs)
    })
}

fn rms_norm_last_axis(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(CDType::F64)?;
    let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_div(&mean_sq.affine(1.0, eps)?.sqrt()?)?;
    Ok(y.to_dtype(x.dtype())?.broadcast_mul(scale)?)
}

fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a_vec, b_vec) = (a.rank() == 1, b.rank() == 1);
    let a2 = if a_vec { a.unsqueeze(0)? } else { a.clone() };
    let b2 = if b_vec { b.unsqueeze(1)? } else { b.clone() };
    let mut y = if a2.rank() == 2 && b2.rank() == 2 {
        a2.matmul(&b2)?
    } else if b2.rank() == 2 {
        // Fold the batch dims into rows: one GEMM instead of a batched one.
        let dims = a2.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = a2.reshape((rows, dims[dims.len() - 1]))?.matmul(&b2)?;
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(b2.dim(1)?);
        y.reshape(out)?
    } else if let Some(y) = linear::batched_matmul(&a2, &b2)? {
        y
    } else {
        a2.broadcast_matmul(&b2)?
    };
    if a_vec {
        y = y.squeeze(y.rank() - 2)?;
    }
    if b_vec {
        y = y.squeeze(y.rank() - 1)?;
    }
    Ok(y)
}

fn is_float(t: &Tensor) -> bool {
    matches!(
        t.dtype(),
        CDType::F32 | CDType::F64 | CDType::F16 | CDType::BF16
    )
}

fn binary(kind: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if is_float(a) {
        return elementwise::binary(kind, a, b);
    }
    Ok(match kind {
        BinaryOp::Add => a.broadcast_add(b)?,
        BinaryOp::Sub => a.broadcast_sub(b)?,
        BinaryOp::Mul => a.broadcast_mul(b)?,
        BinaryOp::Div => {
            // Integer division truncates toward zero, as ONNX and C do.
            let q = a
                .to_dtype(CDType::F64)?
                .broadcast_div(&b.to_dtype(CDType::F64)?)?;
            let truncated = q.abs()?.floor()?.mul(&q.sign()?)?;
            truncated.to_dtype(a.dtype())?
        }
        BinaryOp::Pow => {
            elementwise::binary(kind, &a.to_dtype(CDType::F64)?, &b.to_dtype(CDType::F64)?)?
                .round()?
                .to_dtype(a.dtype())?
        }
        BinaryOp::Max => a.broadcast_maximum(b)?,
        BinaryOp::Min => a.broadcast_minimum(b)?,
    })
}

fn unary(kind: UnaryOp, x: &Tensor) -> Result<Tensor> {
    if is_float(x) && kind != UnaryOp::Not {
        return elementwise::unary(kind, x);
    }
    Ok(match kind {
        UnaryOp::Not => x.eq(0u8)?.to_dtype(CDType::U8)?,
        UnaryOp::Relu => x.relu()?,
        UnaryOp::Neg => x.neg()?,
        UnaryOp::Abs => x.abs()?,
        other => {
            return Err(GraphError::op(
                other.name(),
                format!("needs a float input, got {:?}", x.dtype()),
            ));
        }
    })
}

fn softmax(x: &Tensor, axis: usize, log: bool) -> Result<Tensor> {
    if !log && axis + 1 == x.rank() && x.dtype() == CDType::F32 {
        return Ok(kiln_engine::activation::softmax_last_dim(&x.contiguous()?)?);
    }
    let max = x.max_keepdim(axis)?;
    let shifted = x.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(axis)?;
    Ok(if log {
        shifted.broadcast_sub(&sum.log()?)?
    } else {
        exp.broadcast_div(&sum)?
    })
}

fn reduce(kind: ReduceOp, x: &Tensor, axes: &[usize], keepdims: bool) -> Result<Tensor> {
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut y = match kind {
        ReduceOp::Sum => x.sum_keepdim(sorted.as_slice())?,
        ReduceOp::Mean => {
            let count: usize = sorted.iter().map(|&a| x.dims()[a]).product();
            let s = x.sum_keepdim(sorted.as_slice())?;
            if is_float(x) {
                s.affine(1.0 / count.max(1) as f64, 0.0)?
            } else {
                (s.to_dtype(CDType::F64)?
                    .affine(1.0 / count.max(1) as f64, 0.0)?)
                .to_dtype(x.dtype())?
            }
        }
        ReduceOp::Max | ReduceOp::Min => {
            let mut y = x.clone();
            for &a in &sorted {
                y = if kind == ReduceOp::Max {
                    y.max_keepdim(a)?
                } else {
                    y.min_keepdim(a)?
                };
            }
            y
        }
    };
    if !keepdims {
        for &a in sorted.iter().rev() {
            y = y.squeeze(a)?;
        }
    }
    Ok(y)
}

fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    strides: [usize; 2],
    pads: [usize; 4],
    dilations: [usize; 2],
    groups: usize,
) -> Result<Tensor> {
    let symmetric = pads.iter().all(|&p| p == pads[0]);
    let im2col = dilations == [1, 1] && strides[0] == strides[1] && x.dtype() == CDType::F32;
    if im2col {
        // Kiln's im2col convolution, per group, on an explicitly padded input
        // when the padding differs per side.
        let (x, padding) = if symmetric {
            (x.clone(), pads[0])
        } else {
            (
                x.pad_with_zeros(2, pads[0], pads[2])?
                    .pad_with_zeros(3, pads[1], pads[3])?,
                0,
            )
        };
        if groups == 1 {
            return Ok(kiln_engine::conv::conv2d_im2col(
                &x, w, bias, strides[0], padding,
            )?);
        }
        let (in_per_group, out_per_group) = (x.dim(1)? / groups, w.dim(0)? / groups);
        let parts = (0..groups)
            .map(|g| {
                let xg = x.narrow(1, g * in_per_group, in_per_group)?.contiguous()?;
                let wg = w.narrow(0, g * out_per_group, out_per_group)?;
                let bg = bias
                    .map(|b| b.narrow(0, g * out_per_group, out_per_group))
                    .transpose()?;
                Ok(kiln_engine::conv::conv2d_im2col(
                    &xg,
                    &wg,
                    bg.as_ref(),
                    strides[0],
                    padding,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&parts, 1)?);
    }
    if strides[0] != strides[1] || dilations[0] != dilations[1] {
        return Err(GraphError::op(
            "conv2d",
            format!(
                "different strides {strides:?} or dilations {dilations:?} per axis are not supported"
            ),
        ));
    }
    let (x, padding) = if symmetric {
        (x.clone(), pads[0])
    } else {
        (
            x.pad_with_zeros(2, pads[0], pads[2])?
                .pad_with_zeros(3, pads[1], pads[3])?,
            0,
        )
    };
    let mut y = x.conv2d(w, padding, strides[0], dilations[0], groups)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?;
    }
    Ok(y)
}

/// ONNX Reshape target dims at run time.
pub fn reshape_dims(
    op: &str,
    input: &[usize],
    target: &[i64],
    allow_zero: bool,
) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut dims = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        dims.push(match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            0 if !allow_zero => *input.get(i).ok_or_else(|| {
                GraphError::op(
                    op,
                    format!("0 at position {i} has no input dim to copy from {input:?}"),
                )
            })?,
            t if t >= 0 => t as usize,
            _ => {
                return Err(GraphError::op(
                    op,
                    format!("invalid target shape {target:?}"),
                ));
            }
        });
    }
    if let Some(i) = infer {
        let known: usize = dims.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(GraphError::op(
                op,
                format!("cannot reshape {input:?} into {target:?}"),
            ));
        }
        dims[i] = total / known;
    }
    if dims.iter().product::<usize>() != total {
        return Err(GraphError::op(
            op,
            format!("cannot reshape {input:?} into {target:?}"),
        ));
    }
    Ok(dims)
}

fn slice(x: &Tensor, inputs: &[Tensor]) -> Result<Tensor> {
    let name = "slice";
    let starts = ints(name, &inputs[1])?;
    let ends = ints(name, &inputs[2])?;
    let axes: Vec<usize> = match inputs.get(3) {
        Some(a) => ints(name, a)?
            .into_iter()
            .map(|a| axis_of(name, a, x.rank()))
            .collect::<Result<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = match inputs.get(4) {
        Some(s) => ints(name, s)?,
        None => vec![1; starts.len()],
    };
    if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(GraphError::op(
            name,
            "starts, ends, axes and steps must have the same length",
        ));
    }
    let mut y = x.clone();
    for (i, &axis) in axes.iter().enumerate() {
        let n = y.dim(axis)?;
        let idx = slice_range(name, n, starts[i], ends[i], steps[i])?;
        y = if steps[i] == 1 {
            let start = idx.first().copied().unwrap_or(0);
            y.narrow(axis, start, idx.len())?
        } else {
            let len = idx.len();
            let selector = Tensor::from_vec(
                idx.into_iter().map(|i| i as i64).collect::<Vec<_>>(),
                len,
                &Device::Cpu,
            )?;
            y.contiguous()?.index_select(&selector, axis)?
        };
    }
    Ok(y)
}

fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    if to == DType::Bool {
        return Ok(x.ne(0f64)?.to_dtype(CDType::U8)?);
    }
    if to.is_integer() && is_float(x) {
        // Float to integer truncates toward zero (C, numpy and ONNX).
        let t = x.to_dtype(CDType::F64)?;
        let truncated = t.abs()?.floor()?.mul(&t.sign()?)?;
        return Ok(truncated.to_dtype(to.storage())?);
    }
    Ok(x.to_dtype(to.storage())?)
}
