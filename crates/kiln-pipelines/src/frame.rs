//! Tabular inputs: raw frames as protocols deliver them (JSON cells, CSV text,
//! tensors), column signatures, and conformance to a signature as MLflow does it
//! (missing required columns rejected, extra columns ignored, safe widening only).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{FieldProblem, PipelineError, ProblemKind};
use crate::tensor::{Tensor, TensorData};

/// Column types, with MLflow's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Boolean,
    Integer,
    Long,
    Float,
    Double,
    String,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Boolean => "boolean",
            ColumnType::Integer => "integer",
            ColumnType::Long => "long",
            ColumnType::Float => "float",
            ColumnType::Double => "double",
            ColumnType::String => "string",
        }
    }

    /// The Open Inference Protocol datatype that carries this column.
    pub fn protocol_datatype(self) -> &'static str {
        match self {
            ColumnType::Boolean => "BOOL",
            ColumnType::Integer => "INT32",
            ColumnType::Long => "INT64",
            ColumnType::Float => "FP32",
            ColumnType::Double => "FP64",
            ColumnType::String => "BYTES",
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One named, typed column of a signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// A tabular model's input and output columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    pub inputs: Vec<ColumnSpec>,
    pub outputs: Vec<ColumnSpec>,
}

/// Typed column values after conformance.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnValues {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Float(Vec<f64>),
    Str(Vec<String>),
}

/// A conformed frame: the signature's columns, in signature order, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub n_rows: usize,
    pub columns: Vec<(String, ColumnValues)>,
}

impl Frame {
    pub fn column(&self, name: &str) -> Option<&ColumnValues> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Columns as delivered, cells still JSON. `positional` frames had no column names
/// and are matched to the signature by position.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawFrame {
    pub columns: Vec<(String, Vec<Value>)>,
    pub positional: bool,
}

fn malformed(field: &str, message: impl Into<String>) -> PipelineError {
    PipelineError::invalid(field, ProblemKind::Malformed, message)
}

