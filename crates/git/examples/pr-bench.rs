//! Benchmark: pull-request promotions on a repository of 10,000 files, against a real
//! Gitea on loopback, cold (first promotion, empty clone cache) and warm (later promotions
//! of the same repository, from the cached clone).
//!
//! Two modes:
//!
//! - default (in process): hands the promotions straight to `PullRequestStrategy::promote`
//!   and prints the time of each and the peak memory (VmHWM) of this process and of the
//!   largest git child process;
//! - `--controller PATH`: starts the real `pipeline-controller serve` binary (embedded mode,
//!   a manifests folder with the pipeline and its Secrets) and, for each revision, POSTs a
//!   signed Flux event and polls `GET /api/v1/promotions/{id}` until the record's `result`
//!   holds the pull request URL. Prints the time from the event to the pull request, the
//!   phases from the record's history, the git commands the controller ran and the forge
//!   API requests it made (both from its debug log), and the peak memory (VmHWM) of the
//!   controller and of its largest git child.
//!
//! Event 1 is cold; the `--warm N` (default 10) later events are warm, and before every
//! `--base-commit-every K`-th (default 2) of them a commit lands on the base branch, so the
//! warm clone has something to fetch. Before the promotions, the time Gitea takes to
//! answer an API request authenticated with the password (what git over HTTP sends on
//! every request) and with the token is measured.
//!
//! ```sh
//! scripts/ensure-test-binaries.sh gitea
//! cargo build --release -p pipeline-controller
//! cargo run --release -p pipeline-git --features testing --example pr-bench -- \
//!     [--files N] [--warm N] [--base-commit-every K] [--controller target/release/pipeline-controller]
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline_core::pipeline::parse_pipeline_spec;
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_core::testing::MemoryCatalog;
use pipeline_core::{
    Pipeline, PipelineRef, PromotionContext, PromotionRecord, PromotionStrategy, Trigger,
};
use pipeline_git::testing::{ADMIN_PASSWORD, ADMIN_USER, Gitea};
use pipeline_git::{PullRequestSettings, PullRequestStrategy};
use serde_json::{Value, json};

/// The pipeline's `pull-request.secretRef` Secret, flux-system/git: with the password,
/// or with the token alone (then git sends the token as its password).
fn git_secret(token: &str, password: bool) -> MemoryCatalog {
    if password {
        MemoryCatalog::new().with_secret(
            "flux-system",
            "git",
            [
                ("username", ADMIN_USER),
                ("password", ADMIN_PASSWORD),
                ("token", token),
            ],
        )
    } else {
        MemoryCatalog::new().with_secret("flux-system", "git", [("token", token)])
    }
}

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Descendants of `pid`, not descending into `skip` (Gitea and its own git processes).
fn children(pid: &str, out: &mut Vec<String>, skip: Option<&str>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            for child in text.split_whitespace() {
                if Some(child) == skip {
                    continue;
                }
                out.push(child.to_string());
                children(child, out, skip);
            }
        }
    }
}

