//! Webhook delivery: POST a job's JSON to the URL its submitter gave. Final events
//! are retried on failure (connection errors, 429 and 5xx) with growing pauses;
//! intermediate ones are sent once. Delivery never blocks a job. Only http(s)
//! URLs are called, redirects are not followed, and unless configured otherwise
//! a URL whose host resolves to a loopback, private, link-local or otherwise
//! internal address is refused (the address checked is the address connected to).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

/// Sends webhooks in the background.
pub struct Sender {
    retries: u32,
    delay: Duration,
    allow_private: bool,
}

/// Resolve the webhook's host to one address it may be sent to.
/// Refuse, at submission, a webhook URL that delivery could never use: it
/// must parse, be `http` or `https`, and name a host. (Addresses are checked
/// again at delivery, on every attempt.)
pub fn check_webhook_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{url:?}: only http and https webhooks are delivered"
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} names no host"));
    }
    Ok(())
}

async fn checked_address(url: &reqwest::Url, allow_private: bool) -> Result<SocketAddr, String> {
    kiln_fetch::address::checked_address(url, allow_private)
        .await
        .map_err(|e| match e {
            kiln_fetch::FetchError::InternalAddress { .. } => {
                format!("{e}; set jobs.webhook_private_addresses = true to allow it")
            }
            other => other.to_string(),
        })
}

impl Sender {
    pub fn new(retries: u32, delay: Duration, allow_private: bool) -> Self {
        Sender {
            retries,
            delay,
            allow_private,
        }
    }

    /// A channel whose messages (body, retry) are delivered to `url` one after
    /// another, in order: one job's events never overtake each other.
    pub fn ordered(&self, url: String) -> tokio::sync::mpsc::UnboundedSender<(Value, bool)> {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Value, bool)>();
        let (retries, delay, allow_private) = (self.retries, self.delay, self.allow_private);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                while let Some((body, retry)) = receiver.recv().await {
                    let attempts = if retry { retries + 1 } else { 1 };
                    deliver(&url, body, attempts, delay, allow_private).await;
                }
            });
        }
        sender
    }

    /// Deliver `body` to `url` in the background.
    pub fn send(&self, url: String, body: Value, retry: bool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let attempts = if retry { self.retries + 1 } else { 1 };
        let (delay, allow_private) = (self.delay, self.allow_private);
        runtime.spawn(async move { deliver(&url, body, attempts, delay, allow_private).await });
    }
}

/// POST `body` to `url`, up to `attempts` times with growing pauses.
async fn deliver(url: &str, body: Value, attempts: u32, delay: Duration, allow_private: bool) {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        tracing::warn!(%url, "webhook skipped: not a URL");
        return;
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        tracing::warn!(%url, "webhook skipped: only http(s) URLs are called");
        return;
    }
    let address = match checked_address(&parsed, allow_private).await {
        Ok(address) => address,
        Err(reason) => {
            tracing::warn!(%url, %reason, "webhook refused");
            return;
        }
    };
    // Connect to the address that was checked, whatever DNS says later.
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    if let Some(host) = parsed.host_str() {
        builder = builder.resolve(host, address);
    }
    let Ok(client) = builder.build() else {
        return;
    };
    for attempt in 1..=attempts {
        let outcome = client
            .post(parsed.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let retryable = match &outcome {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                let status = response.status();
                tracing::warn!(%url, %status, attempt, "webhook refused");
                status.as_u16() == 429 || status.is_server_error()
            }
            Err(error) => {
                tracing::warn!(%url, %error, attempt, "webhook failed");
                true
            }
        };
        if !retryable {
            return;
        }
        if attempt < attempts {
            tokio::time::sleep(delay * attempt).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_webhook_urls_are_refused_at_submission() {
        assert!(check_webhook_url("https://hooks.example.com/x?y=1").is_ok());
        assert!(check_webhook_url("http://127.0.0.1:9000/hook").is_ok());
        for bad in [
            "not a url",
            "file:///etc/passwd",
            "ftp://example.com/x",
            "http://",
            "",
        ] {
            assert!(check_webhook_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn loopback_webhooks_are_refused_unless_allowed() {
        let url = reqwest::Url::parse("http://127.0.0.1:9/hook").unwrap();
        let refused = checked_address(&url, false).await.unwrap_err();
        assert!(refused.contains("webhook_private_addresses"), "{refused}");
        assert!(checked_address(&url, true).await.is_ok());
    }
}
