//! Cog's `/openapi.json`, built the way cog 0.14's FastAPI server builds it
//! (pydantic 2): the same paths, operation ids, parameters and components
//! (`Input` from the pipeline's fields with `x-order`, one enum component per
//! choice field, `Output`, `PredictionRequest`/`PredictionResponse`,
//! `Status`, `WebhookEvent`, `HTTPValidationError`/`ValidationError`), plus
//! what Kiln answers beyond Cog's document: 202 for async and idempotent
//! predictions, 409 when busy, 404 for unknown ids, and `nullable` where a
//! response holds null, so the document validates every real response.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use kiln_pipelines::InputSpec;
use serde_json::{Map, Value, json};

use super::{EVENTS, error};
use crate::state::AppState;

/// Input fields Cog types as files (`Path`): a URL or data URL string.
const FILE_FIELDS: [&str; 2] = ["image", "mask"];

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// `components.schemas` names Kiln's own document uses.
const RESERVED: [&str; 8] = [
    "Input",
    "Output",
    "Status",
    "WebhookEvent",
    "PredictionRequest",
    "PredictionResponse",
    "HTTPValidationError",
    "ValidationError",
];

/// Cog's `Input`: every choice field becomes an enum component named after it
/// and a property `{description, default, x-order, allOf: [$ref]}`; file
/// fields are `format: uri`. Returns the schema and the enum components.
fn cog_input(mut input: Value) -> (Value, Map<String, Value>) {
    let mut enums = Map::new();
    let required: Vec<String> = input["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if let Some(properties) = input["properties"].as_object_mut() {
        for (name, property) in properties.iter_mut() {
            if FILE_FIELDS.contains(&name.as_str()) {
                property["format"] = json!("uri");
            }
            // Kiln reads null as "not given" for an optional field.
            if !required.contains(name) {
                property["nullable"] = json!(true);
            }
            let Some(choices) = property.get("enum").cloned() else {
                continue;
            };
            let component = if RESERVED.contains(&name.as_str()) {
                format!("{name}Choice")
            } else {
                name.clone()
            };
            enums.insert(
                component.clone(),
                json!({"type": property["type"], "enum": choices, "title": name, "description": "An enumeration."}),
            );
            let mut replaced = Map::new();
            for key in ["description", "default", "x-order", "nullable"] {
                if let Some(value) = property.get(key) {
                    replaced.insert(key.into(), value.clone());
                }
            }
            replaced.insert("allOf".into(), json!([reference(&component)]));
            *property = Value::Object(replaced);
        }
    }
    (input, enums)
}

fn operation(
    summary: &str,
    description: Option<&str>,
    operation_id: &str,
    parameters: Vec<Value>,
    request_body: Option<Value>,
    responses: Value,
) -> Value {
    let mut op = json!({"summary": summary, "operationId": operation_id, "responses": responses});
    if let Some(description) = description {
        op["description"] = json!(description);
    }
    if !parameters.is_empty() {
        op["parameters"] = Value::Array(parameters);
    }
    if let Some(body) = request_body {
        op["requestBody"] = body;
    }
    op
}

fn any_response(title: &str) -> Value {
    json!({"description": "Successful Response", "content": {"application/json": {"schema": {"title": title}}}})
}

fn prediction_responses(with_async: bool) -> Value {
    let prediction = json!({"application/json": {"schema": reference("PredictionResponse")}});
    let mut responses = json!({
        "200": {"description": "Successful Response", "content": prediction},
        "409": {"description": "Every prediction slot is busy", "content": {"application/json": {"schema": {"title": "Busy", "type": "object"}}}},
        "422": {"description": "Validation Error", "content": {"application/json": {"schema": reference("HTTPValidationError")}}},
    });
    if with_async {
        responses["202"] = json!({"description": "Accepted (Prefer: respond-async, or an id already running)", "content": prediction});
    }
    responses
}