fn comm(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split('\0')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    // RUST_LOG=pipeline_git=debug shows each git command and its duration.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // With Gitea's router log: the time Gitea itself spent on each request.
    let gitea = Gitea::start_with(true).await.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let gitea_pid = gitea_pid();

    // A fleet repository: `files` files, most YAML, 10 of them marked for the promotion.
    let files = args.files;
    let mut content = Vec::with_capacity(files);
    for i in 0..files {
        let app = format!("app-{i:05}");
        if i % 10 == 9 {
            content.push((format!("docs/{app}.md"), format!("# {app}\n\nNotes.\n")));
            continue;
        }
        let marker = if i % 1000 == 0 {
            "flux-system:podinfo:prod"
        } else {
            "flux-system:other:prod"
        };
        content.push((
            format!("clusters/prod/{}/{app}/release.yaml", i / 500),
            format!(
                "apiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\nmetadata:\n  name: {app}\n  namespace: prod\nspec:\n  chart:\n    spec:\n      chart: {app}\n      version: \"1.0.0\" # {{\"$promotion\": \"{marker}\"}}\n  values:\n    replicas: 3\n"
            ),
        ));
    }
    let setup = Instant::now();
    let url = gitea.create_repo("fleet", &content).await.unwrap();
    drop(content);
    println!(
        "repository: {files} files pushed to Gitea in {:.2}s",
        setup.elapsed().as_secs_f64()
    );
    auth_cost(&gitea).await;
    println!(
        "git authenticates with the {}",
        if args.password {
            "password (username/password in the Secret)"
        } else {
            "token (token alone in the Secret)"
        }
    );
    if let Some(controller) = &args.controller {
        let ok = through_the_controller(controller, &gitea, &url, &args).await;
        // Gitea stops when dropped; `exit` would leave it running.
        drop(gitea);
        if !ok {
            std::process::exit(1);
        }
        return;
    }

    let spec = parse_pipeline_spec(json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": [
            {"name": "staging", "targets": [{"namespace": "staging"}]},
            {"name": "prod", "targets": [{"namespace": "prod"}]}
        ],
        "promotion": {"strategy": {"pull-request": {
            "type": "gitea", "url": url, "baseBranch": "main", "secretRef": {"name": "git"}}}}
    }))
    .unwrap();
    let pipeline = Pipeline {
        reference: PipelineRef::new("flux-system", "podinfo"),
        spec,
    };
    let work = tempfile::tempdir().unwrap();
    let strategy = PullRequestStrategy::new(
        PullRequestSettings {
            work_dir: work.path().to_path_buf(),
            ..PullRequestSettings::default()
        },
        pipeline_git::forge::http_client().unwrap(),
    );
    let secrets = git_secret(&gitea.token, args.password);

    let own_before = status_kib("self", "VmHWM:").unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let me = std::process::id().to_string();
        std::thread::spawn(move || {
            let mut peaks: HashMap<String, (u64, String)> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let mut pids = Vec::new();
                children(&me, &mut pids, gitea_pid.as_deref());
                for pid in pids {
                    if let Some(hwm) = status_kib(&pid, "VmHWM:") {
                        let entry = peaks.entry(pid.clone()).or_insert((0, comm(&pid)));
                        entry.0 = entry.0.max(hwm);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peaks.into_values().max_by_key(|(kib, _)| *kib)
        })
    };

    let mut warm = Vec::new();
    for round in 0..=args.warm {
        let revision = format!("2.0.{round}");
        let kind = round_kind(round, &args);
        if kind == Kind::WarmBaseMoved {
            base_commit(&gitea, round).await;
        }
        let record = PromotionRecord::new(
            pipeline.reference.clone(),
            "staging",
            "prod",
            &revision,
            false,
            Trigger::default(),
            chrono::Utc::now(),
        );
        let start = Instant::now();
        let outcome = strategy
            .promote(PromotionContext {
                record: &record,
                pipeline: &pipeline,
                promotion: pipeline.promotion_for("prod").unwrap(),
                secrets: &secrets,
            })
            .await;
        let elapsed = start.elapsed();
        match outcome {
            Ok(outcome) => println!(
                "promotion {} ({revision}, {}): {:.0} ms: {} -> {}",
                round + 1,
                kind.label(),
                ms(elapsed),
                outcome.message,
                outcome.result.unwrap_or_default()
            ),
            Err(err) => {
                println!("promotion failed after {:.0} ms: {err}", ms(elapsed));
                std::process::exit(1);
            }
        }
        if round > 0 {
            warm.push(ms(elapsed));
        }
    }
    println!(
        "warm promotions: {}",
        summary(&warm).unwrap_or_else(|| "none".into())
    );
    stop.store(true, Ordering::Relaxed);
    let child_peak = sampler.join().unwrap();
    let own_after = status_kib("self", "VmHWM:").unwrap_or(0);
    println!(
        "peak memory: this process VmHWM {:.1} MiB (before the promotions {:.1} MiB)",
        own_after as f64 / 1024.0,
        own_before as f64 / 1024.0
    );
    if let Some((kib, command)) = child_peak {
        println!(
            "peak memory: largest git child VmHWM {:.1} MiB ({command})",
            kib as f64 / 1024.0
        );
    }
    drop(gitea);
}

fn gitea_pid() -> Option<String> {
    let mut pids = Vec::new();
    children("self", &mut pids, None);
    pids.into_iter().find(|p| comm(p).contains("gitea"))
}

