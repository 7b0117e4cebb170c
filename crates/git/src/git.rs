//! The `git` command line, run with credentials that never reach a URL, an argument list
//! or a message.
//!
//! Every command runs with an empty environment apart from `PATH`, a private `HOME`, no
//! system or global configuration, no terminal prompts and `LC_ALL=C`. HTTPS credentials
//! travel as an `Authorization: Basic` header set through `GIT_CONFIG_COUNT`/`KEY`/`VALUE`
//! environment variables, scoped to the repository's origin; SSH uses `GIT_SSH_COMMAND`
//! with the identity and `known_hosts` written to owner-only files of the workspace and
//! strict host key checking. Everything git prints is scrubbed before it is surfaced.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::process::Command;

use crate::credentials::{Credentials, Scrubber};
use crate::repo_url::{RepoUrl, Transport};

/// Longest a single git command may run.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a git command failed, classified for retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitErrorKind {
    /// Credentials refused.
    Auth,
    /// Repository or branch does not exist (or is hidden from these credentials).
    NotFound,
    /// A push lost a race: the remote branch moved.
    Rejected,
    /// Network trouble or a server error: worth retrying.
    Transient,
    /// Anything else.
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct GitError {
    pub kind: GitErrorKind,
    /// Scrubbed of credentials.
    pub message: String,
}

impl GitError {
    fn new(kind: GitErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(self.kind, GitErrorKind::Transient | GitErrorKind::Rejected)
    }
}

/// Classifies git's (C locale) error output.
fn classify(stderr: &str) -> GitErrorKind {
    let s = stderr.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| s.contains(n));
    if has(&[
        "stale info",
        "[rejected]",
        "non-fast-forward",
        "fetch first",
        "cannot lock ref",
        "failed to update ref",
    ]) {
        GitErrorKind::Rejected
    } else if has(&[
        "authentication failed",
        "could not read username",
        "could not read password",
        "permission denied",
        "host key verification failed",
        "the requested url returned error: 401",
        "the requested url returned error: 403",
        "access denied",
        "invalid username or password",
    ]) {
        GitErrorKind::Auth
    } else if has(&[
        "repository not found",
        "not found",
        "does not appear to be a git repository",
        "couldn't find remote ref",
        "remote branch",
        "the requested url returned error: 404",
    ]) {
        GitErrorKind::NotFound
    } else if has(&[
        "could not resolve host",
        "connection refused",
        "connection timed out",
        "timed out",
        "connection reset",
        "failed to connect",
        "the remote end hung up",
        "early eof",
        "rpc failed",
        "the requested url returned error: 5",
        "the requested url returned error: 429",
        "temporary failure",
        "unable to access",
    ]) {
        GitErrorKind::Transient
    } else {
        GitErrorKind::Other
    }
}

/// Who commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    pub name: String,
    pub email: String,
}

/// Runs git for one repository with one set of credentials; owns a private directory
/// (home, SSH key files) that is removed when dropped.
pub struct Git {
    env: Vec<(String, String)>,
    scrubber: Scrubber,
    url: RepoUrl,
    timeout: Duration,
    _private: tempfile::TempDir,
}

impl std::fmt::Debug for Git {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Git")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    if !bytes.ends_with(b"\n") {
        file.write_all(b"\n")?;
    }
    Ok(())
}

