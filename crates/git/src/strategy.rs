//! The `pull-request` promotion strategy: rewrite the marked values of the target
//! environment in the GitOps repository, push a promotion branch and open (or update) the
//! pull request that proposes it.
//!
//! An attempt looks at the world before acting, so repeating it changes nothing visible:
//!
//! 1. the base branch, fetched: the repository's cached clone ([`crate::clones`]), which
//!    has no work tree (nothing is ever checked out), refreshed with one `git fetch
//!    --depth 1 --prune` of the base and the promotion branch, the local base branch set
//!    to the fetched one and every other ref deleted; or, the first time, when the clone
//!    is broken (then it is replaced automatically) or with the cache off, a shallow clone
//!    without checkout (`git clone --depth 1 --single-branch --no-checkout`) and a fetch
//!    of the promotion branch;
//! 2. rewrite every value marked `<ns>:<name>:<env>` to the revision, reading the YAML
//!    files of the base's tree from git's objects (`git ls-tree -r`, then one `git
//!    cat-file --batch` for their blobs): the same files and results as a scan of a
//!    checkout would give (regular `*.yaml`/`*.yml` files, any case; no symbolic link, no
//!    submodule; non-UTF-8 files skipped), the blobs as stored, with no line-ending or
//!    other checkout conversion. No marker at all is an error (the pipeline points at the
//!    wrong repository or branch); markers already at the revision end the promotion
//!    successfully, with no branch and no pull request;
//! 3. commit on `promotion-<ns>-<name>-<env>`: the changed files are written as blobs
//!    (byte for byte, each keeping its mode) and the commit made on the base from a
//!    temporary index (`read-tree`, `update-index`, `write-tree`, `commit-tree`). When
//!    that branch already exists remotely with the same tree, nothing is pushed; when its
//!    head was made for a *newer* promotion of the same environment (commit trailers say
//!    which), this older one is superseded and stops; otherwise the branch is force-pushed
//!    from the fresh base with `--force-with-lease` against the commit fetched, so a newer
//!    version replaces an older one and a concurrent push is never overwritten blindly (a
//!    lost race starts over from step 1, a bounded number of times);
//! 4. the open pull request from that branch is updated (title, body) or one is created.
//!    Its URL is the record's result.
//!
//! Promotions of the same repository run one at a time in this process; the clone is used
//! under that lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pipeline_core::pipeline::PullRequestPromotion;
use pipeline_core::{
    PromotionContext, PromotionRecord, PromotionStrategy, SecretBytes, SecretLookupError,
    StrategyError, StrategyOutcome,
};

use crate::clones::{
    CloneCache, CloneCacheLimits, DEFAULT_CLONE_CACHE_MAX_BYTES, DEFAULT_CLONE_CACHE_MAX_CLONES,
    Lease, clone_key,
};
use crate::credentials::Credentials;
use crate::forge::{
    self, Forge, ForgeError, ForgeErrorKind, ForgeKind, ForgeTarget, PullRequest, PullRequestDraft,
};
use crate::git::{Author, Git, GitError, GitErrorKind, TreeFile};
use crate::markers::{MarkerKey, TreeError};
use crate::objects::{CommitRewrite, RewriteError, rewrite_commit};
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
    /// Holds the clone cache (`clones/`) and each attempt's private git home (removed
    /// after the attempt); with the cache off, each attempt's temporary clone.
    pub work_dir: PathBuf,
    /// Fresh-clone attempts when the push loses a race.
    pub push_attempts: u32,
    /// API base URL per repository URL prefix, for forges the URL rules do not fit.
    pub api_overrides: Vec<(String, String)>,
    /// Largest size on disk of the clone cache, in bytes (least recently used clones are
    /// removed beyond it); 0 turns the cache off: a fresh clone per attempt.
    pub clone_cache_max_bytes: u64,
    /// Most clones the cache keeps; 0 turns the cache off.
    pub clone_cache_max_clones: usize,
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
            clone_cache_max_bytes: DEFAULT_CLONE_CACHE_MAX_BYTES,
            clone_cache_max_clones: DEFAULT_CLONE_CACHE_MAX_CLONES,
        }
    }
}

