//! The rules op inference applies: operand checks (dtypes, compatible dims),
//! the shape arithmetic of matmul, convolution, windows, reshape and slice, and
//! the constant shape operands they read. `window_count` and `slice_range` are
//! also what execution uses, so build time and run time agree.

use super::{Inferred, Operand};
use crate::error::{GraphError, Result};
use crate::types::{Dim, TensorType, broadcast, normalize_axis, shape_text};

pub(super) fn same_dtype(op: &str, a: &TensorType, b: &TensorType) -> Result<()> {
    if a.dtype != b.dtype {
        return Err(GraphError::op(
            op,
            format!("operands have different dtypes: {a} and {b}"),
        ));
    }
    Ok(())
}

pub(super) fn float_input(op: &str, a: &TensorType) -> Result<()> {
    if !a.dtype.is_float() {
        return Err(GraphError::op(op, format!("needs a float input, got {a}")));
    }
    Ok(())
}

/// Two dims that may be equal at run time.
pub(super) fn dims_compatible(a: &Dim, b: &Dim) -> bool {
    match (a, b) {
        (Dim::Unknown, _) | (_, Dim::Unknown) => true,
        _ => a == b,
    }
}

pub(super) fn product(dims: &[Dim]) -> Dim {
    let mut n = 1usize;
    for d in dims {
        match d {
            Dim::Static(k) => n *= k,
            _ if dims.len() == 1 => return d.clone(),
            _ => return Dim::Unknown,
        }
    }
    Dim::Static(n)
}

pub(super) fn infer_matmul(op: &str, a: &TensorType, b: &TensorType) -> Result<TensorType> {
    same_dtype(op, a, b)?;
    if a.rank() == 0 || b.rank() == 0 {
        return Err(GraphError::op(
            op,
            format!("needs rank ≥ 1 operands, got {a} and {b}"),
        ));
    }
    let mut ad = a.dims.clone();
    let mut bd = b.dims.clone();
    let a_vector = ad.len() == 1;
    let b_vector = bd.len() == 1;
    if a_vector {
        ad.insert(0, Dim::Static(1));
    }
    if b_vector {
        bd.push(Dim::Static(1));
    }
    let (k1, k2) = (&ad[ad.len() - 1], &bd[bd.len() - 2]);
    if !dims_compatible(k1, k2) {
        return Err(GraphError::op(
            op,
            format!(
                "inner dimensions differ: {} · {} ({k1} vs {k2})",
                shape_text(&a.dims),
                shape_text(&b.dims)
            ),
        ));
    }
    let batch = broadcast(op, &ad[..ad.len() - 2], &bd[..bd.len() - 2])?;
    let mut dims = batch;
    if !a_vector {
        dims.push(ad[ad.len() - 2].clone());
    }
    if !b_vector {
        dims.push(bd[bd.len() - 1].clone());
    }
    Ok(TensorType {
        dtype: a.dtype,
        dims,
    })
}

pub(super) fn infer_conv(
    op: &str,
    operands: &[Operand],
    strides: [usize; 2],
    pads: [usize; 4],
    dilations: [usize; 2],
    groups: usize,
) -> Result<TensorType> {
    let (x, w) = (operands[0].ty, operands[1].ty);
    float_input(op, x)?;
    same_dtype(op, x, w)?;
    if x.rank() != 4 || w.rank() != 4 {
        return Err(GraphError::op(
            op,
            format!(
                "needs an NCHW input and an (O, C/groups, kh, kw) weight, got {} and {}",
                shape_text(&x.dims),
                shape_text(&w.dims)
            ),
        ));
    }
    if groups == 0 || strides.contains(&0) || dilations.contains(&0) {
        return Err(GraphError::op(
            op,
            "groups, strides and dilations must be ≥ 1",
        ));
    }
    if let (Some(c), Some(wc)) = (x.dims[1].as_static(), w.dims[1].as_static())
        && c != wc * groups
    {
        return Err(GraphError::op(
            op,
            format!(
                "input {} has {c} channels; weight {} with {groups} groups expects {}",
                shape_text(&x.dims),
                shape_text(&w.dims),
                wc * groups
            ),
        ));
    }
    if let Some(o) = w.dims[0].as_static()
        && o % groups != 0
    {
        return Err(GraphError::op(
            op,
            format!("{o} output channels do not split into {groups} groups"),
        ));
    }
    if let Some(bias) = operands.get(2) {
        same_dtype(op, x, bias.ty)?;
        if bias.ty.rank() != 1 || !dims_compatible(&bias.ty.dims[0], &w.dims[0]) {
            return Err(GraphError::op(
                op,
                format!(
                    "bias {} does not match {} output channels",
                    shape_text(&bias.ty.dims),
                    w.dims[0]
                ),
            ));
        }
    }
    let mut dims = vec![x.dims[0].clone(), w.dims[0].clone()];
    for i in 0..2 {
        dims.push(
            match (x.dims[2 + i].as_static(), w.dims[2 + i].as_static()) {
                (Some(size), Some(k)) => Dim::Static(window_count(
                    op,
                    size,
                    k,
                    strides[i],
                    dilations[i],
                    pads[i] + pads[i + 2],
                    false,
                )?),
                _ => Dim::Unknown,
            },
        );
    }
    Ok(TensorType {
        dtype: x.dtype,
        dims,
    })
}

