//! End to end: signed Flux event in, pull request out, against a real Gitea built from its
//! Go module (`scripts/ensure-test-binaries.sh gitea`) and the real service binary.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_core::testing::MemoryCatalog;
use pipeline_core::{PipelineRef, PromotionContext, PromotionRecord, PromotionStrategy, Trigger};
use pipeline_git::testing::{ADMIN_PASSWORD, ADMIN_USER, Gitea};
use pipeline_git::{PullRequestSettings, PullRequestStrategy};
use serde_json::Value;
use support::{KEY, Service, client, event, get_json, wait_for};

const REPO: &str = "fleet";
const BRANCH: &str = "promotion-flux-system-podinfo-staging";

const STAGING: &str = "# podinfo in staging\napiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\nmetadata:\n  name: podinfo\n  namespace: podinfo-staging\nspec:\n  chart:\n    spec:\n      chart: podinfo\n      version: \"6.0.0\" # {\"$promotion\": \"flux-system:podinfo:staging\"}\n  values:\n    image: {repository: ghcr.io/stefanprodan/podinfo, tag: 6.0.0} # {\"$promotion\": \"flux-system:podinfo:staging\"}\n    replicas: 2   # not a marker\n---\n# second document, other pipeline\nversion: '1.0.0' # {\"$promotion\": \"flux-system:other:staging\"}\n";
const PROD: &str = "spec:\n  chart:\n    spec:\n      version: 6.5.0 # {\"$promotion\": \"flux-system:podinfo:prod\"}\n";

fn pipeline(name: &str, secret: &str, url: &str) -> String {
    format!(
        r#"apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: flux-system
spec:
  appRef:
    apiVersion: helm.toolkit.fluxcd.io/v2
    kind: HelmRelease
    name: podinfo
  environments:
    - name: dev
      targets:
        - namespace: podinfo-dev
    - name: staging
      targets:
        - namespace: podinfo-staging
    - name: prod
      targets:
        - namespace: podinfo-prod
  promotion:
    strategy:
      secretRef:
        name: podinfo-promotion-hmac
      pull-request:
        type: gitea
        url: {url}
        baseBranch: main
        secretRef:
          name: {secret}
"#
    )
}

fn secret(name: &str, username: &str, password: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: flux-system\nstringData:\n  username: {username}\n  password: {password}\n  token: {token}\n"
    )
}

async fn post(service: &Service, pipeline: &str, env: &str, body: Vec<u8>) -> (u16, Value) {
    let signature = sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &body);
    let response = client()
        .post(service.url(&format!(
            "/pipelines/promotions/flux-system/{pipeline}/{env}"
        )))
        .header("content-type", "application/json")
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn finished(service: &Service, record: &Value) -> Value {
    wait_for(
        service,
        record["id"].as_str().unwrap(),
        "a final phase",
        |r| r["phase"] == "Succeeded" || r["phase"] == "Failed",
    )
    .await
}

/// The `+`/`-` lines of a unified diff, and the files it touches.
fn diff_summary(diff: &str) -> (Vec<String>, Vec<String>) {
    let files = diff
        .lines()
        .filter_map(|l| l.strip_prefix("diff --git a/"))
        .map(|l| l.split(" b/").next().unwrap().to_string())
        .collect();
    let changes = diff
        .lines()
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .map(str::to_string)
        .collect();
    (files, changes)
}

fn expected_changes(version: &str) -> Vec<String> {
    vec![
        "-      version: \"6.0.0\" # {\"$promotion\": \"flux-system:podinfo:staging\"}".into(),
        format!("+      version: \"{version}\" # {{\"$promotion\": \"flux-system:podinfo:staging\"}}"),
        "-    image: {repository: ghcr.io/stefanprodan/podinfo, tag: 6.0.0} # {\"$promotion\": \"flux-system:podinfo:staging\"}".into(),
        format!("+    image: {{repository: ghcr.io/stefanprodan/podinfo, tag: {version}}} # {{\"$promotion\": \"flux-system:podinfo:staging\"}}"),
    ]
}

