//! Reaching Redis: the client (TLS, keepalives), reconnecting connection
//! managers, this process's consumer name, and which Redis errors mean "the
//! store is unreachable now" (503, retry later) rather than a fault.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::super::StoreError;
use crate::config::QueueSection;

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        let message = format!("redis: {e}");
        // Down, or up but not serving yet (loading its AOF, a replica during
        // failover): retry later.
        let transient = matches!(
            e.code(),
            Some("LOADING" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN")
        );
        if transient
            || e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
        {
            StoreError::unreachable(message)
        } else {
            StoreError::new(message)
        }
    }
}

/// The client for `[queue] url`, with keepalives and a user timeout on every
/// connection, and `rediss://` verified against the system's roots or
/// `[queue] tls_ca_file`.
pub(super) fn client(settings: &QueueSection) -> Result<redis::Client, StoreError> {
    let url = settings.url.as_deref().unwrap_or_default();
    let invalid =
        |e: redis::RedisError| StoreError::new(format!("queue URL {}: {e}", redacted(url)));
    // Keepalives and a user timeout, so a Redis that vanished without a
    // reset (a dead node) is noticed in seconds and reconnected to.
    let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5));
    let tcp = redis::io::tcp::TcpSettings::default()
        .set_keepalive(keepalive)
        .set_user_timeout(Duration::from_secs(20));
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(invalid)?
        .set_tcp_settings(tcp);
    let client = match &settings.tls_ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::new(format!("[queue] tls_ca_file {}: {e}", path.display()))
            })?;
            let roots = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            redis::Client::build_with_tls(info, roots).map_err(invalid)?
        }
        None => redis::Client::open(info).map_err(invalid)?,
    };
    Ok(client)
}

/// A reconnecting connection whose replies may take `response_timeout`.
pub(super) async fn manager(
    client: &redis::Client,
    response_timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout));
    client.get_connection_manager_with_config(config).await
}

/// This process's consumer name in every group: host, process id and a nonce.
pub(super) fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kiln".into());
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &nonce[..8])
}

/// A Redis URL with any password masked, for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redacted("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redacted("redis://host:6379/0"), "redis://host:6379/0");
    }
}
