//! Azure DevOps Services and Server: Git pull requests, REST API 7.1
//! (<https://learn.microsoft.com/en-us/rest/api/azure/devops/git/pull-requests>); the
//! personal access token goes as the password of HTTP basic auth.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde_json::json;

use super::{
    ApiClient, Forge, ForgeError, ForgeKind, PullRequest, PullRequestDraft, encode, invalid_url,
};
use crate::git::truncate;
use crate::repo_url::{RepoUrl, Transport};

const API_VERSION: &str = "7.1";
/// Azure DevOps refuses longer descriptions.
const MAX_DESCRIPTION: usize = 4000;

pub struct AzureDevOps {
    api: ApiClient,
    /// `https://dev.azure.com/{org}/{project}/_apis/git/repositories/{repo}`
    repo_api: String,
    /// `https://dev.azure.com/{org}/{project}/_git/{repo}`, for pull request links.
    web: String,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    value: Vec<AzPull>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AzPull {
    pull_request_id: u64,
    #[serde(default)]
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    target_ref_name: String,
    #[serde(default)]
    repository: Option<AzRepo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AzRepo {
    #[serde(default)]
    web_url: Option<String>,
}

impl AzureDevOps {
    pub(crate) fn new(
        url: &RepoUrl,
        api_base: Option<String>,
        api: ApiClient,
    ) -> Result<Self, ForgeError> {
        let s = &url.segments;
        let expected = "https://dev.azure.com/ORG/PROJECT/_git/REPO or git@ssh.dev.azure.com:v3/ORG/PROJECT/REPO";
        let (origin, prefix, project, repo) =
            if url.transport == Transport::Ssh && s.len() == 4 && s[0] == "v3" {
                let origin = if url.host.ends_with("visualstudio.com") {
                    format!("https://{}.visualstudio.com", s[1])
                } else {
                    "https://dev.azure.com".to_string()
                };
                let prefix = if url.host.ends_with("visualstudio.com") {
                    vec![]
                } else {
                    vec![s[1].clone()]
                };
                (origin, prefix, s[2].clone(), s[3].clone())
            } else {
                match s.iter().position(|x| x == "_git") {
                    Some(i) if i >= 1 && s.len() == i + 2 => (
                        url.web_origin(),
                        s[..i - 1].to_vec(),
                        s[i - 1].clone(),
                        s[i + 1].clone(),
                    ),
                    _ => return Err(invalid_url(ForgeKind::AzureDevOps, url, expected)),
                }
            };
        let prefix: String = prefix.iter().map(|p| format!("/{}", encode(p))).collect();
        let project_base = format!("{origin}{prefix}/{}", encode(&project));
        let repo_api = match api_base {
            Some(base) => format!("{base}/_apis/git/repositories/{}", encode(&repo)),
            None => format!("{project_base}/_apis/git/repositories/{}", encode(&repo)),
        };
        Ok(Self {
            repo_api,
            web: format!("{project_base}/_git/{}", encode(&repo)),
            api,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let basic = STANDARD.encode(format!(":{}", self.api.token()).as_bytes());
        self.api
            .request(method, &format!("{}{path}", self.repo_api))
            .header("Authorization", format!("Basic {basic}"))
            .header("Accept", "application/json")
            .query(&[("api-version", API_VERSION)])
    }

    fn convert(&self, p: AzPull) -> PullRequest {
        let web = p
            .repository
            .and_then(|r| r.web_url)
            .unwrap_or_else(|| self.web.clone());
        PullRequest {
            number: p.pull_request_id,
            url: format!(
                "{}/pullrequest/{}",
                web.trim_end_matches('/'),
                p.pull_request_id
            ),
            title: p.title,
            body: p.description.unwrap_or_default(),
            version: 0,
        }
    }
}

#[async_trait]
impl Forge for AzureDevOps {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        let target = format!("refs/heads/{base}");
        let request = self.request(Method::GET, "/pullrequests").query(&[
            ("searchCriteria.sourceRefName", format!("refs/heads/{head}")),
            ("searchCriteria.targetRefName", target.clone()),
            ("searchCriteria.status", "active".to_string()),
        ]);
        let list: List = self
            .api
            .send("Azure DevOps: listing pull requests", request)
            .await?;
        Ok(list
            .value
            .into_iter()
            .find(|p| p.target_ref_name == target)
            .map(|p| self.convert(p)))
    }

    async fn create(&self, draft: &PullRequestDraft) -> Result<PullRequest, ForgeError> {
        let request = self.request(Method::POST, "/pullrequests").json(&json!({
            "sourceRefName": format!("refs/heads/{}", draft.head),
            "targetRefName": format!("refs/heads/{}", draft.base),
            "title": draft.title,
            "description": truncate(&draft.body, MAX_DESCRIPTION - 4),
        }));
        let pull: AzPull = self
            .api
            .send("Azure DevOps: creating a pull request", request)
            .await?;
        Ok(self.convert(pull))
    }

    async fn update(
        &self,
        existing: &PullRequest,
        draft: &PullRequestDraft,
    ) -> Result<PullRequest, ForgeError> {
        let request = self
            .request(Method::PATCH, &format!("/pullrequests/{}", existing.number))
            .json(&json!({
                "title": draft.title,
                "description": truncate(&draft.body, MAX_DESCRIPTION - 4),
            }));
        let pull: AzPull = self
            .api
            .send("Azure DevOps: updating a pull request", request)
            .await?;
        Ok(self.convert(pull))
    }
}
