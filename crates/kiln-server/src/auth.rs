//! API keys: when any is configured, every route except the health checks needs
//! `Authorization: Bearer <key>` (a bare key is accepted too, as some RunPod
//! clients send it). Keys are compared through their SHA-256 digests in constant
//! time, so timing reveals nothing about a key.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// Route templates that answer without a key: liveness and readiness probes,
/// the Databricks SDK's metadata probe, and image links (whose token is the
/// capability). Matched against the route's template (`/v2/{model}/health`), never the raw
/// path, so `/predictions/health` is not mistaken for a probe.
pub fn is_open_route(template: &str) -> bool {
    // An image link's token is its own capability, as a signed URL is.
    if template.ends_with("/v1/images/files/{token}") {
        return true;
    }
    [
        "/ping",
        "/health",
        "/health-check",
        "/v2/health/live",
        "/v2/health/ready",
        // The Databricks SDK's host-metadata probe (an empty answer).
        "/.well-known/databricks-config",
    ]
    .iter()
    .any(|probe| template.ends_with(probe))
}

fn digest(text: &[u8]) -> [u8; 32] {
    Sha256::digest(text).into()
}

/// Equal digests, compared without an early exit.
fn same_key(given: &[u8], expected: &str) -> bool {
    let (a, b) = (digest(given), digest(expected.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Whether the request carries one of `keys`.
pub fn authorized(keys: &[String], authorization: Option<&HeaderValue>) -> bool {
    let Some(value) = authorization.map(HeaderValue::as_bytes) else {
        return false;
    };
    let token = value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"bearer "))
        .unwrap_or(value);
    let mut matched = false;
    for key in keys {
        matched |= same_key(token, key);
    }
    matched
}

/// Middleware: refuse requests without a valid key, in the protocol's error shape.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let probe = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|route| is_open_route(route.as_str()));
    if state.api_keys.is_empty()
        || probe
        || authorized(
            &state.api_keys,
            request.headers().get(header::AUTHORIZATION),
        )
    {
        return next.run(request).await;
    }
    let path = request.uri().path();
    let mut response =
        if path.contains("/v1/images") || path.ends_with("/v1/models") || path.contains("/v1/chat")
        {
            crate::protocols::openai::error(ApiError::Unauthorized)
        } else if path.ends_with("/invocations") {
            ApiError::Unauthorized.mlflow()
        } else {
            ApiError::Unauthorized.simple()
        };
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_bare_keys_match_only_configured_keys() {
        let keys = vec!["s3cret".to_string(), "other".to_string()];
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(authorized(&keys, Some(&header("Bearer s3cret"))));
        assert!(authorized(&keys, Some(&header("other"))));
        assert!(!authorized(&keys, Some(&header("Bearer s3cre"))));
        assert!(!authorized(&keys, Some(&header("Basic s3cret"))));
        assert!(!authorized(&keys, None));
        assert!(is_open_route("/v2/health/ready"));
        assert!(is_open_route("/v2/{model}/health"));
        assert!(is_open_route("/cog/health-check"));
        assert!(!is_open_route("/v1/models"));
        assert!(is_open_route("/v1/images/files/{token}"));
        assert!(!is_open_route("/v1/images/generations"));
        assert!(!is_open_route("/predictions/{id}"));
        assert!(!is_open_route("/status/{id}"));
    }
}
