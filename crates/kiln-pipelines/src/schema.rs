//! Typed input schemas for object-shaped inputs and parameters: validation that
//! reports every problem at once (field and rule), defaults, and JSON Schema output.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{FieldProblem, PipelineError, ProblemKind};

/// The type and constraints of one field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FieldKind {
    Integer {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        minimum: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maximum: Option<i64>,
    },
    Number {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        minimum: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maximum: Option<f64>,
    },
    String {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_length: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_length: Option<usize>,
    },
    Boolean,
    Choice {
        choices: Vec<String>,
    },
    /// A JSON list whose items the pipeline checks itself (e.g. LoRA entries).
    List {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_items: Option<usize>,
    },
}

impl FieldKind {
    /// An integer in `[minimum, maximum]`.
    pub fn integer(minimum: i64, maximum: i64) -> Self {
        FieldKind::Integer {
            minimum: Some(minimum),
            maximum: Some(maximum),
        }
    }

    /// A number in `[minimum, maximum]`.
    pub fn number(minimum: f64, maximum: f64) -> Self {
        FieldKind::Number {
            minimum: Some(minimum),
            maximum: Some(maximum),
        }
    }

    /// One of `choices`.
    pub fn choice(choices: &[&str]) -> Self {
        FieldKind::Choice {
            choices: choices.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Text of at most `max_length` characters.
    pub fn text(max_length: usize) -> Self {
        FieldKind::String {
            min_length: None,
            max_length: Some(max_length),
        }
    }
}

impl FieldSpec {
    pub fn new(
        name: &str,
        description: &str,
        kind: FieldKind,
        default: Option<serde_json::Value>,
    ) -> Self {
        FieldSpec {
            name: name.into(),
            description: description.into(),
            kind,
            default,
        }
    }
}

impl FieldKind {
    fn type_name(&self) -> &'static str {
        match self {
            FieldKind::Integer { .. } => "int",
            FieldKind::Number { .. } => "float",
            FieldKind::String { .. } | FieldKind::Choice { .. } => "str",
            FieldKind::Boolean => "bool",
            FieldKind::List { .. } => "list",
        }
    }
}

/// One field of an input schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(flatten)]
    pub kind: FieldKind,
    /// Filled in when the field is absent; a field without default is required.
    /// A `null` default makes the field optional with no value (e.g. a random seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

/// An ordered set of fields; unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InputSchema {
    pub fields: Vec<FieldSpec>,
}

/// A JSON value's kind as validation errors name it (Python's names, as Cog's
/// pydantic errors do).
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