impl RawFrame {
    /// Pandas `split` orientation: `{"columns": [...], "data": [[...], ...]}`.
    pub fn from_split(value: &Value) -> Result<Self, PipelineError> {
        let field = "dataframe_split";
        let object = value
            .as_object()
            .ok_or_else(|| malformed(field, "must be an object with `columns` and `data`"))?;
        let rows = object
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(field, "`data` must be a list of rows"))?;
        let names: Option<Vec<String>> = match object.get("columns") {
            None | Some(Value::Null) => None,
            Some(Value::Array(names)) => Some(
                names
                    .iter()
                    .map(|n| match n {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect(),
            ),
            Some(_) => return Err(malformed(field, "`columns` must be a list of names")),
        };
        let rows: Vec<&Vec<Value>> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                row.as_array()
                    .ok_or_else(|| malformed(field, format!("row {i} of `data` is not a list")))
            })
            .collect::<Result<_, _>>()?;
        let width = names
            .as_ref()
            .map(Vec::len)
            .or_else(|| rows.first().map(|r| r.len()))
            .unwrap_or(0);
        Self::from_rows(field, names, width, &rows)
    }

    fn from_rows(
        field: &str,
        names: Option<Vec<String>>,
        width: usize,
        rows: &[&Vec<Value>],
    ) -> Result<Self, PipelineError> {
        let positional = names.is_none();
        let names = names.unwrap_or_else(|| (0..width).map(|i| i.to_string()).collect());
        let mut columns: Vec<(String, Vec<Value>)> = names
            .into_iter()
            .map(|n| (n, Vec::with_capacity(rows.len())))
            .collect();
        for (i, row) in rows.iter().enumerate() {
            if row.len() != width {
                return Err(malformed(
                    field,
                    format!(
                        "row {i} has {} values but there are {width} columns",
                        row.len()
                    ),
                ));
            }
            for (column, cell) in columns.iter_mut().zip(row.iter()) {
                column.1.push(cell.clone());
            }
        }
        Ok(RawFrame {
            columns,
            positional,
        })
    }

    /// Pandas `records` orientation: `[{"col": value, ...}, ...]`. A key missing in
    /// some rows becomes a null cell there.
    pub fn from_records(field: &str, records: &[Value]) -> Result<Self, PipelineError> {
        let mut frame = RawFrame::default();
        for (i, record) in records.iter().enumerate() {
            let object = record
                .as_object()
                .ok_or_else(|| malformed(field, format!("record {i} is not an object")))?;
            for (key, value) in object {
                let index = match frame.columns.iter().position(|(n, _)| n == key) {
                    Some(index) => index,
                    None => {
                        frame.columns.push((key.clone(), vec![Value::Null; i]));
                        frame.columns.len() - 1
                    }
                };
                frame.columns[index].1.push(value.clone());
            }
            for column in frame.columns.iter_mut() {
                if column.1.len() < i + 1 {
                    column.1.push(Value::Null);
                }
            }
        }
        Ok(frame)
    }

    /// MLflow's `instances` / `inputs`: a list of records, a list of rows
    /// (positional), or an object of columns.
    pub fn from_instances(field: &str, value: &Value) -> Result<Self, PipelineError> {
        match value {
            Value::Array(items) if items.iter().all(Value::is_object) => {
                Self::from_records(field, items)
            }
            Value::Array(items) if items.iter().all(Value::is_array) => {
                let rows: Vec<&Vec<Value>> = items.iter().filter_map(Value::as_array).collect();
                let width = rows.first().map(|r| r.len()).unwrap_or(0);
                Self::from_rows(field, None, width, &rows)
            }
            Value::Object(columns) => {
                let mut frame = RawFrame::default();
                for (name, values) in columns {
                    let cells = match values {
                        Value::Array(cells) => cells.clone(),
                        scalar => vec![scalar.clone()],
                    };
                    frame.columns.push((name.clone(), cells));
                }
                Ok(frame)
            }
            _ => Err(malformed(
                field,
                "must be a list of records, a list of rows, or an object of columns",
            )),
        }
    }

    /// CSV text with a header row. Cells that parse as numbers become numbers,
    /// `true`/`false` booleans, empty cells nulls, the rest strings.
    pub fn from_csv(text: &str) -> Result<Self, PipelineError> {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let headers = reader
            .headers()
            .map_err(|e| malformed("csv", format!("cannot read the header row: {e}")))?
            .clone();
        let mut columns: Vec<(String, Vec<Value>)> = headers
            .iter()
            .map(|h| (h.to_string(), Vec::new()))
            .collect();
        for (i, record) in reader.records().enumerate() {
            let record =
                record.map_err(|e| malformed("csv", format!("data row {}: {e}", i + 1)))?;
            for (column, cell) in columns.iter_mut().zip(record.iter()) {
                column.1.push(parse_text_cell(cell));
            }
        }
        Ok(RawFrame {
            columns,
            positional: false,
        })
    }

    /// Tensors named after columns (shape `[n]` or `[n, 1]`), or one `[n, k]` tensor
    /// whose columns follow the signature's order.
    pub fn from_tensors(tensors: &[Tensor]) -> Result<Self, PipelineError> {
        if let [single] = tensors
            && single.shape.len() == 2
            && single.shape[1] > 1
        {
            let (n, k) = (single.shape[0], single.shape[1]);
            let columns = (0..k)
                .map(|j| {
                    (
                        j.to_string(),
                        (0..n).map(|i| single.data.json_at(i * k + j)).collect(),
                    )
                })
                .collect();
            return Ok(RawFrame {
                columns,
                positional: true,
            });
        }
        let mut frame = RawFrame::default();
        for tensor in tensors {
            let rows = tensor.shape.first().copied().unwrap_or(tensor.data.len());
            if tensor.data.len() != rows {
                return Err(malformed(
                    &tensor.name,
                    format!(
                        "a column tensor must have shape [n] or [n, 1], got {:?}",
                        tensor.shape
                    ),
                ));
            }
            let cells = match &tensor.data {
                TensorData::Bytes(items) => items
                    .iter()
                    .map(|b| Value::String(String::from_utf8_lossy(b).into_owned()))
                    .collect(),
                data => (0..rows).map(|i| data.json_at(i)).collect(),
            };
            frame.columns.push((tensor.name.clone(), cells));
        }
        Ok(frame)
    }

    /// Conform to a signature: every problem is collected and reported at once.
    pub fn conform(&self, signature: &Signature) -> Result<Frame, PipelineError> {
        let mut problems = Vec::new();
        let n_rows = self.columns.first().map(|c| c.1.len()).unwrap_or(0);
        if n_rows == 0 {
            return Err(malformed("data", "the input has no rows"));
        }
        if let Some((name, cells)) = self.columns.iter().find(|c| c.1.len() != n_rows) {
            return Err(malformed(
                name,
                format!("column has {} values, expected {n_rows}", cells.len()),
            ));
        }
        let mut columns = Vec::with_capacity(signature.inputs.len());
        for (position, spec) in signature.inputs.iter().enumerate() {
            let cells = if self.positional {
                self.columns.get(position).map(|c| &c.1)
            } else {
                self.columns.iter().find(|c| c.0 == spec.name).map(|c| &c.1)
            };
            match cells {
                Some(cells) => match convert_column(spec, cells) {
                    Ok(values) => columns.push((spec.name.clone(), values)),
                    Err(problem) => problems.push(problem),
                },
                None if spec.required => problems.push(FieldProblem::new(
                    &spec.name,
                    ProblemKind::Missing,
                    format!(
                        "required column `{}` ({}) is missing",
                        spec.name, spec.column_type
                    ),
                )),
                None => {}
            }
        }
        if problems.is_empty() {
            Ok(Frame { n_rows, columns })
        } else {
            Err(PipelineError::InvalidInput(problems))
        }
    }
}