struct Args {
    files: usize,
    controller: Option<PathBuf>,
    /// Warm promotions after the cold one.
    warm: usize,
    /// A commit lands on the base branch before every K-th warm promotion (0: never).
    base_commit_every: usize,
    /// git authenticates with the password (else with the token).
    password: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: pr-bench [--files N | N] [--warm N] [--base-commit-every K] [--git-auth password|token] [--controller PATH/TO/pipeline-controller]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        files: 10_000,
        controller: None,
        warm: 10,
        base_commit_every: 2,
        password: true,
    };
    let mut argv = std::env::args().skip(1);
    let number = |argv: &mut dyn Iterator<Item = String>| -> usize {
        argv.next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| usage())
    };
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--controller" => {
                args.controller = Some(PathBuf::from(argv.next().unwrap_or_else(|| usage())));
            }
            "--files" => args.files = number(&mut argv),
            "--warm" => args.warm = number(&mut argv),
            "--base-commit-every" => args.base_commit_every = number(&mut argv),
            "--git-auth" => {
                args.password = match argv.next().as_deref() {
                    Some("password") => true,
                    Some("token") => false,
                    _ => usage(),
                }
            }
            other => args.files = other.parse().unwrap_or_else(|_| usage()),
        }
    }
    args
}

/// What a promotion of the benchmark is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The first: no clone yet.
    Cold,
    /// From the cached clone, the base branch unchanged.
    Warm,
    /// From the cached clone, after a commit landed on the base branch.
    WarmBaseMoved,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Cold => "cold",
            Kind::Warm => "warm",
            Kind::WarmBaseMoved => "warm, base moved",
        }
    }
}

fn round_kind(round: usize, args: &Args) -> Kind {
    if round == 0 {
        Kind::Cold
    } else if args.base_commit_every > 0 && round.is_multiple_of(args.base_commit_every) {
        Kind::WarmBaseMoved
    } else {
        Kind::Warm
    }
}

/// A commit on the base branch (one new Markdown file), through Gitea's API.
async fn base_commit(gitea: &Gitea, round: usize) {
    gitea
        .commit_file(
            "fleet",
            "main",
            &format!("docs/bench-{round}.md"),
            &format!("# round {round}\n"),
        )
        .await
        .unwrap();
}

/// p50 / p90 / min / max of `values` (nearest rank).
fn summary(values: &[f64]) -> Option<String> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank =
        |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    Some(format!(
        "n={} p50 {:.0} ms, p90 {:.0} ms, min {:.0} ms, max {:.0} ms",
        sorted.len(),
        rank(0.5),
        rank(0.9),
        sorted[0],
        sorted[sorted.len() - 1]
    ))
}

/// What authenticating a request costs Gitea: the median time of an API request
/// authenticated with the password (as git over HTTP authenticates every request here)
/// and with the token (as the forge API calls are).
async fn auth_cost(gitea: &Gitea) {
    let mut line = Vec::new();
    for (label, password) in [("password (basic)", true), ("token", false)] {
        let mut times = Vec::new();
        for _ in 0..10 {
            let start = Instant::now();
            let response = gitea.request("/user", password).send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            let _ = response.bytes().await;
            times.push(ms(start.elapsed()));
        }
        times.sort_by(f64::total_cmp);
        line.push(format!("{label} {:.0} ms", times[times.len() / 2]));
    }
    println!(
        "Gitea API request GET /user, median of 10: {}",
        line.join(", ")
    );
}

const HMAC_KEY: &str = "pr-bench-hmac-key-0123456789abcdef";
/// Longest wait for one pull request.
const PR_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the record is polled.
const POLL: Duration = Duration::from_millis(10);

/// One line of the controller's log that the benchmark uses.
enum Logged {
    /// git subcommand, elapsed ms
    Git(String, u64),
    /// forge operation, elapsed ms
    Forge(String, u64),
    /// "cloned into the clone cache" / "cached clone refreshed", elapsed ms
    Clone(&'static str, u64),
    /// "markers rewritten": scanned files, elapsed ms
    Markers(u64, u64),
}

/// What the controller logged: its address, and the lines above with when they were read.
#[derive(Default)]
struct ControllerLog {
    lines: Vec<String>,
    events: Vec<(Instant, Logged)>,
}

/// A Flux event from `namespace` about `podinfo` at `revision`, as helm-controller sends it.
fn flux_event(namespace: &str, revision: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "involvedObject": {"kind": "HelmRelease", "namespace": namespace, "name": "podinfo",
                           "apiVersion": "helm.toolkit.fluxcd.io/v2", "uid": "u1", "resourceVersion": "7"},
        "severity": "info",
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "message": format!("Helm upgrade succeeded for release {namespace}/podinfo.v2 with chart podinfo@{revision}"),
        "reason": "UpgradeSucceeded",
        "metadata": {"revision": revision},
        "reportingController": "helm-controller"
    }))
    .unwrap()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn chrono_ms(d: chrono::Duration) -> f64 {
    d.num_microseconds().unwrap_or(0) as f64 / 1000.0
}