impl InputSchema {
    /// Validate `input`, returning it with defaults filled in, or every problem found.
    pub fn validate(
        &self,
        input: &Map<String, Value>,
    ) -> Result<Map<String, Value>, PipelineError> {
        let mut problems = Vec::new();
        for key in input.keys() {
            if !self.fields.iter().any(|f| &f.name == key) {
                let known: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
                problems.push(FieldProblem::new(
                    key,
                    ProblemKind::Unknown,
                    format!("unknown field; valid fields are: {}", known.join(", ")),
                ));
            }
        }
        let mut out = Map::new();
        for field in &self.fields {
            match input.get(&field.name) {
                None | Some(Value::Null) => match &field.default {
                    Some(default) => {
                        out.insert(field.name.clone(), default.clone());
                    }
                    None => problems.push(FieldProblem::new(
                        &field.name,
                        ProblemKind::Missing,
                        "is required",
                    )),
                },
                Some(value) => match check_value(field, value) {
                    Ok(value) => {
                        out.insert(field.name.clone(), value);
                    }
                    Err(problem) => problems.push(problem),
                },
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(PipelineError::InvalidInput(problems))
        }
    }

    /// A JSON Schema object (as Cog's `components.schemas.Input`), with `x-order`.
    pub fn json_schema(&self, title: &str) -> Value {
        let mut properties = Map::new();
        for (order, field) in self.fields.iter().enumerate() {
            let mut property = Map::new();
            property.insert("title".into(), Value::String(title_case(&field.name)));
            property.insert("x-order".into(), json!(order));
            if !field.description.is_empty() {
                property.insert(
                    "description".into(),
                    Value::String(field.description.clone()),
                );
            }
            match &field.kind {
                FieldKind::Integer { minimum, maximum } => {
                    property.insert("type".into(), json!("integer"));
                    if let Some(m) = minimum {
                        property.insert("minimum".into(), json!(m));
                    }
                    if let Some(m) = maximum {
                        property.insert("maximum".into(), json!(m));
                    }
                }
                FieldKind::Number { minimum, maximum } => {
                    property.insert("type".into(), json!("number"));
                    if let Some(m) = minimum {
                        property.insert("minimum".into(), json!(m));
                    }
                    if let Some(m) = maximum {
                        property.insert("maximum".into(), json!(m));
                    }
                }
                FieldKind::String {
                    min_length,
                    max_length,
                } => {
                    property.insert("type".into(), json!("string"));
                    if let Some(m) = min_length {
                        property.insert("minLength".into(), json!(m));
                    }
                    if let Some(m) = max_length {
                        property.insert("maxLength".into(), json!(m));
                    }
                }
                FieldKind::Boolean => {
                    property.insert("type".into(), json!("boolean"));
                }
                FieldKind::Choice { choices } => {
                    property.insert("type".into(), json!("string"));
                    property.insert("enum".into(), json!(choices));
                }
                FieldKind::List { max_items } => {
                    property.insert("type".into(), json!("array"));
                    property.insert("items".into(), json!({"type": "object"}));
                    if let Some(m) = max_items {
                        property.insert("maxItems".into(), json!(m));
                    }
                }
            }
            if let Some(default) = field.default.as_ref().filter(|d| !d.is_null()) {
                property.insert("default".into(), default.clone());
            }
            properties.insert(field.name.clone(), Value::Object(property));
        }
        let required: Vec<&str> = self
            .fields
            .iter()
            .filter(|f| f.default.is_none())
            .map(|f| f.name.as_str())
            .collect();
        let mut schema = json!({"title": title, "type": "object", "properties": properties});
        if !required.is_empty() {
            schema["required"] = json!(required);
        }
        schema
    }
}

fn title_case(name: &str) -> String {
    name.split('_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect::<String>(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_value(field: &FieldSpec, value: &Value) -> Result<Value, FieldProblem> {
    let type_error = || {
        FieldProblem::new(
            &field.name,
            ProblemKind::Type {
                expected: field.kind.type_name().into(),
                found: json_kind(value).into(),
            },
            format!(
                "should be {} type, not {}",
                field.kind.type_name(),
                json_kind(value)
            ),
        )
    };
    let constraint =
        |message: String| FieldProblem::new(&field.name, ProblemKind::Constraint, message);
    match &field.kind {
        FieldKind::Integer { minimum, maximum } => {
            // A float with no fraction is an integer (JSON Schema's rule, and
            // pydantic's lax mode in Cog): 2.0 is 2, 2.5 is a type error.
            let v = value
                .as_i64()
                .or_else(|| {
                    value
                        .as_f64()
                        .filter(|x| x.fract() == 0.0 && x.abs() < 9.0e15)
                        .map(|x| x as i64)
                })
                .ok_or_else(type_error)?;
            if let Some(min) = minimum.filter(|m| v < *m) {
                return Err(constraint(format!("must be >= {min}, got {v}")));
            }
            if let Some(max) = maximum.filter(|m| v > *m) {
                return Err(constraint(format!("must be <= {max}, got {v}")));
            }
            Ok(Value::from(v))
        }
        FieldKind::Number { minimum, maximum } => {
            let v = value.as_f64().ok_or_else(type_error)?;
            if !v.is_finite() {
                return Err(constraint("must be finite".into()));
            }
            if let Some(min) = minimum.filter(|m| v < *m) {
                return Err(constraint(format!("must be >= {min}, got {v}")));
            }
            if let Some(max) = maximum.filter(|m| v > *m) {
                return Err(constraint(format!("must be <= {max}, got {v}")));
            }
            Ok(value.clone())
        }
        FieldKind::String {
            min_length,
            max_length,
        } => {
            let s = value.as_str().ok_or_else(type_error)?;
            let length = s.chars().count();
            if let Some(min) = min_length.filter(|m| length < *m) {
                return Err(constraint(format!("must be at least {min} characters")));
            }
            if let Some(max) = max_length.filter(|m| length > *m) {
                return Err(constraint(format!(
                    "must be at most {max} characters, got {length}"
                )));
            }
            Ok(value.clone())
        }
        FieldKind::Boolean => value.as_bool().map(Value::Bool).ok_or_else(type_error),
        FieldKind::Choice { choices } => {
            let s = value.as_str().ok_or_else(type_error)?;
            if choices.iter().any(|c| c == s) {
                Ok(value.clone())
            } else {
                Err(constraint(format!(
                    "must be one of {}, got {s:?}",
                    choices.join(", ")
                )))
            }
        }
        FieldKind::List { max_items } => {
            let items = value.as_array().ok_or_else(type_error)?;
            if let Some(max) = max_items.filter(|m| items.len() > *m) {
                return Err(constraint(format!(
                    "must have at most {max} items, got {}",
                    items.len()
                )));
            }
            // The schema promises objects: anything else is named by index.
            if let Some(index) = items.iter().position(|item| !item.is_object()) {
                return Err(constraint(format!(
                    "item {index} must be an object, got {}",
                    items[index]
                )));
            }
            Ok(value.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> InputSchema {
        InputSchema {
            fields: vec![
                FieldSpec {
                    name: "prompt".into(),
                    description: "What to draw".into(),
                    kind: FieldKind::String {
                        min_length: Some(1),
                        max_length: None,
                    },
                    default: None,
                },
                FieldSpec {
                    name: "num_outputs".into(),
                    description: String::new(),
                    kind: FieldKind::Integer {
                        minimum: Some(1),
                        maximum: Some(4),
                    },
                    default: Some(json!(1)),
                },
                FieldSpec {
                    name: "output_format".into(),
                    description: String::new(),
                    kind: FieldKind::Choice {
                        choices: vec!["png".into(), "jpeg".into()],
                    },
                    default: Some(json!("png")),
                },
            ],
        }
    }

    #[test]
    fn defaults_are_filled() {
        let input = json!({"prompt": "a cat"});
        let out = schema().validate(input.as_object().unwrap()).unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"prompt": "a cat", "num_outputs": 1, "output_format": "png"})
        );
    }

    #[test]
    fn list_items_must_be_objects() {
        let schema = InputSchema {
            fields: vec![FieldSpec::new(
                "loras",
                "LoRAs",
                FieldKind::List { max_items: Some(4) },
                Some(json!([])),
            )],
        };
        let bad = json!({"loras": [{"source": "a"}, null]});
        let err = schema
            .validate(bad.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("loras") && err.contains("item 1 must be an object"),
            "{err}"
        );
        let good = json!({"loras": [{"source": "a"}]});
        assert!(schema.validate(good.as_object().unwrap()).is_ok());
    }

    #[test]
    fn a_whole_float_is_an_integer_and_a_fraction_is_not() {
        let whole = json!({"prompt": "a cat", "num_outputs": 2.0});
        let out = schema().validate(whole.as_object().unwrap()).unwrap();
        assert_eq!(out["num_outputs"], json!(2));
        assert!(out["num_outputs"].is_i64());
        let fraction = json!({"prompt": "a cat", "num_outputs": 2.5});
        assert!(schema().validate(fraction.as_object().unwrap()).is_err());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let input = json!({"num_outputs": 9, "output_format": "gif", "steps": 4, "prompt": 3});
        let PipelineError::InvalidInput(problems) =
            schema().validate(input.as_object().unwrap()).unwrap_err()
        else {
            panic!("expected invalid input");
        };
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 4, "{text:?}");
        assert!(
            text.contains(
                &"steps: unknown field; valid fields are: prompt, num_outputs, output_format"
                    .to_string()
            ),
            "{text:?}"
        );
        assert!(
            text.contains(&"prompt: should be str type, not int".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"num_outputs: must be <= 4, got 9".to_string()),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("output_format: must be one of png, jpeg")),
            "{text:?}"
        );
    }

    #[test]
    fn json_schema_lists_order_defaults_and_required() {
        let schema = schema().json_schema("Input");
        assert_eq!(schema["required"], json!(["prompt"]));
        assert_eq!(schema["properties"]["num_outputs"]["maximum"], json!(4));
        assert_eq!(schema["properties"]["num_outputs"]["x-order"], json!(1));
        assert_eq!(
            schema["properties"]["output_format"]["enum"],
            json!(["png", "jpeg"])
        );
        assert_eq!(
            schema["properties"]["num_outputs"]["title"],
            json!("Num Outputs")
        );
    }
}
