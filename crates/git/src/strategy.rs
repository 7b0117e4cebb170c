//! The `pull-request` promotion strategy: rewrite the marked values of the target
//! environment in the GitOps repository, push a promotion branch and open (or update) the
//! pull request that proposes it.
//!
//! An attempt looks at the world before acting, so repeating it changes nothing visible:
//!
//! 1. shallow clone of the base branch (`git clone --depth 1 --single-branch`);
//! 2. rewrite every value marked `<ns>:<name>:<env>` to the revision. No marker at all is
//!    an error (the pipeline points at the wrong repository or branch); markers already at
//!    the revision end the promotion successfully, with no branch and no pull request;
//! 3. commit on `promotion-<ns>-<name>-<env>`. When that branch already exists remotely
//!    with the same tree, nothing is pushed; when its head was made for a *newer*
//!    promotion of the same environment (commit trailers say which), this older one is
//!    superseded and stops; otherwise the branch is force-pushed from the fresh base with
//!    `--force-with-lease` against the commit seen, so a newer version replaces an older
//!    one and a concurrent push is never overwritten blindly (a lost race starts over on
//!    a fresh clone, a bounded number of times);
//! 4. the open pull request from that branch is updated (title, body) or one is created.
//!    Its URL is the record's result.
//!
//! Promotions of the same repository run one at a time in this process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pipeline_core::pipeline::PullRequestPromotion;
use pipeline_core::{
    PromotionContext, PromotionRecord, PromotionStrategy, SecretBytes, SecretLookupError,
    StrategyError, StrategyOutcome,
};

use crate::credentials::Credentials;
use crate::forge::{
    self, Forge, ForgeError, ForgeErrorKind, ForgeKind, ForgeTarget, PullRequest, PullRequestDraft,
};
use crate::git::{Author, Git, GitError, GitErrorKind};
use crate::markers::{MarkerKey, TreeError, rewrite_tree};
use crate::repo_url::RepoUrl;

/// Commit trailers recording which promotion made a branch head.
const TRAILER_ID: &str = "Promotion-Id";
const TRAILER_CREATED: &str = "Promotion-Created";

/// Settings of the strategy, the same for every pipeline.
#[derive(Debug, Clone)]
pub struct PullRequestSettings {
    pub author: Author,
    /// Commit subject and pull request title; `{pipeline}`, `{namespace}`, `{name}`,
    /// `{environment}`, `{version}` and `{source}` are replaced.
    pub message_template: String,
    /// Where clones are made (a fresh temporary directory per attempt, removed after).
    pub work_dir: PathBuf,
    /// Fresh-clone attempts when the push loses a race.
    pub push_attempts: u32,
    /// API base URL per repository URL prefix, for forges the URL rules do not fit.
    pub api_overrides: Vec<(String, String)>,
}

pub const DEFAULT_AUTHOR_NAME: &str = "pipeline-controller";
pub const DEFAULT_AUTHOR_EMAIL: &str = "pipeline-controller@localhost";
pub const DEFAULT_MESSAGE: &str = "Promote {pipeline} to {environment}: {version}";

impl Default for PullRequestSettings {
    fn default() -> Self {
        Self {
            author: Author {
                name: DEFAULT_AUTHOR_NAME.to_string(),
                email: DEFAULT_AUTHOR_EMAIL.to_string(),
            },
            message_template: DEFAULT_MESSAGE.to_string(),
            work_dir: std::env::temp_dir(),
            push_attempts: 3,
            api_overrides: Vec::new(),
        }
    }
}

