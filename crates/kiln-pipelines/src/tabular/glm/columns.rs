//! Column access for model building: numbers and category keys from training
//! data (raw CSV cells) and from conformed prediction frames, with errors that
//! name the column and row.

use std::fmt;

use serde_json::Value;

use crate::frame::{ColumnValues, Frame, RawFrame};

/// A data problem at a column (and row, when known). Rows are 0-based data rows.
#[derive(Debug, Clone, PartialEq)]
pub struct DataProblem {
    pub column: String,
    pub row: Option<usize>,
    pub message: String,
}

impl DataProblem {
    pub fn at(column: &str, row: usize, message: impl Into<String>) -> Self {
        DataProblem {
            column: column.to_string(),
            row: Some(row),
            message: message.into(),
        }
    }

    pub fn column(column: &str, message: impl Into<String>) -> Self {
        DataProblem {
            column: column.to_string(),
            row: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for DataProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataProblem {
                column,
                row: Some(row),
                message,
            } => write!(f, "column `{column}` row {row}: {message}"),
            DataProblem {
                column, message, ..
            } => write!(f, "column `{column}`: {message}"),
        }
    }
}

/// Read access to named columns.
pub trait Columns {
    fn rows(&self) -> usize;
    /// Finite numbers; booleans and text are errors.
    fn numbers(&self, column: &str) -> Result<Vec<f64>, DataProblem>;
    /// Category keys as patsy prints levels (`north`, `1`, `True`).
    fn categories(&self, column: &str) -> Result<Vec<String>, DataProblem>;
    /// Whether a column holds only numbers (so a bare factor is numeric).
    fn is_numeric(&self, column: &str) -> Result<bool, DataProblem>;
    /// Distinct category keys sorted as patsy sorts them.
    fn sorted_levels(&self, column: &str) -> Result<Vec<String>, DataProblem>;
}

fn python_float(x: f64) -> String {
    format!("{x:?}")
}

fn cell_key(column: &str, row: usize, cell: &Value) -> Result<String, DataProblem> {
    match cell {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(true) => Ok("True".into()),
        Value::Bool(false) => Ok("False".into()),
        Value::Number(n) => Ok(match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(x)) => python_float(x),
            (None, None) => n.to_string(),
        }),
        Value::Null => Err(DataProblem::at(column, row, "missing value")),
        other => Err(DataProblem::at(
            column,
            row,
            format!("not a scalar: {other}"),
        )),
    }
}

impl RawFrame {
    fn cells(&self, column: &str) -> Result<&[Value], DataProblem> {
        self.columns
            .iter()
            .find(|(name, _)| name == column)
            .map(|(_, cells)| cells.as_slice())
            .ok_or_else(|| {
                let known: Vec<&str> = self.columns.iter().map(|(n, _)| n.as_str()).collect();
                DataProblem::column(
                    column,
                    format!("no such column (the data has: {})", known.join(", ")),
                )
            })
    }
}

impl Columns for RawFrame {
    fn rows(&self) -> usize {
        self.columns.first().map(|c| c.1.len()).unwrap_or(0)
    }

