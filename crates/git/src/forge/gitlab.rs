//! GitLab (gitlab.com and self-managed): merge requests, REST API v4
//! (<https://docs.gitlab.com/api/merge_requests/>).

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde_json::json;

use super::{
    ApiClient, Forge, ForgeError, ForgeKind, PullRequest, PullRequestDraft, encode, invalid_url,
};
use crate::repo_url::RepoUrl;

pub struct GitLab {
    api: ApiClient,
    /// `https://gitlab.example/api/v4/projects/group%2Fproject`
    project_api: String,
}

#[derive(Deserialize)]
struct GlMergeRequest {
    iid: u64,
    web_url: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    target_branch: String,
}

impl From<GlMergeRequest> for PullRequest {
    fn from(m: GlMergeRequest) -> Self {
        PullRequest {
            number: m.iid,
            url: m.web_url,
            title: m.title,
            body: m.description.unwrap_or_default(),
            version: 0,
        }
    }
}

impl GitLab {
    pub(crate) fn new(
        url: &RepoUrl,
        api_base: Option<String>,
        api: ApiClient,
    ) -> Result<Self, ForgeError> {
        if url.segments.len() < 2 {
            return Err(invalid_url(
                ForgeKind::GitLab,
                url,
                "https://host/GROUP[/SUBGROUP...]/PROJECT",
            ));
        }
        let base = api_base.unwrap_or_else(|| format!("{}/api/v4", url.web_origin()));
        Ok(Self {
            project_api: format!("{base}/projects/{}", encode(&url.path())),
            api,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.api
            .request(method, &format!("{}{path}", self.project_api))
            .header("PRIVATE-TOKEN", self.api.token())
    }
}

#[async_trait]
impl Forge for GitLab {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        let request = self.request(Method::GET, "/merge_requests").query(&[
            ("state", "opened"),
            ("source_branch", head),
            ("target_branch", base),
            ("per_page", "100"),
        ]);
        let found: Vec<GlMergeRequest> = self
            .api
            .send("GitLab: listing merge requests", request)
            .await?;
        Ok(found
            .into_iter()
            .find(|m| m.target_branch == base)
            .map(PullRequest::from))
    }

    async fn create(&self, draft: &PullRequestDraft) -> Result<PullRequest, ForgeError> {
        let request = self.request(Method::POST, "/merge_requests").json(&json!({
            "source_branch": draft.head,
            "target_branch": draft.base,
            "title": draft.title,
            "description": draft.body,
            "remove_source_branch": true,
        }));
        let created: GlMergeRequest = self
            .api
            .send("GitLab: creating a merge request", request)
            .await?;
        Ok(created.into())
    }

    async fn update(
        &self,
        existing: &PullRequest,
        draft: &PullRequestDraft,
    ) -> Result<PullRequest, ForgeError> {
        let request = self
            .request(Method::PUT, &format!("/merge_requests/{}", existing.number))
            .json(&json!({"title": draft.title, "description": draft.body}));
        let updated: GlMergeRequest = self
            .api
            .send("GitLab: updating a merge request", request)
            .await?;
        Ok(updated.into())
    }
}