/// The `pull-request` strategy.
pub struct PullRequestStrategy {
    settings: PullRequestSettings,
    client: reqwest::Client,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for PullRequestStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullRequestStrategy")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The branch a pipeline environment's promotions are proposed from.
pub fn promotion_branch(namespace: &str, name: &str, environment: &str) -> String {
    let raw = format!("promotion-{namespace}-{name}-{environment}");
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_end_matches(['.', '-'])
        .replace("..", "--")
}

impl PullRequestStrategy {
    /// `client` should come from [`forge::http_client`].
    pub fn new(settings: PullRequestSettings, client: reqwest::Client) -> Self {
        Self {
            settings,
            client,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock_for(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Drop entries nobody holds, so the map does not grow without bound.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(key).or_default().clone()
    }

    fn api_override(&self, url: &str) -> Option<String> {
        self.settings
            .api_overrides
            .iter()
            .find(|(prefix, _)| url.starts_with(prefix.as_str()))
            .map(|(_, base)| base.clone())
    }

    fn render(&self, template: &str, record: &PromotionRecord) -> String {
        template
            .replace("{pipeline}", &record.pipeline.to_string())
            .replace("{namespace}", &record.pipeline.namespace)
            .replace("{name}", &record.pipeline.name)
            .replace("{environment}", &record.target_environment)
            .replace("{version}", &record.revision)
            .replace("{source}", &record.source_environment)
    }
}

#[async_trait]
impl PromotionStrategy for PullRequestStrategy {
    async fn promote(&self, ctx: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError> {
        let Some(spec) = ctx.promotion.strategy.pull_request.as_ref() else {
            return Err(StrategyError::permanent(
                "the promotion has no pull-request settings",
            ));
        };
        let kind = ForgeKind::parse(&spec.provider).ok_or_else(|| {
            StrategyError::permanent(format!(
                "unknown pull-request provider type {:?}",
                spec.provider
            ))
        })?;
        let url = RepoUrl::parse(&spec.url).map_err(StrategyError::permanent)?;
        let namespace = &ctx.pipeline.reference.namespace;
        let credentials = read_credentials(ctx.secrets, namespace, spec).await?;
        let scrubber = credentials.scrubber();
        let token = credentials.token_text().ok_or_else(|| {
            StrategyError::permanent(format!(
                "secret {namespace}/{} has no \"token\" key for the {kind} API",
                spec.secret_ref.name
            ))
        })?;
        let target = ForgeTarget {
            kind,
            url: url.clone(),
            api_base: self.api_override(&spec.url),
        };
        let forge = forge::connect(&target, token, self.client.clone()).map_err(forge_error)?;

        let lock = self.lock_for(url.lock_key());
        let _guard = lock.lock().await;
        let attempt = Attempt {
            strategy: self,
            record: ctx.record,
            spec,
            url: &url,
            credentials: &credentials,
            forge: forge.as_ref(),
        };
        attempt.run().await.map_err(|mut err| {
            err.message = scrubber.scrub(&err.message);
            err
        })
    }
}

async fn read_credentials(
    secrets: &dyn pipeline_core::SecretSource,
    namespace: &str,
    spec: &PullRequestPromotion,
) -> Result<Credentials, StrategyError> {
    let name = &spec.secret_ref.name;
    let mut values: Vec<Option<SecretBytes>> = Vec::new();
    for key in ["username", "password", "token", "identity", "known_hosts"] {
        match secrets.secret_value(namespace, name, key).await {
            Ok(value) => values.push(value.filter(|v| !v.expose().is_empty())),
            Err(SecretLookupError::SecretNotFound { namespace, name }) => {
                return Err(StrategyError::permanent(format!(
                    "secret {namespace}/{name} for the pull request not found"
                )));
            }
            Err(SecretLookupError::Unavailable(err)) => {
                return Err(StrategyError::retryable(format!(
                    "cannot read secret {namespace}/{name}: {err}"
                )));
            }
        }
    }
    let mut values = values.into_iter();
    let mut next = || values.next().flatten();
    let username = next().map(|u| {
        String::from_utf8_lossy(u.expose())
            .trim_end_matches(['\r', '\n'])
            .to_string()
    });
    Ok(Credentials {
        username,
        password: next(),
        token: next(),
        identity: next(),
        known_hosts: next(),
    })
}

fn git_error(err: GitError) -> StrategyError {
    let message = match err.kind {
        GitErrorKind::Auth => format!("{} (check the credentials in the secret)", err.message),
        _ => err.message,
    };
    match err.kind {
        GitErrorKind::Transient | GitErrorKind::Rejected => StrategyError::retryable(message),
        _ => StrategyError::permanent(message),
    }
}

fn forge_error(err: ForgeError) -> StrategyError {
    let message = match err.kind {
        ForgeErrorKind::Auth => format!("{} (check the \"token\" in the secret)", err.message),
        _ => err.message.clone(),
    };
    if err.retryable() {
        StrategyError::retryable(message)
    } else {
        StrategyError::permanent(message)
    }
}

/// One attempt at one promotion, under the repository's lock.
struct Attempt<'a> {
    strategy: &'a PullRequestStrategy,
    record: &'a PromotionRecord,
    spec: &'a PullRequestPromotion,
    url: &'a RepoUrl,
    credentials: &'a Credentials,
    forge: &'a dyn Forge,
}

/// What happened to the promotion branch.
enum BranchState {
    /// The base already has the version.
    NothingToChange { matched: usize },
    /// The branch now (or already) proposes the version.
    Proposed { pushed: bool, files: Vec<PathBuf> },
    /// A newer promotion owns the branch.
    Superseded { by: String },
}

impl Attempt<'_> {
    fn key(&self) -> MarkerKey {
        let p = &self.record.pipeline;
        MarkerKey::new(&p.namespace, &p.name, &self.record.target_environment)
    }

    fn branch(&self) -> String {
        let p = &self.record.pipeline;
        promotion_branch(&p.namespace, &p.name, &self.record.target_environment)
    }

    fn where_(&self) -> String {
        format!("{}@{}", self.url, self.spec.base_branch)
    }

    async fn run(&self) -> Result<StrategyOutcome, StrategyError> {
        let settings = &self.strategy.settings;
        let record = self.record;
        let branch = self.branch();
        let mut state = None;
        let attempts = settings.push_attempts.max(1);
        for round in 1..=attempts {
            match self.prepare_branch(&branch).await {
                Ok(done) => {
                    state = Some(done);
                    break;
                }
                Err(err) if err.kind == GitErrorKind::Rejected && round < attempts => {
                    tracing::info!(
                        promotion = %record.id,
                        branch = %branch,
                        round,
                        "promotion branch moved while pushing; starting over on a fresh clone"
                    );
                }
                Err(err) => return Err(git_error(err)),
            }
        }
        let Some(state) = state else {
            return Err(StrategyError::retryable(format!(
                "pushing {branch} to {} kept losing races",
                self.url
            )));
        };
        let files = match state {
            BranchState::NothingToChange { matched } => {
                return Ok(StrategyOutcome {
                    message: format!(
                        "{} already has {} for {} ({matched} marked value(s)): nothing to change, no pull request",
                        self.where_(),
                        record.revision,
                        record.target_environment
                    ),
                    result: None,
                });
            }
            BranchState::Superseded { by } => {
                let existing = self
                    .forge
                    .find_open(&branch, &self.spec.base_branch)
                    .await
                    .map_err(forge_error)?;
                return Ok(StrategyOutcome {
                    message: format!(
                        "superseded: branch {branch} already proposes the newer promotion {by}"
                    ),
                    result: existing.map(|pr| pr.url),
                });
            }
            BranchState::Proposed { pushed, files } => (pushed, files),
        };
        let (pushed, files) = files;
        let draft = self.draft(&branch, &files);
        let (pr, action) = self.open_or_update(&draft).await?;
        let pushed_note = if pushed {
            ""
        } else {
            " (branch already up to date)"
        };
        Ok(StrategyOutcome {
            message: format!(
                "{action} pull request #{} proposing {} for {}{pushed_note}",
                pr.number, record.revision, record.target_environment
            ),
            result: Some(pr.url),
        })
    }

    async fn open_or_update(
        &self,
        draft: &PullRequestDraft,
    ) -> Result<(PullRequest, &'static str), StrategyError> {
        let existing = self
            .forge
            .find_open(&draft.head, &draft.base)
            .await
            .map_err(forge_error)?;
        if let Some(pr) = existing {
            return self.update(pr, draft).await;
        }
        match self.forge.create(draft).await {
            Ok(pr) => Ok((pr, "opened")),
            // Someone opened it meanwhile: find it and update it.
            Err(err) if err.kind == ForgeErrorKind::Conflict => {
                match self
                    .forge
                    .find_open(&draft.head, &draft.base)
                    .await
                    .map_err(forge_error)?
                {
                    Some(pr) => self.update(pr, draft).await,
                    None => Err(forge_error(err)),
                }
            }
            Err(err) => Err(forge_error(err)),
        }
    }

    async fn update(
        &self,
        pr: PullRequest,
        draft: &PullRequestDraft,
    ) -> Result<(PullRequest, &'static str), StrategyError> {
        if pr.title == draft.title && pr.body.trim() == draft.body.trim() {
            return Ok((pr, "unchanged"));
        }
        let updated = self.forge.update(&pr, draft).await.map_err(forge_error)?;
        // Some forges answer an update without the web URL; keep the one we know.
        let url = if updated.url.is_empty() {
            pr.url
        } else {
            updated.url.clone()
        };
        Ok((PullRequest { url, ..updated }, "updated"))
    }

    fn title(&self) -> String {
        self.strategy
            .render(&self.strategy.settings.message_template, self.record)
    }

    fn draft(&self, branch: &str, files: &[PathBuf]) -> PullRequestDraft {
        let record = self.record;
        let mut body = format!(
            "Promotes pipeline `{}` to environment `{}` with version `{}`, after it was deployed in `{}`.\n\nFiles changed:\n",
            record.pipeline, record.target_environment, record.revision, record.source_environment
        );
        for file in files {
            body.push_str(&format!("- `{}`\n", file.display()));
        }
        body.push_str(&format!(
            "\nMarker: `{}`. Opened by pipeline-controller (promotion `{}`); a newer version of this environment updates this pull request.\n",
            self.key(),
            record.id
        ));
        PullRequestDraft {
            head: branch.to_string(),
            base: self.spec.base_branch.clone(),
            title: self.title(),
            body,
        }
    }

    fn commit_message(&self, files: &[PathBuf]) -> String {
        let record = self.record;
        let mut message = format!("{}\n\n", self.title());
        message.push_str(&format!("Rewrites the values marked {} in:\n", self.key()));
        for file in files {
            message.push_str(&format!("  {}\n", file.display()));
        }
        message.push_str(&format!(
            "\n{TRAILER_ID}: {}\n{TRAILER_CREATED}: {}\n",
            record.id,
            record
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        ));
        message
    }

    /// Clone, rewrite, commit and push; `Err` with kind `Rejected` means "start over".
    async fn prepare_branch(&self, branch: &str) -> Result<BranchState, GitError> {
        let settings = &self.strategy.settings;
        std::fs::create_dir_all(&settings.work_dir).map_err(|e| GitError {
            kind: GitErrorKind::Other,
            message: format!("cannot create {}: {e}", settings.work_dir.display()),
        })?;
        let workspace = tempfile::Builder::new()
            .prefix("promotion-")
            .tempdir_in(&settings.work_dir)
            .map_err(|e| GitError {
                kind: GitErrorKind::Other,
                message: format!(
                    "cannot create a workspace in {}: {e}",
                    settings.work_dir.display()
                ),
            })?;
        let result = self.prepare_in(workspace.path(), branch).await;
        // Removing a big checkout takes a while; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(workspace)).await;
        result
    }

    async fn prepare_in(&self, workspace: &Path, branch: &str) -> Result<BranchState, GitError> {
        let record = self.record;
        let git = Git::new(self.url, self.credentials, workspace)?;
        let repo = workspace.join("repo");
        git.clone_branch(&self.spec.base_branch, &repo).await?;

        let key = self.key();
        let revision = record.revision.clone();
        let root = repo.clone();
        let rewrite = tokio::task::spawn_blocking(move || rewrite_tree(&root, &key, &revision))
            .await
            .map_err(|e| GitError {
                kind: GitErrorKind::Other,
                message: format!("rewriting markers stopped: {e}"),
            })?
            .map_err(|e| GitError {
                kind: GitErrorKind::Other,
                message: match e {
                    TreeError::Marker { .. } => format!(
                        "cannot apply marker {} in {}: {e}",
                        self.key(),
                        self.where_()
                    ),
                    TreeError::Io { .. } => format!("rewriting markers: {e}"),
                },
            })?;
        for warning in &rewrite.warnings {
            tracing::warn!(
                promotion = %record.id,
                file = %warning.path.display(),
                "{}",
                warning.warning
            );
        }
        if rewrite.matched() == 0 {
            return Err(GitError {
                kind: GitErrorKind::Other,
                message: format!(
                    "no value in the YAML files of {} is marked {{\"$promotion\": \"{}\"}} ({} YAML file(s) scanned)",
                    self.where_(),
                    self.key(),
                    rewrite.scanned
                ),
            });
        }
        if rewrite.changed() == 0 {
            return Ok(BranchState::NothingToChange {
                matched: rewrite.matched(),
            });
        }
        let files: Vec<PathBuf> = rewrite.changed_paths().map(Path::to_path_buf).collect();
        git.commit(
            &repo,
            branch,
            &files,
            &self.strategy.settings.author,
            &self.commit_message(&files),
        )
        .await?;

        let remote = git.remote_branch(&repo, branch).await?;
        if let Some(remote_sha) = &remote {
            let fetched = git.fetch_branch(&repo, branch).await?;
            let ours = git.rev_parse(&repo, "HEAD^{tree}").await?;
            let theirs = git.rev_parse(&repo, &format!("{fetched}^{{tree}}")).await?;
            if ours == theirs {
                return Ok(BranchState::Proposed {
                    pushed: false,
                    files,
                });
            }
            let message = git.message(&repo, &fetched).await?;
            if let Some(by) = newer_promotion(&message, record) {
                return Ok(BranchState::Superseded { by });
            }
            git.push_with_lease(&repo, branch, Some(remote_sha)).await?;
        } else {
            git.push_with_lease(&repo, branch, None).await?;
        }
        Ok(BranchState::Proposed {
            pushed: true,
            files,
        })
    }
}

/// The promotion that made a branch head, when it is newer than `record`.
fn newer_promotion(message: &str, record: &PromotionRecord) -> Option<String> {
    let trailer = |name: &str| {
        message.lines().rev().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        })
    };
    let id = trailer(TRAILER_ID)?;
    let created = trailer(TRAILER_CREATED)?;
    let created = chrono::DateTime::parse_from_rfc3339(&created).ok()?;
    (id != record.id && created > record.created_at).then_some(id)
}
