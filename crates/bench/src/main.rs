//! `pipeline-bench`: a load benchmark (not a test) of the pipeline-controller webhook.
//!
//! Starts the release `pipeline-controller serve` on a copy of `examples/quickstart`
//! (embedded redb store, notification strategy delivering to a receiver inside this
//! process) and the `bare-hmac-server` baseline, both as child processes on loopback; then
//! for each scenario (`new`, `duplicate`, `bad-signature`) sends a fixed number of signed
//! events over C concurrent keep-alive connections to each, and prints throughput,
//! p50/p99/max latency, unexpected answers and both processes' memory.
//!
//! `--mode kubernetes` runs the same scenarios against the controller in Kubernetes mode
//! on a real test API server instead, beside raw Promotion creates (see `kube_mode`).
#![forbid(unsafe_code)]

mod kube_mode;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use axum::body::Bytes;
use clap::{Parser, ValueEnum};
use pipeline_bench::{Receiver, cpu_model, cpu_seconds, free_port, memory, read_tail};
use pipeline_core::signature::{HmacAlgorithm, sign};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "pipeline-bench",
    about = "Webhook throughput/latency of pipeline-controller beside a bare HMAC server"
)]
struct Args {
    /// Embedded mode (redb store, beside a bare HMAC server) or Kubernetes mode (a real
    /// test API server from `scripts/ensure-test-binaries.sh kube`, beside raw
    /// Promotion creates).
    #[arg(long, value_enum, default_value = "embedded")]
    mode: Mode,
    /// Requests per scenario and server.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Concurrent keep-alive connections (one request in flight on each).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "new,duplicate,bad-signature"
    )]
    scenarios: Vec<Scenario>,
    /// The pipeline-controller binary [default: beside this one].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// The bare-hmac-server binary [default: beside this one].
    #[arg(long)]
    bare_bin: Option<PathBuf>,
    /// The quickstart folder (manifests and hmac-key.txt) [default: examples/quickstart].
    #[arg(long)]
    quickstart: Option<PathBuf>,
    /// Where the temporary manifests copy and state file go [default: the system temp dir].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Longest wait, in seconds, for the executor to notify every new record.
    #[arg(long, default_value_t = 90)]
    drain_timeout: u64,
    /// Pipelines loaded in all: the benchmarked one plus this many minus one others
    /// (three environments each, in the same namespace), to show that looking up an
    /// event's pipeline does not get dearer with their number.
    #[arg(long, default_value_t = 1)]
    pipelines: usize,
    /// Kubernetes mode: afterwards, a fresh controller makes this many promotions and its
    /// RSS is printed along the way (0: skip).
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Kubernetes mode: the controller's `--retention-per-environment` (0 keeps every
    /// finished Promotion).
    #[arg(long, default_value_t = 100)]
    retention_per_environment: usize,
    /// Kubernetes mode, memory phase: new events are sent this many at a time, each batch
    /// notified before the next, so the history grows while the live set of Promotions
    /// stays near this size plus what retention keeps (0: each step at once). The default
    /// is the first step's size, so every step sees the same bursts and only the history
    /// differs.
    #[arg(long, default_value_t = 100)]
    history_batch: usize,
    /// Kubernetes mode: rounds of the new-event comparison (both baselines and a fresh
    /// controller's new events each), so the ratio to the ceiling comes with its spread;
    /// the scenarios' table is the last round's
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Kubernetes mode: etcd and kube-apiserver run on the first half of the CPUs this
    /// process may use, the bench (load, baseline clients, receiver) and the controller
    /// on the other half, as a control plane's nodes are apart from the controller's
    /// in a real cluster. Without it, everything shares every CPU.
    #[arg(long)]
    split_cpus: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Embedded,
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    New,
    Duplicate,
    BadSignature,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Duplicate => "duplicate",
            Self::BadSignature => "bad-signature",
        }
    }
}

const WEBHOOK_PATH: &str = "/pipelines/promotions/flux-system/podinfo/dev";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Dropping `run` (on Ctrl-C) drops its child guards, which kill the servers.
    let result = tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Child processes

