//! Files from the Hugging Face Hub through hf-hub, into the standard HF cache
//! (`HF_HOME`, shared with Python tools). The endpoint (`HF_ENDPOINT`) must be
//! an allowed host, the file's size is checked before it is fetched, and a
//! file already in the cache is used without touching the network.

use std::path::PathBuf;

use hf_hub::api::tokio::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::download::{check_url, remote_size};
use crate::{FetchError, Policy};

/// The Hub's default address.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to reach the Hub.
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
    /// The HF cache folder (`HF_HOME`/hub, by default `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// Show hf-hub's progress bar (CLI use).
    pub progress: bool,
}

impl Hub {
    /// From `HF_ENDPOINT` and `HF_TOKEN` (else the token file `huggingface-cli login` writes).
    pub fn from_env() -> Self {
        let cache = Cache::from_env();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| cache.token());
        Hub {
            endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache: cache.path().clone(),
            progress: false,
        }
    }

    /// The endpoint's host name (`huggingface.co` by default).
    pub fn endpoint_host(&self) -> Option<String> {
        reqwest::Url::parse(&self.endpoint)
            .ok()?
            .host_str()
            .map(str::to_string)
    }

    /// The policy with this hub's token attached to its host.
    fn policy(&self, policy: &Policy) -> Policy {
        let mut policy = policy.clone();
        if let (Some(token), Some(host)) = (&self.token, self.endpoint_host()) {
            policy.tokens.push((host, token.clone()));
        }
        policy
    }

    fn repo(repo: &str, revision: &str) -> Repo {
        Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string())
    }

    fn api(&self) -> Result<hf_hub::api::tokio::Api, FetchError> {
        ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(self.progress)
            .build()
            .map_err(|e| FetchError::Hub(e.to_string()))
    }

    /// The local path of `file` in `repo` at `revision`, downloaded on a cache miss.
    pub async fn file(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        policy: &Policy,
    ) -> Result<PathBuf, FetchError> {
        if let Some(cached) = Cache::new(self.cache.clone())
            .repo(Self::repo(repo, revision))
            .get(file)
        {
            return Ok(cached);
        }
        let url = format!("{}/{repo}/resolve/{revision}/{file}", self.endpoint);
        let policy = self.policy(policy);
        check_url(&url, &policy)?;
        if let Some(size) = remote_size(&url, &policy).await?
            && size > policy.max_bytes
        {
            return Err(FetchError::TooLarge {
                url,
                limit: policy.max_bytes,
            });
        }
        self.api()?
            .repo(Self::repo(repo, revision))
            .get(file)
            .await
            .map_err(|e| FetchError::Hub(format!("{repo}/{file}@{revision}: {e}")))
    }

    /// The files in `repo` at `revision`.
    pub async fn list(
        &self,
        repo: &str,
        revision: &str,
        policy: &Policy,
    ) -> Result<Vec<String>, FetchError> {
        check_url(&self.endpoint, &self.policy(policy))?;
        let info = self
            .api()?
            .repo(Self::repo(repo, revision))
            .info()
            .await
            .map_err(|e| FetchError::Hub(format!("{repo}@{revision}: {e}")))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }
}
