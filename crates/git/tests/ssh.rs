//! Git over SSH for real: an OpenSSH `sshd` on loopback (own host key, own
//! `authorized_keys`, public keys only) serving a bare repository, and the pull-request
//! strategy reading `identity` and `known_hosts` from its Secret as Flux's
//! `GitRepository` secrets hold them. Plain sshd has no forge API, so the pull request
//! itself goes to a small Gitea-shaped HTTP double (`api_overrides`); everything git does
//! — clone, `ls-remote`, fetch, push — goes over SSH.
//!
//! Checks the branch the strategy pushes, that a wrong identity and a host key that does
//! not match `known_hosts` (or is not in it) fail with clear errors, and that no key
//! material reaches an error, a log line, a command line or a process environment.
//!
//! Needs `/usr/sbin/sshd` (`apt-get install openssh-server`; `scripts/test.sh` installs it).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{captured_logs, git, logs_text, run};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use pipeline_core::pipeline::parse_pipeline_spec;
use pipeline_core::testing::MemoryCatalog;
use pipeline_core::{
    Pipeline, PipelineRef, PromotionContext, PromotionRecord, PromotionStrategy, SecretBytes,
    StrategyError, StrategyOutcome, Trigger,
};
use pipeline_git::credentials::Credentials;
use pipeline_git::git::{Git, GitErrorKind};
use pipeline_git::repo_url::RepoUrl;
use pipeline_git::{PullRequestSettings, PullRequestStrategy, promotion_branch};
use serde_json::{Value, json};

const SSHD: &str = "/usr/sbin/sshd";
const TOKEN: &str = "forge-api-token-0123456789abcdef";
const BRANCH: &str = "promotion-flux-system-podinfo-prod";

const PROD: &str = "apiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\nmetadata:\n  name: podinfo\n  namespace: podinfo-prod\nspec:\n  chart:\n    spec:\n      chart: podinfo\n      version: \"6.0.0\" # {\"$promotion\": \"flux-system:podinfo:prod\"}\n  values:\n    image:\n      tag: 6.0.0 # {\"$promotion\": \"flux-system:podinfo:prod\"}\n    replicas: 2 # not a marker\n";
const STAGING: &str = "spec:\n  chart:\n    spec:\n      version: \"6.5.1\" # {\"$promotion\": \"flux-system:podinfo:staging\"}\n";

// ---------------------------------------------------------------------------------------
// Processes and files

/// An ed25519 key pair made with `ssh-keygen -t ed25519 -N ''`.
struct KeyPair {
    /// The private key file's text (OpenSSH format).
    private: String,
    /// `ssh-ed25519 AAAA… comment`
    public: String,
    /// `SHA256:…`
    fingerprint: String,
}

impl KeyPair {
    fn generate(dir: &Path, name: &str) -> KeyPair {
        let path = dir.join(name);
        let path_text = path.to_str().unwrap();
        run(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path_text],
            None,
        );
        let fingerprint = run("ssh-keygen", &["-l", "-f", path_text], None)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        KeyPair {
            private: std::fs::read_to_string(&path).unwrap(),
            public: std::fs::read_to_string(path.with_extension("pub"))
                .unwrap()
                .trim()
                .to_string(),
            fingerprint,
        }
    }

    /// Every piece of the private key that must never be shown: the base64 body lines.
    fn material(&self) -> Vec<String> {
        let lines: Vec<String> = self
            .private
            .lines()
            .filter(|l| !l.starts_with("-----") && l.trim().len() >= 8)
            .map(|l| l.trim().to_string())
            .collect();
        assert!(!lines.is_empty(), "no key body in {}", self.private.len());
        lines
    }
}

/// Asserts `text` quotes none of `keys`' private material.
fn assert_no_key_material(what: &str, text: &str, keys: &[&KeyPair]) {
    assert!(
        !text.contains("PRIVATE KEY"),
        "{what} quotes a private key header"
    );
    for key in keys {
        for line in key.material() {
            assert!(!text.contains(&line), "{what} quotes private key material");
        }
    }
}

