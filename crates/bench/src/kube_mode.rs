//! `pipeline-bench --mode kubernetes`: the webhook in Kubernetes mode against a real test
//! API server (etcd + kube-apiserver from `pipeline-testenv`), beside the ceiling for one
//! durable write per event: Promotions created directly by the bench, in the same run,
//! against the same API server.
//!
//! API requests are counted from the API server's own `apiserver_request_total`, so the
//! figures include everything the controller does (its request path, the executor, the
//! reconciler, Events), not what it believes it does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use pipeline_bench::{
    Receiver, cpu_seconds, free_port, memory, metric_samples, pids_mentioning, proc_status,
    read_tail, rss_kib, status_kib,
};
use pipeline_core::{PipelineRef, PromotionRecord, Trigger};
use pipeline_crds::Promotion;
use pipeline_testenv::TestCluster;

use super::{
    Args, Scenario, Server, Stats, WEBHOOK_PATH, connections, load, ms, requests, signed, warm_up,
};

/// The Pipeline the bench promotes: dev → staging, both in the controller's own cluster,
/// notification strategy (Kubernetes Events and `--events-addr`).
const PIPELINE_YAML: &str = r#"
apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata:
  name: podinfo
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
  promotion:
    strategy:
      secretRef:
        name: podinfo-promotion-hmac
      notification: {}
"#;

/// Creates the `n` other Pipelines of `--pipelines`, `concurrency` at a time.
async fn create_other_pipelines(
    cluster: &TestCluster,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let documents = super::other_pipelines(n);
    let mut applied = futures::stream::iter(documents.iter().map(|yaml| cluster.apply_yaml(yaml)))
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = applied.next().await {
        result.context("creating the other Pipelines")?;
    }
    Ok(())
}

/// Splits the CPUs this process may use in two halves: the first for the cluster (a
/// `taskset` list, returned), the second for this process, its threads and whatever it
/// starts later (the controller), set here with `taskset --all-tasks`.
fn split_cpus() -> anyhow::Result<(String, String)> {
    let allowed = proc_status(std::process::id())
        .remove("Cpus_allowed_list")
        .context("no Cpus_allowed_list in /proc/self/status")?;
    let cpus = cpu_list(&allowed)?;
    ensure!(
        cpus.len() >= 2,
        "--split-cpus needs at least 2 CPUs, this process may use {}",
        cpus.len()
    );
    let (cluster, rest) = cpus.split_at(cpus.len() / 2);
    let join = |c: &[usize]| c.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let (cluster, rest) = (join(cluster), join(rest));
    let pinned = Command::new("taskset")
        .args(["--all-tasks", "--cpu-list", "--pid", &rest])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    ensure!(
        pinned.success(),
        "taskset could not pin the bench to CPUs {rest}: {pinned}"
    );
    Ok((cluster, rest))
}

/// The CPUs of a kernel CPU list such as `0-3,6`.
fn cpu_list(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let parse = |n: &str| {
            n.trim()
                .parse::<usize>()
                .with_context(|| format!("CPU list {text:?}"))
        };
        cpus.extend(parse(first)?..=parse(last)?);
    }
    Ok(cpus)
}

/// Where the raw-create baseline puts its Promotions (no Pipeline there).
const BASELINE_NAMESPACE: &str = "bench-baseline";

/// API requests by (verb, resource[/subresource]), from `apiserver_request_total`.
#[derive(Debug, Default, Clone)]
struct Requests(BTreeMap<(String, String), f64>);

impl Requests {
    fn read(metrics: &str) -> Self {
        let mut counts = BTreeMap::new();
        for (labels, value) in metric_samples(metrics, "apiserver_request_total") {
            let verb = labels.get("verb").copied().unwrap_or("?").to_owned();
            let mut resource = labels.get("resource").copied().unwrap_or("").to_owned();
            if let Some(sub) = labels.get("subresource").filter(|s| !s.is_empty()) {
                resource = format!("{resource}/{sub}");
            }
            if resource.is_empty() {
                resource = "(non-resource)".into();
            }
            *counts.entry((verb, resource)).or_default() += value;
        }
        Self(counts)
    }