/// git subcommands that talk to the remote.
fn is_network(command: &str) -> bool {
    matches!(command, "clone" | "fetch" | "push" | "ls-remote")
}

/// The figures of one event.
struct Figures {
    kind: Kind,
    total: f64,
    attempt: f64,
    git_network: f64,
    git_local: f64,
    forge: f64,
    forge_requests: usize,
    markers: f64,
    /// Gitea's own time (its router log) serving this promotion's git over HTTP requests
    /// and its pull-request API requests.
    gitea_git: f64,
    gitea_api: f64,
}

/// What Gitea's router log says it spent on the requests of one promotion, in the log
/// text written since the event was sent: (git over HTTP ms, requests), (API ms,
/// requests). Only the repository's git endpoints and its pull-request API count (not the
/// internal hook calls, which run inside a `git-receive-pack` request, nor the bench's own
/// requests).
fn gitea_share(log: &str, owner: &str, repo: &str) -> ((f64, usize), (f64, usize)) {
    let git_prefix = format!("/{owner}/{repo}/");
    let api_prefix = format!("/api/v1/repos/{owner}/{repo}/pulls");
    let mut git = (0.0, 0);
    let mut api = (0.0, 0);
    for line in log.lines() {
        let Some(rest) = line.split_once("router: completed ").map(|(_, r)| r) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(_method), Some(path)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(took) = rest
            .rsplit_once(" in ")
            .and_then(|(_, t)| t.split(" @ ").next())
            .and_then(go_duration_ms)
        else {
            continue;
        };
        let slot = if path.starts_with(&api_prefix) {
            &mut api
        } else if path.starts_with(&git_prefix) {
            &mut git
        } else {
            continue;
        };
        slot.0 += took;
        slot.1 += 1;
    }
    (git, api)
}

/// A Go duration as Gitea logs it (`12.3ms`, `950µs`, `1.2s`) in milliseconds.
fn go_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    for (unit, factor) in [
        ("ms", 1.0),
        ("µs", 0.001),
        ("us", 0.001),
        ("ns", 1e-6),
        ("s", 1000.0),
    ] {
        if let Some(number) = text.strip_suffix(unit) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    None
}

