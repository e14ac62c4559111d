//! Tables for field-shaped pipelines: tabular protocols (MLflow `dataframe_split`,
//! KServe tensors) carry one request per row; each row becomes an object of fields,
//! with text cells converted to the numbers and booleans the schema expects (KServe
//! BYTES tensors and CSV carry everything as text).

use serde_json::{Map, Value};

use crate::contract::{InputSpec, Pipeline, PredictInput, PredictRequest, Prediction};
use crate::error::{PipelineError, ProblemKind};
use crate::frame::RawFrame;
use crate::schema::{FieldKind, InputSchema};

fn coerce(kind: &FieldKind, cell: Value) -> Value {
    let Value::String(text) = &cell else {
        return cell;
    };
    let parsed = match kind {
        FieldKind::Integer { .. } => text.trim().parse::<i64>().ok().map(Value::from),
        FieldKind::Number { .. } => text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|x| serde_json::Number::from_f64(x).map(Value::Number)),
        FieldKind::Boolean => match text.trim() {
            "true" | "True" | "1" => Some(Value::Bool(true)),
            "false" | "False" | "0" => Some(Value::Bool(false)),
            _ => None,
        },
        FieldKind::String { .. } | FieldKind::Choice { .. } => None,
        FieldKind::List { .. } => serde_json::from_str::<Value>(text)
            .ok()
            .filter(Value::is_array),
    };
    parsed.unwrap_or(cell)
}

/// One object of fields per row; null cells are left out (defaults apply).
pub fn frame_rows(
    frame: &RawFrame,
    schema: &InputSchema,
) -> Result<Vec<Map<String, Value>>, PipelineError> {
    if frame.positional {
        return Err(PipelineError::invalid(
            "columns",
            ProblemKind::Malformed,
            "name the columns: this model takes named fields",
        ));
    }
    let rows = frame.columns.first().map(|c| c.1.len()).unwrap_or(0);
    if rows == 0 {
        return Err(PipelineError::invalid(
            "data",
            ProblemKind::Malformed,
            "the input has no rows",
        ));
    }
    Ok((0..rows)
        .map(|row| {
            let mut fields = Map::new();
            for (name, cells) in &frame.columns {
                let cell = cells.get(row).cloned().unwrap_or(Value::Null);
                if cell.is_null() {
                    continue;
                }
                let cell = match schema.fields.iter().find(|f| &f.name == name) {
                    Some(field) => coerce(&field.kind, cell),
                    None => cell,
                };
                fields.insert(name.clone(), cell);
            }
            fields
        })
        .collect())
}

/// Predict with any input shape: a table sent to a field-shaped pipeline runs
/// once per row and returns the list of results.
pub fn predict_any(
    pipeline: &dyn Pipeline,
    request: PredictRequest,
) -> Result<Prediction, PipelineError> {
    match (&pipeline.interface().inputs, request.input) {
        (InputSpec::Fields(schema), PredictInput::Frame(frame)) => {
            let mut results = Vec::new();
            for fields in frame_rows(&frame, schema)? {
                let prediction = pipeline.predict(PredictRequest {
                    input: PredictInput::Fields(fields),
                    params: request.params.clone(),
                })?;
                results.push(match prediction {
                    Prediction::Json(value) => value,
                    Prediction::Tensors(tensors) => Value::Object(
                        tensors
                            .into_iter()
                            .map(|t| (t.name.clone(), t.data.to_json()))
                            .collect(),
                    ),
                });
            }
            Ok(Prediction::Json(Value::Array(results)))
        }
        (_, input) => pipeline.predict(PredictRequest {
            input,
            params: request.params,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::FieldSpec;
    use serde_json::json;

    #[test]
    fn rows_become_fields_with_text_converted_by_the_schema() {
        let schema = InputSchema {
            fields: vec![
                FieldSpec {
                    name: "prompt".into(),
                    description: String::new(),
                    kind: FieldKind::String {
                        min_length: None,
                        max_length: None,
                    },
                    default: None,
                },
                FieldSpec {
                    name: "seed".into(),
                    description: String::new(),
                    kind: FieldKind::Integer {
                        minimum: None,
                        maximum: None,
                    },
                    default: Some(Value::Null),
                },
                FieldSpec {
                    name: "tiled".into(),
                    description: String::new(),
                    kind: FieldKind::Boolean,
                    default: Some(json!(false)),
                },
            ],
        };
        let frame = RawFrame::from_split(&json!({"columns": ["prompt", "seed", "tiled"], "data": [["a cat", "42", "true"], ["a dog", null, false]]})).unwrap();
        let rows = frame_rows(&frame, &schema).unwrap();
        assert_eq!(
            Value::Object(rows[0].clone()),
            json!({"prompt": "a cat", "seed": 42, "tiled": true})
        );
        assert_eq!(
            Value::Object(rows[1].clone()),
            json!({"prompt": "a dog", "tiled": false})
        );
        let positional = RawFrame::from_instances("instances", &json!([["a cat"]])).unwrap();
        assert!(frame_rows(&positional, &schema).is_err());
    }
}