/// A server child process, killed (SIGKILL) and reaped when dropped.
struct Server {
    name: &'static str,
    child: Child,
    address: SocketAddr,
    /// pipeline-controller's internal listener (API, metrics); the bare server has one.
    internal: SocketAddr,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    fn internal_url(&self, path: &str) -> String {
        format!("http://{}{}", self.internal, path)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_controller(
    bin: &Path,
    manifests: &Path,
    state: &Path,
    notify_url: &str,
    log: &Path,
    client: &reqwest::Client,
) -> anyhow::Result<Server> {
    let address = free_port()?;
    let internal = free_port()?;
    let log_file = File::create(log).context("creating the controller log file")?;
    let child = Command::new(bin)
        .arg("serve")
        .arg("--manifests")
        .arg(manifests)
        .arg("--state")
        .arg(state)
        .arg("--listen")
        .arg(address.to_string())
        .arg("--internal-listen")
        .arg(internal.to_string())
        .args(["--notify-url", notify_url, "--log-format", "json"])
        // Keep every record: the run ends by checking that each accepted event is stored.
        .args(["--retention-per-environment", "0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut server = Server {
        name: "pipeline-controller",
        child,
        address,
        internal,
    };
    wait_healthy(&mut server, client)
        .await
        .with_context(|| format!("log:\n{}", read_tail(log, 20)))?;
    Ok(server)
}

async fn start_bare(
    bin: &Path,
    key_file: &Path,
    client: &reqwest::Client,
) -> anyhow::Result<Server> {
    let mut child = Command::new(bin)
        .arg("0")
        .arg("--key-file")
        .arg(key_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("bare server stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines.map_while(Result::ok) {}
    });
    // Guard first, so the child is killed if anything below fails.
    let mut server = Server {
        name: "bare-hmac-server",
        child,
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
        internal: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let line = tokio::task::spawn_blocking(move || rx.recv_timeout(START_TIMEOUT))
        .await
        .context("waiting for the bare server's address")?
        .context("bare server printed no address")?
        .context("bare server closed stdout")?
        .context("reading the bare server's address")?;
    server.address = line
        .trim()
        .parse()
        .with_context(|| format!("bare server printed {line:?}, not an address"))?;
    wait_healthy(&mut server, client).await?;
    Ok(server)
}

/// Polls `GET /healthz` until 200 (bounded by [`START_TIMEOUT`]).
async fn wait_healthy(server: &mut Server, client: &reqwest::Client) -> anyhow::Result<()> {
    let url = server.url("/healthz");
    wait_ok(server, client, &url, START_TIMEOUT).await
}

/// Polls `GET url` until it answers 2xx, failing when `server` exits or after `timeout`
/// (naming the last answer).
async fn wait_ok(
    server: &mut Server,
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("none");
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("{} exited during start-up: {status}", server.name);
        }
        if let Ok(response) = client.get(url).send().await {
            if response.status().is_success() {
                return Ok(());
            }
            last = format!(
                "{}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "{} not answering {url} after {timeout:?} (last answer: {last})",
            server.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The notification receiver

// ---------------------------------------------------------------------------------------
// Events

/// A Flux event from helm-controller in `podinfo-dev` (as `crates/cli/tests/support`).
fn event(revision: &str) -> Bytes {
    let namespace = "podinfo-dev";
    let body = json!({
        "involvedObject": {"kind": "HelmRelease", "namespace": namespace, "name": "podinfo",
                           "apiVersion": "helm.toolkit.fluxcd.io/v2", "uid": "u1", "resourceVersion": "7"},
        "severity": "info",
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "message": format!("Helm upgrade succeeded for release {namespace}/podinfo.v2 with chart podinfo@{revision}"),
        "reason": "UpgradeSucceeded",
        "metadata": {"revision": revision},
        "reportingController": "helm-controller"
    });
    Bytes::from(body.to_string())
}

struct Request {
    body: Bytes,
    signature: String,
}

fn signed(key: &[u8], body: Bytes) -> Request {
    let signature = sign(HmacAlgorithm::Sha256, key, &body);
    Request { body, signature }
}

/// The `n` requests of a scenario, built before the clock starts.
fn requests(scenario: Scenario, key: &[u8], n: usize, tag: &str) -> Vec<Request> {
    match scenario {
        Scenario::New => (0..n)
            .map(|i| signed(key, event(&format!("{tag}.{i}"))))
            .collect(),
        Scenario::Duplicate => {
            let one = signed(key, event(&format!("{tag}.dup")));
            (0..n)
                .map(|_| Request {
                    body: one.body.clone(),
                    signature: one.signature.clone(),
                })
                .collect()
        }
        Scenario::BadSignature => (0..n)
            .map(|i| signed(b"not-the-key", event(&format!("{tag}.bad{i}"))))
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------
// Load

struct Stats {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    statuses: BTreeMap<u16, usize>,
    errors: usize,
    unexpected: usize,
    /// CPU time (user + system) the server process used during the run, in seconds.
    server_cpu: f64,
}

impl Stats {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile of the sorted latencies, in ms.
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank =
            ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        ms(self.latencies[rank - 1])
    }

    fn max(&self) -> f64 {
        self.latencies.last().map_or(f64::NAN, |d| ms(*d))
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// One HTTP/1.1 client per connection, so each worker keeps exactly one keep-alive
/// connection to the server.
fn connections(concurrency: usize) -> anyhow::Result<Vec<reqwest::Client>> {
    (0..concurrency)
        .map(|_| {
            reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .pool_max_idle_per_host(1)
                .http1_only()
                .build()
                .context("building an HTTP client")
        })
        .collect()
}

/// Sends the duplicate scenario's event once before the timed run: the first delivery
/// records the promotion (202); only repeats are timed. Returns whether it was new.
async fn prime_duplicate(
    control: &reqwest::Client,
    server: &Server,
    first: &Request,
) -> anyhow::Result<bool> {
    let response = control
        .post(server.url(WEBHOOK_PATH))
        .header("content-type", "application/json")
        .header("x-signature", &first.signature)
        .body(first.body.clone())
        .send()
        .await?;
    let status = response.status().as_u16();
    ensure!(
        matches!(status, 200 | 202),
        "priming the duplicate scenario: {}",
        response.status()
    );
    Ok(status == 202)
}

/// Opens every connection (a `GET /healthz` each) so connecting is not timed.
async fn warm_up(server: &Server, clients: &[reqwest::Client]) -> anyhow::Result<()> {
    let url = server.url("/healthz");
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            for _ in 0..3 {
                client.get(&url).send().await?.bytes().await?;
            }
            Ok::<_, reqwest::Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result?.context("warming up")?;
    }
    Ok(())
}

/// Sends every request in `requests` with `clients.len()` in flight, timing each from send
/// to the end of the response body.
async fn load(
    url: &str,
    clients: &[reqwest::Client],
    requests: Vec<Request>,
    expected: u16,
) -> anyhow::Result<Stats> {
    let total = requests.len();
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for client in clients {
        let (client, requests, next, url) = (
            client.clone(),
            requests.clone(),
            next.clone(),
            url.to_owned(),
        );
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(total / 8 + 1);
            let mut statuses = BTreeMap::<u16, usize>::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    break;
                };
                let sent = Instant::now();
                let result = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-signature", &request.signature)
                    .body(request.body.clone())
                    .send()
                    .await;
                match result {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let body = response.bytes().await;
                        latencies.push(sent.elapsed());
                        match body {
                            Ok(_) => *statuses.entry(status).or_default() += 1,
                            Err(_) => errors += 1,
                        }
                    }
                    Err(_) => {
                        latencies.push(sent.elapsed());
                        errors += 1;
                    }
                }
            }
            (latencies, statuses, errors)
        });
    }
    let mut stats = Stats {
        requests: total,
        elapsed: Duration::ZERO,
        latencies: Vec::with_capacity(total),
        statuses: BTreeMap::new(),
        errors: 0,
        unexpected: 0,
        server_cpu: 0.0,
    };
    while let Some(result) = tasks.join_next().await {
        let (latencies, statuses, errors) = result.context("a load worker panicked")?;
        stats.latencies.extend(latencies);
        for (status, count) in statuses {
            *stats.statuses.entry(status).or_default() += count;
        }
        stats.errors += errors;
    }
    stats.elapsed = started.elapsed();
    stats.latencies.sort_unstable();
    stats.unexpected = stats.errors
        + stats
            .statuses
            .iter()
            .filter(|(status, _)| **status != expected)
            .map(|(_, count)| count)
            .sum::<usize>();
    Ok(stats)
}

// ---------------------------------------------------------------------------------------
// Reporting helpers

/// The type of the file system holding `path` (longest matching mount point).
fn filesystem(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, kind)| kind)
}

/// Latency of a 4 KiB write + `fsync` (`sync_data`) in `dir`, 200 times: p50 and p99 in ms.
fn fsync_probe(dir: &Path) -> anyhow::Result<(f64, f64)> {
    use std::io::Write as _;
    let path = dir.join("fsync-probe");
    let mut file = File::create(&path).context("creating the fsync probe file")?;
    let block = [0x5a_u8; 4096];
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(started.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    times.sort_unstable();
    Ok((ms(times[99]), ms(times[197])))
}

fn copy_manifests(source: &Path, target: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(target)?;
    for entry in
        std::fs::read_dir(source).with_context(|| format!("reading {}", source.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml")
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, target.join(name))?;
        }
    }
    Ok(())
}

/// `n` Pipelines beside the benchmarked one (`flux-system/app-<i>`, dev → staging →
/// prod, the quickstart's Secret), as YAML documents.
fn other_pipelines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata:
  name: app-{i}
  namespace: flux-system
spec:
  appRef:
    apiVersion: helm.toolkit.fluxcd.io/v2
    kind: HelmRelease
    name: app-{i}
  environments:
    - name: dev
      targets:
        - namespace: app-{i}-dev
    - name: staging
      targets:
        - namespace: app-{i}-staging
    - name: prod
      targets:
        - namespace: app-{i}-prod
  promotion:
    strategy:
      secretRef:
        name: podinfo-promotion-hmac
      notification: {{}}
"
            )
        })
        .collect()
}