fn current_user() -> String {
    run("id", &["-un"], None).trim().to_string()
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A real OpenSSH server on 127.0.0.1; killed when dropped.
struct Sshd {
    child: Child,
    /// Config, host key, `authorized_keys`, pid file; removed when dropped.
    _dir: tempfile::TempDir,
    port: u16,
    /// `ssh-ed25519 AAAA…` of the server's host key.
    host_key: String,
    user: String,
    log: Arc<Mutex<String>>,
}

impl Sshd {
    /// Starts sshd accepting exactly `authorized` (a public key line) for the current user.
    fn start(authorized: &str) -> Sshd {
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} not found: these tests need OpenSSH's server \
             (apt-get install openssh-server; scripts/test.sh installs it)"
        );
        let dir = tempfile::Builder::new()
            .prefix("sshd-test-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        run(
            "ssh-keygen",
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "test-host",
                "-f",
                d.join("host_ed25519").to_str().unwrap(),
            ],
            None,
        );
        let host_key = std::fs::read_to_string(d.join("host_ed25519.pub")).unwrap();
        let host_key = host_key.split_whitespace().take(2).collect::<Vec<_>>();
        let host_key = host_key.join(" ");
        std::fs::write(d.join("authorized_keys"), format!("{authorized}\n")).unwrap();
        let user = current_user();
        let root = running_as_root();
        if root {
            // sshd started as root needs its privilege separation directory, which the
            // package's systemd unit would otherwise create.
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let config = format!(
            "ListenAddress 127.0.0.1\n\
             HostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             StrictModes no\n\
             UsePAM no\n\
             UseDNS no\n\
             PrintMotd no\n\
             AllowUsers {user}\n\
             {root_login}\
             LogLevel VERBOSE\n",
            d = d.display(),
            root_login = if root {
                "PermitRootLogin prohibit-password\n"
            } else {
                ""
            },
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();

        // A free port can be taken between finding and binding it: try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .args(["-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
            let log = Arc::new(Mutex::new(String::new()));
            let sink = log.clone();
            let stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
            match wait_ready(&mut child, port, &log, Duration::from_secs(15)) {
                Ok(()) => {
                    return Sshd {
                        child,
                        _dir: dir,
                        port,
                        host_key,
                        user,
                        log,
                    };
                }
                Err(text) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if !text.contains("Address already in use") {
                        panic!("sshd did not start: {text}");
                    }
                    last_log = text;
                }
            }
        }
        panic!("sshd found no free port: {last_log}");
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The `known_hosts` line for this server, as `ssh-keyscan -p PORT 127.0.0.1` prints it.
    fn known_hosts(&self) -> String {
        format!("[127.0.0.1]:{} {}\n", self.port, self.host_key)
    }

    /// `ssh://user@127.0.0.1:PORT/abs/path`
    fn url(&self, repo: &Path) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            repo.display()
        )
    }
}

/// Bounded wait until sshd answers with its SSH banner; `Err` (with its log) if it exits
/// or does not answer in time.
fn wait_ready(
    child: &mut Child,
    port: u16,
    log: &Mutex<String>,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // Let the reader thread take the last lines.
            std::thread::sleep(Duration::from_millis(100));
            return Err(format!("sshd exited ({status}):\n{}", log.lock().unwrap()));
        }
        if let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_millis(500)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut banner = String::new();
            if BufReader::new(stream).read_line(&mut banner).is_ok()
                && banner.starts_with("SSH-2.0-")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "sshd did not answer within {limit:?}:\n{}",
                log.lock().unwrap()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- sshd log ---\n{}", self.log());
        }
    }
}

/// A bare repository `<dir>/srv/fleet/podinfo.git` holding the fleet files on `main`.
fn bare_repo(dir: &Path) -> PathBuf {
    let bare = dir.join("srv/fleet/podinfo.git");
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "--quiet", "--bare", "-b", "main"]);
    let work = dir.join("seed");
    std::fs::create_dir_all(work.join("apps/prod")).unwrap();
    std::fs::create_dir_all(work.join("apps/staging")).unwrap();
    std::fs::write(work.join("apps/prod/podinfo.yaml"), PROD).unwrap();
    std::fs::write(work.join("apps/staging/podinfo.yaml"), STAGING).unwrap();
    std::fs::write(work.join("README.md"), "# fleet\n").unwrap();
    git(&work, &["init", "--quiet", "-b", "main"]);
    git(&work, &["add", "--all"]);
    git(&work, &["commit", "--quiet", "-m", "initial content"]);
    git(&work, &["push", "--quiet", bare.to_str().unwrap(), "main"]);
    bare
}

// ---------------------------------------------------------------------------------------
// Everything the code under test logs, and every command line and environment around it

