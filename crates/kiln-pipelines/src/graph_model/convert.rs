//! Request tensors to graph inputs and graph outputs to response tensors:
//! wire datatypes, nested JSON lists (MLflow's `inputs`/`instances`), and
//! columns of a frame stacked into one feature tensor.

use std::collections::HashMap;

use candle_core::{Device, Tensor as Candle};
use kiln_graph::{DType, Dim, TensorType};
use serde_json::Value;

use crate::error::{FieldProblem, PipelineError, ProblemKind};
use crate::frame::RawFrame;
use crate::tensor::{DataType, Tensor, TensorData, TensorSpec};

/// The wire datatype of a graph dtype (bf16 travels as FP32: the protocol has
/// no bf16).
pub fn wire_type(dtype: DType) -> DataType {
    match dtype {
        DType::Bool => DataType::Bool,
        DType::U8 => DataType::U8,
        DType::I32 => DataType::I32,
        DType::I64 => DataType::I64,
        DType::F16 => DataType::F16,
        DType::BF16 | DType::F32 => DataType::F32,
        DType::F64 => DataType::F64,
    }
}

/// A signature entry: `-1` for symbolic or unknown dims.
pub fn spec(name: &str, ty: &TensorType) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        datatype: wire_type(ty.dtype).protocol_name().to_string(),
        shape: ty
            .dims
            .iter()
            .map(|d| match d {
                Dim::Static(n) => *n as i64,
                _ => -1,
            })
            .collect(),
    }
}

fn problem(field: &str, kind: ProblemKind, message: impl Into<String>) -> FieldProblem {
    FieldProblem::new(field, kind, message)
}

fn from_f64(values: Vec<f64>, dims: &[usize], dtype: DType) -> candle_core::Result<Candle> {
    Candle::from_vec(values, dims, &Device::Cpu)?.to_dtype(dtype.storage())
}

/// A wire tensor as a graph input of `dtype`. The datatype must be the
/// model's (as Triton requires); values are not converted silently.
pub fn wire_to_input(tensor: &Tensor, dtype: DType) -> Result<Candle, FieldProblem> {
    let field = tensor.name.as_str();
    let expected = wire_type(dtype);
    if tensor.dtype != expected {
        return Err(problem(
            field,
            ProblemKind::Type {
                expected: expected.protocol_name().into(),
                found: tensor.dtype.protocol_name().into(),
            },
            format!(
                "datatype {} does not match the model's {}",
                tensor.dtype.protocol_name(),
                expected.protocol_name()
            ),
        ));
    }
    let count: usize = tensor.shape.iter().product();
    if count != tensor.data.len() {
        return Err(problem(
            field,
            ProblemKind::Malformed,
            format!(
                "shape {:?} needs {count} values, got {}",
                tensor.shape,
                tensor.data.len()
            ),
        ));
    }
    let dims = tensor.shape.as_slice();
    let device = &Device::Cpu;
    let built = match &tensor.data {
        TensorData::F32(v) => {
            Candle::from_slice(v, dims, device).and_then(|t| t.to_dtype(dtype.storage()))
        }
        TensorData::F64(v) => Candle::from_slice(v, dims, device),
        TensorData::I64(v) => {
            Candle::from_slice(v, dims, device).and_then(|t| t.to_dtype(dtype.storage()))
        }
        TensorData::U64(v) => {
            let bytes: Vec<u8> = v.iter().map(|&x| x.min(255) as u8).collect();
            Candle::from_vec(bytes, dims, device)
        }
        TensorData::Bool(v) => Candle::from_vec(
            v.iter().map(|&b| u8::from(b)).collect::<Vec<u8>>(),
            dims,
            device,
        ),
        TensorData::Bytes(_) => {
            return Err(problem(
                field,
                ProblemKind::Malformed,
                "BYTES tensors are not graph inputs",
            ));
        }
    };
    built.map_err(|e| problem(field, ProblemKind::Malformed, e.to_string()))
}