    fn since(&self, before: &Self) -> Self {
        let mut delta = BTreeMap::new();
        for (key, value) in &self.0 {
            let d = value - before.0.get(key).copied().unwrap_or(0.0);
            if d >= 0.5 {
                delta.insert(key.clone(), d);
            }
        }
        Self(delta)
    }

    /// Requests that change something (everything but GET, LIST and WATCH).
    fn writes(&self) -> f64 {
        self.0
            .iter()
            .filter(|((verb, _), _)| !matches!(verb.as_str(), "GET" | "LIST" | "WATCH"))
            .map(|(_, v)| v)
            .sum::<f64>()
            + 0.0
    }

    fn total(&self) -> f64 {
        // `+ 0.0`: an empty f64 sum is -0.0, printed as "-0".
        self.0.values().sum::<f64>() + 0.0
    }

    fn count(&self, verb: &str, resource: &str) -> f64 {
        self.0
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0.0)
    }

    /// `VERB resource n` items, per `per` (e.g. per promotion), largest first.
    fn breakdown(&self, per: f64) -> String {
        let mut items: Vec<_> = self.0.iter().collect();
        items.sort_by(|a, b| b.1.total_cmp(a.1));
        items
            .iter()
            .map(|((verb, resource), n)| format!("{verb} {resource} {:.2}", *n / per))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// User + system CPU seconds of the test API server and its etcd together.
fn cluster_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

async fn api_requests(cluster: &TestCluster) -> anyhow::Result<Requests> {
    Ok(Requests::read(
        &cluster
            .metrics_text()
            .await
            .context("reading the API server's /metrics")?,
    ))
}

/// A Promotion as the controller creates one (same spec, labels and size), for the
/// baseline.
fn baseline_promotion(i: usize) -> Promotion {
    let trigger = Trigger {
        source: "webhook".into(),
        reason: "UpgradeSucceeded".into(),
        reporting_controller: "helm-controller".into(),
        object: "HelmRelease/podinfo-dev/podinfo".into(),
        ..Trigger::default()
    };
    let record = PromotionRecord::new(
        PipelineRef::new(BASELINE_NAMESPACE, "podinfo"),
        "dev",
        "staging",
        &format!("6.{i}.0"),
        false,
        trigger,
        chrono::Utc::now(),
    );
    pipeline_kube::convert::promotion_for(&record, false)
}

struct Baseline {
    creates: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    failures: usize,
    cluster_cpu: f64,
    requests: Requests,
}

impl Baseline {
    fn throughput(&self) -> f64 {
        self.creates as f64 / self.elapsed.as_secs_f64()
    }
}

/// One baseline run ([`raw_creates`]), reported on stderr; its Promotions are deleted
/// afterwards.
async fn baseline_run(
    cluster: &TestCluster,
    cluster_pids: &[u32],
    args: &Args,
    watched: bool,
) -> anyhow::Result<Baseline> {
    let run = raw_creates(
        cluster,
        cluster_pids,
        args.requests,
        args.concurrency,
        watched,
    )
    .await?;
    let name = if watched {
        "raw creates, watched"
    } else {
        "raw creates"
    };
    eprintln!("  done: {name} {:>8.0} creates/s", run.throughput());
    remove_baseline(cluster).await?;
    Ok(run)
}

/// A client of its own (its own connections), as the controller is a client of its own.
async fn fresh_client(cluster: &TestCluster) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig_path())?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Creates Promotions `range` with one client per worker, `concurrency` in flight,
/// timing each create.
async fn creates(
    clients: &[kube::Client],
    range: std::ops::Range<usize>,
) -> (Vec<Duration>, usize) {
    let objects: Arc<Vec<Promotion>> = Arc::new(range.map(baseline_promotion).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let api: Api<Promotion> = Api::namespaced(client.clone(), BASELINE_NAMESPACE);
        let (objects, next) = (objects.clone(), next.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0;
            while let Some(object) = objects.get(next.fetch_add(1, Ordering::Relaxed)) {
                let sent = Instant::now();
                if api.create(&PostParams::default(), object).await.is_err() {
                    failures += 1;
                }
                latencies.push(sent.elapsed());
            }
            (latencies, failures)
        });
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok((l, f)) => {
                latencies.extend(l);
                failures += f;
            }
            Err(_) => failures += 1,
        }
    }
    (latencies, failures)
}

