//! What a guarded download may do: which hosts a user may name, which hosts
//! may be internal (and plain http), how many bytes may come back, and which
//! host gets which access token.

use std::time::Duration;

/// Rules for one kind of download (LoRAs, model files…).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Hosts a URL may name (a name also allows its subdomains). Redirect
    /// targets need not be listed (CDNs vary), but every hop is address-checked.
    pub allowed_hosts: Vec<String>,
    /// Hosts trusted to resolve to internal addresses and to be called over
    /// plain http: an in-house artifact server, or a test's loopback server.
    pub private_hosts: Vec<String>,
    /// Largest body accepted (bytes).
    pub max_bytes: u64,
    /// Access tokens sent as `Authorization: Bearer` to a host (and its
    /// subdomains), never to a host a redirect leads to.
    pub tokens: Vec<(String, String)>,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// Connect timeout, and the longest pause between two pieces of a body.
    pub idle_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_hosts: Vec::new(),
            private_hosts: Vec::new(),
            max_bytes: 2 << 30,
            tokens: Vec::new(),
            max_redirects: 5,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Whether `host` is `pattern` or one of its subdomains (case-insensitive).
pub fn host_matches(host: &str, pattern: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
    !pattern.is_empty()
        && (host == pattern
            || host
                .strip_suffix(&pattern)
                .is_some_and(|rest| rest.ends_with('.')))
}

impl Policy {
    pub fn allows_host(&self, host: &str) -> bool {
        self.allowed_hosts.iter().any(|p| host_matches(host, p))
    }

    pub fn trusts_private(&self, host: &str) -> bool {
        self.private_hosts.iter().any(|p| host_matches(host, p))
    }

    /// The token for `host`, if one is configured.
    pub fn token_for(&self, host: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(pattern, _)| host_matches(host, pattern))
            .map(|(_, token)| token.as_str())
    }

    /// Add `token` for `host` when the environment variable `name` is set.
    pub fn with_token_from_env(mut self, host: &str, names: &[&str]) -> Self {
        if let Some(token) = names
            .iter()
            .find_map(|name| std::env::var(name).ok())
            .filter(|t| !t.trim().is_empty())
        {
            self.tokens
                .push((host.to_string(), token.trim().to_string()));
        }
        self
    }
}

/// A comma- or whitespace-separated list from the environment variable `name`,
/// or `default` when it is unset.
pub fn list_from_env(name: &str, default: &[&str]) -> Vec<String> {
    match std::env::var(name) {
        Ok(value) => value
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Err(_) => default.iter().map(|s| s.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_themselves_and_subdomains_only() {
        assert!(host_matches("huggingface.co", "huggingface.co"));
        assert!(host_matches("cdn-lfs.HuggingFace.co", "huggingface.co"));
        assert!(!host_matches("evilhuggingface.co", "huggingface.co"));
        assert!(!host_matches("huggingface.co.evil.com", "huggingface.co"));
        assert!(!host_matches("huggingface.co", ""));
    }
}
