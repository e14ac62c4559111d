//! Guarded HTTP GETs: the named host must be allowed, every hop (redirects
//! are followed by hand) must resolve to a public address unless its host is
//! trusted, the connection goes to the address checked, tokens go only to
//! their own host, and bodies are cut off at the policy's byte limit.

use std::io::Write;
use std::path::{Path, PathBuf};

use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, LOCATION, RANGE};
use reqwest::{Response, StatusCode, Url};
use sha2::{Digest, Sha256};

use crate::address::checked_address;
use crate::{FetchError, Policy};

/// A finished download.
#[derive(Debug, Clone, PartialEq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    /// Hex SHA-256 of the body.
    pub sha256: String,
    /// The URL the body came from, after redirects.
    pub final_url: String,
}

/// Whether the first hop of `url` may be requested under `policy`.
pub fn check_url(url: &str, policy: &Policy) -> Result<Url, FetchError> {
    let parsed = Url::parse(url).map_err(|e| FetchError::BadUrl(format!("{url}: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| FetchError::BadUrl(format!("{url} has no host")))?
        .to_string();
    if !policy.allows_host(&host) {
        return Err(FetchError::HostNotAllowed {
            host,
            allowed: policy.allowed_hosts.clone(),
        });
    }
    Ok(parsed)
}

/// One checked request to `url`, not following redirects.
async fn request_hop(
    url: &Url,
    policy: &Policy,
    range: Option<&str>,
) -> Result<Response, FetchError> {
    let host = url
        .host_str()
        .ok_or_else(|| FetchError::BadUrl(format!("{url} has no host")))?;
    let trusted = policy.trusts_private(host);
    let address = checked_address(url, trusted).await?;
    match url.scheme() {
        "https" => {}
        "http" if trusted => {}
        other => {
            return Err(FetchError::BadUrl(format!(
                "{url}: only https is fetched ({other} is allowed only for trusted private hosts)"
            )));
        }
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(policy.idle_timeout)
        .read_timeout(policy.idle_timeout)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .resolve(host, address)
        .build()
        .map_err(|e| FetchError::Network(e.to_string()))?;
    let mut request = client.get(url.clone());
    if let Some(token) = policy.token_for(host) {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(range) = range {
        request = request.header(RANGE, range);
    }
    request.send().await.map_err(|e| network(&url, &e))
}

/// A transport error, told apart as a timeout where reqwest says so.
fn network(url: &dyn std::fmt::Display, error: &reqwest::Error) -> FetchError {
    if error.is_timeout() {
        FetchError::Timeout(format!("{url}: {error}"))
    } else {
        FetchError::Network(format!("{url}: {error}"))
    }
}

fn redirect_target(url: &Url, response: &Response) -> Result<Option<Url>, FetchError> {
    if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| FetchError::Network(format!("{url}: redirect without a Location")))?;
    url.join(location)
        .map(Some)
        .map_err(|e| FetchError::BadUrl(format!("{url} redirects to {location}: {e}")))
}

/// GET `url`, following up to `policy.max_redirects` redirects, each checked.
pub async fn get(url: &str, policy: &Policy) -> Result<(Url, Response), FetchError> {
    let mut current = check_url(url, policy)?;
    for _ in 0..=policy.max_redirects {
        let response = request_hop(&current, policy, None).await?;
        match redirect_target(&current, &response)? {
            Some(next) => {
                tracing::debug!(from = %current, to = %next, "following redirect");
                current = next;
            }
            None if response.status().is_success() => return Ok((current, response)),
            None => {
                let status = response.status();
                let detail: String = response
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect();
                return Err(FetchError::Status {
                    url: current.to_string(),
                    status: status.as_u16(),
                    detail,
                });
            }
        }
    }
    Err(FetchError::TooManyRedirects(url.to_string()))
}

/// The size of the file at `url` without fetching it: `X-Linked-Size` (the
/// Hugging Face Hub's header for large files), else the total of a one-byte
/// range. `None` when the server does not say.
pub async fn remote_size(url: &str, policy: &Policy) -> Result<Option<u64>, FetchError> {
    let parsed = check_url(url, policy)?;
    let response = request_hop(&parsed, policy, Some("bytes=0-0")).await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Some(size) = header("x-linked-size").and_then(|v| v.parse().ok()) {
        return Ok(Some(size));
    }
    if response.status() == StatusCode::PARTIAL_CONTENT {
        return Ok(header(CONTENT_RANGE.as_str())
            .and_then(|v| v.rsplit('/').next().and_then(|n| n.parse().ok())));
    }
    if response.status().is_success() {
        return Ok(header(CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()));
    }
    Ok(None)
}

/// Read a body of at most `limit` bytes, passing each piece to `sink`.
async fn read_body(
    url: &Url,
    mut response: Response,
    limit: u64,
    idle: std::time::Duration,
    sink: &mut (dyn FnMut(&[u8]) -> Result<(), FetchError> + Send),
) -> Result<u64, FetchError> {
    if let Some(length) = response.content_length()
        && length > limit
    {
        return Err(FetchError::TooLarge {
            url: url.to_string(),
            limit,
        });
    }
    let mut total = 0u64;
    loop {
        let piece = tokio::time::timeout(idle, response.chunk())
            .await
            .map_err(|_| FetchError::Timeout(format!("{url}: no data for {idle:?}")))?
            .map_err(|e| network(&url, &e))?;
        let Some(piece) = piece else { break };
        total += piece.len() as u64;
        if total > limit {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        sink(&piece)?;
    }
    Ok(total)
}

/// GET `url` into memory (at most `policy.max_bytes`).
pub async fn get_bytes(url: &str, policy: &Policy) -> Result<(Url, Vec<u8>), FetchError> {
    let (final_url, response) = get(url, policy).await?;
    let mut body = Vec::new();
    read_body(
        &final_url,
        response,
        policy.max_bytes,
        policy.idle_timeout,
        &mut |piece| {
            body.extend_from_slice(piece);
            Ok(())
        },
    )
    .await?;
    Ok((final_url, body))
}

/// GET `url` as JSON (at most 4 MiB).
pub async fn get_json(url: &str, policy: &Policy) -> Result<serde_json::Value, FetchError> {
    let limited = Policy {
        max_bytes: policy.max_bytes.min(4 << 20),
        ..policy.clone()
    };
    let (final_url, body) = get_bytes(url, &limited).await?;
    serde_json::from_slice(&body)
        .map_err(|e| FetchError::Network(format!("{final_url} did not return JSON: {e}")))
}

/// Download `url` to `dest` (written beside it first, then renamed, so a
/// reader never sees half a file). `progress` gets (bytes so far, total if known).
pub async fn download_to(
    url: &str,
    policy: &Policy,
    dest: &Path,
    progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
) -> Result<Downloaded, FetchError> {
    let (final_url, response) = get(url, policy).await?;
    let expected = response.content_length();
    let partial = dest.with_extension(format!("part-{}", std::process::id()));
    let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", partial.display()));
    let mut file = std::fs::File::create(&partial).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let outcome = read_body(
        &final_url,
        response,
        policy.max_bytes,
        policy.idle_timeout,
        &mut |piece| {
            file.write_all(piece).map_err(io)?;
            hasher.update(piece);
            done += piece.len() as u64;
            progress(done, expected);
            Ok(())
        },
    )
    .await;
    let finished = outcome.and_then(|bytes| {
        if expected.is_some_and(|e| e != bytes) {
            return Err(FetchError::Network(format!(
                "{final_url}: the body ended after {bytes} of {} bytes",
                expected.unwrap_or_default()
            )));
        }
        file.sync_all().map_err(io)?;
        std::fs::rename(&partial, dest).map_err(io)?;
        Ok(bytes)
    });
    match finished {
        Ok(bytes) => Ok(Downloaded {
            path: dest.to_path_buf(),
            bytes,
            sha256: hex(&hasher.finalize()),
            final_url: final_url.to_string(),
        }),
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            Err(error)
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `text`.
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}
