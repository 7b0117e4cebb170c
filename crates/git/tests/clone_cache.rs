//! The clone cache against a real Gitea on loopback (`scripts/ensure-test-binaries.sh
//! gitea`): a later promotion reuses the clone and picks up new base commits, a broken
//! clone is replaced, least recently used clones are evicted, and no credential is ever
//! written into a clone.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use support::{captured_logs, logs_text};

use base64::Engine;
use pipeline_core::pipeline::parse_pipeline_spec;
use pipeline_core::testing::MemoryCatalog;
use pipeline_core::{
    Pipeline, PipelineRef, PromotionContext, PromotionRecord, PromotionStrategy, StrategyError,
    StrategyOutcome, Trigger,
};
use pipeline_git::clones::{CLONES_DIR, dir_size};
use pipeline_git::testing::{ADMIN_PASSWORD, ADMIN_USER, Gitea};
use pipeline_git::{CloneCacheLimits, PullRequestSettings, PullRequestStrategy};
use serde_json::json;

const BRANCH: &str = "promotion-flux-system-podinfo-prod";
const PROD: &str = "apiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\nmetadata:\n  name: podinfo\n  namespace: podinfo-prod\nspec:\n  chart:\n    spec:\n      chart: podinfo\n      version: \"6.0.0\" # {\"$promotion\": \"flux-system:podinfo:prod\"}\n";

// ---------------------------------------------------------------------------------------
// Logs of the code under test (one global subscriber, at debug level)

/// How many `git clone` commands ran for `url` (from the "git command finished" lines).
fn clones_of(url: &str) -> usize {
    logs_text()
        .lines()
        .filter(|l| {
            l.contains("git command finished")
                && l.contains("command=\"clone\"")
                && l.contains(&format!("repository={url} "))
        })
        .count()
}

/// Log lines mentioning `url` and `text`.
fn log_lines(url: &str, text: &str) -> Vec<String> {
    logs_text()
        .lines()
        .filter(|l| l.contains(url) && l.contains(text))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The strategy against one Gitea repository

async fn gitea() -> Gitea {
    captured_logs();
    match Gitea::start().await {
        Ok(gitea) => gitea,
        Err(err) => panic!(
            "cannot start the Gitea these tests need: {err}\n\
             build it with: scripts/ensure-test-binaries.sh gitea"
        ),
    }
}

async fn fleet(gitea: &Gitea, name: &str) -> String {
    gitea
        .create_repo(
            name,
            &[
                ("apps/prod/podinfo.yaml".into(), PROD.into()),
                ("README.md".into(), "# fleet\n".into()),
            ],
        )
        .await
        .unwrap()
}

fn pipeline(url: &str) -> Pipeline {
    let spec = parse_pipeline_spec(json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": [
            {"name": "staging", "targets": [{"namespace": "podinfo-staging"}]},
            {"name": "prod", "targets": [{"namespace": "podinfo-prod"}]}
        ],
        "promotion": {"strategy": {"pull-request": {
            "type": "gitea", "url": url, "baseBranch": "main", "secretRef": {"name": "git"}}}}
    }))
    .unwrap();
    Pipeline {
        reference: PipelineRef::new("flux-system", "podinfo"),
        spec,
    }
}

fn secret(gitea: &Gitea, password: &str) -> MemoryCatalog {
    MemoryCatalog::new().with_secret(
        "flux-system",
        "git",
        [
            ("username", ADMIN_USER),
            ("password", password),
            ("token", gitea.token.as_str()),
        ],
    )
}

fn strategy(work: &Path, limits: CloneCacheLimits) -> PullRequestStrategy {
    PullRequestStrategy::new(
        PullRequestSettings {
            work_dir: work.to_path_buf(),
            clone_cache_max_bytes: limits.max_bytes,
            clone_cache_max_clones: limits.max_clones,
            ..PullRequestSettings::default()
        },
        pipeline_git::forge::http_client().unwrap(),
    )
}