/// The raw create ceiling: `n` Promotions created by `concurrency` clients, each with
/// its own connections, after a warm-up round that is not timed (connections, the
/// API server's first writes of the resource).
/// With `watched`, one watch of every Promotion (a client of its own, decoding each
/// event as the controller's shared watch does) stays open throughout.
async fn raw_creates(
    cluster: &TestCluster,
    cluster_pids: &[u32],
    n: usize,
    concurrency: usize,
    watched: bool,
) -> anyhow::Result<Baseline> {
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(fresh_client(cluster).await?);
    }
    let _watch = if watched {
        let api = Api::<Promotion>::all(fresh_client(cluster).await?);
        let task = tokio::spawn(async move {
            let stream = kube::runtime::watcher(api, kube::runtime::watcher::Config::default());
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                std::hint::black_box(event.ok());
            }
        });
        Some(pipeline_kube::watch::AbortOnDrop(task))
    } else {
        None
    };
    let warm_up = concurrency * 4;
    let (_, failures) = creates(&clients, n..n + warm_up).await;
    ensure!(failures == 0, "{failures} of the warm-up creates failed");
    let before = api_requests(cluster).await?;
    let cpu_before = cluster_cpu(cluster_pids);
    let started = Instant::now();
    let (mut latencies, failures) = creates(&clients, 0..n).await;
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Baseline {
        creates: n,
        elapsed,
        latencies,
        failures,
        cluster_cpu: cluster_cpu(cluster_pids) - cpu_before,
        requests: api_requests(cluster).await?.since(&before),
    })
}