    fn numbers(&self, column: &str) -> Result<Vec<f64>, DataProblem> {
        self.cells(column)?
            .iter()
            .enumerate()
            .map(|(row, cell)| match cell {
                Value::Number(n) => n
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| DataProblem::at(column, row, "value must be finite")),
                Value::Null => Err(DataProblem::at(column, row, "missing value")),
                Value::String(s) if s.parse::<f64>().is_ok() => {
                    Err(DataProblem::at(column, row, format!("value must be finite, found {s:?}")))
                }
                other => Err(DataProblem::at(
                    column,
                    row,
                    format!("expected a number, found {other} (use C({column}) for a categorical column)"),
                )),
            })
            .collect()
    }

    fn categories(&self, column: &str) -> Result<Vec<String>, DataProblem> {
        self.cells(column)?
            .iter()
            .enumerate()
            .map(|(row, cell)| cell_key(column, row, cell))
            .collect()
    }

    fn is_numeric(&self, column: &str) -> Result<bool, DataProblem> {
        let cells = self.cells(column)?;
        let first_number = cells.iter().position(Value::is_number);
        // Text like "inf" or "NaN" is a (non-finite) number: `numbers` reports it.
        let is_text = |c: &Value| match c {
            Value::String(s) => s.parse::<f64>().is_err(),
            Value::Bool(_) => true,
            _ => false,
        };
        let first_other = cells.iter().position(is_text);
        match (first_number, first_other) {
            (Some(_), None) => Ok(true),
            (None, _) => Ok(false),
            (Some(n), Some(o)) => {
                let row = n.max(o);
                Err(DataProblem::at(
                    column,
                    row,
                    format!(
                        "the column mixes numbers and text ({} here); fix the cell or quote every value",
                        cells[row]
                    ),
                ))
            }
        }
    }

    fn sorted_levels(&self, column: &str) -> Result<Vec<String>, DataProblem> {
        levels_of(column, self.is_numeric(column)?, self.cells(column)?)
    }
}

fn levels_of(column: &str, numeric: bool, cells: &[Value]) -> Result<Vec<String>, DataProblem> {
    if numeric {
        let mut values: Vec<(f64, String)> = Vec::new();
        for (row, cell) in cells.iter().enumerate() {
            let x = cell
                .as_f64()
                .ok_or_else(|| DataProblem::at(column, row, "missing value"))?;
            let key = cell_key(column, row, cell)?;
            if !values.iter().any(|(_, k)| *k == key) {
                values.push((x, key));
            }
        }
        values.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(values.into_iter().map(|(_, k)| k).collect())
    } else {
        let mut keys: Vec<String> = Vec::new();
        for (row, cell) in cells.iter().enumerate() {
            keys.push(cell_key(column, row, cell)?);
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}

impl Frame {
    fn values(&self, column: &str) -> Result<&ColumnValues, DataProblem> {
        self.column(column)
            .ok_or_else(|| DataProblem::column(column, "required column is missing"))
    }
}

impl Columns for Frame {
    fn rows(&self) -> usize {
        self.n_rows
    }

    fn numbers(&self, column: &str) -> Result<Vec<f64>, DataProblem> {
        match self.values(column)? {
            ColumnValues::Float(v) => Ok(v.clone()),
            ColumnValues::Int(v) => Ok(v.iter().map(|x| *x as f64).collect()),
            ColumnValues::Bool(_) | ColumnValues::Str(_) => {
                Err(DataProblem::column(column, "expected numbers"))
            }
        }
    }

    fn categories(&self, column: &str) -> Result<Vec<String>, DataProblem> {
        Ok(match self.values(column)? {
            ColumnValues::Str(v) => v.clone(),
            ColumnValues::Int(v) => v.iter().map(ToString::to_string).collect(),
            ColumnValues::Float(v) => v.iter().map(|x| python_float(*x)).collect(),
            ColumnValues::Bool(v) => v
                .iter()
                .map(|b| if *b { "True" } else { "False" }.to_string())
                .collect(),
        })
    }

    fn is_numeric(&self, column: &str) -> Result<bool, DataProblem> {
        Ok(matches!(
            self.values(column)?,
            ColumnValues::Float(_) | ColumnValues::Int(_)
        ))
    }

    fn sorted_levels(&self, column: &str) -> Result<Vec<String>, DataProblem> {
        let cells: Vec<Value> = match self.values(column)? {
            ColumnValues::Str(v) => v.iter().map(|s| Value::String(s.clone())).collect(),
            ColumnValues::Int(v) => v.iter().map(|x| Value::from(*x)).collect(),
            ColumnValues::Float(v) => v.iter().map(|x| Value::from(*x)).collect(),
            ColumnValues::Bool(v) => v.iter().map(|b| Value::Bool(*b)).collect(),
        };
        levels_of(column, self.is_numeric(column)?, &cells)
    }
}