/// Event in, pull request out, through the real `pipeline-controller serve`.
/// `false` when a promotion failed (or the controller did not start).
async fn through_the_controller(controller: &Path, gitea: &Gitea, url: &str, args: &Args) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("pipeline.yaml"),
        format!(
            "apiVersion: pipelines.weave.works/v1alpha1\nkind: Pipeline\nmetadata:\n  name: podinfo\n  namespace: flux-system\nspec:\n  appRef:\n    apiVersion: helm.toolkit.fluxcd.io/v2\n    kind: HelmRelease\n    name: podinfo\n  environments:\n    - name: staging\n      targets:\n        - namespace: staging\n    - name: prod\n      targets:\n        - namespace: prod\n  promotion:\n    strategy:\n      secretRef:\n        name: podinfo-promotion-hmac\n      pull-request:\n        type: gitea\n        url: {url}\n        baseBranch: main\n        secretRef:\n          name: git-credentials\n"
        ),
    )
    .unwrap();
    std::fs::write(
        manifests.join("hmac.yaml"),
        format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: podinfo-promotion-hmac\n  namespace: flux-system\nstringData:\n  hmac-key: {HMAC_KEY}\n"),
    )
    .unwrap();
    std::fs::write(
        manifests.join("git-credentials.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: git-credentials\n  namespace: flux-system\nstringData:\n{}  token: {}\n",
            if args.password {
                format!("  username: {ADMIN_USER}\n  password: {ADMIN_PASSWORD}\n")
            } else {
                String::new()
            },
            gitea.token
        ),
    )
    .unwrap();

    let work = dir.path().join("work");
    let spawned = Command::new(controller)
        .arg("serve")
        .arg("--manifests")
        .arg(&manifests)
        .arg("--state")
        .arg(dir.path().join("state.redb"))
        .arg("--pr-work-dir")
        .arg(&work)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        // The promotions API is on the internal listener.
        .args(["--internal-listen", "127.0.0.1:0"])
        // pipeline_git=debug: one line per git command and per forge request.
        .env("RUST_LOG", "info,pipeline_git=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            eprintln!("cannot start {}: {e}", controller.display());
            return false;
        }
    };
    let pid = child.id().to_string();
    let log = Arc::new(Mutex::new(ControllerLog::default()));
    let (address_tx, address_rx) = std::sync::mpsc::channel::<String>();
    let (internal_tx, internal_rx) = std::sync::mpsc::channel::<String>();
    {
        let log = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let now = Instant::now();
                let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let mut log = log.lock().unwrap();
                if value["message"] == "listening"
                    && let Some(address) = value["address"].as_str()
                {
                    let _ = address_tx.send(address.to_string());
                }
                if let Some(address) = value["internal_address"].as_str() {
                    let _ = internal_tx.send(address.to_string());
                }
                let elapsed = value["elapsed_ms"].as_u64();
                let logged = match (value["message"].as_str(), elapsed) {
                    (Some("git command finished"), Some(elapsed)) => value["command"]
                        .as_str()
                        .map(|c| Logged::Git(c.to_string(), elapsed)),
                    (Some("forge request finished"), Some(elapsed)) => value["operation"]
                        .as_str()
                        .map(|o| Logged::Forge(o.to_string(), elapsed)),
                    (Some("cloned into the clone cache"), Some(elapsed)) => {
                        Some(Logged::Clone("clone into the cache", elapsed))
                    }
                    (Some("cached clone refreshed"), Some(elapsed)) => {
                        Some(Logged::Clone("refresh of the cached clone", elapsed))
                    }
                    (Some("markers rewritten"), Some(elapsed)) => Some(Logged::Markers(
                        value["scanned"].as_u64().unwrap_or(0),
                        elapsed,
                    )),
                    _ => None,
                };
                if let Some(logged) = logged {
                    log.events.push((now, logged));
                }
                log.lines.push(line);
            }
        });
    }
    let Ok(address) = address_rx.recv_timeout(Duration::from_secs(30)) else {
        let _ = child.kill();
        eprintln!(
            "the controller did not start:\n{}",
            log.lock().unwrap().lines.join("\n")
        );
        return false;
    };
    let Ok(internal) = internal_rx.recv_timeout(Duration::from_secs(30)) else {
        let _ = child.kill();
        eprintln!("the controller logged no internal listener address");
        return false;
    };
    let idle_rss = status_kib(&pid, "VmRSS:").unwrap_or(0);
    println!(
        "controller: {} pid {pid} on {address}, RSS {:.1} MiB idle",
        controller.display(),
        idle_rss as f64 / 1024.0
    );

    // The controller's git children: the peak of the largest one.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pid = pid.clone();
        std::thread::spawn(move || {
            let mut peaks: HashMap<String, (u64, String)> = HashMap::new();
            let mut controller_rss = 0;
            while !stop.load(Ordering::Relaxed) {
                controller_rss = controller_rss.max(status_kib(&pid, "VmRSS:").unwrap_or(0));
                let mut pids = Vec::new();
                children(&pid, &mut pids, None);
                for child in pids {
                    if let Some(hwm) = status_kib(&child, "VmHWM:") {
                        let entry = peaks.entry(child.clone()).or_insert((0, comm(&child)));
                        entry.0 = entry.0.max(hwm);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (
                peaks.into_values().max_by_key(|(kib, _)| *kib),
                controller_rss,
            )
        })
    };

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = format!("http://{address}");
    let api = format!("http://{internal}");
    let mut failed = false;
    let mut figures: Vec<Figures> = Vec::new();
    for round in 0..=args.warm {
        let revision = format!("2.0.{round}");
        let kind = round_kind(round, args);
        if kind == Kind::WarmBaseMoved {
            base_commit(gitea, round).await;
        }
        let body = flux_event("staging", &revision);
        let signature = sign(HmacAlgorithm::Sha256, HMAC_KEY.as_bytes(), &body);
        let gitea_log_from = gitea.log().len();
        let sent_at = chrono::Utc::now();
        let start = Instant::now();
        let response = client
            .post(format!(
                "{base}/pipelines/promotions/flux-system/podinfo/staging"
            ))
            .header("content-type", "application/json")
            .header("x-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        let answered = start.elapsed();
        if status.as_u16() != 202 {
            println!("event {revision}: unexpected answer {status}: {answer}");
            failed = true;
            break;
        }
        let id = answer["id"].as_str().unwrap().to_string();
        let record = loop {
            let record: Value = client
                .get(format!("{api}/api/v1/promotions/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if record["result"].is_string() || record["phase"] == "Failed" {
                break record;
            }
            if start.elapsed() > PR_TIMEOUT {
                println!("event {revision}: no pull request within {PR_TIMEOUT:?}: {record:#}");
                failed = true;
                break record;
            }
            tokio::time::sleep(POLL).await;
        };
        let total = start.elapsed();
        if failed {
            break;
        }
        let record: PromotionRecord = serde_json::from_value(record).unwrap();
        let Some(pr) = record.result.clone() else {
            println!(
                "event {revision}: promotion {} failed: {}",
                record.phase, record.message
            );
            failed = true;
            break;
        };
        // The log lines of this promotion have been written; let the reader catch up.
        tokio::time::sleep(Duration::from_millis(50)).await;
        println!(
            "event {} ({revision}, {}): event -> pull request {:.0} ms ({pr})",
            round + 1,
            kind.label(),
            ms(total)
        );
        println!(
            "  webhook answered 202 in {:.1} ms; record {} after {} attempt(s): {}",
            ms(answered),
            record.id,
            record.attempts,
            record.message
        );
        let mut previous = sent_at;
        let mut attempt = 0.0;
        for (i, change) in record.history.iter().enumerate() {
            let from = if i == 0 {
                "event sent".to_string()
            } else {
                record.history[i - 1].phase.to_string()
            };
            let took = chrono_ms(change.at - previous);
            if from == "Running" {
                attempt += took;
            }
            println!(
                "  {from:>10} -> {:<10} {took:>8.1} ms ({})",
                change.phase.to_string(),
                change.reason
            );
            previous = change.at;
        }
        // What the controller logged while this promotion ran.
        let mut git: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        let mut forge: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        let mut clone_steps = Vec::new();
        let mut markers = 0.0;
        let mut scanned = 0;
        for (at, logged) in &log.lock().unwrap().events {
            if *at < start {
                continue;
            }
            match logged {
                Logged::Git(command, elapsed) => {
                    let entry = git.entry(command.clone()).or_default();
                    entry.0 += 1;
                    entry.1 += elapsed;
                }
                Logged::Forge(operation, elapsed) => {
                    let entry = forge.entry(operation.clone()).or_default();
                    entry.0 += 1;
                    entry.1 += elapsed;
                }
                Logged::Clone(what, elapsed) => clone_steps.push(format!("{what} {elapsed} ms")),
                Logged::Markers(files, elapsed) => {
                    markers += *elapsed as f64;
                    scanned = *files;
                }
            }
        }
        let list = |map: &BTreeMap<String, (u32, u64)>| {
            map.iter()
                .map(|(name, (n, ms))| {
                    if *n > 1 {
                        format!("{name} {ms} ms ({n}x)")
                    } else {
                        format!("{name} {ms} ms")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sum = |map: &BTreeMap<String, (u32, u64)>, network: Option<bool>| -> f64 {
            map.iter()
                .filter(|(name, _)| network.is_none_or(|n| is_network(name) == n))
                .map(|(_, (_, ms))| *ms as f64)
                .sum()
        };
        let git_network = sum(&git, Some(true));
        let git_local = sum(&git, Some(false));
        let forge_ms = sum(&forge, None);
        let forge_requests: usize = forge.values().map(|(n, _)| *n as usize).sum();
        println!("  git commands: {}", list(&git));
        if !clone_steps.is_empty() {
            println!("  clone cache: {}", clone_steps.join(", "));
        }
        println!(
            "  forge API: {forge_ms:.0} ms in {forge_requests} request(s): {}",
            list(&forge)
        );
        let gitea_log = gitea.log();
        let ((gitea_git, git_requests), (gitea_api, api_requests)) = gitea_share(
            gitea_log.get(gitea_log_from..).unwrap_or_default(),
            ADMIN_USER,
            "fleet",
        );
        println!(
            "  Gitea's own time (router log): git over HTTP {gitea_git:.0} ms in {git_requests} request(s), pull-request API {gitea_api:.0} ms in {api_requests} request(s); event -> pull request without it {:.0} ms",
            ms(total) - gitea_git - gitea_api
        );
        println!(
            "  split: git network {git_network:.0} ms, git local {git_local:.0} ms, forge API {forge_ms:.0} ms, markers {markers:.0} ms ({scanned} YAML files), rest {:.0} ms",
            (attempt - git_network - git_local - forge_ms - markers).max(0.0)
        );
        figures.push(Figures {
            kind,
            total: ms(total),
            attempt,
            git_network,
            git_local,
            forge: forge_ms,
            forge_requests,
            markers,
            gitea_git,
            gitea_api,
        });
    }
    stop.store(true, Ordering::Relaxed);
    let (child_peak, sampled_rss) = sampler.join().unwrap();
    let hwm = status_kib(&pid, "VmHWM:").unwrap_or(0);
    if !failed {
        println!("summary (event -> pull request; attempt = Running -> Succeeded):");
        for (label, filter) in [
            ("cold", &[Kind::Cold][..]),
            ("warm", &[Kind::Warm, Kind::WarmBaseMoved][..]),
            ("  warm, base unchanged", &[Kind::Warm][..]),
            ("  warm, base moved", &[Kind::WarmBaseMoved][..]),
        ] {
            let pick = |f: fn(&Figures) -> f64| -> Vec<f64> {
                figures
                    .iter()
                    .filter(|x| filter.contains(&x.kind))
                    .map(f)
                    .collect()
            };
            let Some(total) = summary(&pick(|f| f.total)) else {
                continue;
            };
            println!("  {label}: {total}");
            for (part, values) in [
                (
                    "git network (clone/fetch/push, incl. Gitea)",
                    pick(|f| f.git_network),
                ),
                ("git local", pick(|f| f.git_local)),
                ("forge API (Gitea)", pick(|f| f.forge)),
                ("markers", pick(|f| f.markers)),
                ("attempt", pick(|f| f.attempt)),
                ("Gitea's own time, git over HTTP", pick(|f| f.gitea_git)),
                ("Gitea's own time, pull-request API", pick(|f| f.gitea_api)),
                (
                    "Gitea's own time, both",
                    pick(|f| f.gitea_git + f.gitea_api),
                ),
                (
                    "event -> pull request without Gitea's own time",
                    pick(|f| f.total - f.gitea_git - f.gitea_api),
                ),
            ] {
                if let Some(line) = summary(&values) {
                    println!("      {part}: {line}");
                }
            }
        }
        let requests: Vec<usize> = figures.iter().map(|f| f.forge_requests).collect();
        println!("  forge API requests per promotion: {requests:?}");
        let cache = pipeline_git::clones::dir_size(&work.join(pipeline_git::clones::CLONES_DIR));
        println!(
            "  clone cache on disk: {:.1} MiB",
            cache as f64 / 1024.0 / 1024.0
        );
    }
    println!(
        "peak memory: controller VmHWM {:.1} MiB (RSS {:.1} MiB idle, at most {:.1} MiB sampled during the promotions)",
        hwm as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        sampled_rss as f64 / 1024.0
    );
    if let Some((kib, command)) = child_peak {
        println!(
            "peak memory: largest git child VmHWM {:.1} MiB ({command})",
            kib as f64 / 1024.0
        );
    }
    if std::env::var_os("PR_BENCH_GITEA_LOG").is_some() {
        eprintln!("--- Gitea log ---\n{}", gitea.log());
    }
    let _ = child.kill();
    let _ = child.wait();
    if failed {
        eprintln!(
            "--- controller log ---\n{}",
            log.lock().unwrap().lines.join("\n")
        );
        return false;
    }
    true
}