/// Output positions of a sliding window.
pub fn window_count(
    op: &str,
    size: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    total_pad: usize,
    ceil_mode: bool,
) -> Result<usize> {
    let span = dilation * (kernel.max(1) - 1) + 1;
    let padded = size + total_pad;
    if padded < span || stride == 0 {
        return Err(GraphError::op(
            op,
            format!("a window of {span} does not fit {size} (+{total_pad} padding)"),
        ));
    }
    let steps = padded - span;
    let mut count = if ceil_mode {
        steps.div_ceil(stride) + 1
    } else {
        steps / stride + 1
    };
    // A ceil-mode window must start inside the input or its left padding.
    if ceil_mode && (count - 1) * stride >= size + total_pad / 2 {
        count -= 1;
    }
    Ok(count)
}

pub(super) fn reduced(x: &TensorType, axes: &[usize], keepdims: bool) -> TensorType {
    let dims = x
        .dims
        .iter()
        .enumerate()
        .filter_map(|(d, dim)| match (axes.contains(&d), keepdims) {
            (true, true) => Some(Dim::Static(1)),
            (true, false) => None,
            (false, _) => Some(dim.clone()),
        })
        .collect();
    TensorType {
        dtype: x.dtype,
        dims,
    }
}

/// The entries of a constant 1-D (or scalar) integer tensor.
pub fn int_list(value: Option<&candle_core::Tensor>) -> Result<Option<Vec<i64>>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let flat = value.flatten_all()?.to_dtype(candle_core::DType::I64)?;
    Ok(Some(flat.to_vec1::<i64>()?))
}

pub(super) fn axes_of(op: &str, axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let a = normalize_axis(op, a, rank)?;
        if out.contains(&a) {
            return Err(GraphError::op(op, format!("axis {a} is repeated")));
        }
        out.push(a);
    }
    Ok(out)
}

/// The length of a 1-D shape operand.
pub(super) fn operand_length(op: &str, shape: &TensorType) -> Result<usize> {
    match shape.dims.as_slice() {
        [Dim::Static(n)] if shape.dtype.is_integer() => Ok(*n),
        _ => Err(GraphError::op(
            op,
            format!("the shape operand must be a 1-D integer tensor of static length, got {shape}"),
        )),
    }
}

/// Shape entries as dims: negative entries (`-1`, inferred) are unknown.
pub fn dims_of_shape_values(values: &[i64]) -> Vec<Dim> {
    values
        .iter()
        .map(|&v| {
            if v < 0 {
                Dim::Unknown
            } else {
                Dim::Static(v as usize)
            }
        })
        .collect()
}

/// A shape operand's entries as dims, where known: from a constant (`-1` and `0`
/// kept as Static markers for the caller) or a tracked shape value.
pub(super) fn shape_operand(op: &str, operand: &Operand) -> Result<Option<Vec<Dim>>> {
    operand_length(op, operand.ty)?;
    if let Some(values) = int_list(operand.value)? {
        return Ok(Some(dims_of_shape_values(&values)));
    }
    Ok(operand.shape_value.map(<[Dim]>::to_vec))
}