fn parse_text_cell(cell: &str) -> Value {
    if cell.is_empty() {
        return Value::Null;
    }
    if let Ok(i) = cell.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(x) = cell.parse::<f64>() {
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(cell.to_string()));
    }
    match cell {
        "true" | "True" | "TRUE" => Value::Bool(true),
        "false" | "False" | "FALSE" => Value::Bool(false),
        _ => Value::String(cell.to_string()),
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "double",
        Value::Number(_) => "long",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// Convert one column's cells; the first bad cell is reported with its row and the
/// number of other bad cells.
fn convert_column(spec: &ColumnSpec, cells: &[Value]) -> Result<ColumnValues, FieldProblem> {
    let mut bad: Option<(usize, String)> = None;
    let mut bad_count = 0usize;
    let mut note = |row: usize, message: String| {
        bad_count += 1;
        if bad.is_none() {
            bad = Some((row, message));
        }
    };
    let missing = |v: &Value| v.is_null();
    let values = match spec.column_type {
        ColumnType::Double | ColumnType::Float => {
            let mut out = Vec::with_capacity(cells.len());
            for (row, cell) in cells.iter().enumerate() {
                match cell.as_f64() {
                    Some(x) if x.is_finite() => out.push(x),
                    Some(_) => note(row, "value must be finite".into()),
                    // pandas reads a missing number as NaN, and MLflow scores it.
                    None if missing(cell) => out.push(f64::NAN),
                    None if cell
                        .as_str()
                        .and_then(|s| s.parse::<f64>().ok())
                        .is_some_and(|x| !x.is_finite()) =>
                    {
                        note(row, "value must be finite".into())
                    }
                    None => note(
                        row,
                        format!(
                            "expected {}, found {} {cell}",
                            spec.column_type,
                            json_type_name(cell)
                        ),
                    ),
                }
            }
            ColumnValues::Float(out)
        }
        ColumnType::Long | ColumnType::Integer => {
            let mut out = Vec::with_capacity(cells.len());
            for (row, cell) in cells.iter().enumerate() {
                let value = cell
                    .as_i64()
                    .filter(|v| spec.column_type == ColumnType::Long || i32::try_from(*v).is_ok());
                match value {
                    Some(v) => out.push(v),
                    None if missing(cell) => note(row, "missing value".into()),
                    None => note(
                        row,
                        format!(
                            "expected {}, found {} {cell} (only safe conversions are applied: \
                             send whole numbers)",
                            spec.column_type,
                            json_type_name(cell)
                        ),
                    ),
                }
            }
            ColumnValues::Int(out)
        }
        ColumnType::Boolean => {
            let mut out = Vec::with_capacity(cells.len());
            for (row, cell) in cells.iter().enumerate() {
                match cell.as_bool() {
                    Some(b) => out.push(b),
                    None if missing(cell) => note(row, "missing value".into()),
                    None => note(
                        row,
                        format!("expected boolean, found {} {cell}", json_type_name(cell)),
                    ),
                }
            }
            ColumnValues::Bool(out)
        }
        ColumnType::String => {
            let mut out = Vec::with_capacity(cells.len());
            for (row, cell) in cells.iter().enumerate() {
                match cell.as_str() {
                    Some(s) => out.push(s.to_string()),
                    None if missing(cell) => note(row, "missing value".into()),
                    None => note(
                        row,
                        format!("expected string, found {} {cell}", json_type_name(cell)),
                    ),
                }
            }
            ColumnValues::Str(out)
        }
    };
    match bad {
        None => Ok(values),
        Some((row, message)) => {
            let others = if bad_count > 1 {
                format!(" (and {} more bad rows)", bad_count - 1)
            } else {
                String::new()
            };
            let kind = if message == "missing value" || message == "value must be finite" {
                ProblemKind::Constraint
            } else {
                ProblemKind::Type {
                    expected: spec.column_type.name().into(),
                    found: json_type_name(&cells[row]).into(),
                }
            };
            Err(FieldProblem::new(
                &spec.name,
                kind,
                format!("column `{}` row {row}: {message}{others}", spec.name),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signature() -> Signature {
        Signature {
            inputs: vec![
                ColumnSpec {
                    name: "age".into(),
                    column_type: ColumnType::Long,
                    required: true,
                },
                ColumnSpec {
                    name: "income".into(),
                    column_type: ColumnType::Double,
                    required: true,
                },
                ColumnSpec {
                    name: "region".into(),
                    column_type: ColumnType::String,
                    required: true,
                },
            ],
            outputs: vec![],
        }
    }

    #[test]
    fn split_records_instances_and_csv_agree() {
        let split = RawFrame::from_split(&json!({
            "columns": ["region", "age", "income", "extra"],
            "data": [["north", 30, 1.5, "ignored"], ["south", 41, 2, null]]
        }))
        .unwrap();
        let records = RawFrame::from_records(
            "dataframe_records",
            json!([{"age": 30, "income": 1.5, "region": "north"},
                   {"age": 41, "income": 2, "region": "south"}])
            .as_array()
            .unwrap(),
        )
        .unwrap();
        let columns = RawFrame::from_instances(
            "inputs",
            &json!({"age": [30, 41], "income": [1.5, 2.0], "region": ["north", "south"]}),
        )
        .unwrap();
        let csv = RawFrame::from_csv("age,income,region\n30,1.5,north\n41,2,south\n").unwrap();
        let expected = signature();
        let a = split.conform(&expected).unwrap();
        assert_eq!(a.n_rows, 2);
        assert_eq!(
            a.column("income"),
            Some(&ColumnValues::Float(vec![1.5, 2.0]))
        );
        assert_eq!(a.column("age"), Some(&ColumnValues::Int(vec![30, 41])));
        for other in [records, columns, csv] {
            assert_eq!(other.conform(&expected).unwrap(), a);
        }
    }

    #[test]
    fn every_problem_is_reported_with_column_and_row() {
        let frame = RawFrame::from_split(&json!({
            "columns": ["age", "income"],
            "data": [[30.5, "high"], [40, 1.0], [41, "x"]]
        }))
        .unwrap();
        let PipelineError::InvalidInput(problems) = frame.conform(&signature()).unwrap_err() else {
            panic!("expected a validation error");
        };
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(
            text[0].contains("age") && text[0].contains("row 0") && text[0].contains("safe"),
            "{text:?}"
        );
        assert!(
            text[1].contains("income") && text[1].contains("and 1 more"),
            "{text:?}"
        );
        assert_eq!(problems[2].kind, ProblemKind::Missing);
        assert!(text[2].contains("required column `region`"));
    }

    #[test]
    fn a_missing_number_is_nan_as_pandas_reads_it() {
        let frame = RawFrame::from_split(&json!({
            "columns": ["age", "income", "region"],
            "data": [[30, null, "north"]]
        }))
        .unwrap();
        let conformed = frame.conform(&signature()).unwrap();
        let Some(ColumnValues::Float(income)) = conformed.column("income") else {
            panic!("income is a double column");
        };
        assert!(income[0].is_nan());
        // A missing whole number has no NaN: still an error naming the row.
        let frame = RawFrame::from_split(&json!({
            "columns": ["age", "income", "region"],
            "data": [[null, 1.0, "north"]]
        }))
        .unwrap();
        let err = frame.conform(&signature()).unwrap_err().to_string();
        assert!(
            err.contains("age") && err.contains("missing value"),
            "{err}"
        );
    }

    #[test]
    fn empty_frames_and_non_finite_values_are_rejected() {
        let empty = RawFrame::from_split(&json!({"columns": ["age"], "data": []})).unwrap();
        assert!(
            empty
                .conform(&signature())
                .unwrap_err()
                .to_string()
                .contains("no rows")
        );
        let csv = RawFrame::from_csv("age,income,region\n1,inf,a\n").unwrap();
        let err = csv.conform(&signature()).unwrap_err().to_string();
        assert!(err.contains("income") && err.contains("finite"), "{err}");
        let csv = RawFrame::from_csv("age,income,region\n,1,a\n").unwrap();
        let err = csv.conform(&signature()).unwrap_err().to_string();
        assert!(err.contains("missing value"), "{err}");
    }

    #[test]
    fn positional_rows_follow_signature_order() {
        let frame = RawFrame::from_instances("instances", &json!([[30, 1.5, "north"]])).unwrap();
        let conformed = frame.conform(&signature()).unwrap();
        assert_eq!(
            conformed.column("region"),
            Some(&ColumnValues::Str(vec!["north".into()]))
        );
    }
}
