//! Served models and their load state; readiness is true only when every model
//! has loaded.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use kiln_pipelines::Pipeline;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Where a served model is in its life.
#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<dyn Pipeline>),
    Failed(String),
}

/// A model this server serves.
pub struct ServedModel {
    /// Name clients use (`catalog.schema.model`, or a folder's name).
    pub name: String,
    /// Registry version, when the model came from the registry.
    pub version: Option<u64>,
    /// The reference it was started with, for logs and `/v2/models` metadata.
    pub reference: String,
    state: RwLock<LoadState>,
}

impl ServedModel {
    pub fn new(
        name: impl Into<String>,
        version: Option<u64>,
        reference: impl Into<String>,
    ) -> Self {
        ServedModel {
            name: name.into(),
            version,
            reference: reference.into(),
            state: RwLock::new(LoadState::Loading),
        }
    }

    /// The current state (a poisoned lock reads as a failed model, never a panic).
    pub fn state(&self) -> LoadState {
        match self.state.read() {
            Ok(state) => state.clone(),
            Err(_) => LoadState::Failed("internal lock poisoned".into()),
        }
    }

    pub fn set_state(&self, state: LoadState) {
        match self.state.write() {
            Ok(mut guard) => *guard = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state(), LoadState::Ready(_))
    }

    /// The loaded pipeline, or why there is none.
    pub fn pipeline(&self) -> Result<Arc<dyn Pipeline>, ApiError> {
        match self.state() {
            LoadState::Ready(pipeline) => Ok(pipeline),
            LoadState::Loading => Err(ApiError::ModelNotReady(self.name.clone())),
            LoadState::Failed(message) => Err(ApiError::ModelFailed {
                model: self.name.clone(),
                message,
            }),
        }
    }

    /// The version string protocols report.
    pub fn version_label(&self) -> String {
        self.version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "1".into())
    }
}

/// Shared state behind every route.
pub struct AppState {
    pub models: Vec<Arc<ServedModel>>,
    pub metrics: Metrics,
    pub body_limit: usize,
    pub started: Instant,
}

impl AppState {
    /// True once every served model has loaded.
    pub fn ready(&self) -> bool {
        self.models.iter().all(|m| m.is_ready())
    }

    /// Look a model up by the name clients use.
    pub fn model(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
    }

    /// The model `/invocations` uses when none is named: the first served.
    pub fn default_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        self.models
            .first()
            .cloned()
            .ok_or_else(|| ApiError::ModelNotFound("(no models are served)".into()))
    }
}