/// Quotes `text` for the POSIX shell git runs `GIT_SSH_COMMAND` with.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Git {
    /// Prepares git for `url` with `credentials`; the private directory is made under
    /// `work_dir`.
    pub fn new(
        url: &RepoUrl,
        credentials: &Credentials,
        work_dir: &Path,
    ) -> Result<Self, GitError> {
        let private = tempfile::Builder::new()
            .prefix("git-home-")
            .tempdir_in(work_dir)
            .map_err(|e| {
                GitError::new(
                    GitErrorKind::Other,
                    format!(
                        "cannot create a private directory in {}: {e}",
                        work_dir.display()
                    ),
                )
            })?;
        let home = private.path().to_path_buf();
        let mut env: Vec<(String, String)> = vec![
            ("HOME".into(), path_text(&home)),
            ("XDG_CONFIG_HOME".into(), path_text(&home)),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
            ("GIT_TERMINAL_PROMPT".into(), "0".into()),
            ("GIT_ASKPASS".into(), "true".into()),
            ("SSH_ASKPASS".into(), "true".into()),
            ("GCM_INTERACTIVE".into(), "never".into()),
            ("LC_ALL".into(), "C".into()),
        ];
        if let Some(path) = std::env::var_os("PATH") {
            env.push(("PATH".into(), path.to_string_lossy().into_owned()));
        }
        let mut config: Vec<(String, String)> = vec![
            // No credential helper may answer (or store) anything.
            ("credential.helper".into(), String::new()),
            ("init.defaultBranch".into(), "main".into()),
            ("advice.detachedHead".into(), "false".into()),
            ("gc.auto".into(), "0".into()),
            ("maintenance.auto".into(), "false".into()),
            // No reflogs: objects of old promotion commits become unreachable, and the
            // periodic `gc` of a cached clone can drop them.
            ("core.logAllRefUpdates".into(), "false".into()),
            ("core.hooksPath".into(), "/dev/null".into()),
            ("protocol.file.allow".into(), "never".into()),
        ];
        match url.transport {
            Transport::Http => {
                if let Some((user, password)) = credentials.https_basic() {
                    let value = STANDARD.encode(format!("{user}:{password}").as_bytes());
                    config.push((
                        format!("http.{}.extraHeader", url.credential_scope()),
                        format!("Authorization: Basic {value}"),
                    ));
                }
            }
            Transport::Ssh => {
                let identity = credentials.identity.as_ref().ok_or_else(|| {
                    GitError::new(
                        GitErrorKind::Auth,
                        "an SSH repository URL needs an \"identity\" key (private key) in the secret",
                    )
                })?;
                let known_hosts = credentials.known_hosts.as_ref().ok_or_else(|| {
                    GitError::new(
                        GitErrorKind::Auth,
                        "an SSH repository URL needs a \"known_hosts\" key in the secret (host keys are always checked)",
                    )
                })?;
                let identity_path = home.join("identity");
                let known_hosts_path = home.join("known_hosts");
                write_private(&identity_path, identity.expose())
                    .and_then(|()| write_private(&known_hosts_path, known_hosts.expose()))
                    .map_err(|e| {
                        GitError::new(
                            GitErrorKind::Other,
                            format!("cannot write SSH key files: {e}"),
                        )
                    })?;
                env.push((
                    "GIT_SSH_COMMAND".into(),
                    format!(
                        "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=30",
                        shell_quote(&path_text(&identity_path)),
                        shell_quote(&path_text(&known_hosts_path)),
                    ),
                ));
                env.push(("GIT_SSH_VARIANT".into(), "ssh".into()));
            }
        }
        env.push(("GIT_CONFIG_COUNT".into(), config.len().to_string()));
        for (i, (key, value)) in config.into_iter().enumerate() {
            env.push((format!("GIT_CONFIG_KEY_{i}"), key));
            env.push((format!("GIT_CONFIG_VALUE_{i}"), value));
        }
        Ok(Self {
            env,
            scrubber: credentials.scrubber(),
            url: url.clone(),
            timeout: GIT_TIMEOUT,
            _private: private,
        })
    }

    pub fn scrubber(&self) -> &Scrubber {
        &self.scrubber
    }

    /// Runs `git args` in `dir`; returns stdout. Failures carry scrubbed stderr.
    pub async fn run(&self, dir: Option<&Path>, args: &[&str]) -> Result<String, GitError> {
        self.run_with_env(dir, args, &[]).await
    }

    async fn run_with_env(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Result<String, GitError> {
        self.run_full(dir, args, extra_env, None).await
    }

    async fn run_full(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        extra_env: &[(&str, &str)],
        input: Option<&str>,
    ) -> Result<String, GitError> {
        let out = self
            .run_raw(dir, args, extra_env, input.map(str::as_bytes))
            .await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// A `git` command with this repository's environment, output piped.
    fn command(&self, dir: Option<&Path>, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new("git");
        command
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        command
    }

    fn log_finished(&self, what: &str, started: std::time::Instant) {
        tracing::debug!(
            command = what,
            repository = %self.url,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "git command finished"
        );
    }

    /// The error of a command that exited with `status`, from its (scrubbed) stderr.
    fn failed(&self, what: &str, status: std::process::ExitStatus, stderr: &[u8]) -> GitError {
        let stderr = String::from_utf8_lossy(stderr);
        let stderr = self.scrubber.scrub(stderr.trim());
        let kind = classify(&stderr);
        GitError::new(
            kind,
            format!(
                "git {what} {} failed ({status}): {}",
                self.url,
                failure_detail(&stderr)
            ),
        )
    }

    /// Runs `git args` in `dir` with `input` on its stdin (written while the output is
    /// read, so neither side can block the other); returns stdout as bytes.
    async fn run_raw(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        extra_env: &[(&str, &str)],
        input: Option<&[u8]>,
    ) -> Result<Vec<u8>, GitError> {
        let mut command = self.command(dir, args, extra_env);
        command.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let what = args.first().copied().unwrap_or("git");
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let mut child = command.spawn()?;
            let stdin = child.stdin.take();
            let write = async move {
                if let (Some(input), Some(mut stdin)) = (input, stdin) {
                    use tokio::io::AsyncWriteExt;
                    // A command that stops reading early fails on its own; its exit
                    // status and stderr say why.
                    let _ = stdin.write_all(input).await;
                }
            };
            let ((), output) = tokio::join!(write, child.wait_with_output());
            output
        })
        .await;
        self.log_finished(what, started);
        let output = match result {
            Ok(Ok(output)) => output,
            Ok(Err(err)) => {
                return Err(GitError::new(
                    GitErrorKind::Other,
                    format!("cannot run git: {err}"),
                ));
            }
            Err(_) => {
                return Err(GitError::new(
                    GitErrorKind::Transient,
                    format!("git {what} timed out after {}s", self.timeout.as_secs()),
                ));
            }
        };
        if output.status.success() {
            return Ok(output.stdout);
        }
        Err(self.failed(what, output.status, &output.stderr))
    }

    /// Shallow, single-branch clone of `branch` into `dest` (which must not exist).
    pub async fn clone_branch(&self, branch: &str, dest: &Path) -> Result<(), GitError> {
        self.clone_into(branch, dest, true).await
    }

    /// Like [`Git::clone_branch`], without checking any file out: `dest` holds only `.git`
    /// (objects, refs, `HEAD` naming `branch`) and no index.
    pub async fn clone_branch_no_checkout(
        &self,
        branch: &str,
        dest: &Path,
    ) -> Result<(), GitError> {
        self.clone_into(branch, dest, false).await
    }

    async fn clone_into(&self, branch: &str, dest: &Path, checkout: bool) -> Result<(), GitError> {
        let dest_text = path_text(dest);
        let url = self.url.git_url();
        let mut args = vec![
            "clone",
            "--quiet",
            "--depth",
            "1",
            "--single-branch",
            "--no-tags",
        ];
        if !checkout {
            args.push("--no-checkout");
        }
        args.extend(["--branch", branch, "--", &url, &dest_text]);
        self.run(None, &args).await.map(|_| ())
    }

    /// The commit `refs/heads/<branch>` points to on `origin`, if the branch exists.
    pub async fn remote_branch(
        &self,
        repo: &Path,
        branch: &str,
    ) -> Result<Option<String>, GitError> {
        let refname = format!("refs/heads/{branch}");
        let out = self
            .run(Some(repo), &["ls-remote", "--heads", "origin", &refname])
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(_, name)| *name == refname)
            .map(|(sha, _)| sha.to_string()))
    }

    /// Fetches the tip of `branch` (depth 1) and returns its commit id.
    pub async fn fetch_branch(&self, repo: &Path, branch: &str) -> Result<String, GitError> {
        let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        self.fetch(repo, &[refspec], false).await?;
        self.rev_parse(repo, &format!("refs/remotes/origin/{branch}"))
            .await
    }

    /// Fetches `refspecs` from `origin` with depth 1 and no tags, in one request; only
    /// objects the clone lacks are transferred. With `prune`, remote-tracking refs the
    /// refspecs cover that no longer exist on `origin` are deleted. A refspec with a `*`
    /// that matches nothing is no error.
    pub async fn fetch(
        &self,
        repo: &Path,
        refspecs: &[String],
        prune: bool,
    ) -> Result<(), GitError> {
        let mut args = vec!["fetch", "--quiet", "--depth", "1", "--no-tags"];
        if prune {
            args.push("--prune");
        }
        args.push("origin");
        args.extend(refspecs.iter().map(String::as_str));
        self.run(Some(repo), &args).await.map(|_| ())
    }

    /// Every ref of the repository: full name to commit id.
    pub async fn refs(&self, repo: &Path) -> Result<HashMap<String, String>, GitError> {
        let out = self
            .run(
                Some(repo),
                &["for-each-ref", "--format=%(objectname) %(refname)"],
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(sha, name)| (name.to_string(), sha.to_string()))
            .collect())
    }

    /// Points `refs/heads/<branch>` at `commit` (when given) and deletes the refs `delete`
    /// (full names such as `refs/heads/x`), in one command and one transaction.
    pub async fn update_refs(
        &self,
        repo: &Path,
        set: Option<(&str, &str)>,
        delete: &[&str],
    ) -> Result<(), GitError> {
        let mut commands = String::new();
        if let Some((branch, commit)) = set {
            commands.push_str(&format!("update refs/heads/{branch} {commit}\n"));
        }
        for name in delete {
            commands.push_str(&format!("delete {name}\n"));
        }
        if commands.is_empty() {
            return Ok(());
        }
        self.run_full(
            Some(repo),
            &["update-ref", "--no-deref", "--stdin"],
            &[],
            Some(&commands),
        )
        .await
        .map(|_| ())
    }

    /// Makes `HEAD` name `refs/heads/<branch>`, unless it already does.
    pub async fn point_head_at(&self, repo: &Path, branch: &str) -> Result<(), GitError> {
        let refname = format!("refs/heads/{branch}");
        // `.git/HEAD` read directly: one process less on every use of a cached clone.
        let head = std::fs::read_to_string(repo.join(".git").join("HEAD")).unwrap_or_default();
        if head.trim_end().strip_prefix("ref: ") == Some(refname.as_str()) {
            return Ok(());
        }
        self.run(Some(repo), &["symbolic-ref", "HEAD", &refname])
            .await
            .map(|_| ())
    }

    /// Drops unreachable objects and repacks (`git gc --prune=now`).
    pub async fn gc(&self, repo: &Path) -> Result<(), GitError> {
        self.run(Some(repo), &["gc", "--quiet", "--prune=now"])
            .await
            .map(|_| ())
    }

    /// Checks that every object reachable from the refs is present
    /// (`git fsck --connectivity-only`).
    pub async fn fsck(&self, repo: &Path) -> Result<(), GitError> {
        self.run(
            Some(repo),
            &[
                "fsck",
                "--connectivity-only",
                "--no-progress",
                "--no-dangling",
            ],
        )
        .await
        .map(|_| ())
    }

    pub async fn rev_parse(&self, repo: &Path, rev: &str) -> Result<String, GitError> {
        Ok(self
            .run(Some(repo), &["rev-parse", "--verify", "--quiet", rev])
            .await?
            .trim()
            .to_string())
    }

    /// The tree and the full message of commit `rev` (`git cat-file commit`).
    pub async fn commit_info(&self, repo: &Path, rev: &str) -> Result<CommitInfo, GitError> {
        let raw = self.run(Some(repo), &["cat-file", "commit", rev]).await?;
        let (headers, message) = raw.split_once("\n\n").unwrap_or((raw.as_str(), ""));
        let tree = headers
            .lines()
            .find_map(|l| l.strip_prefix("tree "))
            .ok_or_else(|| {
                GitError::new(
                    GitErrorKind::Other,
                    format!("git cat-file {}: commit {rev} has no tree", self.url),
                )
            })?;
        Ok(CommitInfo {
            tree: tree.trim().to_string(),
            message: message.to_string(),
        })
    }

    /// The regular files of the tree of `commit`, recursively (`git ls-tree -r`), in the
    /// tree's order; symbolic links and submodules are left out.
    pub async fn regular_files(
        &self,
        repo: &Path,
        commit: &str,
    ) -> Result<Vec<TreeFile>, GitError> {
        use std::os::unix::ffi::OsStrExt;
        let out = self
            .run_raw(
                Some(repo),
                &["ls-tree", "-r", "-z", "--full-tree", commit],
                &[],
                None,
            )
            .await?;
        let mut files = Vec::new();
        for record in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            // <mode> SP <type> SP <object> TAB <path>
            let parsed = record.iter().position(|b| *b == b'\t').and_then(|tab| {
                let meta = std::str::from_utf8(&record[..tab]).ok()?;
                let mut parts = meta.split(' ');
                let (mode, kind, oid) = (parts.next()?, parts.next()?, parts.next()?);
                Some((mode, kind, oid, &record[tab + 1..]))
            });
            let Some((mode, kind, oid, path)) = parsed else {
                return Err(GitError::new(
                    GitErrorKind::Other,
                    format!("git ls-tree {}: unexpected output", self.url),
                ));
            };
            if kind != "blob" || !(mode == "100644" || mode == "100755") {
                continue;
            }
            files.push(TreeFile {
                mode: mode.to_string(),
                oid: oid.to_string(),
                path: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
            });
        }
        Ok(files)
    }

    /// Starts one `git cat-file --batch` that reads the blobs `oids`, in that order.
    pub fn read_blobs(&self, repo: &Path, oids: &[&str]) -> Result<BlobReader<'_>, GitError> {
        let mut command = self.command(Some(repo), &["cat-file", "--batch"], &[]);
        command.stdin(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| GitError::new(GitErrorKind::Other, format!("cannot run git: {e}")))?;
        let input: Vec<u8> = oids
            .iter()
            .flat_map(|oid| oid.bytes().chain(std::iter::once(b'\n')))
            .collect();
        let stdin = child.stdin.take();
        // Written while the blobs are read, so neither side can block the other.
        let writer = tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                use tokio::io::AsyncWriteExt;
                let _ = stdin.write_all(&input).await;
            }
        });
        let stdout = child.stdout.take().map(tokio::io::BufReader::new);
        Ok(BlobReader {
            git: self,
            child,
            stdout,
            writer,
            remaining: oids.len(),
            started: std::time::Instant::now(),
            deadline: tokio::time::Instant::now() + self.timeout,
        })
    }

    /// Writes `contents` as blobs (`git hash-object -w --no-filters`, byte for byte: no
    /// line-ending or other conversion) with one command; returns their ids, in order.
    pub async fn write_blobs(
        &self,
        repo: &Path,
        contents: &[&[u8]],
    ) -> Result<Vec<String>, GitError> {
        if contents.is_empty() {
            return Ok(Vec::new());
        }
        let staging = scratch_dir(repo, "promotion-blobs-")?;
        let mut paths = String::new();
        for (i, content) in contents.iter().enumerate() {
            let path = staging.path().join(i.to_string());
            std::fs::write(&path, content).map_err(|e| {
                GitError::new(
                    GitErrorKind::Other,
                    format!("cannot write {}: {e}", path.display()),
                )
            })?;
            paths.push_str(&path_text(&path));
            paths.push('\n');
        }
        let out = self
            .run_full(
                Some(repo),
                &["hash-object", "-w", "--no-filters", "--stdin-paths"],
                &[],
                Some(&paths),
            )
            .await?;
        let oids: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
        if oids.len() != contents.len() {
            return Err(GitError::new(
                GitErrorKind::Other,
                format!(
                    "git hash-object {}: {} object id(s) for {} file(s)",
                    self.url,
                    oids.len(),
                    contents.len()
                ),
            ));
        }
        Ok(oids)
    }

    /// Commits the tree of `parent` with the files `changes` replaced (their mode and new
    /// blob), as `author`, with `parent` as the only parent, touching no ref, no index of
    /// the repository and no work tree: a temporary index (`read-tree`, `update-index
    /// --index-info`, `write-tree`), then `commit-tree`. Returns the new tree and commit.
    pub async fn commit_changes(
        &self,
        repo: &Path,
        parent: &str,
        changes: &[TreeFile],
        author: &Author,
        message: &str,
    ) -> Result<NewCommit, GitError> {
        use std::os::unix::ffi::OsStrExt;
        let scratch = scratch_dir(repo, "promotion-index-")?;
        let index = path_text(&scratch.path().join("index"));
        let index_env = [("GIT_INDEX_FILE", index.as_str())];
        self.run_with_env(Some(repo), &["read-tree", parent], &index_env)
            .await?;
        let mut info: Vec<u8> = Vec::new();
        for file in changes {
            info.extend_from_slice(format!("{} {}\t", file.mode, file.oid).as_bytes());
            info.extend_from_slice(file.path.as_os_str().as_bytes());
            info.push(0);
        }
        self.run_raw(
            Some(repo),
            &["update-index", "-z", "--index-info"],
            &index_env,
            Some(&info),
        )
        .await?;
        let tree = self
            .run_with_env(Some(repo), &["write-tree"], &index_env)
            .await?
            .trim()
            .to_string();
        drop(scratch);
        let identity = [
            ("GIT_AUTHOR_NAME", author.name.as_str()),
            ("GIT_AUTHOR_EMAIL", author.email.as_str()),
            ("GIT_COMMITTER_NAME", author.name.as_str()),
            ("GIT_COMMITTER_EMAIL", author.email.as_str()),
        ];
        let message = cleanup_message(message);
        let commit = self
            .run_raw(
                Some(repo),
                &["commit-tree", "--no-gpg-sign", &tree, "-p", parent],
                &identity,
                Some(message.as_bytes()),
            )
            .await?;
        Ok(NewCommit {
            tree,
            commit: String::from_utf8_lossy(&commit).trim().to_string(),
        })
    }

    /// Pushes the local `refs/heads/<branch>` to `refs/heads/<branch>` on `origin`,
    /// replacing it only if it still points to `expected` (`None`: only if it does not
    /// exist yet).
    pub async fn push_with_lease(
        &self,
        repo: &Path,
        branch: &str,
        expected: Option<&str>,
    ) -> Result<(), GitError> {
        let refname = format!("refs/heads/{branch}");
        let lease = format!("--force-with-lease={refname}:{}", expected.unwrap_or(""));
        let refspec = format!("{refname}:{refname}");
        self.run(
            Some(repo),
            &["push", "--quiet", "--no-verify", &lease, "origin", &refspec],
        )
        .await
        .map(|_| ())
    }
}