/// Deletes the baseline's Promotions and waits until they are gone (bounded).
async fn remove_baseline(cluster: &TestCluster) -> anyhow::Result<()> {
    let api: Api<Promotion> = Api::namespaced(cluster.client(), BASELINE_NAMESPACE);
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .context("deleting the baseline Promotions")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = api.list_metadata(&ListParams::default()).await?.items.len();
        if left == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{left} baseline Promotions still there after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Phase counts of the Promotions in `namespace` (a Promotion without status is Pending).
async fn phases(cluster: &TestCluster, namespace: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let api: Api<Promotion> = Api::namespaced(cluster.client(), namespace);
    let mut counts = BTreeMap::new();
    for promotion in api.list(&ListParams::default()).await?.items {
        let phase = promotion
            .status
            .as_ref()
            .and_then(|s| s.phase.as_ref())
            .map_or_else(|| "Pending".to_owned(), |phase| format!("{phase:?}"));
        *counts.entry(phase).or_default() += 1;
    }
    Ok(counts)
}

/// Waits until `receiver` has `count` notifications (the executor finished every new
/// promotion), bounded by `timeout`; returns how long it took.
async fn drained(receiver: &Receiver, count: usize, timeout: Duration) -> (Duration, bool) {
    let started = Instant::now();
    while receiver.count() < count && started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (started.elapsed(), receiver.count() >= count)
}

async fn start_controller(
    bin: &Path,
    kubeconfig: &Path,
    events_addr: &str,
    retention_per_environment: usize,
    log: &Path,
    client: &reqwest::Client,
) -> anyhow::Result<Server> {
    let address = free_port()?;
    let internal = free_port()?;
    let log_file = File::create(log).context("creating the controller log file")?;
    let child = Command::new(bin)
        .args(["serve", "--listen", &address.to_string()])
        .args(["--internal-listen", &internal.to_string()])
        .args([
            "--lease-namespace",
            "default",
            "--identity",
            "pipeline-bench",
        ])
        .args(["--events-addr", events_addr, "--no-deployment-watch"])
        .args([
            "--retention-per-environment",
            &retention_per_environment.to_string(),
        ])
        .args(["--log-format", "json", "--log-level", "warn"])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("RUST_LOG")
        .env_remove("PIPELINE_CONTROLLER_MANIFESTS")
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
    // Ready means leader with synced caches: only then is the timed load meaningful.
    let url = server.internal_url("/readyz");
    super::wait_ok(&mut server, client, &url, Duration::from_secs(60))
        .await
        .with_context(|| format!("log:\n{}", read_tail(log, 20)))?;
    Ok(server)
}

/// A receiver for notifications, a ready controller (`--retention-per-environment` as
/// asked) notifying it, and the bench's connections to that controller.
async fn start_with_receiver(
    args: &Args,
    cluster: &TestCluster,
    controller_bin: &Path,
    log: &Path,
    control: &reqwest::Client,
) -> anyhow::Result<(Receiver, Server, Vec<reqwest::Client>)> {
    let receiver = Receiver::start().await?;
    let controller = start_controller(
        controller_bin,
        cluster.kubeconfig_path(),
        &receiver.url,
        args.retention_per_environment,
        log,
        control,
    )
    .await?;
    let clients = connections(args.concurrency)?;
    Ok((receiver, controller, clients))
}

/// Sends `n` new events (distinct revisions) with the bench's connections, for the
/// memory phase; returns how many were accepted.
async fn send_new(
    server: &Server,
    clients: &[reqwest::Client],
    key: &[u8],
    tag: &str,
    n: usize,
) -> anyhow::Result<usize> {
    let requests = (0..n)
        .map(|i| signed(key, super::event(&format!("{tag}.{i}"))))
        .collect();
    let stats = load(&server.url(WEBHOOK_PATH), clients, requests, 202).await?;
    Ok(stats.statuses.get(&202).copied().unwrap_or(0))
}

pub(crate) async fn run(args: &Args, controller_bin: &Path, key: &[u8]) -> anyhow::Result<()> {
    let cluster_cpus = if args.split_cpus {
        let (cluster, rest) = split_cpus()?;
        eprintln!("  etcd + kube-apiserver on CPUs {cluster}; bench and controller on CPUs {rest}");
        Some(cluster)
    } else {
        None
    };
    let cluster = TestCluster::start_on_cpus("pipeline-bench", cluster_cpus)
        .await
        .context("starting etcd + kube-apiserver (scripts/ensure-test-binaries.sh kube)")?;
    cluster.install_crds().await?;
    for namespace in [
        "flux-system",
        "podinfo-dev",
        "podinfo-staging",
        BASELINE_NAMESPACE,
    ] {
        cluster.ensure_namespace(namespace).await?;
    }
    let key_text = String::from_utf8(key.to_vec()).context("the HMAC key is not UTF-8")?;
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "podinfo-promotion-hmac", "namespace": "flux-system"},
        "stringData": {"hmac-key": key_text}
    });
    cluster
        .apply_yaml(&serde_json::to_string(&secret)?)
        .await
        .context("creating the HMAC Secret")?;
    cluster
        .apply_yaml(PIPELINE_YAML)
        .await
        .context("creating the Pipeline")?;
    create_other_pipelines(&cluster, args.pipelines.saturating_sub(1), args.concurrency).await?;

    let cluster_dir = cluster.dir().to_string_lossy().into_owned();
    let cluster_pids = pids_mentioning(&cluster_dir);
    ensure!(
        cluster_pids.len() >= 2,
        "found {} processes of the test cluster under {cluster_dir} (expected etcd and kube-apiserver)",
        cluster_pids.len()
    );

    println!(
        "pipeline-bench --mode kubernetes  {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!(
        "machine: {} cores ({}); load average at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        pipeline_bench::cpu_model(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    );
    println!(
        "API server: kube-apiserver {} + etcd {} (pipeline-testenv, one member, data on {}), on this machine",
        std::env::var("PIPELINE_KUBE_VERSION").unwrap_or_else(|_| "?".into()),
        std::env::var("PIPELINE_ETCD_VERSION").unwrap_or_else(|_| "?".into()),
        cluster.dir().display()
    );
    println!(
        "load: {} requests per scenario, {} concurrent keep-alive HTTP/1.1 connections, loopback; \
         baseline: {} Promotion creates by {} concurrent clients (each its own connections, after \
         an untimed warm-up); {} Pipeline(s)",
        args.requests, args.concurrency, args.requests, args.concurrency, args.pipelines
    );
    println!();

    let work = tempfile::Builder::new()
        .prefix("pipeline-bench-kube")
        .tempdir()?;
    let control = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // Earlier rounds of the comparison (`--rounds`); the last round is the full run below.
    let mut rounds = Vec::new();
    for round in 1..args.rounds {
        let log = work.path().join(format!("controller-round-{round}.log"));
        rounds.push(
            comparison_round(
                args,
                &cluster,
                &cluster_pids,
                controller_bin,
                key,
                &control,
                &log,
            )
            .await
            .with_context(|| format!("round {round}; log:\n{}", read_tail(&log, 20)))?,
        );
    }

    // The ceiling: one durable write per event, nothing else; then what the watch the
    // controller keeps (and any other watcher) costs the creates.
    let baseline = baseline_run(&cluster, &cluster_pids, args, false).await?;
    let watched = baseline_run(&cluster, &cluster_pids, args, true).await?;

    let log = work.path().join("controller.log");
    let (receiver, controller, clients) =
        start_with_receiver(args, &cluster, controller_bin, &log, &control).await?;
    let idle_rss = rss_kib(controller.pid());
    warm_up(&controller, &clients).await?;

    let run_tag = chrono::Utc::now().format("%H%M%S").to_string();
    let mut rows: Vec<(Scenario, Stats, Requests, f64)> = Vec::new();
    let mut notes = Vec::new();
    let mut accepted = 0usize;
    let mut lifetime: Option<(Requests, f64, usize)> = None;
    for &scenario in &args.scenarios {
        let requests = requests(scenario, key, args.requests, &run_tag);
        let expected = match scenario {
            Scenario::New => 202,
            Scenario::Duplicate => 200,
            Scenario::BadSignature => 401,
        };
        if scenario == Scenario::Duplicate
            && super::prime_duplicate(&control, &controller, &requests[0]).await?
        {
            accepted += 1;
            drained(&receiver, accepted, Duration::from_secs(30)).await;
        }
        let before = api_requests(&cluster).await?;
        let cpu_before = (cpu_seconds(controller.pid()), cluster_cpu(&cluster_pids));
        let mut stats = load(&controller.url(WEBHOOK_PATH), &clients, requests, expected).await?;
        let during = api_requests(&cluster).await?.since(&before);
        stats.server_cpu = cpu_seconds(controller.pid()) - cpu_before.0;
        let cluster_cpu_during = cluster_cpu(&cluster_pids) - cpu_before.1;
        if stats.unexpected > 0 {
            notes.push(format!(
                "{}: expected {expected}, got {:?} and {} transport errors",
                scenario.name(),
                stats.statuses,
                stats.errors
            ));
        }
        eprintln!(
            "  done: {:<13} {:>8.0} req/s",
            scenario.name(),
            stats.throughput()
        );
        if scenario == Scenario::New {
            let new = stats.statuses.get(&202).copied().unwrap_or(0);
            accepted += new;
            let (took, complete) =
                drained(&receiver, accepted, Duration::from_secs(args.drain_timeout)).await;
            // Let the last status writes land before counting the whole life.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let whole = api_requests(&cluster).await?.since(&before);
            let cpu = cluster_cpu(&cluster_pids) - cpu_before.1;
            notes.push(format!(
                "executor: {} of {accepted} promotions notified {:.1} s after the `new` run ended{}",
                receiver.count(),
                took.as_secs_f64(),
                if complete { "" } else { " (drain timeout reached)" }
            ));
            lifetime = Some((whole, cpu, new));
        }
        rows.push((scenario, stats, during, cluster_cpu_during));
    }
    let after_rss = rss_kib(controller.pid());

    let ceiling = baseline.throughput();
    let mut out = String::new();
    writeln!(
        out,
        "| run | requests | throughput (req/s) | × raw create ceiling | p50 (ms) | p99 (ms) | max (ms) | unexpected | API requests / request (writes) | API server + etcd CPU (ms/req) | controller CPU (ms/req) |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let pct = |lat: &[Duration], p: f64| {
        if lat.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
        ms(lat[rank - 1])
    };
    for (name, run) in [
        ("raw Promotion creates (baseline)", &baseline),
        ("raw Promotion creates, one watch open", &watched),
    ] {
        let throughput = run.throughput();
        writeln!(
            out,
            "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} ({:.2}) | {:.2} | – |",
            run.creates,
            throughput,
            throughput / ceiling,
            pct(&run.latencies, 0.5),
            pct(&run.latencies, 0.99),
            run.latencies.last().map_or(f64::NAN, |d| ms(*d)),
            run.failures,
            run.requests.total() / run.creates as f64,
            run.requests.writes() / run.creates as f64,
            run.cluster_cpu * 1000.0 / run.creates as f64,
        )?;
    }
    for (scenario, stats, during, cpu) in &rows {
        let n = stats.requests as f64;
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} ({:.2}) | {:.2} | {:.3} |",
            scenario.name(),
            stats.requests,
            stats.throughput(),
            stats.throughput() / ceiling,
            stats.percentile(0.50),
            stats.percentile(0.99),
            stats.max(),
            stats.unexpected,
            during.total() / n,
            during.writes() / n,
            cpu * 1000.0 / n,
            stats.server_cpu * 1000.0 / n,
        )?;
    }
    println!("{out}");
    if let Some((_, stats, _, _)) = rows.iter().find(|(s, ..)| *s == Scenario::New) {
        rounds.push((ceiling, watched.throughput(), stats.throughput()));
    }
    if rounds.len() > 1 {
        let of_raw: Vec<f64> = rounds.iter().map(|(raw, _, new)| new / raw).collect();
        let of_watched: Vec<f64> = rounds.iter().map(|(_, w, new)| new / w).collect();
        let list = |values: &[f64]| {
            values
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "new events over {} rounds (each with its own baselines and a fresh controller): \
             median {:.2}× of the raw create ceiling ({}), median {:.2}× of the watched one ({})",
            rounds.len(),
            median(of_raw.clone()),
            list(&of_raw),
            median(of_watched.clone()),
            list(&of_watched)
        );
        println!();
    }
    println!(
        "\"API requests / request\" counts every request the API server served during the run (the controller's request path and whatever its executor did meanwhile), divided by the requests sent."
    );
    if let Some((whole, cpu, new)) = &lifetime {
        let n = (*new).max(1) as f64;
        println!(
            "whole life of the {new} new promotions (from the first event to the last notification): \
             {:.2} API writes and {:.2} requests in all per promotion, {:.2} ms API server + etcd CPU each",
            whole.writes() / n,
            whole.total() / n,
            cpu * 1000.0 / n
        );
        println!(
            "  of which Promotion creates {:.2}, Promotion status writes {:.2}, Events {:.2}",
            whole.count("POST", "promotions") / n,
            (whole.count("PUT", "promotions/status") + whole.count("PATCH", "promotions/status"))
                / n,
            (whole.count("POST", "events") + whole.count("PATCH", "events")) / n,
        );
        println!(
            "  by verb and resource, per promotion: {}",
            whole.breakdown(n)
        );
    }
    for (scenario, stats, during, _) in &rows {
        if *scenario != Scenario::New {
            println!(
                "{}: API requests during the run: {} in all ({})",
                scenario.name(),
                during.total(),
                if during.total() == 0.0 {
                    "answered from the cache".to_owned()
                } else {
                    during.breakdown(stats.requests as f64) + " per request"
                }
            );
        }
    }
    for note in &notes {
        println!("{note}");
    }
    println!(
        "controller RSS: idle {idle_rss} KiB, after the runs {after_rss} KiB; Promotions now {:?}",
        phases(&cluster, "flux-system").await?
    );

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    println!(
        "pipeline-controller log (warn and above): {} lines{}",
        log_text.lines().count(),
        if log_text.is_empty() {
            String::new()
        } else {
            format!(", last:\n{}", read_tail(&log, 5))
        }
    );
    drop(controller);

    if args.history > 0 {
        memory_growth(args, &cluster, controller_bin, key, &control, work.path()).await?;
    }
    cluster.stop().await;
    Ok(())
}

