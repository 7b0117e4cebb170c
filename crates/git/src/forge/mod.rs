//! Pull requests on the forges a `pull-request` promotion may name.
//!
//! # Where the API is, from the repository URL
//!
//! | `type` | repository URL | API base | repository |
//! |---|---|---|---|
//! | `github` | `https://github.com/o/r` | `https://api.github.com` | `o/r` |
//! | `github` | `https://ghe.example/o/r` (any other host) | `https://ghe.example/api/v3` (GitHub Enterprise Server) | `o/r` |
//! | `gitlab` | `https://gitlab.example/group/sub/project` | `https://gitlab.example/api/v4` | `group/sub/project` (URL-encoded) |
//! | `gitea`, `forgejo` | `https://host[/prefix]/o/r` | `https://host[/prefix]/api/v1` | last two segments |
//! | `bitbucket-server` | `https://host[/ctx]/scm/KEY/slug.git`, `https://host/projects/KEY/repos/slug`, `ssh://git@host:7999/KEY/slug.git` | `https://host[/ctx]/rest/api/1.0` | project `KEY`, repository `slug` |
//! | `azure-devops` | `https://dev.azure.com/org/project/_git/repo` (also `org.visualstudio.com/project/_git/repo` and Azure DevOps Server collections) | `https://dev.azure.com/org/project/_apis/git/repositories/repo` | |
//!
//! SSH URLs (`git@host:o/r.git`, `ssh://git@host[:port]/o/r.git`) use `https://host` as
//! the web origin (`ssh.dev.azure.com:v3/org/project/repo` maps to `dev.azure.com`). Where
//! these rules do not fit (GitLab under a path prefix, an API on another host),
//! [`ForgeTarget::api_base`] overrides the API base URL.
//!
//! Requests carry the `token` of the Secret in the provider's header (GitHub `Bearer`,
//! GitLab `PRIVATE-TOKEN`, Gitea/Forgejo `token`, Bitbucket Server `Bearer`, Azure DevOps
//! basic auth with the token as password). Redirects are not followed, so a token never
//! travels to another host.

mod azure;
mod bitbucket;
mod gitea;
mod github;
mod gitlab;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

pub use azure::AzureDevOps;
pub use bitbucket::BitbucketServer;
pub use gitea::Gitea;
pub use github::GitHub;
pub use gitlab::GitLab;

use crate::credentials::Scrubber;
use crate::git::truncate;
use crate::repo_url::RepoUrl;

/// How long one API request may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// An open pull request (merge request on GitLab).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// The number people see (`#12`, GitLab's `!12`).
    pub number: u64,
    /// Its web page.
    pub url: String,
    pub title: String,
    pub body: String,
    /// Bitbucket Server's optimistic-locking version; 0 elsewhere.
    pub version: u64,
}

/// What a pull request should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestDraft {
    /// Source branch (short name).
    pub head: String,
    /// Target branch (short name).
    pub base: String,
    pub title: String,
    pub body: String,
}

/// Why a forge request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeErrorKind {
    /// 401/403: the token is wrong, expired or lacks rights.
    Auth,
    /// 404: no such repository (or hidden from the token).
    NotFound,
    /// 429 or an exhausted rate limit.
    RateLimited,
    /// A pull request for the branch already exists (a race with another writer).
    Conflict,
    /// 5xx, connection trouble, timeouts.
    Transient,
    /// The forge refused the request for another reason, or answered nonsense.
    Rejected,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ForgeError {
    pub kind: ForgeErrorKind,
    /// Scrubbed of the token.
    pub message: String,
}

impl ForgeError {
    pub fn new(kind: ForgeErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ForgeErrorKind::RateLimited | ForgeErrorKind::Transient
        )
    }
}

/// The pull-request operations a promotion needs.
#[async_trait]
pub trait Forge: Send + Sync {
    /// The open pull request from `head` into `base`, if any.
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError>;
    async fn create(&self, draft: &PullRequestDraft) -> Result<PullRequest, ForgeError>;
    /// Sets title and body of `existing`.
    async fn update(
        &self,
        existing: &PullRequest,
        draft: &PullRequestDraft,
    ) -> Result<PullRequest, ForgeError>;
}

/// The forge kinds (`pull-request.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    GitHub,
    GitLab,
    Gitea,
    Forgejo,
    BitbucketServer,
    AzureDevOps,
}

impl ForgeKind {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "github" => Self::GitHub,
            "gitlab" => Self::GitLab,
            "gitea" => Self::Gitea,
            "forgejo" => Self::Forgejo,
            "bitbucket-server" => Self::BitbucketServer,
            "azure-devops" => Self::AzureDevOps,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::GitHub => "github",
            Self::GitLab => "gitlab",
            Self::Gitea => "gitea",
            Self::Forgejo => "forgejo",
            Self::BitbucketServer => "bitbucket-server",
            Self::AzureDevOps => "azure-devops",
        }
    }
}

impl fmt::Display for ForgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which forge and repository a promotion talks to.
#[derive(Debug, Clone)]
pub struct ForgeTarget {
    pub kind: ForgeKind,
    pub url: RepoUrl,
    /// Overrides the API base derived from the URL.
    pub api_base: Option<String>,
}