fn beside_this_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe.parent().context("this binary has no directory")?;
    Ok(dir.join(name))
}

// ---------------------------------------------------------------------------------------

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.requests > 0, "--requests must be positive");
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    let controller_bin = match args.controller_bin.clone() {
        Some(path) => path,
        None => beside_this_binary("pipeline-controller")?,
    };
    let bare_bin = match args.bare_bin.clone() {
        Some(path) => path,
        None => beside_this_binary("bare-hmac-server")?,
    };
    let quickstart = args
        .quickstart
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart"));
    let key_file = quickstart.join("hmac-key.txt");
    let mut key =
        std::fs::read(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
    if key.last() == Some(&b'\n') {
        key.pop();
    }
    if args.mode == Mode::Kubernetes {
        return kube_mode::run(&args, &controller_bin, &key).await;
    }

    let work = match &args.work_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("pipeline-bench")
            .tempdir_in(dir),
        None => tempfile::Builder::new().prefix("pipeline-bench").tempdir(),
    }
    .context("creating the work directory")?;
    let manifests = work.path().join("manifests");
    copy_manifests(&quickstart, &manifests)?;
    if args.pipelines > 1 {
        std::fs::write(
            manifests.join("bench-more-pipelines.yaml"),
            other_pipelines(args.pipelines - 1).join("---\n"),
        )?;
    }
    let state = work.path().join("state.redb");
    let fsync = fsync_probe(work.path())?;
    let log = work.path().join("controller.log");

    let control = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let receiver = Receiver::start().await?;
    let controller = start_controller(
        &controller_bin,
        &manifests,
        &state,
        &receiver.url,
        &log,
        &control,
    )
    .await?;
    let bare = start_bare(&bare_bin, &key_file, &control).await?;
    let idle = [memory(controller.pid()), memory(bare.pid())];

    println!(
        "pipeline-bench  {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!(
        "machine: {} cores ({}), {}; state file on {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
            |_| "unknown kernel".into(),
            |r| format!("Linux {}", r.trim())
        ),
        filesystem(work.path()),
    );
    println!(
        "disk: 4 KiB write + fsync in the state directory: p50 {:.2} ms, p99 {:.2} ms",
        fsync.0, fsync.1
    );
    println!(
        "load average at start (1/5/15 min): {}",
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    );
    println!(
        "load: {} requests per scenario and server, {} concurrent keep-alive HTTP/1.1 connections, loopback; {} pipeline(s) loaded",
        args.requests, args.concurrency, args.pipelines
    );
    println!("note: both servers and this load generator share the same machine (and its cores).");
    println!(
        "pipeline-controller: release build, RUST_LOG=warn --log-format json, embedded redb state,\n  \
         --notify-url to a 200-OK receiver in this process: the executor notifies every new\n  \
         record concurrently with the load (real work, not stubbed)."
    );
    println!(
        "bare-hmac-server: axum, 256 KiB body limit, constant-time HMAC-SHA256 check, JSON parse, 202."
    );
    println!();

    let clients = [
        connections(args.concurrency)?,
        connections(args.concurrency)?,
    ];
    warm_up(&controller, &clients[0]).await?;
    warm_up(&bare, &clients[1]).await?;

    let run_tag = chrono::Utc::now().format("%H%M%S").to_string();
    let mut rows: Vec<(Scenario, &'static str, Stats)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut accepted = 0usize;
    for &scenario in &args.scenarios {
        for (server, clients) in [(&bare, &clients[1]), (&controller, &clients[0])] {
            let is_controller = std::ptr::eq(server, &controller);
            let tag = format!("{run_tag}-{}", server.name);
            let requests = requests(scenario, &key, args.requests, &tag);
            let expected = match (scenario, is_controller) {
                (Scenario::BadSignature, _) => 401,
                (Scenario::Duplicate, true) => 200,
                (_, _) => 202,
            };
            if scenario == Scenario::Duplicate
                && is_controller
                && prime_duplicate(&control, server, &requests[0]).await?
            {
                accepted += 1;
            }
            let cpu_before = cpu_seconds(server.pid());
            let mut stats = load(&server.url(WEBHOOK_PATH), clients, requests, expected).await?;
            stats.server_cpu = cpu_seconds(server.pid()) - cpu_before;
            if is_controller {
                accepted += stats.statuses.get(&202).copied().unwrap_or(0);
            }
            if stats.unexpected > 0 {
                notes.push(format!(
                    "{} / {}: expected {expected}, got {:?} and {} transport errors",
                    scenario.name(),
                    server.name,
                    stats.statuses,
                    stats.errors
                ));
            }
            eprintln!(
                "  done: {:<13} {:<19} {:>8.0} req/s",
                scenario.name(),
                server.name,
                stats.throughput()
            );
            rows.push((scenario, server.name, stats));

            if scenario == Scenario::New && is_controller {
                // Let the executor catch up so its backlog does not load the next scenario.
                let rss_after_new = memory(controller.pid()).0;
                let started = Instant::now();
                let deadline = started + Duration::from_secs(args.drain_timeout);
                while receiver.count() < accepted && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                notes.push(format!(
                    "executor: {} of {} new records notified {:.1} s after the `new` run ended{}; \
                     pipeline-controller RSS {rss_after_new} when the run ended, {} after the drain",
                    receiver.count(),
                    accepted,
                    started.elapsed().as_secs_f64(),
                    if receiver.count() < accepted {
                        " (drain timeout reached)"
                    } else {
                        ""
                    },
                    memory(controller.pid()).0,
                ));
            }
        }
    }

    // Memory right after the runs, before anything else touches the servers.
    let after = [memory(controller.pid()), memory(bare.pid())];

    let mut table = String::new();
    writeln!(
        table,
        "| scenario | server | requests | throughput (req/s) | p50 (ms) | p99 (ms) | max (ms) | unexpected | server CPU (ms/req) |"
    )?;
    writeln!(table, "|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (scenario, server, stats) in &rows {
        writeln!(
            table,
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.3} |",
            scenario.name(),
            server,
            stats.requests,
            stats.throughput(),
            stats.percentile(0.50),
            stats.percentile(0.99),
            stats.max(),
            stats.unexpected,
            stats.server_cpu * 1000.0 / stats.requests as f64,
        )?;
    }
    println!("{table}");

    println!("| process | RSS idle | RSS after runs | peak RSS (VmHWM) |");
    println!("|---|---:|---:|---:|");
    for (i, server) in [&controller, &bare].into_iter().enumerate() {
        println!(
            "| {} | {} | {} | {} |",
            server.name, idle[i].0, after[i].0, after[i].1
        );
    }
    println!();

    // Sanity: what the store holds.
    let records: Value = control
        .get(controller.internal_url("/api/v1/promotions"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let records = records.as_array().cloned().unwrap_or_default();
    let mut phases = BTreeMap::<String, usize>::new();
    for record in &records {
        let phase = record
            .get("phase")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        *phases.entry(phase).or_default() += 1;
    }
    let state_bytes = std::fs::metadata(&state).map_or(0, |m| m.len());
    println!(
        "store: {} records (expected {accepted} accepted), phases {phases:?}, state file {:.1} MiB; \
         receiver got {} notifications",
        records.len(),
        state_bytes as f64 / (1024.0 * 1024.0),
        receiver.count()
    );
    for note in &notes {
        println!("{note}");
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut messages = BTreeMap::<String, usize>::new();
    for line in log_text.lines() {
        let message = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|entry| {
                let level = entry.get("level")?.as_str()?.to_owned();
                let message = entry.get("message")?.as_str()?.to_owned();
                Some(format!("{level} {message}"))
            })
            .unwrap_or_else(|| line.to_owned());
        *messages.entry(message).or_default() += 1;
    }
    println!(
        "pipeline-controller log (RUST_LOG=warn): {} lines {messages:?}",
        log_text.lines().count()
    );
    ensure!(
        records.len() == accepted,
        "the store holds {} records, {accepted} were accepted",
        records.len()
    );
    Ok(())
}