/// The `pull-request` strategy.
pub struct PullRequestStrategy {
    settings: PullRequestSettings,
    client: reqwest::Client,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    clones: Arc<CloneCache>,
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
        let clones = Arc::new(CloneCache::new(
            &settings.work_dir,
            CloneCacheLimits {
                max_bytes: settings.clone_cache_max_bytes,
                max_clones: settings.clone_cache_max_clones,
            },
        ));
        Self {
            settings,
            client,
            locks: Mutex::new(HashMap::new()),
            clones,
        }
    }

    /// Waits until the clone cache's background upkeep (measuring the clones used so far,
    /// evicting beyond the limits) is done.
    pub async fn settle_clone_cache(&self) {
        self.clones.settle().await;
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
                        "promotion branch moved while pushing; starting over on a refreshed clone"
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

    /// Clone (or refresh the cached clone), rewrite, commit and push; `Err` with kind
    /// `Rejected` means "start over".
    async fn prepare_branch(&self, branch: &str) -> Result<BranchState, GitError> {
        let settings = &self.strategy.settings;
        std::fs::create_dir_all(&settings.work_dir).map_err(|e| GitError {
            kind: GitErrorKind::Other,
            message: format!("cannot create {}: {e}", settings.work_dir.display()),
        })?;
        // Its private home (and SSH key files) go when it is dropped.
        let git = Git::new(self.url, self.credentials, &settings.work_dir)?;
        let key = clone_key(self.url, &self.spec.base_branch);
        match self.strategy.clones.acquire(self.url, &key).await? {
            Some(lease) => {
                let mut gc_done = false;
                let result = self
                    .prepare_cached(&git, &lease, branch, &mut gc_done)
                    .await;
                self.strategy.clones.release(lease, gc_done);
                result
            }
            None => self.prepare_uncached(&git, branch).await,
        }
    }

    /// Without the clone cache: a fresh clone in a temporary workspace, removed after.
    async fn prepare_uncached(&self, git: &Git, branch: &str) -> Result<BranchState, GitError> {
        let settings = &self.strategy.settings;
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
        let repo = workspace.path().join("repo");
        let result = async {
            git.clone_branch_no_checkout(&self.spec.base_branch, &repo)
                .await?;
            let fetched = self
                .promotion_branch_of_fresh_clone(git, &repo, branch)
                .await?;
            self.prepare_in(git, &repo, branch, fetched).await
        }
        .await;
        let _ = tokio::task::spawn_blocking(move || drop(workspace)).await;
        result
    }

    /// In the cached clone: refreshed when it exists and is sound, else cloned afresh.
    async fn prepare_cached(
        &self,
        git: &Git,
        lease: &Lease,
        branch: &str,
        gc_done: &mut bool,
    ) -> Result<BranchState, GitError> {
        let repo = lease.path();
        let mut fetched = None;
        if lease.exists() {
            let started = std::time::Instant::now();
            match self.refresh(git, repo, branch, lease.gc_due()).await {
                Ok((seen, gc)) => {
                    tracing::debug!(
                        repository = %self.url,
                        clone = %repo.display(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        gc,
                        "cached clone refreshed"
                    );
                    fetched = Some(seen);
                    *gc_done = gc;
                }
                Err(Refresh::Remote(err)) => return Err(err),
                Err(Refresh::Broken(err)) => {
                    tracing::warn!(
                        repository = %self.url,
                        clone = %repo.display(),
                        error = %err.message,
                        "cached clone unusable; replacing it with a fresh clone"
                    );
                    lease.discard().await?;
                }
            }
        }
        let fetched = match fetched {
            Some(fetched) => fetched,
            None => {
                let started = std::time::Instant::now();
                let fresh = lease.fresh_dir()?;
                if let Err(err) = git
                    .clone_branch_no_checkout(&self.spec.base_branch, fresh.path())
                    .await
                {
                    let _ = tokio::task::spawn_blocking(move || drop(fresh)).await;
                    return Err(err);
                }
                lease.install(fresh).await?;
                tracing::info!(
                    repository = %self.url,
                    base = %self.spec.base_branch,
                    clone = %repo.display(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "cloned into the clone cache"
                );
                self.promotion_branch_of_fresh_clone(git, repo, branch)
                    .await?
            }
        };
        let result = self.prepare_in(git, repo, branch, fetched).await;
        if let Err(err) = &result {
            // A git command failed for no remote reason: make sure the clone is sound.
            if err.kind == GitErrorKind::Other
                && err.message.starts_with("git ")
                && let Err(fsck) = git.fsck(repo).await
            {
                tracing::warn!(
                    repository = %self.url,
                    clone = %repo.display(),
                    error = %fsck.message,
                    "cached clone corrupt; removing it (the next attempt clones afresh)"
                );
                lease.discard().await?;
            }
        }
        result
    }

    /// Brings the cached clone at `repo` to the remote base branch, with nothing left of
    /// earlier promotions: one `fetch --depth 1 --prune` of the base and the promotion
    /// branch (only what changed is transferred), the local base branch set to the fetched
    /// one with `HEAD` on it, and every other ref deleted. The clone has no work tree:
    /// anything found beside `.git` (and a `.git/index`, from clones of earlier versions,
    /// which checked the files out) is removed while the fetch runs. Returns the fetched
    /// heads, and whether the clone was garbage-collected.
    async fn refresh(
        &self,
        git: &Git,
        repo: &Path,
        branch: &str,
        gc_due: bool,
    ) -> Result<(Fetched, bool), Refresh> {
        let base = self.spec.base_branch.as_str();
        git.rev_parse(repo, "HEAD^{commit}")
            .await
            .map_err(Refresh::Broken)?;
        let refspecs = [
            format!("+refs/heads/{base}:refs/remotes/origin/{base}"),
            promotion_refspec(branch),
        ];
        let checkout = repo.to_path_buf();
        let (fetched, cleared) = tokio::join!(
            git.fetch(repo, &refspecs, true),
            tokio::task::spawn_blocking(move || remove_checkout(&checkout))
        );
        fetched.map_err(Refresh::from_remote)?;
        match cleared {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                return Err(Refresh::Broken(GitError {
                    kind: GitErrorKind::Other,
                    message: format!("cannot remove the files beside .git: {err}"),
                }));
            }
            Err(err) => {
                return Err(Refresh::Broken(GitError {
                    kind: GitErrorKind::Other,
                    message: format!("removing the files beside .git stopped: {err}"),
                }));
            }
        }
        let refs = git.refs(repo).await.map_err(Refresh::Broken)?;
        let fetched = Fetched::from_refs(&refs, base, branch).map_err(Refresh::Broken)?;
        git.point_head_at(repo, base)
            .await
            .map_err(Refresh::Broken)?;
        let keep = [
            format!("refs/heads/{base}"),
            format!("refs/remotes/origin/{base}"),
            format!("refs/remotes/origin/{branch}"),
        ];
        let stale: Vec<&str> = refs
            .keys()
            .map(String::as_str)
            .filter(|name| !keep.iter().any(|k| k == name))
            .collect();
        let set_base =
            (refs.get(&keep[0]) != Some(&fetched.base)).then_some((base, fetched.base.as_str()));
        git.update_refs(repo, set_base, &stale)
            .await
            .map_err(Refresh::Broken)?;
        if gc_due {
            git.gc(repo).await.map_err(Refresh::Broken)?;
        }
        Ok((fetched, gc_due))
    }

    /// The base and the promotion branch's remote head, fetched into a fresh clone.
    async fn promotion_branch_of_fresh_clone(
        &self,
        git: &Git,
        repo: &Path,
        branch: &str,
    ) -> Result<Fetched, GitError> {
        // With the base: a shallow fetch of a pattern that matches nothing fails.
        let base = &self.spec.base_branch;
        let refspecs = [
            format!("+refs/heads/{base}:refs/remotes/origin/{base}"),
            promotion_refspec(branch),
        ];
        git.fetch(repo, &refspecs, false).await?;
        Fetched::from_refs(&git.refs(repo).await?, base, branch)
    }

    /// Rewrites the markers of the fetched base's tree, commits and pushes from `repo`, a
    /// clone without work tree: the base's YAML blobs are read (`ls-tree`, `cat-file
    /// --batch`), the changed files written as new blobs and the commit made from a
    /// temporary index; `fetched.promotion` is the promotion branch's remote head, if it
    /// exists.
    async fn prepare_in(
        &self,
        git: &Git,
        repo: &Path,
        branch: &str,
        fetched: Fetched,
    ) -> Result<BranchState, GitError> {
        let record = self.record;
        let rewrite_started = std::time::Instant::now();
        let CommitRewrite {
            report: rewrite,
            changes,
            scan_ms,
        } = rewrite_commit(git, repo, &fetched.base, &self.key(), &record.revision)
            .await
            .map_err(|err| match err {
                RewriteError::Git(err) => err,
                RewriteError::Markers(err) => self.marker_error(err),
            })?;
        tracing::debug!(
            promotion = %record.id,
            scanned = rewrite.scanned,
            matched = rewrite.matched(),
            changed = rewrite.changed(),
            elapsed_ms = scan_ms,
            read_and_scan_ms = rewrite_started.elapsed().as_millis() as u64,
            "markers rewritten"
        );
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
        let contents: Vec<&[u8]> = changes.iter().map(|(_, text)| text.as_bytes()).collect();
        let oids = git.write_blobs(repo, &contents).await?;
        let changes: Vec<TreeFile> = changes
            .into_iter()
            .zip(oids)
            .map(|((file, _), oid)| TreeFile { oid, ..file })
            .collect();
        let made = git
            .commit_changes(
                repo,
                &fetched.base,
                &changes,
                &self.strategy.settings.author,
                &self.commit_message(&files),
            )
            .await?;
        git.update_refs(repo, Some((branch, &made.commit)), &[])
            .await?;

        if let Some(remote_sha) = &fetched.promotion {
            let theirs = git.commit_info(repo, remote_sha).await?;
            if made.tree == theirs.tree {
                return Ok(BranchState::Proposed {
                    pushed: false,
                    files,
                });
            }
            if let Some(by) = newer_promotion(&theirs.message, record) {
                return Ok(BranchState::Superseded { by });
            }
            git.push_with_lease(repo, branch, Some(remote_sha)).await?;
        } else {
            git.push_with_lease(repo, branch, None).await?;
        }
        Ok(BranchState::Proposed {
            pushed: true,
            files,
        })
    }

    fn marker_error(&self, err: TreeError) -> GitError {
        GitError {
            kind: GitErrorKind::Other,
            message: match err {
                TreeError::Marker { .. } => format!(
                    "cannot apply marker {} in {}: {err}",
                    self.key(),
                    self.where_()
                ),
                TreeError::Io { .. } => format!("rewriting markers: {err}"),
            },
        }
    }
}

/// What a fetch brought: the base branch's head, and the promotion branch's, if it
/// exists.
struct Fetched {
    base: String,
    promotion: Option<String>,
}

impl Fetched {
    fn from_refs(
        refs: &HashMap<String, String>,
        base: &str,
        branch: &str,
    ) -> Result<Self, GitError> {
        let base_ref = format!("refs/remotes/origin/{base}");
        let base = refs.get(&base_ref).cloned().ok_or_else(|| GitError {
            kind: GitErrorKind::Other,
            message: format!("git fetch left no {base_ref}"),
        })?;
        Ok(Self {
            base,
            promotion: refs.get(&format!("refs/remotes/origin/{branch}")).cloned(),
        })
    }
}

/// Removes everything in the clone at `repo` but `.git`, `.git/index`, and the scratch
/// directories of an attempt that did not end (`.git/promotion-*`, see [`Git`]):
/// the clone has no work tree (clones of earlier versions had one). Cheap when there is
/// nothing to remove.
fn remove_checkout(repo: &Path) -> std::io::Result<()> {
    let remove = |path: &Path, is_dir: bool| {
        if is_dir {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        }
    };
    for entry in std::fs::read_dir(repo)? {
        let entry = entry?;
        if entry.file_name() != ".git" {
            remove(&entry.path(), entry.file_type()?.is_dir())?;
        }
    }
    for entry in std::fs::read_dir(repo.join(".git"))? {
        let entry = entry?;
        let name = entry.file_name();
        // `PROMOTION_MSG`: the commit message file of earlier versions.
        if name == "index"
            || name == "PROMOTION_MSG"
            || name.to_string_lossy().starts_with("promotion-")
        {
            remove(&entry.path(), entry.file_type()?.is_dir())?;
        }
    }
    Ok(())
}

/// Fetches the promotion branch if it exists: a pattern, because a refspec naming a
/// missing branch fails the fetch. It may also match longer names (`…-prod-eu` for
/// `…-prod`); those refs are deleted at the next refresh.
fn promotion_refspec(branch: &str) -> String {
    format!("+refs/heads/{branch}*:refs/remotes/origin/{branch}*")
}

/// Why a cached clone could not be refreshed.
enum Refresh {
    /// The remote said no (credentials, missing repository or branch, network): the
    /// clone is fine, the attempt fails.
    Remote(GitError),
    /// The clone itself is broken: it is replaced by a fresh clone.
    Broken(GitError),
}

impl Refresh {
    /// A failed `fetch`: the remote's fault unless git could not say why
    /// (a corrupt object store, a stale lock file, a `.git/HEAD` that is no ref).
    fn from_remote(err: GitError) -> Self {
        match err.kind {
            GitErrorKind::Auth | GitErrorKind::NotFound | GitErrorKind::Transient => {
                Self::Remote(err)
            }
            GitErrorKind::Rejected | GitErrorKind::Other => Self::Broken(err),
        }
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