/// Samples the command line and environment of every `git`/`ssh` process on the machine
/// until stopped.
struct ProcessSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeSet<String>>,
}

impl ProcessSampler {
    fn start() -> ProcessSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !flag.load(Ordering::Relaxed) {
                let Ok(entries) = std::fs::read_dir("/proc") else {
                    break;
                };
                for entry in entries.flatten() {
                    let pid = entry.file_name();
                    let Some(pid) = pid
                        .to_str()
                        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
                    else {
                        continue;
                    };
                    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                        continue;
                    };
                    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    if !(cmdline.contains("git") || cmdline.contains("ssh")) {
                        continue;
                    }
                    let environ = std::fs::read(format!("/proc/{pid}/environ"))
                        .map(|e| String::from_utf8_lossy(&e).replace('\0', " "))
                        .unwrap_or_default();
                    seen.insert(format!("cmdline: {cmdline}\nenviron: {environ}"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        ProcessSampler { stop, thread }
    }

    fn finish(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// A Gitea-shaped pull request API (plain sshd has none)

#[derive(Default)]
struct ForgeState {
    pulls: Vec<Value>,
    requests: Vec<(Method, String)>,
}

struct ForgeDouble {
    address: SocketAddr,
    state: Arc<Mutex<ForgeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl ForgeDouble {
    async fn start() -> ForgeDouble {
        let state: Arc<Mutex<ForgeState>> = Arc::default();
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move {
                    let mut state = state.lock().unwrap();
                    state.requests.push((method.clone(), uri.to_string()));
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if auth != Some(&format!("token {TOKEN}")) {
                        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"message": "bad token"})))
                            .into_response();
                    }
                    let path = uri.path();
                    let pulls = "/api/v1/repos/fleet/podinfo/pulls";
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    match (method, path) {
                        (Method::GET, p) if p == pulls => {
                            axum::Json(Value::Array(state.pulls.clone())).into_response()
                        }
                        (Method::POST, p) if p == pulls => {
                            let number = state.pulls.len() as u64 + 1;
                            let pull = json!({
                                "number": number,
                                "html_url": format!("https://forge.example/fleet/podinfo/pulls/{number}"),
                                "title": body["title"],
                                "body": body["body"],
                                "head": {"ref": body["head"], "repo_id": 1},
                                "base": {"ref": body["base"], "repo_id": 1},
                            });
                            state.pulls.push(pull.clone());
                            (StatusCode::CREATED, axum::Json(pull)).into_response()
                        }
                        (Method::PATCH, p) if p.starts_with(&format!("{pulls}/")) => {
                            let number: u64 = p.rsplit('/').next().unwrap().parse().unwrap();
                            let pull = &mut state.pulls[number as usize - 1];
                            pull["title"] = body["title"].clone();
                            pull["body"] = body["body"].clone();
                            axum::Json(pull.clone()).into_response()
                        }
                        _ => (StatusCode::NOT_FOUND, axum::Json(json!({"message": "not found"})))
                            .into_response(),
                    }
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ForgeDouble {
            address,
            state,
            task,
        }
    }

    fn api_base(&self) -> String {
        format!("http://{}/api/v1", self.address)
    }

    fn pulls(&self) -> Vec<Value> {
        self.state.lock().unwrap().pulls.clone()
    }
}

impl Drop for ForgeDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// The strategy with an SSH repository URL

/// The `pull-request.secretRef` Secret (flux-system/git-ssh): Flux's SSH keys plus the
/// API token.
fn ssh_secret(identity: &KeyPair, known_hosts: &str) -> MemoryCatalog {
    MemoryCatalog::new().with_secret(
        "flux-system",
        "git-ssh",
        [
            ("identity", identity.private.as_str()),
            ("known_hosts", known_hosts),
            ("token", TOKEN),
        ],
    )
}

struct Setup {
    pipeline: Pipeline,
    strategy: PullRequestStrategy,
    work: tempfile::TempDir,
}

fn setup(url: &str, forge: &ForgeDouble) -> Setup {
    let spec = parse_pipeline_spec(json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": [
            {"name": "staging", "targets": [{"namespace": "podinfo-staging"}]},
            {"name": "prod", "targets": [{"namespace": "podinfo-prod"}]}
        ],
        "promotion": {"strategy": {"pull-request": {
            "type": "gitea", "url": url, "baseBranch": "main", "secretRef": {"name": "git-ssh"}}}}
    }))
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let strategy = PullRequestStrategy::new(
        PullRequestSettings {
            work_dir: work.path().to_path_buf(),
            api_overrides: vec![(url.to_string(), forge.api_base())],
            ..PullRequestSettings::default()
        },
        pipeline_git::forge::http_client().unwrap(),
    );
    Setup {
        pipeline: Pipeline {
            reference: PipelineRef::new("flux-system", "podinfo"),
            spec,
        },
        strategy,
        work,
    }
}

