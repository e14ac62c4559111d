//! Shape and dtype inference for every op: what the builder knows about each
//! result, and where a wrong shape becomes a build-time error naming the op and
//! both shapes.

mod rules;

use crate::error::{GraphError, Result};
use crate::ops::{Op, UnaryOp};
use crate::types::{DType, Dim, TensorType, broadcast, normalize_axis, shape_text};

use rules::{
    axes_of, dims_compatible, float_input, infer_conv, infer_matmul, infer_slice, operand_length,
    product, reduced, reshaped, same_dtype, shape_operand,
};
pub use rules::{dims_of_shape_values, int_list, slice_range, window_count};

/// What inference knows about one operand.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    pub ty: &'a TensorType,
    /// The value when it is a constant known at build time.
    pub value: Option<&'a candle_core::Tensor>,
    /// For a 1-D integer value that holds a shape (from `Shape`, constants,
    /// gathers and concats of them): its entries as dims, symbols included.
    pub shape_value: Option<&'a [Dim]>,
}

/// What inference learns about one result.
#[derive(Debug, Clone, PartialEq)]
pub struct Inferred {
    pub ty: TensorType,
    pub shape_value: Option<Vec<Dim>>,
}

impl From<TensorType> for Inferred {
    fn from(ty: TensorType) -> Self {
        Inferred {
            ty,
            shape_value: None,
        }
    }
}