/// ONNX Reshape semantics over possibly symbolic dims. Unknown entries of the
/// target (a `-1`) are inferred when the rest is static.
pub(super) fn reshaped(
    op: &str,
    input: &[Dim],
    target: &[Dim],
    allow_zero: bool,
) -> Result<Vec<Dim>> {
    let mut dims: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Static(0) if !allow_zero => input.get(i).cloned().unwrap_or(Dim::Unknown),
            other => other.clone(),
        })
        .collect();
    if dims.iter().filter(|d| **d == Dim::Unknown).count() == 1
        && let (Some(total), Some(known)) = (
            input.iter().map(Dim::as_static).product::<Option<usize>>(),
            dims.iter()
                .filter(|d| **d != Dim::Unknown)
                .map(Dim::as_static)
                .product::<Option<usize>>(),
        )
    {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(GraphError::op(
                op,
                format!(
                    "cannot reshape {} into {}",
                    shape_text(input),
                    shape_text(target)
                ),
            ));
        }
        for d in dims.iter_mut() {
            if *d == Dim::Unknown {
                *d = Dim::Static(total / known);
            }
        }
    }
    if let (Some(total), Some(new_total)) = (
        input.iter().map(Dim::as_static).product::<Option<usize>>(),
        dims.iter().map(Dim::as_static).product::<Option<usize>>(),
    ) && total != new_total
    {
        return Err(GraphError::op(
            op,
            format!(
                "cannot reshape {} ({total} elements) into {} ({new_total})",
                shape_text(input),
                shape_text(&dims)
            ),
        ));
    }
    Ok(dims)
}

pub(super) fn infer_slice(op: &str, operands: &[Operand]) -> Result<Inferred> {
    let x = operands[0].ty;
    let lists: Vec<Option<Vec<i64>>> = operands[1..]
        .iter()
        .map(|o| int_list(o.value))
        .collect::<Result<_>>()?;
    let rank = x.rank();
    let (Some(starts), Some(ends)) = (&lists[0], &lists[1]) else {
        let mut dims = x.dims.clone();
        // Without constant bounds, only the sliced axes are unknown.
        match lists.get(2).cloned().flatten() {
            Some(axes) => {
                for a in axes_of(op, &axes, rank)? {
                    dims[a] = Dim::Unknown;
                }
            }
            None => dims.iter_mut().for_each(|d| *d = Dim::Unknown),
        }
        return Ok(TensorType {
            dtype: x.dtype,
            dims,
        }
        .into());
    };
    let axes = match lists.get(2).cloned().flatten() {
        Some(axes) => axes_of(op, &axes, rank)?,
        None => (0..starts.len()).collect(),
    };
    let steps = lists
        .get(3)
        .cloned()
        .flatten()
        .unwrap_or_else(|| vec![1; starts.len()]);
    if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(GraphError::op(
            op,
            "starts, ends, axes and steps must have the same length",
        ));
    }
    let mut dims = x.dims.clone();
    for (i, &axis) in axes.iter().enumerate() {
        dims[axis] = match x.dims[axis].as_static() {
            Some(n) => Dim::Static(slice_range(op, n, starts[i], ends[i], steps[i])?.len()),
            None => Dim::Unknown,
        };
    }
    // Slicing a known shape value keeps it known.
    let shape_value = match (operands[0].shape_value, axes.as_slice()) {
        (Some(values), [0]) => {
            let idx = slice_range(op, values.len(), starts[0], ends[0], steps[0])?;
            Some(idx.iter().map(|&i| values[i].clone()).collect())
        }
        _ => None,
    };
    Ok(Inferred {
        ty: TensorType {
            dtype: x.dtype,
            dims,
        },
        shape_value,
    })
}

/// The indices ONNX's Slice takes along one axis of `n` (clamped as numpy does).
pub fn slice_range(op: &str, n: usize, start: i64, end: i64, step: i64) -> Result<Vec<usize>> {
    if step == 0 {
        return Err(GraphError::op(op, "slice step must not be 0"));
    }
    let n = n as i64;
    let norm = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let (start, end) = (norm(start), norm(end));
    let mut out = Vec::new();
    if step > 0 {
        let (s, e) = (start.clamp(0, n), end.clamp(0, n));
        let mut i = s;
        while i < e {
            out.push(i as usize);
            i += step;
        }
    } else {
        let (s, e) = (start.clamp(-1, n - 1), end.clamp(-1, n - 1));
        let mut i = s;
        while i > e {
            out.push(i as usize);
            i += step;
        }
    }
    Ok(out)
}