async fn promote(
    strategy: &PullRequestStrategy,
    url: &str,
    revision: &str,
    secrets: &MemoryCatalog,
) -> Result<StrategyOutcome, StrategyError> {
    let pipeline = pipeline(url);
    let record = PromotionRecord::new(
        pipeline.reference.clone(),
        "staging",
        "prod",
        revision,
        false,
        Trigger::default(),
        chrono::Utc::now(),
    );
    let outcome = strategy
        .promote(PromotionContext {
            record: &record,
            pipeline: &pipeline,
            promotion: pipeline.promotion_for("prod").unwrap(),
            secrets,
        })
        .await;
    // Measuring and evicting happen after the promotion, in the background.
    strategy.settle_clone_cache().await;
    outcome
}

/// The clones in `work`'s cache, by directory name.
fn cached(work: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(work.join(CLONES_DIR))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn only_clone(work: &Path) -> PathBuf {
    let names = cached(work);
    assert_eq!(names.len(), 1, "{names:?}");
    work.join(CLONES_DIR).join(&names[0])
}

/// Every file under `dir`, except git's object store (compressed repository content).
fn files_outside_objects(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            if path.file_name().is_some_and(|n| n == "objects") {
                continue;
            }
            files_outside_objects(&path, out);
        } else if kind.is_file() {
            out.push(path);
        }
    }
}

fn assert_no_credentials(clone: &Path, gitea: &Gitea, extra: &[&str]) {
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"));
    let mut needles = vec![
        ADMIN_PASSWORD.to_string(),
        gitea.token.clone(),
        basic,
        "extraheader".to_string(),
        "authorization".to_string(),
        format!("{ADMIN_USER}@"),
    ];
    needles.extend(extra.iter().map(|s| s.to_string()));
    let mut files = Vec::new();
    files_outside_objects(&clone.join(".git"), &mut files);
    assert!(
        files.iter().any(|f| f.ends_with(".git/config")),
        "{files:?}"
    );
    for file in files {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).to_lowercase();
        for needle in &needles {
            assert!(
                !text.contains(&needle.to_lowercase()),
                "{} holds {needle:?}:\n{text}",
                file.display()
            );
        }
    }
}