/// A graph output as a wire tensor.
pub fn output_to_wire(name: &str, tensor: &Candle, dtype: DType) -> Result<Tensor, PipelineError> {
    let fail = |e: candle_core::Error| PipelineError::Execution(format!("output {name}: {e}"));
    let flat = tensor.flatten_all().map_err(fail)?;
    let data = match dtype {
        DType::Bool => TensorData::Bool(
            flat.to_vec1::<u8>()
                .map_err(fail)?
                .into_iter()
                .map(|b| b != 0)
                .collect(),
        ),
        DType::U8 => TensorData::U64(
            flat.to_vec1::<u8>()
                .map_err(fail)?
                .into_iter()
                .map(u64::from)
                .collect(),
        ),
        DType::I32 | DType::I64 => TensorData::I64(
            flat.to_dtype(candle_core::DType::I64)
                .map_err(fail)?
                .to_vec1::<i64>()
                .map_err(fail)?,
        ),
        DType::F64 => TensorData::F64(flat.to_vec1::<f64>().map_err(fail)?),
        DType::F16 | DType::BF16 | DType::F32 => TensorData::F32(
            flat.to_dtype(candle_core::DType::F32)
                .map_err(fail)?
                .to_vec1::<f32>()
                .map_err(fail)?,
        ),
    };
    Ok(Tensor {
        name: name.to_string(),
        dtype: wire_type(dtype),
        shape: tensor.dims().to_vec(),
        data,
    })
}

/// Nested JSON lists to (shape, values); ragged lists are an error.
fn nested(
    field: &str,
    value: &Value,
    dims: &mut Vec<usize>,
    depth: usize,
    out: &mut Vec<f64>,
) -> Result<(), FieldProblem> {
    match value {
        Value::Array(items) => {
            if depth == dims.len() {
                if !out.is_empty() {
                    return Err(problem(
                        field,
                        ProblemKind::Malformed,
                        "lists are ragged (nested to different depths)",
                    ));
                }
                dims.push(items.len());
            } else if dims[depth] != items.len() {
                return Err(problem(
                    field,
                    ProblemKind::Malformed,
                    format!(
                        "lists are ragged: {} items where an earlier list at the same depth had {}",
                        items.len(),
                        dims[depth]
                    ),
                ));
            }
            for item in items {
                nested(field, item, dims, depth + 1, out)?;
            }
            Ok(())
        }
        scalar => {
            if depth != dims.len() {
                return Err(problem(
                    field,
                    ProblemKind::Malformed,
                    "lists are ragged (a number where a list was expected)",
                ));
            }
            out.push(match scalar {
                Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
                Value::Bool(b) => f64::from(u8::from(*b)),
                // JSON has no NaN: pandas and Kiln write it as null.
                Value::Null => f64::NAN,
                Value::String(s) => match s.as_str() {
                    "inf" | "Infinity" => f64::INFINITY,
                    "-inf" | "-Infinity" => f64::NEG_INFINITY,
                    "nan" | "NaN" => f64::NAN,
                    other => {
                        return Err(problem(
                            field,
                            ProblemKind::Type {
                                expected: "number".into(),
                                found: "string".into(),
                            },
                            format!("{other:?} is not a number"),
                        ));
                    }
                },
                other => {
                    return Err(problem(
                        field,
                        ProblemKind::Malformed,
                        format!("{other} is not a number"),
                    ));
                }
            });
            Ok(())
        }
    }
}

/// Rows of cells (each a nested list or a number) as one tensor with the rows
/// as its first dim.
fn stack_rows(field: &str, rows: &[Value], dtype: DType) -> Result<Candle, FieldProblem> {
    let mut dims = Vec::new();
    let mut values = Vec::new();
    nested(
        field,
        &Value::Array(rows.to_vec()),
        &mut dims,
        0,
        &mut values,
    )?;
    if (dtype.is_integer() || dtype == DType::Bool)
        && let Some(bad) = values.iter().find(|v| v.fract() != 0.0 || !v.is_finite())
    {
        return Err(problem(
            field,
            ProblemKind::Type {
                expected: dtype.name().into(),
                found: "number".into(),
            },
            format!("{bad} is not an integer"),
        ));
    }
    from_f64(values, &dims, dtype)
        .map_err(|e| problem(field, ProblemKind::Malformed, e.to_string()))
}