impl Op {
    /// Result types from operand facts; the error names the op and the shapes.
    pub fn infer(&self, operands: &[Operand]) -> Result<Vec<Inferred>> {
        let name = self.name();
        let (lo, hi) = self.arity();
        if operands.len() < lo || operands.len() > hi {
            return Err(GraphError::op(
                name,
                format!(
                    "takes {} inputs, got {}",
                    if lo == hi {
                        lo.to_string()
                    } else if hi == usize::MAX {
                        format!("at least {lo}")
                    } else {
                        format!("{lo} to {hi}")
                    },
                    operands.len()
                ),
            ));
        }
        let t = |i: usize| operands[i].ty;
        let one = |ty: TensorType| Ok(vec![Inferred::from(ty)]);
        match self {
            Op::MatMul => one(infer_matmul(name, t(0), t(1))?),
            Op::MatMulBias { .. } => {
                let product = infer_matmul(name, t(0), t(1))?;
                same_dtype(name, &product, t(2))?;
                let mut dims = broadcast(name, &product.dims, &t(2).dims)?;
                if let Some(residual) = operands.get(3) {
                    same_dtype(name, &product, residual.ty)?;
                    dims = broadcast(name, &dims, &residual.ty.dims)?;
                }
                one(TensorType {
                    dtype: product.dtype,
                    dims,
                })
            }
            Op::Binary { .. } => {
                same_dtype(name, t(0), t(1))?;
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: broadcast(name, &t(0).dims, &t(1).dims)?,
                })
            }
            Op::Compare { .. } => {
                same_dtype(name, t(0), t(1))?;
                one(TensorType {
                    dtype: DType::Bool,
                    dims: broadcast(name, &t(0).dims, &t(1).dims)?,
                })
            }
            Op::Unary { kind } => {
                if kind.float_only() && !t(0).dtype.is_float() {
                    return Err(GraphError::op(
                        name,
                        format!("needs a float input, got {}", t(0)),
                    ));
                }
                if *kind == UnaryOp::Not && t(0).dtype != DType::Bool {
                    return Err(GraphError::op(
                        name,
                        format!("needs a bool input, got {}", t(0)),
                    ));
                }
                one(t(0).clone())
            }
            Op::Clip => {
                for i in 1..3 {
                    same_dtype(name, t(0), t(i))?;
                    if t(i).rank() != 0 {
                        return Err(GraphError::op(
                            name,
                            format!("min and max must be scalars, got {}", t(i)),
                        ));
                    }
                }
                one(t(0).clone())
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => {
                float_input(name, t(0))?;
                t(0).axis(name, *axis)?;
                one(t(0).clone())
            }
            Op::Reduce { keepdims, .. } => {
                let axes = match operands.get(1) {
                    None => Some((0..t(0).rank()).collect()),
                    Some(a) => int_list(a.value)?
                        .map(|axes| axes_of(name, &axes, t(0).rank()))
                        .transpose()?,
                };
                match axes {
                    Some(axes) => one(reduced(t(0), &axes, *keepdims)),
                    None => one(TensorType {
                        dtype: t(0).dtype,
                        dims: vec![Dim::Unknown; if *keepdims { t(0).rank() } else { 0 }],
                    }),
                }
            }
            Op::ArgMax { axis, keepdims } => {
                let axis = t(0).axis(name, *axis)?;
                let mut ty = reduced(t(0), &[axis], *keepdims);
                ty.dtype = DType::I64;
                one(ty)
            }
            Op::LayerNorm { axis, .. } => {
                float_input(name, t(0))?;
                let axis = t(0).axis(name, *axis)?;
                let normalized = &t(0).dims[axis..];
                for i in 1..operands.len() {
                    same_dtype(name, t(0), t(i))?;
                    broadcast(name, normalized, &t(i).dims)?;
                }
                one(t(0).clone())
            }
            Op::RmsNorm { .. } => {
                float_input(name, t(0))?;
                same_dtype(name, t(0), t(1))?;
                let last = t(0).dims.last().cloned().unwrap_or(Dim::Static(1));
                broadcast(name, &[last], &t(1).dims)?;
                one(t(0).clone())
            }
            Op::BatchNorm { .. } | Op::GroupNorm { .. } => {
                float_input(name, t(0))?;
                if t(0).rank() < 2 {
                    return Err(GraphError::op(
                        name,
                        format!("needs an (N, C, ...) input, got {}", t(0)),
                    ));
                }
                let channels = &t(0).dims[1];
                for i in 1..operands.len() {
                    same_dtype(name, t(0), t(i))?;
                    if t(i).rank() != 1 || !dims_compatible(&t(i).dims[0], channels) {
                        return Err(GraphError::op(
                            name,
                            format!(
                                "parameter {} must be 1-D of {channels} channels, got {}",
                                i,
                                shape_text(&t(i).dims)
                            ),
                        ));
                    }
                }
                if let (Op::GroupNorm { groups, .. }, Some(c)) = (self, channels.as_static())
                    && (*groups == 0 || c % groups != 0)
                {
                    return Err(GraphError::op(
                        name,
                        format!("{c} channels do not split into {groups} groups"),
                    ));
                }
                one(t(0).clone())
            }
            Op::Conv2d {
                strides,
                pads,
                dilations,
                groups,
            } => infer_conv(name, operands, *strides, *pads, *dilations, *groups)
                .map(|t| vec![t.into()]),
            Op::Pool2d {
                kernel,
                strides,
                pads,
                ceil_mode,
                ..
            } => {
                float_input(name, t(0))?;
                if t(0).rank() != 4 {
                    return Err(GraphError::op(
                        name,
                        format!("needs an NCHW input, got {}", shape_text(&t(0).dims)),
                    ));
                }
                let mut dims = t(0).dims.clone();
                for i in 0..2 {
                    dims[2 + i] = match t(0).dims[2 + i].as_static() {
                        Some(size) => Dim::Static(window_count(
                            name,
                            size,
                            kernel[i],
                            strides[i],
                            1,
                            pads[i] + pads[i + 2],
                            *ceil_mode,
                        )?),
                        None => Dim::Unknown,
                    };
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Reshape { allow_zero } => {
                let target = shape_operand(name, &operands[1])?;
                let dims = match target {
                    Some(target) => reshaped(name, &t(0).dims, &target, *allow_zero)?,
                    None => vec![Dim::Unknown; operand_length(name, t(1))?],
                };
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Flatten { axis } => {
                let rank = t(0).rank();
                let axis = normalize_axis(name, *axis, rank + 1)?;
                let dims = vec![product(&t(0).dims[..axis]), product(&t(0).dims[axis..])];
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Transpose { perm } => {
                let rank = t(0).rank();
                let mut seen = vec![false; rank];
                if perm.len() != rank
                    || perm
                        .iter()
                        .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
                {
                    return Err(GraphError::op(
                        name,
                        format!("{perm:?} is not a permutation of {rank} axes"),
                    ));
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: perm.iter().map(|&p| t(0).dims[p].clone()).collect(),
                })
            }
            Op::Concat { axis } => {
                let rank = t(0).rank();
                let axis = normalize_axis(name, *axis, rank)?;
                let mut dims = t(0).dims.clone();
                let mut total = Some(0usize);
                let mut symbolic = Vec::new();
                for op in operands {
                    same_dtype(name, t(0), op.ty)?;
                    if op.ty.rank() != rank {
                        return Err(GraphError::op(
                            name,
                            format!(
                                "inputs of different ranks: {} and {}",
                                shape_text(&t(0).dims),
                                shape_text(&op.ty.dims)
                            ),
                        ));
                    }
                    for (d, (a, b)) in dims.iter_mut().zip(&op.ty.dims).enumerate() {
                        if d == axis {
                            continue;
                        }
                        if !dims_compatible(a, b) {
                            return Err(GraphError::op(
                                name,
                                format!(
                                    "shapes {} and {} differ outside axis {axis}",
                                    shape_text(&t(0).dims),
                                    shape_text(&op.ty.dims)
                                ),
                            ));
                        }
                        if *a == Dim::Unknown {
                            *a = b.clone();
                        }
                    }
                    match &op.ty.dims[axis] {
                        Dim::Static(n) => total = total.map(|t| t + n),
                        other => {
                            total = None;
                            symbolic.push(other.clone());
                        }
                    }
                }
                dims[axis] = match total {
                    Some(n) => Dim::Static(n),
                    None if operands.len() == 1 => symbolic.remove(0),
                    None => Dim::Unknown,
                };
                // Concatenated shape values stay known (`[batch, -1, 64]`).
                let shape_value = if rank == 1 {
                    operands
                        .iter()
                        .map(|o| o.shape_value.map(<[Dim]>::to_vec))
                        .collect::<Option<Vec<_>>>()
                        .map(|parts| parts.concat())
                } else {
                    None
                };
                Ok(vec![Inferred {
                    ty: TensorType {
                        dtype: t(0).dtype,
                        dims,
                    },
                    shape_value,
                }])
            }
            Op::Split { axis, outputs } => {
                let axis = t(0).axis(name, *axis)?;
                let sizes: Option<Vec<i64>> = match operands.get(1) {
                    Some(o) => int_list(o.value)?,
                    None => t(0).dims[axis].as_static().map(|n| {
                        let part = n.div_ceil((*outputs).max(1));
                        (0..*outputs)
                            .map(|i| part.min(n.saturating_sub(i * part)) as i64)
                            .collect()
                    }),
                };
                if let Some(sizes) = &sizes {
                    if sizes.len() != *outputs || sizes.iter().any(|&s| s < 0) {
                        return Err(GraphError::op(
                            name,
                            format!("split sizes {sizes:?} do not give {outputs} parts"),
                        ));
                    }
                    if let Some(n) = t(0).dims[axis].as_static()
                        && sizes.iter().sum::<i64>() != n as i64
                    {
                        return Err(GraphError::op(
                            name,
                            format!("split sizes {sizes:?} do not add up to {n}"),
                        ));
                    }
                }
                Ok((0..*outputs)
                    .map(|i| {
                        let mut dims = t(0).dims.clone();
                        dims[axis] = match &sizes {
                            Some(s) => Dim::Static(s[i] as usize),
                            None => Dim::Unknown,
                        };
                        TensorType {
                            dtype: t(0).dtype,
                            dims,
                        }
                        .into()
                    })
                    .collect())
            }
            Op::Slice => infer_slice(name, operands).map(|t| vec![t]),
            Op::Gather { axis } => {
                let axis = t(0).axis(name, *axis)?;
                if !t(1).dtype.is_integer() {
                    return Err(GraphError::op(
                        name,
                        format!("indices must be integers, got {}", t(1)),
                    ));
                }
                let mut dims = t(0).dims[..axis].to_vec();
                dims.extend(t(1).dims.iter().cloned());
                dims.extend(t(0).dims[axis + 1..].iter().cloned());
                // Gathering from a known shape keeps it known.
                let shape_value = match (operands[0].shape_value, int_list(operands[1].value)?) {
                    (Some(values), Some(indices)) if t(0).rank() == 1 => indices
                        .iter()
                        .map(|&i| {
                            let i = if i < 0 { i + values.len() as i64 } else { i };
                            values.get(i as usize).cloned()
                        })
                        .collect(),
                    _ => None,
                };
                Ok(vec![Inferred {
                    ty: TensorType {
                        dtype: t(0).dtype,
                        dims,
                    },
                    shape_value,
                }])
            }
            Op::Unsqueeze => {
                let axes = int_list(operands[1].value)?
                    .ok_or_else(|| GraphError::op(name, "axes must be a constant"))?;
                let rank = t(0).rank() + axes.len();
                let axes = axes_of(name, &axes, rank)?;
                let mut rest = t(0).dims.iter();
                let dims = (0..rank)
                    .map(|d| {
                        if axes.contains(&d) {
                            Dim::Static(1)
                        } else {
                            rest.next().cloned().unwrap_or(Dim::Unknown)
                        }
                    })
                    .collect();
                let shape_value = match operands[0].shape_value {
                    Some(v) if t(0).rank() == 0 => Some(v.to_vec()),
                    _ => None,
                };
                Ok(vec![Inferred {
                    ty: TensorType {
                        dtype: t(0).dtype,
                        dims,
                    },
                    shape_value,
                }])
            }
            Op::Squeeze => {
                let axes = match operands.get(1) {
                    Some(o) => {
                        let axes = int_list(o.value)?
                            .ok_or_else(|| GraphError::op(name, "axes must be a constant"))?;
                        axes_of(name, &axes, t(0).rank())?
                    }
                    None => {
                        let axes: Vec<usize> = (0..t(0).rank())
                            .filter(|&d| t(0).dims[d] == Dim::Static(1))
                            .collect();
                        if t(0).dims.iter().any(|d| d.as_static().is_none()) {
                            return Err(GraphError::op(
                                name,
                                format!(
                                    "without axes needs a static shape, got {}",
                                    shape_text(&t(0).dims)
                                ),
                            ));
                        }
                        axes
                    }
                };
                for &a in &axes {
                    if matches!(t(0).dims[a], Dim::Static(n) if n != 1) {
                        return Err(GraphError::op(
                            name,
                            format!("axis {a} of {} is not 1", shape_text(&t(0).dims)),
                        ));
                    }
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: (0..t(0).rank())
                        .filter(|d| !axes.contains(d))
                        .map(|d| t(0).dims[d].clone())
                        .collect(),
                })
            }
            Op::Expand => {
                let dims = match shape_operand(name, &operands[1])? {
                    Some(target) => broadcast(name, &t(0).dims, &target)?,
                    None => {
                        let len = operand_length(name, t(1))?;
                        vec![Dim::Unknown; len.max(t(0).rank())]
                    }
                };
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
            Op::Where => {
                if t(0).dtype != DType::Bool {
                    return Err(GraphError::op(
                        name,
                        format!("condition must be bool, got {}", t(0)),
                    ));
                }
                same_dtype(name, t(1), t(2))?;
                let dims = broadcast(name, &t(0).dims, &t(1).dims)?;
                let dims = broadcast(name, &dims, &t(2).dims)?;
                one(TensorType {
                    dtype: t(1).dtype,
                    dims,
                })
            }
            Op::Cast { to } => one(TensorType {
                dtype: *to,
                dims: t(0).dims.clone(),
            }),
            Op::Shape { start, end } => {
                let rank = t(0).rank() as i64;
                let clamp = |i: i64| (if i < 0 { i + rank } else { i }).clamp(0, rank) as usize;
                let (s, e) = (clamp(*start), clamp(end.unwrap_or(rank)));
                let values: Vec<Dim> = if s < e {
                    t(0).dims[s..e].to_vec()
                } else {
                    Vec::new()
                };
                Ok(vec![Inferred {
                    ty: TensorType::new(DType::I64, [values.len()]),
                    shape_value: Some(values),
                }])
            }
            Op::ConstantOfShape { dtype, .. } => {
                let dims = match shape_operand(name, &operands[0])? {
                    Some(dims) => dims,
                    None => vec![Dim::Unknown; operand_length(name, t(0))?],
                };
                one(TensorType {
                    dtype: *dtype,
                    dims,
                })
            }
            Op::Range => {
                for i in 0..3 {
                    same_dtype(name, t(0), t(i))?;
                    if t(i).rank() != 0 {
                        return Err(GraphError::op(name, format!("needs scalars, got {}", t(i))));
                    }
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims: vec![Dim::Unknown],
                })
            }
            Op::Identity => Ok(vec![Inferred {
                ty: t(0).clone(),
                shape_value: operands[0].shape_value.map(<[Dim]>::to_vec),
            }]),
            Op::Fused { .. } => {
                let mut dims = t(0).dims.clone();
                for o in &operands[1..] {
                    same_dtype(name, t(0), o.ty)?;
                    dims = broadcast(name, &dims, &o.ty.dims)?;
                }
                one(TensorType {
                    dtype: t(0).dtype,
                    dims,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operand(ty: &TensorType) -> Operand<'_> {
        Operand {
            ty,
            value: None,
            shape_value: None,
        }
    }

    #[test]
    fn matmul_broadcasts_batches_and_names_mismatched_inner_dims() {
        let a = TensorType::new(
            DType::F32,
            [Dim::sym("batch"), 1.into(), 3.into(), 4.into()],
        );
        let b = TensorType::new(DType::F32, [5usize, 4, 6]);
        let out = Op::MatMul.infer(&[operand(&a), operand(&b)]).unwrap();
        assert_eq!(
            out[0].ty,
            TensorType::new(
                DType::F32,
                [Dim::sym("batch"), 5.into(), 3.into(), 6.into()]
            )
        );
        let bad = TensorType::new(DType::F32, [5usize, 3]);
        let err = Op::MatMul.infer(&[operand(&a), operand(&bad)]).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("matmul"), "{text}");
        assert!(
            text.contains("[batch, 1, 3, 4]") && text.contains("[5, 3]"),
            "{text}"
        );
    }

    #[test]
    fn conv_and_pool_output_sizes_follow_torch() {
        assert_eq!(window_count("conv2d", 32, 3, 2, 1, 2, false).unwrap(), 16);
        assert_eq!(window_count("max_pool2d", 7, 2, 2, 1, 0, false).unwrap(), 3);
        assert_eq!(window_count("max_pool2d", 7, 2, 2, 1, 0, true).unwrap(), 4);
        assert_eq!(window_count("conv2d", 10, 3, 1, 2, 0, false).unwrap(), 6);
    }

    #[test]
    fn slice_ranges_clamp_like_numpy() {
        assert_eq!(slice_range("slice", 5, 1, i64::MAX, 2).unwrap(), vec![1, 3]);
        assert_eq!(
            slice_range("slice", 5, -1, i64::MIN, -1).unwrap(),
            vec![4, 3, 2, 1, 0]
        );
        assert_eq!(slice_range("slice", 5, -2, 10, 1).unwrap(), vec![3, 4]);
        assert!(slice_range("slice", 5, 0, 1, 0).is_err());
    }
}
