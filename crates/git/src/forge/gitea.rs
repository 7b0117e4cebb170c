//! Gitea and Forgejo (same API): `/api/v1/repos/{owner}/{repo}/pulls`
//! (<https://docs.gitea.com/api/>, <https://forgejo.org/docs/latest/user/api-usage/>).

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde_json::json;

use super::{
    ApiClient, Forge, ForgeError, ForgeKind, PullRequest, PullRequestDraft, encode, invalid_url,
};
use crate::repo_url::RepoUrl;

/// Pages of open pull requests looked through for the promotion branch.
const MAX_PAGES: usize = 20;
const PAGE_SIZE: usize = 50;

pub struct Gitea {
    api: ApiClient,
    /// `https://host[/prefix]/api/v1/repos/{owner}/{repo}`
    repo_api: String,
}

#[derive(Deserialize)]
struct GtPull {
    number: u64,
    html_url: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    body: Option<String>,
    head: GtBranch,
    base: GtBranch,
}

#[derive(Deserialize)]
struct GtBranch {
    #[serde(rename = "ref")]
    name: String,
    #[serde(default)]
    repo_id: Option<i64>,
    #[serde(default)]
    repo: Option<GtRepo>,
}

#[derive(Deserialize)]
struct GtRepo {
    #[serde(default)]
    full_name: String,
}

impl From<GtPull> for PullRequest {
    fn from(p: GtPull) -> Self {
        PullRequest {
            number: p.number,
            url: p.html_url,
            title: p.title,
            body: p.body.unwrap_or_default(),
            version: 0,
        }
    }
}

impl Gitea {
    pub(crate) fn new(
        url: &RepoUrl,
        api_base: Option<String>,
        api: ApiClient,
    ) -> Result<Self, ForgeError> {
        let n = url.segments.len();
        if n < 2 {
            return Err(invalid_url(
                ForgeKind::Gitea,
                url,
                "https://host[/prefix]/OWNER/REPO",
            ));
        }
        let (prefix, repo) = url.segments.split_at(n - 2);
        let base = api_base.unwrap_or_else(|| {
            let prefix: String = prefix.iter().map(|s| format!("/{}", encode(s))).collect();
            format!("{}{prefix}/api/v1", url.web_origin())
        });
        Ok(Self {
            repo_api: format!("{base}/repos/{}/{}", encode(&repo[0]), encode(&repo[1])),
            api,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.api
            .request(method, &format!("{}{path}", self.repo_api))
            .header("Authorization", format!("token {}", self.api.token()))
            .header("Accept", "application/json")
    }
}

#[async_trait]
impl Forge for Gitea {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        for page in 1..=MAX_PAGES {
            let request = self.request(Method::GET, "/pulls").query(&[
                ("state", "open".to_string()),
                ("page", page.to_string()),
                ("limit", PAGE_SIZE.to_string()),
            ]);
            let pulls: Vec<GtPull> = self
                .api
                .send("Gitea: listing pull requests", request)
                .await?;
            let count = pulls.len();
            // Same-repository branches only: a fork's branch of the same name is not ours.
            let same_repo = |p: &GtPull| match (&p.head.repo, &p.base.repo) {
                (Some(h), Some(b)) => h.full_name == b.full_name,
                _ => p.head.repo_id.is_none() || p.head.repo_id == p.base.repo_id,
            };
            if let Some(found) = pulls
                .into_iter()
                .find(|p| p.head.name == head && p.base.name == base && same_repo(p))
            {
                return Ok(Some(found.into()));
            }
            if count < PAGE_SIZE {
                break;
            }
        }
        Ok(None)
    }

    async fn create(&self, draft: &PullRequestDraft) -> Result<PullRequest, ForgeError> {
        let request = self.request(Method::POST, "/pulls").json(&json!({
            "head": draft.head,
            "base": draft.base,
            "title": draft.title,
            "body": draft.body,
        }));
        let pull: GtPull = self
            .api
            .send("Gitea: creating a pull request", request)
            .await?;
        Ok(pull.into())
    }

    async fn update(
        &self,
        existing: &PullRequest,
        draft: &PullRequestDraft,
    ) -> Result<PullRequest, ForgeError> {
        let request = self
            .request(Method::PATCH, &format!("/pulls/{}", existing.number))
            .json(&json!({"title": draft.title, "body": draft.body}));
        let pull: GtPull = self
            .api
            .send("Gitea: updating a pull request", request)
            .await?;
        Ok(pull.into())
    }
}