/// The whole document for `input` and `output` schemas.
pub fn document(description: &str, input: Value, output: Value) -> Value {
    let (input, enums) = cog_input(input);
    let prefer = json!({"name": "prefer", "in": "header", "required": false, "schema": {"title": "Prefer", "type": "string"}});
    let prediction_id = json!({"name": "prediction_id", "in": "path", "required": true, "schema": {"type": "string", "title": "Prediction ID"}});
    let date_time = |title: &str, nullable: bool| {
        let mut schema = json!({"title": title, "type": "string", "format": "date-time"});
        if nullable {
            schema["nullable"] = json!(true);
        }
        schema
    };
    // Every field but `input` may be null (Cog's are Optional); Kiln needs
    // `input` (its fields' own rules say which are required).
    let request = json!({
        "title": "PredictionRequest", "type": "object", "required": ["input"],
        "properties": {
            "input": reference("Input"),
            "id": {"title": "Id", "type": "string", "minLength": 1, "maxLength": 128, "nullable": true},
            "created_at": date_time("Created At", true),
            "context": {"title": "Context", "type": "object", "additionalProperties": {"type": "string"}, "nullable": true},
            "output_file_prefix": {"title": "Output File Prefix", "type": "string", "nullable": true},
            "webhook": {"title": "Webhook", "type": "string", "format": "uri", "maxLength": 65536, "minLength": 1, "nullable": true},
            "webhook_events_filter": {"type": "array", "items": reference("WebhookEvent"), "default": EVENTS, "nullable": true},
        },
    });
    let response = json!({
        "title": "PredictionResponse", "type": "object",
        "properties": {
            "input": reference("Input"),
            "output": {"allOf": [reference("Output")], "nullable": true},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string", "nullable": true},
            "created_at": date_time("Created At", true),
            "started_at": date_time("Started At", true),
            "completed_at": date_time("Completed At", true),
            "logs": {"title": "Logs", "type": "string", "default": ""},
            "error": {"title": "Error", "type": "string", "nullable": true},
            "status": reference("Status"),
            "metrics": {"title": "Metrics", "type": "object", "additionalProperties": true},
            "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
            "webhook_events_filter": {"type": "array", "items": reference("WebhookEvent")},
        },
    });
    let json_body = |schema: Value, required: bool| {
        let mut body = json!({"content": {"application/json": {"schema": schema}}});
        if required {
            body["required"] = json!(true);
        }
        body
    };
    let mut schemas = Map::new();
    schemas.insert(
        "HTTPValidationError".into(),
        json!({"title": "HTTPValidationError", "type": "object", "properties": {
            "detail": {"title": "Detail", "type": "array", "items": reference("ValidationError")}}}),
    );
    schemas.insert("Input".into(), input);
    schemas.insert("Output".into(), output);
    schemas.insert("PredictionRequest".into(), request);
    schemas.insert("PredictionResponse".into(), response);
    schemas.insert(
        "Status".into(),
        json!({"title": "Status", "description": "An enumeration.", "type": "string",
               "enum": ["starting", "processing", "succeeded", "canceled", "failed"]}),
    );
    schemas.insert(
        "ValidationError".into(),
        json!({"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"], "properties": {
            "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"}}}),
    );
    schemas.insert(
        "WebhookEvent".into(),
        json!({"title": "WebhookEvent", "description": "An enumeration.", "type": "string", "enum": EVENTS}),
    );
    schemas.extend(enums);
    json!({
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0", "description": description},
        "paths": {
            "/shutdown": {"post": operation("Start Shutdown", None, "start_shutdown_shutdown_post", vec![], None,
                json!({"200": any_response("Response Start Shutdown Shutdown Post")}))},
            "/": {"get": operation("Root", None, "root__get", vec![], None,
                json!({"200": any_response("Response Root  Get")}))},
            "/health-check": {"get": operation("Healthcheck", None, "healthcheck_health_check_get", vec![], None,
                json!({"200": any_response("Response Healthcheck Health Check Get")}))},
            "/predictions": {"post": operation("Predict", Some("Run a single prediction on the model"),
                "predict_predictions_post", vec![prefer.clone()],
                Some(json_body(reference("PredictionRequest"), false)), prediction_responses(true))},
            "/predictions/{prediction_id}": {"put": operation("Predict Idempotent",
                Some("Run a single prediction on the model (idempotent creation)."),
                "predict_idempotent_predictions__prediction_id__put", vec![prediction_id.clone(), prefer],
                Some(json_body(json!({"allOf": [reference("PredictionRequest")], "title": "Prediction Request"}), true)),
                prediction_responses(true))},
            "/predictions/{prediction_id}/cancel": {"post": operation("Cancel", Some("Cancel a running prediction"),
                "cancel_predictions__prediction_id__cancel_post", vec![prediction_id], None,
                json!({
                    "200": any_response("Response Cancel Predictions  Prediction Id  Cancel Post"),
                    "404": {"description": "Unknown prediction", "content": {"application/json": {"schema": {"title": "Not Found", "type": "object"}}}},
                    "422": {"description": "Validation Error", "content": {"application/json": {"schema": reference("HTTPValidationError")}}},
                }))},
        },
        "components": {"schemas": schemas},
    })
}

