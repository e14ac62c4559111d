//! Expiring links to generated images, for OpenAI's `response_format: "url"`:
//! the image is kept in memory under an unguessable token for an hour (as
//! OpenAI's URLs last 60 minutes), within a byte budget (oldest dropped
//! first), and served at `GET /v1/images/files/{token}` without an API key —
//! the token is the capability, as a signed URL is.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a link works.
pub const LINK_TTL: Duration = Duration::from_secs(3600);
/// Bytes of images kept for links at most.
pub const LINK_BUDGET: usize = 512 << 20;

struct Entry {
    token: String,
    bytes: Arc<Vec<u8>>,
    mime: String,
    expires: Instant,
}

/// The images behind live links, oldest first.
pub struct ImageLinks {
    entries: Mutex<VecDeque<Entry>>,
    ttl: Duration,
    budget: usize,
}

impl Default for ImageLinks {
    fn default() -> Self {
        Self::new(LINK_TTL, LINK_BUDGET)
    }
}

impl ImageLinks {
    pub fn new(ttl: Duration, budget: usize) -> Self {
        ImageLinks {
            entries: Mutex::new(VecDeque::new()),
            ttl,
            budget,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keep `bytes` and return the token of its link.
    pub fn put(&self, bytes: Vec<u8>, mime: &str) -> String {
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let now = Instant::now();
        let mut entries = self.entries();
        entries.retain(|e| e.expires > now);
        let mut total: usize = entries.iter().map(|e| e.bytes.len()).sum::<usize>() + bytes.len();
        while total > self.budget {
            match entries.pop_front() {
                Some(oldest) => total -= oldest.bytes.len(),
                None => break,
            }
        }
        entries.push_back(Entry {
            token: token.clone(),
            bytes: Arc::new(bytes),
            mime: mime.to_string(),
            expires: now + self.ttl,
        });
        token
    }

    /// The image behind a live link, with its MIME type.
    pub fn get(&self, token: &str) -> Option<(Arc<Vec<u8>>, String)> {
        let now = Instant::now();
        self.entries()
            .iter()
            .find(|e| e.token == token && e.expires > now)
            .map(|e| (Arc::clone(&e.bytes), e.mime.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_expire_and_the_budget_drops_the_oldest() {
        let links = ImageLinks::new(Duration::from_millis(50), 10);
        let first = links.put(vec![1; 6], "image/png");
        assert_eq!(links.get(&first).unwrap().0.len(), 6);
        assert_eq!(first.len(), 64);
        let second = links.put(vec![2; 6], "image/jpeg");
        assert!(
            links.get(&first).is_none(),
            "over the budget: the oldest goes"
        );
        assert_eq!(links.get(&second).unwrap().1, "image/jpeg");
        std::thread::sleep(Duration::from_millis(80));
        assert!(links.get(&second).is_none(), "expired");
        assert!(links.get("not-a-token").is_none());
    }
}
