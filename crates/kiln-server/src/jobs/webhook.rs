//! Webhook delivery: POST a job's JSON to the URL its submitter gave. Final events
//! are retried on failure (connection errors, 429 and 5xx) a configured number of
//! times; intermediate ones are sent once. Delivery never blocks a job.

use std::time::Duration;

use serde_json::Value;

/// Sends webhooks in the background.
pub struct Sender {
    client: reqwest::Client,
    retries: u32,
    delay: Duration,
}

impl Sender {
    pub fn new(retries: u32, delay: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Sender {
            client,
            retries,
            delay,
        }
    }

    /// Deliver `body` to `url` (only http and https URLs are called).
    pub fn send(&self, url: String, body: Value, retry: bool) {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            tracing::warn!(%url, "webhook skipped: only http(s) URLs are called");
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let attempts = if retry { self.retries + 1 } else { 1 };
        let delay = self.delay;
        runtime.spawn(async move {
            for attempt in 1..=attempts {
                let outcome = client
                    .post(&url)
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
                    tokio::time::sleep(delay).await;
                }
            }
        });
    }
}
