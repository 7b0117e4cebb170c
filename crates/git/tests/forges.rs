//! The forge clients against HTTP test doubles that check method, path, query, auth
//! header and body as the providers document them, and answer realistic JSON.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use pipeline_git::forge::{
    Forge, ForgeErrorKind, ForgeKind, ForgeTarget, PullRequest, PullRequestDraft, connect,
    http_client,
};
use pipeline_git::repo_url::RepoUrl;
use serde_json::{Value, json};

const TOKEN: &str = "s3cr3t-token-value";

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    /// Path and query, decoded as sent.
    uri: String,
    headers: HeaderMap,
    body: Value,
}

type Handler = dyn Fn(&Seen) -> (u16, Vec<(&'static str, String)>, Value) + Send + Sync;

struct Double {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Double {
    async fn start(
        handler: impl Fn(&Seen) -> (u16, Vec<(&'static str, String)>, Value) + Send + Sync + 'static,
    ) -> Double {
        let handler: Arc<Handler> = Arc::new(handler);
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let sink = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let handler = handler.clone();
                let sink = sink.clone();
                async move {
                    let request = Seen {
                        method,
                        uri: uri.to_string(),
                        headers,
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    };
                    let (status, headers, body) = handler(&request);
                    sink.lock().unwrap().push(request);
                    let mut response =
                        (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
                    for (name, value) in headers {
                        response.headers_mut().insert(name, value.parse().unwrap());
                    }
                    response
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Double {
            address,
            seen,
            task,
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.address)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn forge(kind: ForgeKind, url: &str) -> Box<dyn Forge> {
    connect(
        &ForgeTarget {
            kind,
            url: RepoUrl::parse(url).unwrap(),
            api_base: None,
        },
        TOKEN.to_string(),
        http_client().unwrap(),
    )
    .unwrap()
}

fn draft() -> PullRequestDraft {
    PullRequestDraft {
        head: "promotion-ns-app-prod".into(),
        base: "main".into(),
        title: "Promote ns/app to prod: 1.2.3".into(),
        body: "body text".into(),
    }
}

fn ok(body: Value) -> (u16, Vec<(&'static str, String)>, Value) {
    (200, vec![], body)
}

fn header<'a>(seen: &'a Seen, name: &str) -> &'a str {
    seen.headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

/// The error cases every provider shares: 401 and 404 are permanent, 429 and 5xx retryable,
/// and no message quotes the token.
async fn check_errors(kind: ForgeKind, url_of: impl Fn(&Double) -> String) {
    for (status, expected) in [
        (401, ForgeErrorKind::Auth),
        (403, ForgeErrorKind::Auth),
        (404, ForgeErrorKind::NotFound),
        (429, ForgeErrorKind::RateLimited),
        (502, ForgeErrorKind::Transient),
    ] {
        let double = Double::start(move |_| {
            (
                status,
                vec![("retry-after", "7".to_string())],
                json!({"message": format!("nope, your token {TOKEN} is bad")}),
            )
        })
        .await;
        let client = forge(kind, &url_of(&double));
        let err = client.find_open("h", "main").await.unwrap_err();
        assert_eq!(err.kind, expected, "{kind} {status}: {err}");
        assert_eq!(
            err.retryable(),
            matches!(status, 429 | 502),
            "{kind} {status}"
        );
        assert!(!err.message.contains(TOKEN), "{err}");
        assert!(err.message.contains(&status.to_string()), "{err}");
        if status == 429 {
            assert!(err.message.contains("retry after 7"), "{err}");
        }
    }
    // Nobody listening: transient.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = unused.local_addr().unwrap();
    drop(unused);
    let fake = Double {
        address,
        seen: Arc::default(),
        task: tokio::spawn(async {}),
    };
    let client = forge(kind, &url_of(&fake));
    let err = client.find_open("h", "main").await.unwrap_err();
    assert_eq!(err.kind, ForgeErrorKind::Transient, "{err}");
}

fn github_pull(number: u64, title: &str) -> Value {
    json!({
        "url": format!("https://api.github.com/repos/o/r/pulls/{number}"),
        "html_url": format!("https://github.com/o/r/pull/{number}"),
        "number": number, "state": "open", "title": title, "body": "old body",
        "head": {"ref": "promotion-ns-app-prod", "label": "o:promotion-ns-app-prod"},
        "base": {"ref": "main", "label": "o:main"}
    })
}

#[tokio::test]
async fn github_creates_and_updates_pull_requests() {
    let double = Double::start(|r| match (r.method.as_str(), r.uri.as_str()) {
        ("GET", uri) if uri.starts_with("/api/v3/repos/o/r/pulls?") => {
            if uri.contains("head=o%3Apromotion-ns-app-prod")
                && uri.contains("state=open")
                && uri.contains("base=main")
            {
                ok(json!([]))
            } else {
                (400, vec![], json!({"message": "bad query"}))
            }
        }
        ("POST", "/api/v3/repos/o/r/pulls") => (201, vec![], github_pull(7, "t")),
        _ => (404, vec![], json!({"message": "Not Found"})),
    })
    .await;
    let url = format!("{}/o/r.git", double.base());
    let client = forge(ForgeKind::GitHub, &url);
    assert_eq!(
        client
            .find_open("promotion-ns-app-prod", "main")
            .await
            .unwrap(),
        None
    );
    let pr = client.create(&draft()).await.unwrap();
    assert_eq!(pr.number, 7);
    assert_eq!(pr.url, "https://github.com/o/r/pull/7");
    let seen = double.seen();
    let create = &seen[1];
    assert_eq!(header(create, "authorization"), format!("Bearer {TOKEN}"));
    assert_eq!(header(create, "accept"), "application/vnd.github+json");
    assert_eq!(header(create, "x-github-api-version"), "2022-11-28");
    assert!(header(create, "user-agent").starts_with("pipeline-controller/"));
    assert_eq!(create.body["head"], "promotion-ns-app-prod");
    assert_eq!(create.body["base"], "main");
    assert_eq!(create.body["title"], "Promote ns/app to prod: 1.2.3");
    assert_eq!(create.body["body"], "body text");

    // An open pull request exists: found, then updated.
    let double = Double::start(|r| match (r.method.as_str(), r.uri.as_str()) {
        ("GET", uri) if uri.starts_with("/api/v3/repos/o/r/pulls?") => {
            ok(json!([github_pull(9, "old")]))
        }
        ("PATCH", "/api/v3/repos/o/r/pulls/9") => ok(github_pull(9, "new")),
        _ => (404, vec![], json!({"message": "Not Found"})),
    })
    .await;
    let client = forge(ForgeKind::GitHub, &format!("{}/o/r", double.base()));
    let found = client
        .find_open("promotion-ns-app-prod", "main")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found.number, found.title.as_str()), (9, "old"));
    let updated = client.update(&found, &draft()).await.unwrap();
    assert_eq!(updated.title, "new");
    let patch = &double.seen()[1];
    assert_eq!(
        patch.body,
        json!({"title": "Promote ns/app to prod: 1.2.3", "body": "body text"})
    );

    // "A pull request already exists" is a conflict, not a failure.
    let double = Double::start(|_| {
        (422, vec![], json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom", "message": "A pull request already exists for o:promotion-ns-app-prod."}]}))
    })
    .await;
    let err = forge_at(ForgeKind::GitHub, &double, "/o/r")
        .create(&draft())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ForgeErrorKind::Conflict);
    assert!(err.message.contains("already exists"), "{err}");

    // Exhausted rate limit answers 403 with x-ratelimit-remaining: 0.
    let double = Double::start(|_| {
        (
            403,
            vec![("x-ratelimit-remaining", "0".into())],
            json!({"message": "API rate limit exceeded"}),
        )
    })
    .await;
    let err = forge_at(ForgeKind::GitHub, &double, "/o/r")
        .find_open("h", "main")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ForgeErrorKind::RateLimited, "{err}");

    check_errors(ForgeKind::GitHub, |d| format!("{}/o/r", d.base())).await;
}

fn forge_at(kind: ForgeKind, double: &Double, path: &str) -> Box<dyn Forge> {
    forge(kind, &format!("{}{path}", double.base()))
}

#[test]
fn github_dot_com_uses_the_public_api() {
    // Construction only: github.com maps to api.github.com, other hosts to /api/v3.
    let gh = RepoUrl::parse("https://github.com/o/r").unwrap();
    assert_eq!(gh.web_origin(), "https://github.com");
}

fn gitlab_mr(iid: u64, title: &str) -> Value {
    json!({"id": 100 + iid, "iid": iid, "project_id": 3, "title": title, "description": "d",
           "state": "opened", "source_branch": "promotion-ns-app-prod", "target_branch": "main",
           "web_url": format!("https://gitlab.example/group/sub/proj/-/merge_requests/{iid}")})
}

#[tokio::test]
async fn gitlab_merge_requests() {
    let double = Double::start(|r| match (r.method.as_str(), r.uri.as_str()) {
        ("GET", uri) if uri.starts_with("/api/v4/projects/group%2Fsub%2Fproj/merge_requests?") => {
            assert!(uri.contains("state=opened"), "{uri}");
            assert!(uri.contains("source_branch=promotion-ns-app-prod"), "{uri}");
            assert!(uri.contains("target_branch=main"), "{uri}");
            ok(json!([]))
        }
        ("POST", "/api/v4/projects/group%2Fsub%2Fproj/merge_requests") => {
            (201, vec![], gitlab_mr(4, "t"))
        }
        ("PUT", "/api/v4/projects/group%2Fsub%2Fproj/merge_requests/4") => ok(gitlab_mr(4, "new")),
        _ => (404, vec![], json!({"message": "404 Project Not Found"})),
    })
    .await;
    let forge = forge_at(ForgeKind::GitLab, &double, "/group/sub/proj.git");
    assert_eq!(
        forge
            .find_open("promotion-ns-app-prod", "main")
            .await
            .unwrap(),
        None
    );
    let mr = forge.create(&draft()).await.unwrap();
    assert_eq!(mr.number, 4);
    assert_eq!(
        mr.url,
        "https://gitlab.example/group/sub/proj/-/merge_requests/4"
    );
    let updated = forge.update(&mr, &draft()).await.unwrap();
    assert_eq!(updated.title, "new");
    let seen = double.seen();
    assert_eq!(header(&seen[1], "private-token"), TOKEN);
    assert_eq!(seen[1].body["source_branch"], "promotion-ns-app-prod");
    assert_eq!(seen[1].body["target_branch"], "main");
    assert_eq!(seen[1].body["description"], "body text");
    assert_eq!(
        seen[2].body,
        json!({"title": "Promote ns/app to prod: 1.2.3", "description": "body text"})
    );

    let double = Double::start(|_| ok(json!([gitlab_mr(5, "old")]))).await;
    let found = forge_at(ForgeKind::GitLab, &double, "/group/sub/proj")
        .find_open("promotion-ns-app-prod", "main")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.number, 5);

    let double = Double::start(|_| (409, vec![], json!({"message": ["Another open merge request already exists for this source branch: !5"]}))).await;
    let err = forge_at(ForgeKind::GitLab, &double, "/group/proj")
        .create(&draft())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ForgeErrorKind::Conflict);
    assert!(err.message.contains("already exists"), "{err}");

    check_errors(ForgeKind::GitLab, |d| format!("{}/group/proj", d.base())).await;
}

fn gitea_pull(number: u64, head: &str, base: &str, head_repo: &str) -> Value {
    json!({"id": 50 + number, "number": number, "state": "open", "title": "old", "body": "b",
           "html_url": format!("http://gitea.example/o/r/pulls/{number}"),
           "head": {"ref": head, "sha": "abc", "repo_id": 1, "repo": {"full_name": head_repo}},
           "base": {"ref": base, "sha": "def", "repo_id": 1, "repo": {"full_name": "o/r"}}})
}

#[tokio::test]
async fn gitea_and_forgejo_pull_requests() {
    for kind in [ForgeKind::Gitea, ForgeKind::Forgejo] {
        let double = Double::start(|r| match (r.method.as_str(), r.uri.as_str()) {
            ("GET", uri) if uri.starts_with("/git/api/v1/repos/o/r/pulls?") => {
                assert!(uri.contains("state=open"), "{uri}");
                if uri.contains("page=1&") {
                    // A full first page without ours (same name from a fork, other base).
                    let mut page: Vec<Value> = (0..50)
                        .map(|i| gitea_pull(100 + i, &format!("feature-{i}"), "main", "o/r"))
                        .collect();
                    page[0] = gitea_pull(99, "promotion-ns-app-prod", "main", "fork/r");
                    page[1] = gitea_pull(98, "promotion-ns-app-prod", "release", "o/r");
                    ok(Value::Array(page))
                } else {
                    ok(json!([gitea_pull(
                        12,
                        "promotion-ns-app-prod",
                        "main",
                        "o/r"
                    )]))
                }
            }
            ("POST", "/git/api/v1/repos/o/r/pulls") => (
                201,
                vec![],
                gitea_pull(13, "promotion-ns-app-prod", "main", "o/r"),
            ),
            ("PATCH", "/git/api/v1/repos/o/r/pulls/12") => {
                ok(gitea_pull(12, "promotion-ns-app-prod", "main", "o/r"))
            }
            _ => (
                404,
                vec![],
                json!({"message": "The target couldn't be found.", "errors": []}),
            ),
        })
        .await;
        // A Gitea under a path prefix.
        let client = forge_at(kind, &double, "/git/o/r.git");
        let found = client
            .find_open("promotion-ns-app-prod", "main")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.number, 12);
        assert_eq!(found.url, "http://gitea.example/o/r/pulls/12");
        client.update(&found, &draft()).await.unwrap();
        let created = client.create(&draft()).await.unwrap();
        assert_eq!(created.number, 13);
        let seen = double.seen();
        assert_eq!(seen.len(), 4);
        assert!(
            seen.iter()
                .all(|s| header(s, "authorization") == format!("token {TOKEN}"))
        );
        assert_eq!(
            seen[2].body,
            json!({"title": "Promote ns/app to prod: 1.2.3", "body": "body text"})
        );
        assert_eq!(seen[3].body["head"], "promotion-ns-app-prod");
        assert_eq!(seen[3].body["base"], "main");

        let double = Double::start(|_| {
            (
                409,
                vec![],
                json!({"message": "pull request already exists for these targets"}),
            )
        })
        .await;
        let err = forge_at(kind, &double, "/o/r")
            .create(&draft())
            .await
            .unwrap_err();
        assert_eq!(err.kind, ForgeErrorKind::Conflict);
        check_errors(kind, |d| format!("{}/o/r", d.base())).await;
    }
}

fn bitbucket_pull(id: u64, version: u64, to: &str) -> Value {
    json!({"id": id, "version": version, "title": "old", "description": "d", "state": "OPEN", "open": true,
           "fromRef": {"id": "refs/heads/promotion-ns-app-prod", "displayId": "promotion-ns-app-prod",
                       "repository": {"slug": "fleet", "project": {"key": "OPS"}}},
           "toRef": {"id": format!("refs/heads/{to}"), "displayId": to,
                     "repository": {"slug": "fleet", "project": {"key": "OPS"}}},
           "links": {"self": [{"href": format!("https://bitbucket.example/projects/OPS/repos/fleet/pull-requests/{id}")}]}})
}

#[tokio::test]
async fn bitbucket_server_pull_requests() {
    let double = Double::start(|r| match (r.method.as_str(), r.uri.as_str()) {
        ("GET", uri) if uri.starts_with("/bb/rest/api/1.0/projects/OPS/repos/fleet/pull-requests?") => {
            assert!(uri.contains("state=OPEN"), "{uri}");
            assert!(uri.contains("direction=OUTGOING"), "{uri}");
            assert!(uri.contains("at=refs%2Fheads%2Fpromotion-ns-app-prod"), "{uri}");
            if uri.contains("start=0") {
                ok(json!({"size": 1, "limit": 1, "isLastPage": false, "start": 0, "nextPageStart": 1,
                          "values": [bitbucket_pull(3, 0, "release")]}))
            } else {
                ok(json!({"size": 1, "limit": 1, "isLastPage": true, "start": 1,
                          "values": [bitbucket_pull(4, 2, "main")]}))
            }
        }
        ("PUT", "/bb/rest/api/1.0/projects/OPS/repos/fleet/pull-requests/4") => ok(bitbucket_pull(4, 3, "main")),
        ("POST", "/bb/rest/api/1.0/projects/OPS/repos/fleet/pull-requests") => (201, vec![], bitbucket_pull(5, 0, "main")),
        _ => (404, vec![], json!({"errors": [{"context": null, "message": "Repository OPS/fleet does not exist.", "exceptionName": "com.atlassian.bitbucket.repository.NoSuchRepositoryException"}]})),
    })
    .await;
    let forge = forge_at(ForgeKind::BitbucketServer, &double, "/bb/scm/OPS/fleet.git");
    let found = forge
        .find_open("promotion-ns-app-prod", "main")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found.number, found.version), (4, 2));
    assert_eq!(
        found.url,
        "https://bitbucket.example/projects/OPS/repos/fleet/pull-requests/4"
    );
    let updated = forge.update(&found, &draft()).await.unwrap();
    assert_eq!(updated.version, 3);
    let created = forge.create(&draft()).await.unwrap();
    assert_eq!(created.number, 5);
    let seen = double.seen();
    assert!(
        seen.iter()
            .all(|s| header(s, "authorization") == format!("Bearer {TOKEN}"))
    );
    assert_eq!(
        seen[2].body,
        json!({"version": 2, "title": "Promote ns/app to prod: 1.2.3", "description": "body text"})
    );
    assert_eq!(
        seen[3].body["fromRef"],
        json!({"id": "refs/heads/promotion-ns-app-prod", "repository": {"slug": "fleet", "project": {"key": "OPS"}}})
    );
    assert_eq!(seen[3].body["toRef"]["id"], "refs/heads/main");

    // The browse URL form works too; the 404 error text comes through.
    let double = Double::start(|_| {
        (
            404,
            vec![],
            json!({"errors": [{"message": "Repository OPS/fleet does not exist."}]}),
        )
    })
    .await;
    let err = forge_at(
        ForgeKind::BitbucketServer,
        &double,
        "/projects/OPS/repos/fleet/browse",
    )
    .find_open("h", "main")
    .await
    .unwrap_err();
    assert_eq!(err.kind, ForgeErrorKind::NotFound);
    assert!(err.message.contains("does not exist"), "{err}");
    check_errors(ForgeKind::BitbucketServer, |d| {
        format!("{}/scm/OPS/fleet.git", d.base())
    })
    .await;
}

fn azure_pull(id: u64, web: &str) -> Value {
    json!({"pullRequestId": id, "status": "active", "title": "old", "description": "d",
           "sourceRefName": "refs/heads/promotion-ns-app-prod", "targetRefName": "refs/heads/main",
           "url": format!("https://dev.azure.com/org/_apis/git/repositories/x/pullRequests/{id}"),
           "repository": {"id": "x", "name": "fleet", "webUrl": web}})
}

#[tokio::test]
async fn azure_devops_pull_requests() {
    let double = Double::start(|r| {
        let path = r.uri.split('?').next().unwrap();
        assert!(r.uri.contains("api-version=7.1"), "{}", r.uri);
        match (r.method.as_str(), path) {
            ("GET", "/org/My%20Project/_apis/git/repositories/fleet/pullrequests") => {
                assert!(r.uri.contains("searchCriteria.sourceRefName=refs%2Fheads%2Fpromotion-ns-app-prod"), "{}", r.uri);
                assert!(r.uri.contains("searchCriteria.targetRefName=refs%2Fheads%2Fmain"), "{}", r.uri);
                assert!(r.uri.contains("searchCriteria.status=active"), "{}", r.uri);
                ok(json!({"value": [], "count": 0}))
            }
            ("POST", "/org/My%20Project/_apis/git/repositories/fleet/pullrequests") => {
                (201, vec![], azure_pull(21, "https://dev.azure.com/org/My%20Project/_git/fleet"))
            }
            ("PATCH", "/org/My%20Project/_apis/git/repositories/fleet/pullrequests/21") => {
                ok(azure_pull(21, "https://dev.azure.com/org/My%20Project/_git/fleet"))
            }
            _ => (404, vec![], json!({"$id": "1", "message": "TF401019: The Git repository with name or identifier fleet does not exist.", "typeKey": "GitRepositoryNotFoundException"})),
        }
    })
    .await;
    let forge = forge_at(
        ForgeKind::AzureDevOps,
        &double,
        "/org/My%20Project/_git/fleet",
    );
    assert_eq!(
        forge
            .find_open("promotion-ns-app-prod", "main")
            .await
            .unwrap(),
        None
    );
    let created = forge.create(&draft()).await.unwrap();
    assert_eq!(created.number, 21);
    assert_eq!(
        created.url,
        "https://dev.azure.com/org/My%20Project/_git/fleet/pullrequest/21"
    );
    forge.update(&created, &draft()).await.unwrap();
    let seen = double.seen();
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(":{TOKEN}"));
    assert!(
        seen.iter()
            .all(|s| header(s, "authorization") == format!("Basic {basic}"))
    );
    assert_eq!(
        seen[1].body,
        json!({"sourceRefName": "refs/heads/promotion-ns-app-prod", "targetRefName": "refs/heads/main", "title": "Promote ns/app to prod: 1.2.3", "description": "body text"})
    );
    assert_eq!(
        seen[2].body,
        json!({"title": "Promote ns/app to prod: 1.2.3", "description": "body text"})
    );

    // Existing PR found.
    let double = Double::start(|_| {
        ok(json!({"value": [azure_pull(8, "https://dev.azure.com/org/p/_git/fleet")], "count": 1}))
    })
    .await;
    let found = forge_at(ForgeKind::AzureDevOps, &double, "/org/p/_git/fleet")
        .find_open("promotion-ns-app-prod", "main")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        found.url,
        "https://dev.azure.com/org/p/_git/fleet/pullrequest/8"
    );

    // A refused PAT: 203 with a sign-in page.
    let double = Double::start(|_| (203, vec![], json!("<html>sign in</html>"))).await;
    let err = forge_at(ForgeKind::AzureDevOps, &double, "/org/p/_git/fleet")
        .find_open("h", "main")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ForgeErrorKind::Auth);

    let double = Double::start(|_| (409, vec![], json!({"message": "TF401179: An active pull request for the source and target branch already exists."}))).await;
    let err = forge_at(ForgeKind::AzureDevOps, &double, "/org/p/_git/fleet")
        .create(&draft())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ForgeErrorKind::Conflict);
    check_errors(ForgeKind::AzureDevOps, |d| {
        format!("{}/org/p/_git/fleet", d.base())
    })
    .await;
}

