//! GitHub and GitHub Enterprise Server: REST API v3
//! (<https://docs.github.com/en/rest/pulls/pulls>).

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde_json::json;

use super::{
    ApiClient, Forge, ForgeError, ForgeKind, PullRequest, PullRequestDraft, encode, invalid_url,
};
use crate::repo_url::RepoUrl;

pub struct GitHub {
    api: ApiClient,
    /// `https://api.github.com/repos/{owner}/{repo}`
    repo_api: String,
    owner: String,
}

#[derive(Deserialize)]
struct GhPull {
    number: u64,
    html_url: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    body: Option<String>,
    base: GhRef,
}

#[derive(Deserialize)]
struct GhRef {
    #[serde(rename = "ref")]
    name: String,
}

impl From<GhPull> for PullRequest {
    fn from(p: GhPull) -> Self {
        PullRequest {
            number: p.number,
            url: p.html_url,
            title: p.title,
            body: p.body.unwrap_or_default(),
            version: 0,
        }
    }
}

impl GitHub {
    pub(crate) fn new(
        url: &RepoUrl,
        api_base: Option<String>,
        api: ApiClient,
    ) -> Result<Self, ForgeError> {
        let [owner, repo] = url.segments.as_slice() else {
            return Err(invalid_url(
                ForgeKind::GitHub,
                url,
                "https://host/OWNER/REPO",
            ));
        };
        let base = api_base.unwrap_or_else(|| {
            if url.host.eq_ignore_ascii_case("github.com")
                || url.host.eq_ignore_ascii_case("www.github.com")
            {
                "https://api.github.com".to_string()
            } else {
                format!("{}/api/v3", url.web_origin())
            }
        });
        Ok(Self {
            repo_api: format!("{base}/repos/{}/{}", encode(owner), encode(repo)),
            owner: owner.clone(),
            api,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.api
            .request(method, &format!("{}{path}", self.repo_api))
            .bearer_auth(self.api.token())
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
    }
}

#[async_trait]
impl Forge for GitHub {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        let request = self.request(Method::GET, "/pulls").query(&[
            ("state", "open"),
            ("head", &format!("{}:{head}", self.owner)),
            ("base", base),
            ("per_page", "100"),
        ]);
        let pulls: Vec<GhPull> = self
            .api
            .send("GitHub: listing pull requests", request)
            .await?;
        Ok(pulls
            .into_iter()
            .find(|p| p.base.name == base)
            .map(PullRequest::from))
    }

    async fn create(&self, draft: &PullRequestDraft) -> Result<PullRequest, ForgeError> {
        let request = self.request(Method::POST, "/pulls").json(&json!({
            "title": draft.title,
            "head": draft.head,
            "base": draft.base,
            "body": draft.body,
            "maintainer_can_modify": false,
        }));
        let pull: GhPull = self
            .api
            .send("GitHub: creating a pull request", request)
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
        let pull: GhPull = self
            .api
            .send("GitHub: updating a pull request", request)
            .await?;
        Ok(pull.into())
    }
}