/// A private directory in `repo`'s `.git` for temporary files of one command, removed when
/// dropped.
fn scratch_dir(repo: &Path, prefix: &str) -> Result<tempfile::TempDir, GitError> {
    let git_dir = repo.join(".git");
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&git_dir)
        .map_err(|e| {
            GitError::new(
                GitErrorKind::Other,
                format!("cannot create a directory in {}: {e}", git_dir.display()),
            )
        })
}

/// A commit's tree and message ([`Git::commit_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub tree: String,
    pub message: String,
}

/// What [`Git::commit_changes`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCommit {
    pub tree: String,
    pub commit: String,
}

/// A regular file of a tree ([`Git::regular_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// `100644` or `100755`.
    pub mode: String,
    pub oid: String,
    /// Relative to the tree's root.
    pub path: PathBuf,
}

/// Blobs from one running `git cat-file --batch` ([`Git::read_blobs`]).
pub struct BlobReader<'a> {
    git: &'a Git,
    child: tokio::process::Child,
    stdout: Option<tokio::io::BufReader<tokio::process::ChildStdout>>,
    writer: tokio::task::JoinHandle<()>,
    remaining: usize,
    started: std::time::Instant,
    deadline: tokio::time::Instant,
}

impl BlobReader<'_> {
    /// An error of the batch; `git …` so that the strategy checks the clone (fsck).
    fn error(&self, detail: impl std::fmt::Display) -> GitError {
        GitError::new(
            GitErrorKind::Other,
            format!("git cat-file {} failed: {detail}", self.git.url),
        )
    }

    fn timed_out(&self) -> GitError {
        GitError::new(
            GitErrorKind::Transient,
            format!(
                "git cat-file timed out after {}s",
                self.git.timeout.as_secs()
            ),
        )
    }

    /// The next blob's content; `None` after the last one.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, GitError> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        if self.remaining == 0 {
            return Ok(None);
        }
        let Some(stdout) = self.stdout.as_mut() else {
            return Err(self.error("no output"));
        };
        let read = tokio::time::timeout_at(self.deadline, async {
            let mut header = String::new();
            stdout.read_line(&mut header).await?;
            // <oid> SP blob SP <size> LF, or <oid> SP missing LF
            let mut parts = header.split_whitespace();
            let (oid, kind, size) = (parts.next(), parts.next(), parts.next());
            let size = match (kind, size.and_then(|s| s.parse::<usize>().ok())) {
                (Some("blob"), Some(size)) => size,
                _ if header.is_empty() => {
                    return Ok(Err("the output ended early".to_string()));
                }
                _ => {
                    return Ok(Err(format!(
                        "object {} is not a readable blob ({})",
                        oid.unwrap_or("?"),
                        header.trim()
                    )));
                }
            };
            // The content and its terminating LF.
            let mut content = vec![0; size + 1];
            stdout.read_exact(&mut content).await?;
            content.truncate(size);
            Ok::<_, std::io::Error>(Ok(content))
        })
        .await;
        match read {
            Ok(Ok(Ok(content))) => {
                self.remaining -= 1;
                Ok(Some(content))
            }
            Ok(Ok(Err(detail))) => Err(self.error(detail)),
            Ok(Err(err)) => Err(self.error(err)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// Waits for `git cat-file` to exit, after every blob was read.
    pub async fn finish(mut self) -> Result<(), GitError> {
        use tokio::io::AsyncReadExt;
        let _ = (&mut self.writer).await;
        drop(self.stdout.take());
        let mut stderr = Vec::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_end(&mut stderr).await;
        }
        let status = tokio::time::timeout_at(self.deadline, self.child.wait()).await;
        self.git.log_finished("cat-file", self.started);
        match status {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(self.git.failed("cat-file", status, &stderr)),
            Ok(Err(err)) => Err(self.error(err)),
            Err(_) => Err(self.timed_out()),
        }
    }
}