fn record(revision: &str) -> PromotionRecord {
    PromotionRecord::new(
        PipelineRef::new("flux-system", "podinfo"),
        "staging",
        "prod",
        revision,
        false,
        Trigger::default(),
        chrono::Utc::now(),
    )
}

async fn promote(
    setup: &Setup,
    record: &PromotionRecord,
    secret: &MemoryCatalog,
) -> Result<StrategyOutcome, StrategyError> {
    setup
        .strategy
        .promote(PromotionContext {
            record,
            pipeline: &setup.pipeline,
            promotion: setup.pipeline.promotion_for("prod").unwrap(),
            secrets: secret,
        })
        .await
}

fn branch_head(bare: &Path, branch: &str) -> Option<String> {
    let out = git(
        bare,
        &[
            "for-each-ref",
            "--format=%(objectname)",
            &format!("refs/heads/{branch}"),
        ],
    );
    Some(out.trim().to_string()).filter(|s| !s.is_empty())
}

/// Credentials as the strategy reads them from the Secret, for the `git` module directly.
fn credentials(identity: Option<&KeyPair>, known_hosts: Option<&str>) -> Credentials {
    Credentials {
        identity: identity.map(|k| SecretBytes::new(k.private.clone().into_bytes())),
        known_hosts: known_hosts.map(|k| SecretBytes::new(k.as_bytes().to_vec())),
        ..Credentials::default()
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotes_over_ssh_with_identity_and_known_hosts() {
    captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let client = KeyPair::generate(dir.path(), "client");
    let sshd = Sshd::start(&client.public);
    let bare = bare_repo(dir.path());
    let main_head = branch_head(&bare, "main").unwrap();
    let url = sshd.url(&bare);
    let forge = ForgeDouble::start().await;
    let setup = setup(&url, &forge);
    let secret = ssh_secret(&client, &sshd.known_hosts());
    assert_eq!(promotion_branch("flux-system", "podinfo", "prod"), BRANCH);

    // 1. Clone, rewrite, commit, push the branch, open the pull request.
    let sampler = ProcessSampler::start();
    let first = record("6.5.1");
    let outcome = promote(&setup, &first, &secret).await;
    let processes = sampler.finish();
    let outcome = outcome.unwrap_or_else(|e| panic!("promotion over SSH failed: {e:?}"));
    assert_eq!(
        outcome.result.as_deref(),
        Some("https://forge.example/fleet/podinfo/pulls/1"),
        "{outcome:?}"
    );
    assert!(
        outcome.message.starts_with("opened pull request #1"),
        "{outcome:?}"
    );

    // The branch in the bare repository: one commit on top of main, exactly the change.
    let head = branch_head(&bare, BRANCH).expect("the promotion branch was pushed");
    assert_eq!(
        git(&bare, &["rev-parse", &format!("{head}^")]).trim(),
        main_head
    );
    assert_eq!(
        git(&bare, &["diff", "--name-only", "main", BRANCH]),
        "apps/prod/podinfo.yaml\n"
    );
    assert_eq!(
        git(
            &bare,
            &["show", &format!("{BRANCH}:apps/prod/podinfo.yaml")]
        ),
        PROD.replace("6.0.0", "6.5.1")
    );
    let changes: Vec<String> = git(&bare, &["diff", "--unified=0", "main", BRANCH])
        .lines()
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .map(str::to_string)
        .collect();
    assert_eq!(
        changes,
        [
            "-      version: \"6.0.0\" # {\"$promotion\": \"flux-system:podinfo:prod\"}",
            "+      version: \"6.5.1\" # {\"$promotion\": \"flux-system:podinfo:prod\"}",
            "-      tag: 6.0.0 # {\"$promotion\": \"flux-system:podinfo:prod\"}",
            "+      tag: 6.5.1 # {\"$promotion\": \"flux-system:podinfo:prod\"}",
        ]
    );
    let message = git(&bare, &["log", "-1", "--format=%an <%ae>%n%B", BRANCH]);
    assert!(
        message.starts_with("pipeline-controller <pipeline-controller@localhost>\nPromote flux-system/podinfo to prod: 6.5.1"),
        "{message}"
    );
    assert!(
        message.contains(&format!("Promotion-Id: {}", first.id)),
        "{message}"
    );
    assert_eq!(
        branch_head(&bare, "main").unwrap(),
        main_head,
        "main untouched"
    );

    // The pull request proposes that branch.
    let pulls = forge.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    assert_eq!(pulls[0]["head"]["ref"], BRANCH);
    assert_eq!(pulls[0]["base"]["ref"], "main");

    // sshd authenticated the Secret's identity, by public key.
    let log = sshd.log();
    assert!(
        log.contains(&format!(
            "Accepted publickey for {} from 127.0.0.1",
            sshd.user
        )) && log.contains(&client.fingerprint),
        "{log}"
    );

    // The key travelled in a file: not in any command line or environment of git or ssh.
    assert!(
        processes
            .iter()
            .any(|p| p.contains("StrictHostKeyChecking=yes") && p.contains("UserKnownHostsFile=")),
        "the sampler never saw git's ssh: {processes:#?}"
    );
    for process in &processes {
        assert_no_key_material("a git/ssh process", process, &[&client]);
    }

    // 2. The same promotion again (as after a crash): ls-remote and fetch over SSH find
    //    the branch up to date; nothing is pushed, the pull request is reused.
    let outcome = promote(&setup, &first, &secret).await.unwrap();
    assert!(
        outcome.message.contains("already up to date"),
        "{outcome:?}"
    );
    assert_eq!(branch_head(&bare, BRANCH).unwrap(), head);
    assert_eq!(forge.pulls().len(), 1);

    // 3. A newer version force-pushes the branch (with a lease) and updates the pull request.
    let outcome = promote(&setup, &record("6.5.2"), &secret).await.unwrap();
    assert!(
        outcome.message.starts_with("updated pull request #1"),
        "{outcome:?}"
    );
    let newer = branch_head(&bare, BRANCH).unwrap();
    assert_ne!(newer, head);
    assert_eq!(
        git(&bare, &["rev-parse", &format!("{newer}^")]).trim(),
        main_head
    );
    assert_eq!(
        git(
            &bare,
            &["show", &format!("{BRANCH}:apps/prod/podinfo.yaml")]
        ),
        PROD.replace("6.0.0", "6.5.2")
    );
    assert_eq!(forge.pulls().len(), 1);

    // The private homes with the key files are gone; what is left is the clone cache,
    // which holds no key material; no log line quotes the key.
    let left: Vec<String> = std::fs::read_dir(setup.work.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["clones"], "{left:?}");
    let mut files = Vec::new();
    let mut dirs = vec![setup.work.path().join("clones")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                if !path.ends_with(".git/objects") {
                    dirs.push(path);
                }
            } else {
                files.push(path);
            }
        }
    }
    assert!(
        files.iter().any(|f| f.ends_with(".git/config")),
        "{files:?}"
    );
    for file in files {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        assert_no_key_material(&file.display().to_string(), &text, &[&client]);
    }
    assert_no_key_material("the logs", &logs_text(), &[&client]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_identity_is_a_clear_auth_error_without_key_material() {
    captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let authorized = KeyPair::generate(dir.path(), "authorized");
    let stranger = KeyPair::generate(dir.path(), "stranger");
    let sshd = Sshd::start(&authorized.public);
    let bare = bare_repo(dir.path());
    let url = sshd.url(&bare);

    // The git module: `Auth`, quoting ssh's refusal, not the key.
    let work = tempfile::tempdir().unwrap();
    let git_ = Git::new(
        &RepoUrl::parse(&url).unwrap(),
        &credentials(Some(&stranger), Some(&sshd.known_hosts())),
        work.path(),
    )
    .unwrap();
    let err = git_
        .clone_branch("main", &work.path().join("repo"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, GitErrorKind::Auth, "{err}");
    assert!(!err.retryable());
    assert!(
        err.message.contains("Permission denied (publickey)"),
        "{err}"
    );
    assert!(
        err.message.starts_with(&format!("git clone {url} failed")),
        "{err}"
    );
    assert_no_key_material("the git error", &err.message, &[&stranger, &authorized]);
    assert!(!work.path().join("repo").exists());

    // The strategy: a permanent failure that says what to check.
    let forge = ForgeDouble::start().await;
    let setup = setup(&url, &forge);
    let err = promote(
        &setup,
        &record("6.5.1"),
        &ssh_secret(&stranger, &sshd.known_hosts()),
    )
    .await
    .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(
        err.message.contains("Permission denied (publickey)"),
        "{err:?}"
    );
    assert!(
        err.message.contains("check the credentials in the secret"),
        "{err:?}"
    );
    assert_no_key_material("the strategy error", &err.message, &[&stranger]);
    assert_eq!(branch_head(&bare, BRANCH), None);
    assert!(forge.pulls().is_empty());
    assert!(!sshd.log().contains("Accepted publickey"), "{}", sshd.log());
    assert_no_key_material("the logs", &logs_text(), &[&stranger, &authorized]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_key_must_be_in_known_hosts() {
    captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let client = KeyPair::generate(dir.path(), "client");
    let impostor = KeyPair::generate(dir.path(), "impostor-host");
    let sshd = Sshd::start(&client.public);
    let bare = bare_repo(dir.path());
    let url = RepoUrl::parse(&sshd.url(&bare)).unwrap();
    let impostor_key = impostor
        .public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");

    let attempt = |known_hosts: String| {
        let url = url.clone();
        let client = &client;
        async move {
            let work = tempfile::tempdir().unwrap();
            let git = Git::new(
                &url,
                &credentials(Some(client), Some(&known_hosts)),
                work.path(),
            )
            .unwrap();
            let result = git.clone_branch("main", &work.path().join("repo")).await;
            assert!(!work.path().join("repo").join(".git").exists());
            result.unwrap_err()
        }
    };

    // known_hosts names this server with another key: the man-in-the-middle case.
    let err = attempt(format!("[127.0.0.1]:{} {impostor_key}\n", sshd.port)).await;
    assert_eq!(err.kind, GitErrorKind::Auth, "{err}");
    assert!(!err.retryable());
    // ssh's long banner is cut down to the lines that say what happened.
    assert!(
        err.message
            .contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{err}"
    );
    assert!(
        err.message.contains("Host key verification failed"),
        "{err}"
    );
    assert!(!err.message.contains("Add correct host key in"), "{err}");
    assert_no_key_material("the git error", &err.message, &[&client]);

    // known_hosts does not list this server (its real key, but for another host): an
    // unknown host is never accepted on first use.
    let err = attempt(format!("git.example.com {}\n", sshd.host_key)).await;
    assert_eq!(err.kind, GitErrorKind::Auth, "{err}");
    assert!(
        err.message.contains("Host key verification failed"),
        "{err}"
    );
    assert!(
        err.message.contains("you have requested strict checking"),
        "{err}"
    );
    assert_no_key_material("the git error", &err.message, &[&client]);

    // The right known_hosts line is what makes it work.
    let work = tempfile::tempdir().unwrap();
    let git_ = Git::new(
        &url,
        &credentials(Some(&client), Some(&sshd.known_hosts())),
        work.path(),
    )
    .unwrap();
    git_.clone_branch("main", &work.path().join("repo"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(work.path().join("repo/apps/prod/podinfo.yaml")).unwrap(),
        PROD
    );
    // Only that one connection got past the host key check.
    assert_eq!(
        sshd.log().matches("Accepted publickey").count(),
        1,
        "{}",
        sshd.log()
    );

    // Without known_hosts (or identity) nothing connects at all.
    let work = tempfile::tempdir().unwrap();
    let err = Git::new(&url, &credentials(Some(&client), None), work.path()).unwrap_err();
    assert_eq!(err.kind, GitErrorKind::Auth);
    assert!(err.message.contains("\"known_hosts\""), "{err}");
    let err = Git::new(
        &url,
        &credentials(None, Some(&sshd.known_hosts())),
        work.path(),
    )
    .unwrap_err();
    assert_eq!(err.kind, GitErrorKind::Auth);
    assert!(err.message.contains("\"identity\""), "{err}");
    assert_eq!(branch_head(&bare, BRANCH), None);
    assert_no_key_material("the logs", &logs_text(), &[&client]);
}