/// Deletes the Promotions the scenarios made and waits until they are gone (bounded).
async fn delete_scenario_promotions(cluster: &TestCluster) -> anyhow::Result<Api<Promotion>> {
    let api: Api<Promotion> = Api::namespaced(cluster.client(), "flux-system");
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .context("deleting the scenarios' Promotions")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !api
        .list_metadata(&ListParams::default())
        .await?
        .items
        .is_empty()
    {
        ensure!(
            Instant::now() < deadline,
            "Promotions not deleted after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(api)
}

/// One round of the new-event comparison: both baselines, then a fresh controller's new
/// events; its Promotions are deleted afterwards. Returns (raw, watched, new) per second.
async fn comparison_round(
    args: &Args,
    cluster: &TestCluster,
    cluster_pids: &[u32],
    controller_bin: &Path,
    key: &[u8],
    control: &reqwest::Client,
    log: &Path,
) -> anyhow::Result<(f64, f64, f64)> {
    let raw = baseline_run(cluster, cluster_pids, args, false).await?;
    let watched = baseline_run(cluster, cluster_pids, args, true).await?;
    let (receiver, controller, clients) =
        start_with_receiver(args, cluster, controller_bin, log, control).await?;
    warm_up(&controller, &clients).await?;
    let tag = chrono::Utc::now().format("r%H%M%S").to_string();
    let requests = requests(Scenario::New, key, args.requests, &tag);
    let stats = load(&controller.url(WEBHOOK_PATH), &clients, requests, 202).await?;
    ensure!(
        stats.unexpected == 0,
        "new events: expected 202, got {:?} and {} transport errors",
        stats.statuses,
        stats.errors
    );
    eprintln!("  done: new (round)  {:>8.0} req/s", stats.throughput());
    drained(
        &receiver,
        args.requests,
        Duration::from_secs(args.drain_timeout),
    )
    .await;
    drop(controller);
    delete_scenario_promotions(cluster).await?;
    Ok((raw.throughput(), watched.throughput(), stats.throughput()))
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A fresh controller on an empty namespace, then new events until `--history`
/// promotions were made, printing the controller's RSS at each step (with the retention
/// policy as configured: `--retention-per-environment`).
async fn memory_growth(
    args: &Args,
    cluster: &TestCluster,
    controller_bin: &Path,
    key: &[u8],
    control: &reqwest::Client,
    work: &Path,
) -> anyhow::Result<()> {
    let api = delete_scenario_promotions(cluster).await?;
    let log = work.join("controller-memory.log");
    let (receiver, controller, clients) =
        start_with_receiver(args, cluster, controller_bin, &log, control).await?;
    warm_up(&controller, &clients).await?;
    println!();
    println!(
        "memory: a fresh controller, no Promotions; then new events until {} promotions were \
         made, {} at a time (--history-batch; --retention-per-environment {}). Memory 5 s after \
         every promotion of a step is notified (heap: jemalloc's statistics from /metrics):",
        args.history, args.history_batch, args.retention_per_environment
    );
    println!(
        "| promotions made | Promotion objects kept | records the controller lists | controller RSS (KiB) | of which anonymous (KiB) | heap: live data (KiB) | heap: pages holding it (KiB) | peak RSS (VmHWM) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| 0 | 0 | 0 | {} |",
        memory_columns(&controller, control).await?
    );
    let mut steps: Vec<usize> = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 20_000, 50_000]
        .into_iter()
        .filter(|step| *step < args.history)
        .collect();
    steps.push(args.history);
    let tag = chrono::Utc::now().format("m%H%M%S").to_string();
    let mut made = 0usize;
    for step in steps {
        if step <= made {
            continue;
        }
        while made < step {
            let batch = match args.history_batch {
                0 => step - made,
                n => n.min(step - made),
            };
            let accepted =
                send_new(&controller, &clients, key, &format!("{tag}-{made}"), batch).await?;
            ensure!(
                accepted == batch,
                "{accepted} of {batch} new events accepted"
            );
            made += batch;
            let (_, complete) =
                drained(&receiver, made, Duration::from_secs(args.drain_timeout)).await;
            ensure!(
                complete,
                "only {} of {made} promotions notified after {} s",
                receiver.count(),
                args.drain_timeout
            );
        }
        // Let the last status writes, retention's deletes and the allocator's return of
        // freed pages (after about a second) finish, so every row is a quiet moment.
        tokio::time::sleep(STEP_SETTLE).await;
        let kept = api.list_metadata(&ListParams::default()).await?.items.len();
        let listed = control
            .get(controller.internal_url("/api/v1/promotions"))
            .send()
            .await?
            .error_for_status()?
            .json::<Vec<serde_json::Value>>()
            .await?
            .len();
        println!(
            "| {made} | {kept} | {listed} | {} |",
            memory_columns(&controller, control).await?
        );
    }
    tokio::time::sleep(SETTLE).await;
    println!(
        "after {} s idle: | {} |",
        SETTLE.as_secs(),
        memory_columns(&controller, control).await?
    );
    Ok(())
}

/// The memory columns of one row: RSS, its anonymous part, the allocator's live data and
/// active pages (from the controller's `/metrics`, in KiB) and the peak RSS.
async fn memory_columns(controller: &Server, control: &reqwest::Client) -> anyhow::Result<String> {
    let metrics = control
        .get(controller.internal_url("/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let heap_kib = |kind: &str| {
        metric_samples(&metrics, "pipeline_controller_heap_bytes")
            .find(|(labels, _)| labels.get("kind") == Some(&kind))
            .map_or_else(
                || "?".to_owned(),
                |(_, bytes)| format!("{:.0}", bytes / 1024.0),
            )
    };
    let pid = controller.pid();
    Ok(format!(
        "{} | {} | {} | {} | {}",
        rss_kib(pid),
        status_kib(pid, "RssAnon"),
        heap_kib("allocated"),
        heap_kib("active"),
        memory(pid).1
    ))
}

/// How long the memory phase waits after each step's last notification.
const STEP_SETTLE: Duration = Duration::from_secs(5);

/// How long the memory phase waits at its end before reading RSS once more (the
/// allocator gives freed memory back after a decay of about 10 s).
const SETTLE: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::cpu_list;

    #[test]
    fn a_kernel_cpu_list_expands_ranges_and_single_cpus() {
        assert_eq!(cpu_list("0-1").unwrap(), vec![0, 1]);
        assert_eq!(cpu_list("0-2,5,7-8").unwrap(), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(cpu_list("3").unwrap(), vec![3]);
        assert!(cpu_list("0-x").is_err());
    }
}
