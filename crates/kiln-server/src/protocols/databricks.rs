//! Databricks Model Serving's REST surface, so the seed's way of testing a
//! served model, `mlflow.deployments.get_deploy_client("databricks")`, works
//! against Kiln unchanged (`DATABRICKS_HOST=http://host:port`, the token an API
//! key): endpoints listed and described under `/api/2.0/serving-endpoints`,
//! scored at `POST /serving-endpoints/{name}/invocations` with MLflow's input
//! shapes (or OpenAI bodies for LLMs), errors as `{"error_code", "message"}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::state::{AppState, LoadState, ServedModel};

/// One served model as a Databricks serving endpoint.
fn endpoint(state: &AppState, model: &ServedModel) -> Value {
    let (ready, update) = match model.state() {
        LoadState::Failed(_) => ("NOT_READY", "UPDATE_FAILED"),
        LoadState::Ready(_) => ("READY", "NOT_UPDATING"),
        // Lazy or unloaded models load on their first request: servable.
        LoadState::Unloaded | LoadState::Loading if model.settled() => ("READY", "NOT_UPDATING"),
        LoadState::Unloaded | LoadState::Loading => ("NOT_READY", "IN_PROGRESS"),
    };
    let mut body = json!({
        "name": model.name,
        "id": model.name,
        "creator": "kiln",
        "creation_timestamp": state.started_unix_ms(),
        "last_updated_timestamp": state.started_unix_ms(),
        "state": {"ready": ready, "config_update": update},
        "config": {
            "served_entities": [{
                "name": model.name,
                "entity_name": model.reference,
                "entity_version": model.version_label(),
                "state": {"deployment": if ready == "READY" { "DEPLOYMENT_READY" } else { "DEPLOYMENT_CREATING" }},
            }],
            "traffic_config": {"routes": [{"served_model_name": model.name, "traffic_percentage": 100}]},
        },
        "tags": [],
    });
    if let Some(interface) = model.interface() {
        body["task"] = Value::String(task_of(&interface.pipeline).into());
    }
    body
}

/// Databricks' task names where one fits the pipeline.
fn task_of(pipeline: &str) -> &str {
    if pipeline.starts_with("text_generation") {
        "llm/v1/chat"
    } else {
        pipeline
    }
}

/// `GET /api/2.0/serving-endpoints`: every served model.
pub async fn list(State(state): State<Arc<AppState>>) -> Response {
    let endpoints: Vec<Value> = state.models.iter().map(|m| endpoint(&state, m)).collect();
    Json(json!({"endpoints": endpoints})).into_response()
}

/// `GET /api/2.0/serving-endpoints/{name}`.
pub async fn get(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.model(&name) {
        Ok(model) => Json(endpoint(&state, &model)).into_response(),
        Err(error) => error.mlflow(),
    }
}

/// `GET /.well-known/databricks-config`: the host metadata the Databricks SDK
/// asks for before each call; none to give (an empty object, not a 404 that
/// the SDK would log as a warning every time).
pub async fn host_metadata() -> Response {
    Json(json!({})).into_response()
}