/// `GET /openapi.json`, with `Input` from the model's schema.
pub async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    let model = match state.default_model() {
        Ok(model) => model,
        Err(e) => return error(e),
    };
    let interface = match model.interface_or_not_ready() {
        Ok(interface) => interface,
        Err(e) => return error(e),
    };
    let (input, output) = match &interface.inputs {
        InputSpec::Fields(schema) => {
            let images = interface.outputs.inputs.iter().any(|c| c.name == "images");
            let output = if images {
                json!({"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}})
            } else {
                json!({"title": "Output"})
            };
            (schema.json_schema("Input"), output)
        }
        InputSpec::Tensors(signature) => {
            let properties: Map<String, Value> = signature
                .inputs
                .iter()
                .enumerate()
                .map(|(order, t)| {
                    (
                        t.name.clone(),
                        json!({"title": t.name, "type": "array", "x-order": order,
                               "description": format!("{} tensor of shape {:?} (-1: any size)", t.datatype, t.shape)}),
                    )
                })
                .collect();
            let required: Vec<&str> = signature.inputs.iter().map(|t| t.name.as_str()).collect();
            (
                json!({"title": "Input", "type": "object", "properties": properties, "required": required}),
                json!({"title": "Output"}),
            )
        }
        InputSpec::Columns(signature) => {
            let properties: Map<String, Value> = signature
                .inputs
                .iter()
                .enumerate()
                .map(|(order, c)| (c.name.clone(), json!({"title": c.name, "x-order": order})))
                .collect();
            let required: Vec<&str> = signature
                .inputs
                .iter()
                .filter(|c| c.required)
                .map(|c| c.name.as_str())
                .collect();
            (
                json!({"title": "Input", "type": "object", "properties": properties, "required": required}),
                json!({"title": "Output"}),
            )
        }
    };
    Json(document(
        &format!("{} served by Kiln", model.name),
        input,
        output,
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_cogs_structure_and_declares_every_answer() {
        let input = json!({"title": "Input", "type": "object", "required": ["prompt"], "properties": {
            "prompt": {"title": "Prompt", "type": "string", "x-order": 0},
            "scheduler": {"title": "Scheduler", "type": "string", "enum": ["A", "B"], "default": "A",
                          "description": "Scheduler", "x-order": 1},
            "image": {"title": "Image", "type": "string", "x-order": 2}}});
        let doc = document("test", input, json!({"title": "Output"}));
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["Input"]["properties"]["scheduler"],
            json!({"description": "Scheduler", "default": "A", "x-order": 1, "nullable": true,
                   "allOf": [{"$ref": "#/components/schemas/scheduler"}]})
        );
        assert!(
            schemas["Input"]["properties"]["prompt"]
                .get("nullable")
                .is_none()
        );
        assert_eq!(
            schemas["scheduler"],
            json!({"type": "string", "enum": ["A", "B"], "title": "scheduler", "description": "An enumeration."})
        );
        assert_eq!(schemas["Input"]["properties"]["image"]["format"], "uri");
        for name in ["context", "created_at", "output_file_prefix", "webhook"] {
            assert!(
                schemas["PredictionRequest"]["properties"]
                    .get(name)
                    .is_some(),
                "{name}"
            );
        }
        let response = &schemas["PredictionResponse"]["properties"];
        for nullable in ["output", "error", "started_at", "completed_at", "version"] {
            assert_eq!(response[nullable]["nullable"], true, "{nullable}");
        }
        assert!(
            schemas["HTTPValidationError"].is_object() && schemas["ValidationError"].is_object()
        );
        let put = &doc["paths"]["/predictions/{prediction_id}"]["put"];
        assert_eq!(put["parameters"][0]["name"], "prediction_id");
        assert_eq!(put["parameters"][0]["in"], "path");
        for status in ["200", "202", "409", "422"] {
            assert!(put["responses"].get(status).is_some(), "PUT {status}");
        }
        let cancel = &doc["paths"]["/predictions/{prediction_id}/cancel"]["post"];
        assert!(cancel["responses"].get("404").is_some());
    }
}