/// Builds the client for `target`, authenticating with `token`.
pub fn connect(
    target: &ForgeTarget,
    token: String,
    client: reqwest::Client,
) -> Result<Box<dyn Forge>, ForgeError> {
    let mut scrubber = Scrubber::default();
    scrubber.add(&token);
    let api = ApiClient {
        client,
        token,
        scrubber,
    };
    let base = target
        .api_base
        .as_deref()
        .map(|b| b.trim_end_matches('/').to_string());
    Ok(match target.kind {
        ForgeKind::GitHub => Box::new(GitHub::new(&target.url, base, api)?),
        ForgeKind::GitLab => Box::new(GitLab::new(&target.url, base, api)?),
        ForgeKind::Gitea | ForgeKind::Forgejo => Box::new(Gitea::new(&target.url, base, api)?),
        ForgeKind::BitbucketServer => Box::new(BitbucketServer::new(&target.url, base, api)?),
        ForgeKind::AzureDevOps => Box::new(AzureDevOps::new(&target.url, base, api)?),
    })
}

/// The HTTP client forges are called with: [`API_TIMEOUT`], no redirects.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(API_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("pipeline-controller/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Shared request plumbing: sending, status classification, decoding, scrubbing.
pub(crate) struct ApiClient {
    client: reqwest::Client,
    token: String,
    scrubber: Scrubber,
}

impl ApiClient {
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    pub(crate) fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.client.request(method, url)
    }

    /// Sends `request` and decodes a successful JSON answer. `what` names the operation
    /// for messages, e.g. `GitHub: listing pull requests`.
    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        what: &str,
        request: RequestBuilder,
    ) -> Result<T, ForgeError> {
        let started = std::time::Instant::now();
        let result = self.send_inner(what, request).await;
        // Like git's "git command finished": how long the forge took, per request.
        tracing::debug!(
            operation = what,
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "forge request finished"
        );
        result
    }

    async fn send_inner<T: DeserializeOwned>(
        &self,
        what: &str,
        request: RequestBuilder,
    ) -> Result<T, ForgeError> {
        let response = request.send().await.map_err(|err| {
            let text = pipeline_core::report::error_chain(&err.without_url());
            ForgeError::new(
                ForgeErrorKind::Transient,
                self.scrubber.scrub(&format!("{what}: {text}")),
            )
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|err| {
            ForgeError::new(
                ForgeErrorKind::Transient,
                self.scrubber.scrub(&format!(
                    "{what}: reading the answer: {}",
                    err.without_url()
                )),
            )
        })?;
        // Azure DevOps answers a refused token with 203 and a sign-in page.
        if status == StatusCode::NON_AUTHORITATIVE_INFORMATION {
            return Err(ForgeError::new(
                ForgeErrorKind::Auth,
                format!("{what}: the forge did not accept the token (HTTP 203, sign-in page)"),
            ));
        }
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|err| {
                ForgeError::new(
                    ForgeErrorKind::Rejected,
                    format!("{what}: unexpected answer (HTTP {status}): {err}"),
                )
            });
        }
        let detail = self.scrubber.scrub(&error_detail(&body));
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        };
        let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
            || headers
                .get("x-ratelimit-remaining")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim() == "0");
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(|v| format!(" (retry after {v})"))
            .unwrap_or_default();
        let (kind, explanation) = if rate_limited {
            (
                ForgeErrorKind::RateLimited,
                format!("rate limited{retry_after}"),
            )
        } else {
            match status.as_u16() {
                401 => (
                    ForgeErrorKind::Auth,
                    "the token was refused (wrong or expired)".to_string(),
                ),
                403 => (
                    ForgeErrorKind::Auth,
                    "the token lacks permission for this repository".to_string(),
                ),
                404 => (
                    ForgeErrorKind::NotFound,
                    "repository not found, or not visible to the token".to_string(),
                ),
                409 | 422 => (ForgeErrorKind::Conflict, "refused".to_string()),
                408 | 500..=599 => (ForgeErrorKind::Transient, "server error".to_string()),
                300..=399 => (
                    ForgeErrorKind::Rejected,
                    "redirected (not followed): check the repository URL".to_string(),
                ),
                _ => (ForgeErrorKind::Rejected, "refused".to_string()),
            }
        };
        Err(ForgeError::new(
            kind,
            format!("{what}: HTTP {}: {explanation}{detail}", status.as_u16()),
        ))
    }
}

/// The error text of a forge's JSON error answer (`message`, `error`, `errors[].message`),
/// shortened; or a short plain-text body.
fn error_detail(body: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.starts_with('<') {
            return String::new();
        }
        return truncate(&text.replace('\n', " "), 200);
    };
    let mut parts = Vec::new();
    for key in ["message", "error", "error_description"] {
        if let Some(text) = value.get(key).and_then(|v| v.as_str()) {
            parts.push(text.to_string());
        } else if let Some(v) = value.get(key).filter(|v| v.is_object() || v.is_array()) {
            parts.push(v.to_string());
        }
    }
    if let Some(errors) = value.get("errors").and_then(|e| e.as_array()) {
        for e in errors.iter().take(3) {
            if let Some(text) = e.get("message").and_then(|v| v.as_str()) {
                parts.push(text.to_string());
            } else if let Some(text) = e.as_str() {
                parts.push(text.to_string());
            }
        }
    }
    truncate(&parts.join("; "), 300)
}

/// Percent-encodes one path segment or query value.
pub(crate) fn encode(text: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, SET).to_string()
}

fn invalid_url(kind: ForgeKind, url: &RepoUrl, expected: &str) -> ForgeError {
    ForgeError::new(
        ForgeErrorKind::Rejected,
        format!("{kind} repository URL {url} does not have the form {expected}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_detail_reads_forge_errors() {
        assert_eq!(
            error_detail(br#"{"message":"Validation Failed","errors":[{"message":"A pull request already exists for o:b."}]}"#),
            "Validation Failed; A pull request already exists for o:b."
        );
        assert_eq!(error_detail(b"<html>login</html>"), "");
        assert_eq!(error_detail(b"plain"), "plain");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