#[test]
fn urls_the_forges_do_not_understand_are_refused() {
    for (kind, url) in [
        (ForgeKind::GitHub, "https://github.com/only-owner"),
        (ForgeKind::GitHub, "https://github.com/o/r/extra"),
        (ForgeKind::BitbucketServer, "https://bb.example/o/r"),
        (
            ForgeKind::AzureDevOps,
            "https://dev.azure.com/org/project/repo",
        ),
    ] {
        let err = connect(
            &ForgeTarget {
                kind,
                url: RepoUrl::parse(url).unwrap(),
                api_base: None,
            },
            TOKEN.into(),
            http_client().unwrap(),
        )
        .err()
        .unwrap();
        assert!(err.message.contains("does not have the form"), "{err}");
    }
    // SSH forms map to the HTTPS API origin.
    for (kind, url) in [
        (
            ForgeKind::AzureDevOps,
            "git@ssh.dev.azure.com:v3/org/project/fleet",
        ),
        (
            ForgeKind::BitbucketServer,
            "ssh://git@bb.example:7999/OPS/fleet.git",
        ),
        (ForgeKind::GitLab, "git@gitlab.com:group/sub/proj.git"),
    ] {
        assert!(
            connect(
                &ForgeTarget {
                    kind,
                    url: RepoUrl::parse(url).unwrap(),
                    api_base: None
                },
                TOKEN.into(),
                http_client().unwrap(),
            )
            .is_ok(),
            "{url}"
        );
    }
    let _unused: Option<PullRequest> = None;
}
