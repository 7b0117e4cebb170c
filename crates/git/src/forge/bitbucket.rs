//! Bitbucket Server / Data Center: REST API 1.0
//! (<https://developer.atlassian.com/server/bitbucket/rest/>), `Bearer` HTTP access tokens.

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde_json::json;

use super::{
    ApiClient, Forge, ForgeError, ForgeKind, PullRequest, PullRequestDraft, encode, invalid_url,
};
use crate::repo_url::{RepoUrl, Transport};

const MAX_PAGES: usize = 20;

pub struct BitbucketServer {
    api: ApiClient,
    /// `https://host[/ctx]/rest/api/1.0/projects/{key}/repos/{slug}`
    repo_api: String,
    project: String,
    slug: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    #[serde(default)]
    values: Vec<BbPull>,
    #[serde(default = "yes")]
    is_last_page: bool,
    #[serde(default)]
    next_page_start: Option<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BbPull {
    id: u64,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    title: String,
    #[serde(default)]
    description: Option<String>,
    from_ref: BbRef,
    to_ref: BbRef,
    #[serde(default)]
    links: BbLinks,
}

#[derive(Deserialize)]
struct BbRef {
    id: String,
}

#[derive(Deserialize, Default)]
struct BbLinks {
    #[serde(rename = "self", default)]
    self_links: Vec<BbLink>,
}

#[derive(Deserialize)]
struct BbLink {
    href: String,
}

impl From<BbPull> for PullRequest {
    fn from(p: BbPull) -> Self {
        PullRequest {
            number: p.id,
            url: p
                .links
                .self_links
                .into_iter()
                .next()
                .map(|l| l.href)
                .unwrap_or_default(),
            title: p.title,
            body: p.description.unwrap_or_default(),
            version: p.version,
        }
    }
}

impl BitbucketServer {
    pub(crate) fn new(
        url: &RepoUrl,
        api_base: Option<String>,
        api: ApiClient,
    ) -> Result<Self, ForgeError> {
        let s = &url.segments;
        let parsed = if let Some(i) = s.iter().position(|x| x == "scm") {
            (s.len() == i + 3).then(|| (&s[..i], &s[i + 1], &s[i + 2]))
        } else if let Some(i) = s.iter().position(|x| x == "projects") {
            (s.len() >= i + 4 && s[i + 2] == "repos").then(|| (&s[..i], &s[i + 1], &s[i + 3]))
        } else if url.transport == Transport::Ssh && s.len() == 2 {
            Some((&s[..0], &s[0], &s[1]))
        } else {
            None
        };
        let Some((context, project, slug)) = parsed else {
            return Err(invalid_url(
                ForgeKind::BitbucketServer,
                url,
                "https://host[/context]/scm/PROJECT/REPO.git, https://host/projects/PROJECT/repos/REPO or ssh://git@host:port/PROJECT/REPO.git",
            ));
        };
        let base = api_base.unwrap_or_else(|| {
            let context: String = context.iter().map(|c| format!("/{}", encode(c))).collect();
            format!("{}{context}/rest/api/1.0", url.web_origin())
        });
        Ok(Self {
            repo_api: format!("{base}/projects/{}/repos/{}", encode(project), encode(slug)),
            project: project.clone(),
            slug: slug.clone(),
            api,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.api
            .request(method, &format!("{}{path}", self.repo_api))
            .bearer_auth(self.api.token())
            .header("Accept", "application/json")
    }

    fn reference(&self, branch: &str) -> serde_json::Value {
        json!({
            "id": format!("refs/heads/{branch}"),
            "repository": {"slug": self.slug, "project": {"key": self.project}},
        })
    }
}

#[async_trait]
impl Forge for BitbucketServer {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        let from = format!("refs/heads/{head}");
        let to = format!("refs/heads/{base}");
        let mut start = 0;
        for _ in 0..MAX_PAGES {
            let request = self.request(Method::GET, "/pull-requests").query(&[
                ("state", "OPEN".to_string()),
                ("direction", "OUTGOING".to_string()),
                ("at", from.clone()),
                ("limit", "100".to_string()),
                ("start", start.to_string()),
            ]);
            let page: Page = self
                .api
                .send("Bitbucket Server: listing pull requests", request)
                .await?;
            if let Some(found) = page
                .values
                .into_iter()
                .find(|p| p.from_ref.id == from && p.to_ref.id == to)
            {
                return Ok(Some(found.into()));
            }
            match page.next_page_start {
                Some(next) if !page.is_last_page => start = next,
                _ => break,
            }
        }
        Ok(None)
    }

    async fn create(&self, draft: &PullRequestDraft) -> Result<PullRequest, ForgeError> {
        let request = self.request(Method::POST, "/pull-requests").json(&json!({
            "title": draft.title,
            "description": draft.body,
            "fromRef": self.reference(&draft.head),
            "toRef": self.reference(&draft.base),
        }));
        let pull: BbPull = self
            .api
            .send("Bitbucket Server: creating a pull request", request)
            .await?;
        Ok(pull.into())
    }

    async fn update(
        &self,
        existing: &PullRequest,
        draft: &PullRequestDraft,
    ) -> Result<PullRequest, ForgeError> {
        let request = self
            .request(Method::PUT, &format!("/pull-requests/{}", existing.number))
            .json(&json!({
                "version": existing.version,
                "title": draft.title,
                "description": draft.body,
            }));
        let pull: BbPull = self
            .api
            .send("Bitbucket Server: updating a pull request", request)
            .await?;
        Ok(pull.into())
    }
}
