//! A real Gitea on loopback, for integration tests and the benchmark (feature `testing`).
//!
//! The binary is the one `scripts/ensure-test-binaries.sh gitea` builds from Gitea's Go
//! module: `$PIPELINE_GITEA_BIN` (with `$PIPELINE_GITEA_STATIC_ROOT`), else the default
//! cache directory. Gitea runs from a temporary directory with SQLite, offline, without
//! mailer, SSH, indexers or cron; an admin user and an access token are made with its CLI.
#![allow(clippy::missing_panics_doc)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

pub const ADMIN_USER: &str = "promoter";
pub const ADMIN_PASSWORD: &str = "correct-horse-battery-staple-42";

/// A running Gitea; killed when dropped.
pub struct Gitea {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    pub token: String,
    client: reqwest::Client,
}

/// Where the Gitea binary and its static files are; an error tells how to build them.
pub fn gitea_binary() -> Result<(PathBuf, PathBuf), String> {
    let hint = "run scripts/ensure-test-binaries.sh gitea (or set PIPELINE_GITEA_BIN)";
    if let Some(bin) = std::env::var_os("PIPELINE_GITEA_BIN") {
        let bin = PathBuf::from(bin);
        let root = std::env::var_os("PIPELINE_GITEA_STATIC_ROOT")
            .map(PathBuf::from)
            .or_else(|| bin.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        if bin.is_file() {
            return Ok((bin, root));
        }
        return Err(format!(
            "PIPELINE_GITEA_BIN={} does not exist: {hint}",
            bin.display()
        ));
    }
    let cache = std::env::var_os("PIPELINE_TOOLS_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| PathBuf::from(c).join("pipeline-controller/tools"))
        })
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/pipeline-controller/tools"))
        })
        .ok_or_else(|| format!("no HOME to find the tools cache: {hint}"))?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(&cache)
        .map_err(|e| {
            format!(
                "Gitea test binary not found ({}: {e}): {hint}",
                cache.display()
            )
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("gitea-"))
                && p.join("gitea").is_file()
        })
        .collect();
    found.sort();
    let home = found
        .pop()
        .ok_or_else(|| format!("Gitea test binary not found in {}: {hint}", cache.display()))?;
    Ok((home.join("gitea"), home))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Gitea {
    /// Starts Gitea and waits until its API answers.
    pub async fn start() -> Result<Gitea, String> {
        Self::start_with(false).await
    }

    /// Like [`Gitea::start`]; with `router_log`, [`Gitea::log`] also holds a line for every
    /// request Gitea served, with the time it took (`router: completed … in 12.3ms`).
    pub async fn start_with(router_log: bool) -> Result<Gitea, String> {
        let (bin, static_root) = gitea_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("gitea-test-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let work = dir.path();
        let port = free_port().map_err(|e| e.to_string())?;
        let base_url = format!("http://127.0.0.1:{port}");
        let w = work.display();
        let config = format!(
            r#"APP_NAME = pipeline-controller tests
RUN_MODE = prod
RUN_USER = {user}
WORK_PATH = {w}
I_AM_BEING_UNSAFE_RUNNING_AS_ROOT = true

[database]
DB_TYPE = sqlite3
PATH = {w}/gitea.db
SQLITE_JOURNAL_MODE = WAL

[repository]
ROOT = {w}/repositories
DEFAULT_BRANCH = main

[server]
PROTOCOL = http
HTTP_ADDR = 127.0.0.1
HTTP_PORT = {port}
ROOT_URL = {base_url}/
DISABLE_SSH = true
START_SSH_SERVER = false
OFFLINE_MODE = true
LFS_START_SERVER = false
STATIC_ROOT_PATH = {root}
APP_DATA_PATH = {w}/data

[security]
INSTALL_LOCK = true
SECRET_KEY = pipeline-controller-test-secret-key
INTERNAL_TOKEN = eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJuYmYiOjE3MDAwMDAwMDB9.pipelinecontrollertest
PASSWORD_HASH_ALGO = pbkdf2_hi

[service]
DISABLE_REGISTRATION = true
REQUIRE_SIGNIN_VIEW = false
ENABLE_NOTIFY_MAIL = false

[mailer]
ENABLED = false

[indexer]
REPO_INDEXER_ENABLED = false
ISSUE_INDEXER_TYPE = db

[cron]
ENABLED = false

[cron.update_checker]
ENABLED = false

[log]
MODE = console
LEVEL = warn
ROOT_PATH = {w}/log

[session]
PROVIDER = memory

[cache]
ADAPTER = memory

[queue]
TYPE = channel

[actions]
ENABLED = false

[other]
SHOW_FOOTER_VERSION = false
"#,
            user = std::env::var("USER").unwrap_or_else(|_| whoami()),
            root = static_root.display(),
        );
        let config = if router_log {
            format!(
                "{}\n[log.router-console]\nMODE = console\nLEVEL = info\n",
                config.replace("[log]\n", "[log]\nlogger.router.MODE = router-console\n")
            )
        } else {
            config
        };
        let ini = work.join("app.ini");
        std::fs::write(&ini, config).map_err(|e| e.to_string())?;
        let cli = |args: &[&str]| -> Result<String, String> {
            let out = Command::new(&bin)
                .arg("--config")
                .arg(&ini)
                .arg("--work-path")
                .arg(work)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "gitea {} failed: {}{}",
                    args.first().unwrap_or(&""),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        cli(&["migrate"])?;
        cli(&[
            "admin",
            "user",
            "create",
            "--admin",
            "--username",
            ADMIN_USER,
            "--password",
            ADMIN_PASSWORD,
            "--email",
            "promoter@example.com",
            "--must-change-password=false",
        ])?;
        let out = cli(&[
            "admin",
            "user",
            "generate-access-token",
            "--username",
            ADMIN_USER,
            "--token-name",
            "tests",
            "--scopes",
            "all",
            "--raw",
        ])?;
        // Gitea may print a warning (running as root) before or after it, as stdout and
        // stderr interleave: the token is the word that is all hex digits.
        let token = out
            .split_whitespace()
            .rfind(|t| t.len() >= 32 && t.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| format!("no token in gitea's answer: {out}"))?
            .to_string();
        let log = std::fs::File::create(work.join("web.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&ini)
            .arg("--work-path")
            .arg(work)
            .arg("web")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start gitea: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let mut gitea = Gitea {
            child,
            dir,
            port,
            base_url,
            token,
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = gitea
                .client
                .get(format!("{}/api/v1/version", gitea.base_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return Ok(gitea);
            }
            if let Ok(Some(status)) = gitea.child.try_wait() {
                return Err(format!("gitea exited ({status}): {}", gitea.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("gitea did not answer within 60 s: {}", gitea.log()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("web.log")).unwrap_or_default()
    }

    /// The web (and git) URL of `owner/repo`.
    pub fn repo_url(&self, repo: &str) -> String {
        format!("{}/{ADMIN_USER}/{repo}", self.base_url)
    }

    fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}/api/v1{path}", self.base_url))
            .header("Authorization", format!("token {}", self.token))
    }

    pub async fn get_json(&self, path: &str) -> Result<Value, String> {
        let response = self
            .api(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("GET {path}: {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("GET {path}: {e}: {text}"))
    }

    pub async fn get_text(&self, path: &str) -> Result<String, String> {
        let response = self
            .api(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("GET {path}: {status}: {text}"));
        }
        Ok(text)
    }

    /// Creates repository `name` (default branch `main`) holding `files`, pushed with the
    /// git CLI in one commit. `files` may be many: nothing goes through the API.
    pub async fn create_repo(
        &self,
        name: &str,
        files: &[(String, String)],
    ) -> Result<String, String> {
        let response = self
            .api(reqwest::Method::POST, "/user/repos")
            .json(&json!({"name": name, "auto_init": false, "default_branch": "main", "private": true}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!(
                "creating repository {name}: {}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            ));
        }
        let work = tempfile::tempdir().map_err(|e| e.to_string())?;
        let root = work.path();
        for (path, content) in files {
            let file = root.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&file, content).map_err(|e| e.to_string())?;
        }
        let url = self.repo_url(name);
        self.git(root, &["init", "--quiet", "-b", "main"])?;
        self.git(root, &["add", "--all"])?;
        self.git(root, &["commit", "--quiet", "-m", "initial content"])?;
        self.git(root, &["push", "--quiet", &url, "main"])?;
        Ok(url)
    }

    /// Runs git in `dir` as the admin (credentials through the environment).
    pub fn git(&self, dir: &Path, args: &[&str]) -> Result<String, String> {
        let basic = STANDARD.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"));
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_AUTHOR_NAME", "test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {basic}"),
            )
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Pull requests of `repo` in `state` (`open`, `closed`, `all`).
    pub async fn pulls(&self, repo: &str, state: &str) -> Result<Vec<Value>, String> {
        let value = self
            .get_json(&format!(
                "/repos/{ADMIN_USER}/{repo}/pulls?state={state}&limit=50"
            ))
            .await?;
        Ok(value.as_array().cloned().unwrap_or_default())
    }

    /// The unified diff of pull request `number`.
    pub async fn pull_diff(&self, repo: &str, number: u64) -> Result<String, String> {
        self.get_text(&format!("/repos/{ADMIN_USER}/{repo}/pulls/{number}.diff"))
            .await
    }

    /// A file's content at `reference` (branch, tag or commit).
    pub async fn file(&self, repo: &str, reference: &str, path: &str) -> Result<String, String> {
        self.get_text(&format!(
            "/repos/{ADMIN_USER}/{repo}/raw/{path}?ref={reference}"
        ))
        .await
    }

    /// Commits a new file `path` holding `content` to `branch` through the API (nothing is
    /// cloned); returns the new commit id.
    pub async fn commit_file(
        &self,
        repo: &str,
        branch: &str,
        path: &str,
        content: &str,
    ) -> Result<String, String> {
        let response = self
            .api(
                reqwest::Method::POST,
                &format!("/repos/{ADMIN_USER}/{repo}/contents/{path}"),
            )
            .json(&json!({
                "branch": branch,
                "content": STANDARD.encode(content),
                "message": format!("add {path}"),
            }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("committing {path}: {status}: {text}"));
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        value["commit"]["sha"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("committing {path}: no commit in {text}"))
    }

    /// A request to the API at `path` (`/user`, ...), authenticated as the admin with its
    /// password (`basic`) or its token; for measuring what authentication costs Gitea.
    pub fn request(&self, path: &str, password: bool) -> reqwest::RequestBuilder {
        let request = self.client.get(format!("{}/api/v1{path}", self.base_url));
        if password {
            request.basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        } else {
            request.header("Authorization", format!("token {}", self.token))
        }
    }

    /// The commit `branch` points to, if it exists.
    pub async fn branch_head(&self, repo: &str, branch: &str) -> Result<Option<String>, String> {
        match self
            .get_json(&format!("/repos/{ADMIN_USER}/{repo}/branches/{branch}"))
            .await
        {
            Ok(value) => Ok(value["commit"]["id"].as_str().map(str::to_string)),
            Err(e) if e.contains("404") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn whoami() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".to_string())
}

impl Drop for Gitea {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
