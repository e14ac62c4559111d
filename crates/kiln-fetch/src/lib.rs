//! Guarded downloads for Kiln: a [`Policy`] (allowed hosts, trusted private
//! hosts, size limit, per-host tokens), HTTP GETs that check every redirect
//! hop's address, the Hugging Face Hub via hf-hub, a single-flight helper so
//! concurrent requests fetch once, and [`block_on`] for synchronous callers.

pub mod address;
pub mod download;
pub mod hub;
pub mod policy;
pub mod single_flight;

pub use download::{Downloaded, download_to, get_bytes, get_json, remote_size};
pub use hub::Hub;
pub use policy::Policy;
pub use single_flight::SingleFlight;

use std::net::IpAddr;

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    #[error("bad URL: {0}")]
    BadUrl(String),
    #[error("host {host} is not in the allowed hosts ({})", if allowed.is_empty() { "none are configured".to_string() } else { allowed.join(", ") })]
    HostNotAllowed { host: String, allowed: Vec<String> },
    #[error("{host} resolves to an internal address ({address}); only trusted private hosts may")]
    InternalAddress { host: String, address: IpAddr },
    #[error("{url} is larger than the {limit}-byte limit")]
    TooLarge { url: String, limit: u64 },
    #[error("{url} answered {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("too many redirects from {0}")]
    TooManyRedirects(String),
    #[error("network error: {0}")]
    Network(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("Hugging Face Hub: {0}")]
    Hub(String),
    #[error("file error: {0}")]
    Io(String),
}

/// How a failed fetch is the upstream's fault rather than the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The host failed or answered with a server error (HTTP 502).
    Failed,
    /// The host did not answer in time (HTTP 504).
    TimedOut,
}

impl FetchError {
    /// `Some` when the remote side failed (network errors, 5xx, timeouts);
    /// `None` when the request named something unusable (a bad or disallowed
    /// URL, a missing file, a file over the limit).
    pub fn upstream(&self) -> Option<UpstreamFailure> {
        match self {
            FetchError::Timeout(_) => Some(UpstreamFailure::TimedOut),
            FetchError::Network(_) | FetchError::TooManyRedirects(_) => {
                Some(UpstreamFailure::Failed)
            }
            FetchError::Status { status, .. } if *status >= 500 || *status == 429 => {
                Some(UpstreamFailure::Failed)
            }
            _ => None,
        }
    }
}

/// Run `future` to completion from synchronous code, on a thread of its own
/// (so it works whether or not the caller is inside an async runtime).
pub fn block_on<T: Send>(
    future: impl std::future::Future<Output = Result<T, FetchError>> + Send,
) -> Result<T, FetchError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| FetchError::Io(format!("cannot start a download runtime: {e}")))?
                    .block_on(future)
            })
            .join()
            .unwrap_or_else(|_| Err(FetchError::Network("the download thread panicked".into())))
    })
}