fn head_of(clone: &Path) -> String {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(clone)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_clone_is_reused_refreshed_and_replaced_when_broken() {
    let gitea = gitea().await;
    let url = fleet(&gitea, "fleet").await;
    let work = tempfile::tempdir().unwrap();
    let strategy = strategy(work.path(), CloneCacheLimits::default());
    let secrets = secret(&gitea, ADMIN_PASSWORD);

    // 1. Cold: one clone, kept in the cache.
    let outcome = promote(&strategy, &url, "6.5.1", &secrets).await.unwrap();
    assert!(
        outcome.message.starts_with("opened pull request #1"),
        "{outcome:?}"
    );
    assert_eq!(clones_of(&url), 1);
    let clone = only_clone(work.path());
    assert!(
        clone
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("fleet-"),
        "{clone:?}"
    );
    // Private: the cache directory is 0700.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(work.path().join(CLONES_DIR))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    // Nothing else is left in the work dir: no workspace, no private git home.
    let left: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [CLONES_DIR], "{left:?}");
    assert_no_credentials(&clone, &gitea, &[]);
    let config = std::fs::read_to_string(clone.join(".git/config")).unwrap();
    assert!(config.contains(&format!("url = {url}")), "{config}");

    // Nothing is checked out: the clone is `.git` alone.
    let beside: Vec<String> = std::fs::read_dir(&clone)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, [".git"], "{beside:?}");

    // What an earlier version left: a checkout of the promotion branch, with an index
    // and `HEAD` on that branch. Adopted as it is: no new clone, the checkout removed.
    let checkout = std::process::Command::new("git")
        .args(["checkout", "--quiet", "--force", BRANCH])
        .current_dir(&clone)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(checkout.status.success(), "{checkout:?}");
    assert!(clone.join("apps/prod/podinfo.yaml").is_file());
    assert!(clone.join(".git/index").is_file());
    // And the scratch directory of an attempt that did not end.
    std::fs::create_dir_all(clone.join(".git/promotion-index-left")).unwrap();
    std::fs::write(clone.join(".git/promotion-index-left/index"), "x").unwrap();

    // Marks that tell a reused clone from a fresh one: a file in .git survives, files put
    // beside it do not, and are never read (the marked file planted here differs from the
    // repository's).
    std::fs::write(clone.join(".git/test-reuse-mark"), "still here").unwrap();
    std::fs::write(clone.join("untracked.yaml"), "junk: 1\n").unwrap();
    std::fs::write(clone.join("README.md"), "local edit\n").unwrap();
    std::fs::create_dir_all(clone.join("apps/prod")).unwrap();
    std::fs::write(
        clone.join("apps/prod/podinfo.yaml"),
        "planted: \"1.0.0\" # {\"$promotion\": \"flux-system:podinfo:prod\"}\n",
    )
    .unwrap();

    // 2. A commit lands on the base branch in between.
    let seed = tempfile::tempdir().unwrap();
    gitea
        .git(seed.path(), &["clone", "--quiet", &url, "seed"])
        .unwrap();
    let seed = seed.path().join("seed");
    std::fs::write(seed.join("apps/new.yaml"), "added: on main\n").unwrap();
    gitea.git(&seed, &["add", "--all"]).unwrap();
    gitea
        .git(&seed, &["commit", "--quiet", "-m", "meanwhile on main"])
        .unwrap();
    gitea
        .git(&seed, &["push", "--quiet", "origin", "main"])
        .unwrap();
    let main_head = gitea.branch_head("fleet", "main").await.unwrap().unwrap();

    // 3. Warm: no clone; the branch starts from the new base and proposes only the change.
    let outcome = promote(&strategy, &url, "6.5.2", &secrets).await.unwrap();
    assert!(
        outcome.message.starts_with("updated pull request #1"),
        "{outcome:?}"
    );
    assert_eq!(clones_of(&url), 1, "the second promotion cloned again");
    assert_eq!(only_clone(work.path()), clone);
    assert!(clone.join(".git/test-reuse-mark").exists());
    // The clone has no work tree: what was put beside `.git` is gone, nothing is checked
    // out, and the new base reached the branch through git's objects alone.
    let beside: Vec<String> = std::fs::read_dir(&clone)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, [".git"], "{beside:?}");
    assert!(!clone.join(".git/index").exists());
    assert!(!clone.join(".git/promotion-index-left").exists());
    assert_eq!(
        std::fs::read_to_string(clone.join(".git/HEAD")).unwrap(),
        "ref: refs/heads/main\n"
    );
    assert_eq!(
        gitea.file("fleet", BRANCH, "apps/new.yaml").await.unwrap(),
        "added: on main\n"
    );
    // One commit on top of the new base, changing the marked file only (Gitea's own pull
    // request diff may still use the old merge base for a while).
    let pushed = gitea.branch_head("fleet", BRANCH).await.unwrap().unwrap();
    let commit = gitea
        .get_json(&format!("/repos/{ADMIN_USER}/fleet/git/commits/{pushed}"))
        .await
        .unwrap();
    assert_eq!(
        commit["parents"][0]["sha"],
        main_head.as_str(),
        "{commit:#}"
    );
    let files: Vec<&str> = commit["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["filename"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["apps/prod/podinfo.yaml"], "{commit:#}");
    assert_eq!(
        gitea
            .file("fleet", BRANCH, "apps/prod/podinfo.yaml")
            .await
            .unwrap(),
        PROD.replace("6.0.0", "6.5.2")
    );
    assert_eq!(gitea.pulls("fleet", "open").await.unwrap().len(), 1);
    assert_eq!(
        gitea.file("fleet", BRANCH, "README.md").await.unwrap(),
        "# fleet\n"
    );
    assert_no_credentials(&clone, &gitea, &[]);

    // 4. The same promotion again: nothing pushed, from the warm clone.
    let outcome = promote(&strategy, &url, "6.5.2", &secrets).await.unwrap();
    assert!(
        outcome.message.contains("already up to date"),
        "{outcome:?}"
    );
    assert_eq!(
        gitea.branch_head("fleet", BRANCH).await.unwrap().unwrap(),
        pushed
    );
    assert_eq!(clones_of(&url), 1);

    // 5. Credentials the remote refuses: the attempt fails, the clone stays.
    const WRONG: &str = "wrong-password-in-the-cache-test";
    let err = promote(&strategy, &url, "6.5.3", &secret(&gitea, WRONG))
        .await
        .unwrap_err();
    assert!(err.message.contains("check the credentials"), "{err:?}");
    assert!(clone.join(".git/test-reuse-mark").exists(), "clone kept");
    assert_no_credentials(&clone, &gitea, &[WRONG]);

    // 6. A new strategy (a restarted controller) adopts the clone.
    drop(strategy);
    let strategy = self::strategy(work.path(), CloneCacheLimits::default());
    promote(&strategy, &url, "6.5.3", &secrets).await.unwrap();
    assert_eq!(clones_of(&url), 1, "the restarted strategy cloned again");
    assert!(clone.join(".git/test-reuse-mark").exists());

    // 7. Garbage in .git/HEAD: detected, replaced by a fresh clone, promotion succeeds.
    std::fs::write(clone.join(".git/HEAD"), "garbage\n").unwrap();
    let outcome = promote(&strategy, &url, "6.5.4", &secrets).await.unwrap();
    assert!(
        outcome.message.starts_with("updated pull request #1"),
        "{outcome:?}"
    );
    assert_eq!(clones_of(&url), 2);
    assert!(!clone.join(".git/test-reuse-mark").exists(), "not replaced");
    let unusable = log_lines(
        &url,
        "cached clone unusable; replacing it with a fresh clone",
    );
    assert_eq!(unusable.len(), 1, "{unusable:#?}");
    assert!(unusable[0].contains("WARN"), "{}", unusable[0]);
    assert_eq!(only_clone(work.path()), clone);

    // 8. The object store gone (packs and loose objects): replaced as well.
    std::fs::write(clone.join(".git/test-reuse-mark"), "again").unwrap();
    for entry in walk(&clone.join(".git/objects")) {
        std::fs::remove_file(entry).unwrap();
    }
    let outcome = promote(&strategy, &url, "6.5.5", &secrets).await.unwrap();
    assert!(
        outcome.message.starts_with("updated pull request #1"),
        "{outcome:?}"
    );
    assert_eq!(clones_of(&url), 3);
    assert!(!clone.join(".git/test-reuse-mark").exists());
    assert_eq!(
        log_lines(&url, "cached clone unusable").len(),
        2,
        "{}",
        logs_text()
    );
    assert_eq!(
        gitea
            .file("fleet", BRANCH, "apps/prod/podinfo.yaml")
            .await
            .unwrap(),
        PROD.replace("6.0.0", "6.5.5")
    );

    // 9. .git missing altogether: replaced.
    std::fs::remove_dir_all(clone.join(".git")).unwrap();
    promote(&strategy, &url, "6.5.6", &secrets).await.unwrap();
    assert_eq!(clones_of(&url), 4);
    assert_eq!(head_of(&clone).len(), 40);
    assert_no_credentials(&clone, &gitea, &[WRONG]);
    assert_eq!(gitea.pulls("fleet", "all").await.unwrap().len(), 1);
    if std::env::var_os("DUMP_LOGS").is_some() {
        eprintln!("{}", logs_text());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_clones_are_evicted() {
    let gitea = gitea().await;
    let urls = [
        fleet(&gitea, "alpha").await,
        fleet(&gitea, "beta").await,
        fleet(&gitea, "gamma").await,
    ];
    let [alpha, beta, gamma] = &urls;
    let secrets = secret(&gitea, ADMIN_PASSWORD);
    let name_of = |work: &Path, url: &str| {
        let repo = url.rsplit('/').next().unwrap().to_string();
        cached(work)
            .into_iter()
            .find(|n| n.starts_with(&format!("{repo}-")))
    };

    // At most two clones.
    let work = tempfile::tempdir().unwrap();
    let limit_two = CloneCacheLimits {
        max_clones: 2,
        ..CloneCacheLimits::default()
    };
    let by_count = strategy(work.path(), limit_two);
    promote(&by_count, alpha, "1.0.1", &secrets).await.unwrap();
    promote(&by_count, beta, "1.0.1", &secrets).await.unwrap();
    assert_eq!(cached(work.path()).len(), 2);
    // alpha used again: beta is now the least recently used.
    promote(&by_count, alpha, "1.0.2", &secrets).await.unwrap();
    assert_eq!(clones_of(alpha), 1);
    promote(&by_count, gamma, "1.0.1", &secrets).await.unwrap();
    let left = cached(work.path());
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(name_of(work.path(), alpha).is_some(), "{left:?}");
    assert!(name_of(work.path(), gamma).is_some(), "{left:?}");
    assert!(name_of(work.path(), beta).is_none(), "{left:?}");
    assert_eq!(
        log_lines(
            &name_of_any(beta),
            "evicted the least recently used cached clone"
        )
        .len(),
        1,
        "{}",
        logs_text()
    );
    // beta again: cloned afresh (and alpha, now the least recently used, goes).
    promote(&by_count, beta, "1.0.2", &secrets).await.unwrap();
    assert_eq!(clones_of(beta), 2);
    assert!(name_of(work.path(), alpha).is_none());

    // By size: room for one clone and a half.
    let one = dir_size(
        &work
            .path()
            .join(CLONES_DIR)
            .join(name_of(work.path(), beta).unwrap()),
    );
    assert!(one > 0);
    let work = tempfile::tempdir().unwrap();
    let by_size = strategy(
        work.path(),
        CloneCacheLimits {
            max_bytes: one + one / 2,
            ..CloneCacheLimits::default()
        },
    );
    promote(&by_size, alpha, "1.0.3", &secrets).await.unwrap();
    assert!(name_of(work.path(), alpha).is_some());
    promote(&by_size, gamma, "1.0.3", &secrets).await.unwrap();
    assert_eq!(cached(work.path()), [name_of(work.path(), gamma).unwrap()]);

    // A restart with a smaller limit trims what the earlier run left.
    drop(by_size);
    let tiny = strategy(
        work.path(),
        CloneCacheLimits {
            max_bytes: 1,
            ..CloneCacheLimits::default()
        },
    );
    // One clone larger than the whole budget is not kept; the promotion still works.
    let outcome = promote(&tiny, beta, "1.0.4", &secrets).await.unwrap();
    assert!(outcome.result.is_some(), "{outcome:?}");
    assert!(cached(work.path()).is_empty(), "{:?}", cached(work.path()));

    // Off: every attempt clones into a temporary workspace, nothing is kept.
    let work = tempfile::tempdir().unwrap();
    let off = strategy(
        work.path(),
        CloneCacheLimits {
            max_bytes: 0,
            ..CloneCacheLimits::default()
        },
    );
    let before = clones_of(gamma);
    promote(&off, gamma, "1.0.5", &secrets).await.unwrap();
    promote(&off, gamma, "1.0.6", &secrets).await.unwrap();
    assert_eq!(clones_of(gamma), before + 2);
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The URL's repository name, as it appears in a clone's directory name.
fn name_of_any(url: &str) -> String {
    format!("/{}-", url.rsplit('/').next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotes_from_git_objects_keeping_modes_links_and_submodules() {
    let gitea = gitea().await;
    let url = fleet(&gitea, "objects").await;
    // An executable marked file, a symbolic link named like YAML to the marked file, a
    // YAML file that is not UTF-8 and a submodule named like YAML.
    let seed = tempfile::tempdir().unwrap();
    gitea
        .git(seed.path(), &["clone", "--quiet", &url, "seed"])
        .unwrap();
    let seed = seed.path().join("seed");
    std::fs::create_dir_all(seed.join("deploy")).unwrap();
    std::fs::write(
        seed.join("deploy/run.yaml"),
        "image: {tag: 6.0.0} # {\"$promotion\": \"flux-system:podinfo:prod\"}\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        seed.join("deploy/run.yaml"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("apps/prod/podinfo.yaml", seed.join("link.yaml")).unwrap();
    std::fs::write(
        seed.join("latin1.yaml"),
        b"name: caf\xe9 # {\"$promotion\": \"flux-system:podinfo:prod\"}\n",
    )
    .unwrap();
    gitea.git(&seed, &["add", "--all"]).unwrap();
    gitea
        .git(
            &seed,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                "160000,1234567890abcdef1234567890abcdef12345678,vendor/chart.yaml",
            ],
        )
        .unwrap();
    gitea
        .git(&seed, &["commit", "--quiet", "-m", "more kinds of files"])
        .unwrap();
    gitea
        .git(&seed, &["push", "--quiet", "origin", "main"])
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let strategy = strategy(work.path(), CloneCacheLimits::default());
    let secrets = secret(&gitea, ADMIN_PASSWORD);

    let outcome = promote(&strategy, &url, "6.5.1", &secrets).await.unwrap();
    assert!(
        outcome.message.starts_with("opened pull request #1"),
        "{outcome:?}"
    );
    gitea
        .git(&seed, &["fetch", "--quiet", "origin", BRANCH])
        .unwrap();
    let diff = gitea
        .git(
            &seed,
            &["diff-tree", "-r", "--name-status", "main", "FETCH_HEAD"],
        )
        .unwrap();
    assert_eq!(diff, "M\tapps/prod/podinfo.yaml\nM\tdeploy/run.yaml\n");
    let entry = |rev: &str, path: &str| {
        gitea
            .git(&seed, &["ls-tree", rev, "--", path])
            .unwrap()
            .split('\t')
            .next()
            .unwrap()
            .to_string()
    };
    assert!(entry("FETCH_HEAD", "deploy/run.yaml").starts_with("100755 blob "));
    for path in ["link.yaml", "latin1.yaml", "vendor/chart.yaml", "README.md"] {
        assert_eq!(entry("FETCH_HEAD", path), entry("main", path), "{path}");
    }
    assert_eq!(
        gitea
            .git(&seed, &["show", "FETCH_HEAD:deploy/run.yaml"])
            .unwrap(),
        "image: {tag: 6.5.1} # {\"$promotion\": \"flux-system:podinfo:prod\"}\n"
    );
    // The commit message and the pull request list the files in path order.
    let message = gitea
        .git(&seed, &["log", "-1", "--format=%B", "FETCH_HEAD"])
        .unwrap();
    assert!(
        message.contains("in:\n  apps/prod/podinfo.yaml\n  deploy/run.yaml\n"),
        "{message}"
    );
    let pulls = gitea.pulls("objects", "open").await.unwrap();
    let body = pulls[0]["body"].as_str().unwrap();
    assert!(
        body.contains("- `apps/prod/podinfo.yaml`\n- `deploy/run.yaml`\n"),
        "{body}"
    );
    // The clone cache holds `.git` alone.
    let clone = only_clone(work.path());
    let beside: Vec<String> = std::fs::read_dir(&clone)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, [".git"], "{beside:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_marker_and_bad_markers_fail_naming_what_was_scanned() {
    let gitea = gitea().await;
    let secrets = secret(&gitea, ADMIN_PASSWORD);
    let work = tempfile::tempdir().unwrap();
    let strategy = strategy(work.path(), CloneCacheLimits::default());

    // No marker for the key: the count of YAML files scanned, as a checkout scan gave it.
    let unmarked = gitea
        .create_repo(
            "unmarked",
            &[
                (
                    "apps/staging.yaml".into(),
                    "v: 1 # {\"$promotion\": \"flux-system:podinfo:staging\"}\n".into(),
                ),
                ("apps/plain.YML".into(), "plain: yaml\n".into()),
                ("docs/readme.md".into(), "# docs\n".into()),
            ],
        )
        .await
        .unwrap();
    let err = promote(&strategy, &unmarked, "6.5.1", &secrets)
        .await
        .unwrap_err();
    assert!(
        err.message.ends_with(
            "is marked {\"$promotion\": \"flux-system:podinfo:prod\"} (2 YAML file(s) scanned)"
        ),
        "{err:?}"
    );
    assert_eq!(gitea.branch_head("unmarked", BRANCH).await.unwrap(), None);

    // A marker that cannot be applied: the file and line, nothing pushed, and the clone
    // is kept (it is not broken).
    let broken = gitea
        .create_repo(
            "broken",
            &[
                ("apps/prod/podinfo.yaml".into(), PROD.into()),
                (
                    "apps/prod/tags.yaml".into(),
                    "tags: [1, 2] # {\"$promotion\": \"flux-system:podinfo:prod\"}\n".into(),
                ),
            ],
        )
        .await
        .unwrap();
    let err = promote(&strategy, &broken, "6.5.1", &secrets)
        .await
        .unwrap_err();
    assert!(
        err.message.contains(&format!(
            "cannot apply marker flux-system:podinfo:prod in {broken}@main: apps/prod/tags.yaml: line 1: the marker is ambiguous"
        )),
        "{err:?}"
    );
    assert_eq!(gitea.branch_head("broken", BRANCH).await.unwrap(), None);
    assert!(log_lines(&broken, "cached clone corrupt").is_empty());
    assert_eq!(cached(work.path()).len(), 2);
}