impl Drop for BlobReader<'_> {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// A commit message as `git commit --cleanup=whitespace` leaves it: no trailing
/// whitespace, no leading or trailing blank lines, runs of blank lines collapsed, one final
/// newline.
fn cleanup_message(message: &str) -> String {
    let mut out = String::new();
    let mut blank = false;
    for line in message.lines().map(str::trim_end) {
        if line.is_empty() {
            blank = !out.is_empty();
            continue;
        }
        if blank {
            out.push('\n');
            blank = false;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The lines of git's stderr that say what went wrong. ssh can print a long banner (a
/// changed host key) before the one line that matters, so decisive lines (`fatal:`,
/// `error:`, host key and permission failures) win; otherwise the end of the output.
fn failure_detail(stderr: &str) -> String {
    const MAX: usize = 600;
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim().trim_matches('@').trim())
        .filter(|l| !l.is_empty() && !l.starts_with("hint:"))
        .collect();
    let decisive: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.starts_with("fatal:")
                || lower.starts_with("error:")
                || lower.contains("host identification")
                || (lower.contains("host key")
                    // ssh's advice names a temporary file of ours; it helps nobody.
                    && !lower.starts_with("add correct host key")
                    && !lower.starts_with("it is also possible"))
                || lower.contains("permission denied")
        })
        .collect();
    if !decisive.is_empty() {
        return truncate(&decisive.join(" / "), MAX);
    }
    let mut tail: Vec<&str> = Vec::new();
    let mut length = 0;
    for line in lines.iter().rev() {
        if length + line.len() > MAX && !tail.is_empty() {
            break;
        }
        length += line.len() + 3;
        tail.push(line);
    }
    tail.reverse();
    truncate(&tail.join(" / "), MAX)
}

pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod failure_detail_tests {
    use super::failure_detail;

    #[test]
    fn decisive_lines_survive_a_long_ssh_banner() {
        let mut stderr = String::from(
            "@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n",
        );
        for _ in 0..40 {
            stderr.push_str("IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n");
        }
        stderr.push_str(
            "Host key verification failed.\nfatal: Could not read from remote repository.\n",
        );
        let detail = failure_detail(&stderr);
        assert_eq!(
            detail,
            "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! / Host key verification failed. / fatal: Could not read from remote repository."
        );
    }

    #[test]
    fn otherwise_the_end_of_the_output() {
        let mut stderr = String::new();
        for i in 0..100 {
            stderr.push_str(&format!("line {i}\n"));
        }
        let detail = failure_detail(&stderr);
        assert!(detail.ends_with("line 99"), "{detail}");
        assert!(detail.len() <= 610, "{}", detail.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_git_errors() {
        assert_eq!(
            classify("! [rejected] HEAD -> x (stale info)"),
            GitErrorKind::Rejected
        );
        assert_eq!(
            classify("fatal: Authentication failed for 'https://h/o/r'"),
            GitErrorKind::Auth
        );
        assert_eq!(
            classify("fatal: could not read Username for 'https://h': terminal prompts disabled"),
            GitErrorKind::Auth
        );
        assert_eq!(
            classify("remote: Repository not found.\nfatal: repository 'x' not found"),
            GitErrorKind::NotFound
        );
        assert_eq!(
            classify("fatal: unable to access 'https://h/': Could not resolve host: h"),
            GitErrorKind::Transient
        );
        assert_eq!(
            classify("fatal: Remote branch nope not found in upstream origin"),
            GitErrorKind::NotFound
        );
    }

    #[test]
    fn cleans_commit_messages_up() {
        assert_eq!(
            cleanup_message("\n\nTitle  \n\n\n\nbody \n  indented\n\nTrailer: x\n\n"),
            "Title\n\nbody\n  indented\n\nTrailer: x\n"
        );
        assert_eq!(cleanup_message("#1 title"), "#1 title\n");
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
