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
        let mut command = Command::new("git");
        command
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().copied())
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let what = args.first().copied().unwrap_or("git");
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let mut child = command.spawn()?;
            if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
                use tokio::io::AsyncWriteExt;
                stdin.write_all(input.as_bytes()).await?;
            }
            child.wait_with_output().await
        })
        .await;
        tracing::debug!(
            command = what,
            repository = %self.url,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "git command finished"
        );
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
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = self.scrubber.scrub(stderr.trim());
        let kind = classify(&stderr);
        Err(GitError::new(
            kind,
            format!(
                "git {what} {} failed ({}): {}",
                self.url,
                output.status,
                failure_detail(&stderr)
            ),
        ))
    }

    /// Shallow, single-branch clone of `branch` into `dest` (which must not exist).
    pub async fn clone_branch(&self, branch: &str, dest: &Path) -> Result<(), GitError> {
        let dest_text = path_text(dest);
        let url = self.url.git_url();
        self.run(
            None,
            &[
                "clone",
                "--quiet",
                "--depth",
                "1",
                "--single-branch",
                "--no-tags",
                "--branch",
                branch,
                "--",
                &url,
                &dest_text,
            ],
        )
        .await
        .map(|_| ())
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

    /// Deletes the refs `names` (full names such as `refs/heads/x`), in one command.
    pub async fn delete_refs(&self, repo: &Path, names: &[&str]) -> Result<(), GitError> {
        if names.is_empty() {
            return Ok(());
        }
        let commands: String = names.iter().map(|n| format!("delete {n}\n")).collect();
        self.run_full(
            Some(repo),
            &["update-ref", "--no-deref", "--stdin"],
            &[],
            Some(&commands),
        )
        .await
        .map(|_| ())
    }

    /// Checks out `refs/remotes/origin/<base>` as local branch `base`, discarding every
    /// change of the index and work tree (like `git reset --hard`).
    pub async fn reset_to_base(&self, repo: &Path, base: &str) -> Result<(), GitError> {
        let start = format!("refs/remotes/origin/{base}");
        self.run(
            Some(repo),
            &[
                "checkout",
                "--quiet",
                "--force",
                "--no-track",
                "-B",
                base,
                &start,
            ],
        )
        .await
        .map(|_| ())
    }

    /// Removes untracked and ignored files and directories (`git clean -ffdx`).
    pub async fn clean(&self, repo: &Path) -> Result<(), GitError> {
        self.run(Some(repo), &["clean", "--quiet", "-ffdx"])
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

    /// The full message of commit `rev`.
    pub async fn message(&self, repo: &Path, rev: &str) -> Result<String, GitError> {
        self.run(Some(repo), &["log", "-1", "--format=%B", rev, "--"])
            .await
    }

    /// Stages `paths` (relative to the repository) and commits them on a new branch
    /// `branch` started at `HEAD`; returns the new commit id.
    pub async fn commit(
        &self,
        repo: &Path,
        branch: &str,
        paths: &[PathBuf],
        author: &Author,
        message: &str,
    ) -> Result<String, GitError> {
        // Plumbing rather than `checkout -B` and `commit`: both of those refresh the whole
        // index (a stat of every file), which is most of their time in a big checkout.
        let mut add: Vec<String> = vec!["add".into(), "--".into()];
        add.extend(paths.iter().map(|p| path_text(p)));
        let add_args: Vec<&str> = add.iter().map(String::as_str).collect();
        self.run(Some(repo), &add_args).await?;
        let tree = self.run(Some(repo), &["write-tree"]).await?;
        let tree = tree.trim();
        let message_file = repo.join(".git").join("PROMOTION_MSG");
        std::fs::write(&message_file, cleanup_message(message)).map_err(|e| {
            GitError::new(
                GitErrorKind::Other,
                format!("cannot write the commit message: {e}"),
            )
        })?;
        let message_path = path_text(&message_file);
        let identity = [
            ("GIT_AUTHOR_NAME", author.name.as_str()),
            ("GIT_AUTHOR_EMAIL", author.email.as_str()),
            ("GIT_COMMITTER_NAME", author.name.as_str()),
            ("GIT_COMMITTER_EMAIL", author.email.as_str()),
        ];
        let commit = self
            .run_with_env(
                Some(repo),
                &[
                    "commit-tree",
                    "--no-gpg-sign",
                    tree,
                    "-p",
                    "HEAD",
                    "-F",
                    &message_path,
                ],
                &identity,
            )
            .await?;
        let commit = commit.trim().to_string();
        let refname = format!("refs/heads/{branch}");
        self.run(Some(repo), &["update-ref", &refname, &commit])
            .await?;
        self.run(Some(repo), &["symbolic-ref", "HEAD", &refname])
            .await?;
        Ok(commit)
    }

    /// Pushes `HEAD` to `refs/heads/<branch>`, replacing it only if it still points to
    /// `expected` (`None`: only if it does not exist yet).
    pub async fn push_with_lease(
        &self,
        repo: &Path,
        branch: &str,
        expected: Option<&str>,
    ) -> Result<(), GitError> {
        let refname = format!("refs/heads/{branch}");
        let lease = format!("--force-with-lease={refname}:{}", expected.unwrap_or(""));
        let refspec = format!("HEAD:{refname}");
        self.run(
            Some(repo),
            &["push", "--quiet", "--no-verify", &lease, "origin", &refspec],
        )
        .await
        .map(|_| ())
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