/// A frame as graph inputs: one column per input (cells are that input's rows),
/// or, for a model with one input, every column in order as its second axis
/// (`dataframe_split` / CSV / lists of rows feeding a `[batch, features]` input).
pub fn frame_to_inputs(
    frame: &RawFrame,
    inputs: &[(String, TensorType)],
) -> Result<HashMap<String, Candle>, PipelineError> {
    let by_name = inputs
        .iter()
        .all(|(name, _)| frame.columns.iter().any(|(c, _)| c == name));
    let mut tensors = HashMap::new();
    let mut problems = Vec::new();
    if by_name && !frame.positional {
        for (name, ty) in inputs {
            let Some((_, cells)) = frame.columns.iter().find(|(c, _)| c == name) else {
                continue;
            };
            match stack_rows(name, cells, ty.dtype) {
                Ok(t) => {
                    tensors.insert(name.clone(), t);
                }
                Err(p) => problems.push(p),
            }
        }
        for (column, _) in &frame.columns {
            if !inputs.iter().any(|(n, _)| n == column) {
                let known: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
                problems.push(problem(
                    column,
                    ProblemKind::Unknown,
                    format!(
                        "is not an input of this model (inputs: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
    } else if let [(name, ty)] = inputs {
        let rows = frame.columns.first().map(|(_, c)| c.len()).unwrap_or(0);
        let row_values: Vec<Value> = (0..rows)
            .map(|i| {
                Value::Array(
                    frame
                        .columns
                        .iter()
                        .map(|(_, cells)| cells.get(i).cloned().unwrap_or(Value::Null))
                        .collect(),
                )
            })
            .collect();
        match stack_rows(name, &row_values, ty.dtype) {
            Ok(t) => {
                tensors.insert(name.clone(), t);
            }
            Err(p) => problems.push(p),
        }
    } else {
        for (name, ty) in inputs {
            if !frame.columns.iter().any(|(c, _)| c == name) {
                problems.push(problem(
                    name,
                    ProblemKind::Missing,
                    format!("is required ({})", ty),
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(tensors)
    } else {
        Err(PipelineError::InvalidInput(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_lists_become_tensors_and_ragged_lists_are_refused() {
        let rows = vec![json!([[1, 2], [3, 4]]), json!([[5, 6], [7, "inf"]])];
        let t = stack_rows("x", &rows, DType::F32).unwrap();
        assert_eq!(t.dims(), &[2, 2, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v[7], f32::INFINITY);
        let err = stack_rows("x", &[json!([1, 2]), json!([3])], DType::F32).unwrap_err();
        assert!(err.message.contains("ragged"), "{err}");
        let err = stack_rows("ids", &[json!([1.5])], DType::I64).unwrap_err();
        assert!(err.message.contains("not an integer"), "{err}");
    }

    #[test]
    fn columns_feed_a_single_feature_input_in_order() {
        let frame = RawFrame {
            columns: vec![
                ("a".into(), vec![json!(1), json!(2)]),
                ("b".into(), vec![json!(3), json!(4)]),
            ],
            positional: false,
        };
        let inputs = vec![(
            "x".to_string(),
            TensorType::new(DType::F64, [Dim::sym("batch"), 2.into()]),
        )];
        let t = &frame_to_inputs(&frame, &inputs).unwrap()["x"];
        assert_eq!(
            t.to_vec2::<f64>().unwrap(),
            vec![vec![1.0, 3.0], vec![2.0, 4.0]]
        );
    }
}