/// The pull request's Secret, as `git-credentials.yaml` in the manifests folder holds it.
fn git_credentials(token: &str) -> MemoryCatalog {
    MemoryCatalog::new().with_secret(
        "flux-system",
        "git-credentials",
        [
            ("username", ADMIN_USER),
            ("password", ADMIN_PASSWORD),
            ("token", token),
        ],
    )
}

/// The pull request's `updated_at` once Gitea stops touching it: Gitea updates it in the
/// background after a push (mergeability checks), which is not our doing. Bounded wait.
async fn settled_updated_at(gitea: &Gitea) -> Value {
    let read = || async { gitea.pulls(REPO, "all").await.unwrap()[0]["updated_at"].clone() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = read().await;
    loop {
        // Gitea's timestamps have whole seconds.
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let now = read().await;
        if now == last {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Gitea kept updating the pull request"
        );
        last = now;
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_request_promotions_against_a_real_gitea() {
    let gitea = match Gitea::start().await {
        Ok(gitea) => gitea,
        Err(err) => panic!(
            "cannot start the Gitea these tests need: {err}\n\
             build it with: scripts/ensure-test-binaries.sh gitea"
        ),
    };
    let url = gitea
        .create_repo(
            REPO,
            &[
                ("apps/staging/podinfo.yaml".into(), STAGING.into()),
                ("apps/prod/podinfo.yaml".into(), PROD.into()),
                ("README.md".into(), "# fleet\n".into()),
            ],
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    std::fs::copy(quickstart.join("secret.yaml"), manifests.join("hmac.yaml")).unwrap();
    write(
        &manifests,
        "pipeline.yaml",
        &pipeline("podinfo", "git-credentials", &url),
    );
    write(
        &manifests,
        "git-credentials.yaml",
        &secret("git-credentials", ADMIN_USER, ADMIN_PASSWORD, &gitea.token),
    );
    const WRONG_PASSWORD: &str = "wrong-password-S3CRET";
    const WRONG_TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";
    write(
        &manifests,
        "bad.yaml",
        &pipeline("podinfo-bad", "bad-credentials", &url),
    );
    write(
        &manifests,
        "bad-credentials.yaml",
        &secret("bad-credentials", ADMIN_USER, WRONG_PASSWORD, WRONG_TOKEN),
    );
    let work = dir.path().join("work");
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &[
            "--retry-base",
            "100ms",
            "--pr-work-dir",
            work.to_str().unwrap(),
            "--git-author-name",
            "Promotion Bot",
            "--git-author-email",
            "bot@example.com",
        ],
    );

    // 1. A new version deployed in dev: a pull request to staging with exactly the diff.
    let (status, record) = post(&service, "podinfo", "dev", event("podinfo-dev", "6.5.1")).await;
    assert_eq!(status, 202, "{record}");
    let done = finished(&service, &record).await;
    assert_eq!(done["phase"], "Succeeded", "{done:#}\n{}", gitea.log());
    let pulls = gitea.pulls(REPO, "open").await.unwrap();
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    let pr = &pulls[0];
    let number = pr["number"].as_u64().unwrap();
    assert_eq!(done["result"], pr["html_url"], "{done:#}");
    assert_eq!(pr["head"]["ref"], BRANCH);
    assert_eq!(pr["base"]["ref"], "main");
    assert!(pr["title"].as_str().unwrap().contains("6.5.1"), "{pr}");
    let diff = gitea.pull_diff(REPO, number).await.unwrap();
    let (files, changes) = diff_summary(&diff);
    assert_eq!(files, ["apps/staging/podinfo.yaml"], "{diff}");
    assert_eq!(changes, expected_changes("6.5.1"), "{diff}");
    let expected_file = STAGING
        .replace("\"6.0.0\"", "\"6.5.1\"")
        .replace("tag: 6.0.0}", "tag: 6.5.1}");
    assert_eq!(
        gitea
            .file(REPO, BRANCH, "apps/staging/podinfo.yaml")
            .await
            .unwrap(),
        expected_file
    );
    let commit = gitea
        .get_json(&format!("/repos/{ADMIN_USER}/{REPO}/git/commits/{BRANCH}"))
        .await
        .unwrap();
    assert_eq!(commit["commit"]["author"]["name"], "Promotion Bot");
    assert_eq!(commit["commit"]["author"]["email"], "bot@example.com");

    // 2. A newer version updates the same pull request.
    let (status, record) = post(&service, "podinfo", "dev", event("podinfo-dev", "6.5.2")).await;
    assert_eq!(status, 202, "{record}");
    let done = finished(&service, &record).await;
    assert_eq!(done["phase"], "Succeeded", "{done:#}");
    let pulls = gitea.pulls(REPO, "all").await.unwrap();
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    assert_eq!(pulls[0]["number"].as_u64(), Some(number));
    assert!(
        pulls[0]["title"].as_str().unwrap().contains("6.5.2"),
        "{}",
        pulls[0]
    );
    assert_eq!(done["result"], pulls[0]["html_url"]);
    let diff = gitea.pull_diff(REPO, number).await.unwrap();
    let (files, changes) = diff_summary(&diff);
    assert_eq!(files, ["apps/staging/podinfo.yaml"], "{diff}");
    assert_eq!(changes, expected_changes("6.5.2"), "{diff}");
    let head = gitea.branch_head(REPO, BRANCH).await.unwrap().unwrap();
    let updated_at = settled_updated_at(&gitea).await;
    // The second promotion ran in the clone the first one left in the cache.
    assert_eq!(
        service
            .logs()
            .matches("cloned into the clone cache")
            .count(),
        1,
        "{}",
        service.logs()
    );
    assert_eq!(
        service.logs().matches("cached clone refreshed").count(),
        1,
        "{}",
        service.logs()
    );

    // 3. The identical promotion again creates nothing: the webhook answers with the
    //    record it has, and re-running the attempt itself (as after a crash) pushes and
    //    opens nothing.
    let (status, again) = post(&service, "podinfo", "dev", event("podinfo-dev", "6.5.2")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], record["id"]);
    let manifests_pipeline = pipeline_core::pipeline::parse_pipeline_spec(
        serde_json::to_value(serde_saphyr_spec(&pipeline(
            "podinfo",
            "git-credentials",
            &url,
        )))
        .unwrap(),
    )
    .unwrap();
    let pipeline = pipeline_core::Pipeline {
        reference: PipelineRef::new("flux-system", "podinfo"),
        spec: manifests_pipeline,
    };
    let stored: PromotionRecord = serde_json::from_value(
        get_json(
            &service,
            &format!("/api/v1/promotions/{}", record["id"].as_str().unwrap()),
        )
        .await,
    )
    .unwrap();
    let strategy = PullRequestStrategy::new(
        PullRequestSettings {
            work_dir: work.clone(),
            ..PullRequestSettings::default()
        },
        pipeline_git::forge::http_client().unwrap(),
    );
    let secrets = git_credentials(&gitea.token);
    let outcome = strategy
        .promote(PromotionContext {
            record: &stored,
            pipeline: &pipeline,
            promotion: pipeline.promotion_for("staging").unwrap(),
            secrets: &secrets,
        })
        .await
        .unwrap();
    assert!(outcome.message.contains("unchanged"), "{outcome:?}");
    assert!(
        outcome.message.contains("already up to date"),
        "{outcome:?}"
    );
    assert_eq!(
        outcome.result.as_ref(),
        pulls[0]["html_url"].as_str().map(str::to_string).as_ref()
    );
    assert_eq!(
        gitea.branch_head(REPO, BRANCH).await.unwrap().unwrap(),
        head
    );
    let pulls = gitea.pulls(REPO, "all").await.unwrap();
    assert_eq!(pulls.len(), 1);
    assert_eq!(pulls[0]["updated_at"], updated_at);

    // An older promotion retried late does not roll the pull request back.
    let older = PromotionRecord::new(
        PipelineRef::new("flux-system", "podinfo"),
        "dev",
        "staging",
        "6.4.0",
        false,
        Trigger::default(),
        stored.created_at - chrono::Duration::minutes(5),
    );
    let outcome = strategy
        .promote(PromotionContext {
            record: &older,
            pipeline: &pipeline,
            promotion: pipeline.promotion_for("staging").unwrap(),
            secrets: &secrets,
        })
        .await
        .unwrap();
    assert!(outcome.message.contains("superseded"), "{outcome:?}");
    assert_eq!(
        gitea.branch_head(REPO, BRANCH).await.unwrap().unwrap(),
        head
    );

    // 4. The base already has the version: success, no branch, no pull request.
    let (status, record) = post(
        &service,
        "podinfo",
        "staging",
        event("podinfo-staging", "6.5.0"),
    )
    .await;
    assert_eq!(status, 202, "{record}");
    let done = finished(&service, &record).await;
    assert_eq!(done["phase"], "Succeeded", "{done:#}");
    assert!(
        done["message"]
            .as_str()
            .unwrap()
            .contains("nothing to change"),
        "{done:#}"
    );
    assert!(done["result"].is_null(), "{done:#}");
    assert_eq!(
        gitea
            .branch_head(REPO, "promotion-flux-system-podinfo-prod")
            .await
            .unwrap(),
        None
    );
    assert_eq!(gitea.pulls(REPO, "all").await.unwrap().len(), 1);

    // 5. Wrong credentials: a clear failure that quotes no secret.
    let (status, record) = post(
        &service,
        "podinfo-bad",
        "dev",
        event("podinfo-dev", "7.0.0"),
    )
    .await;
    assert_eq!(status, 202, "{record}");
    let done = finished(&service, &record).await;
    assert_eq!(done["phase"], "Failed", "{done:#}");
    let message = done["message"].as_str().unwrap();
    assert!(
        message.contains("credentials") || message.contains("token"),
        "{message}"
    );
    let all = serde_json::to_string(&done).unwrap();
    let logs = service.logs();
    for secret in [
        WRONG_PASSWORD,
        WRONG_TOKEN,
        ADMIN_PASSWORD,
        gitea.token.as_str(),
    ] {
        assert!(!all.contains(secret), "record quotes a secret: {all}");
        assert!(!logs.contains(secret), "logs quote a secret");
    }
    use base64::Engine;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN_USER}:{WRONG_PASSWORD}"));
    assert!(!all.contains(&basic) && !logs.contains(&basic));
    assert_eq!(gitea.pulls(REPO, "all").await.unwrap().len(), 1);
    // Workspaces and private git homes are cleaned up; the one clone of the repository
    // stays in the cache, with no credential in its configuration.
    let left: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["clones"], "{left:?}");
    let clones: Vec<std::path::PathBuf> = std::fs::read_dir(work.join("clones"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(clones.len(), 1, "{clones:?}");
    let config = std::fs::read_to_string(clones[0].join(".git/config")).unwrap();
    assert!(config.contains(&format!("url = {url}")), "{config}");
    let config = config.to_lowercase();
    for secret in [
        WRONG_PASSWORD,
        WRONG_TOKEN,
        ADMIN_PASSWORD,
        gitea.token.as_str(),
        &basic,
        "extraheader",
        "authorization",
    ] {
        assert!(
            !config.contains(&secret.to_lowercase()),
            ".git/config holds {secret:?}:\n{config}"
        );
    }
}

/// The `spec` of a Pipeline manifest, as JSON.
fn serde_saphyr_spec(manifest: &str) -> Value {
    let value: Value = serde_saphyr::from_str(manifest).unwrap();
    value["spec"].clone()
}
