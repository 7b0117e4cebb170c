//! `watch-bench`: a benchmark (not a test) of the deployment watch at scale.
//!
//! Starts a management cluster and three leaf clusters (each a real etcd + kube-apiserver
//! from pipeline-testenv) and N Pipelines (default 1,000, each in its own namespace unless
//! `--namespaces` says fewer) of three environments. Their dev, staging and prod targets
//! are HelmReleases in leaf 1, 2 and 3, reached through one GitopsCluster (and kubeconfig
//! Secret, key `value`) per leaf. The 3×N HelmReleases start not Ready. Then it starts the
//! release `pipeline-controller serve` in Kubernetes mode against the management cluster
//! (with its admin kubeconfig, so no RBAC objects are needed) and waits until its watches
//! have synced. In each round (`--rounds`, default 2) every dev HelmRelease becomes Ready
//! at a new chart version at once, through the status subresource as helm-controller
//! writes it.
//!
//! It prints, per round: the time from each status write to the Promotion into staging
//! (`spec.recordedAt`, when this process's own watch saw it, and when it `Succeeded`), how
//! many Promotions appeared and when the last did. Also the open WATCH requests per
//! cluster and resource from each API server's `/metrics`, the controller's RSS, CPU time
//! and open sockets, and the machine.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::PostParams;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};
use pipeline_bench::{
    Receiver, cpu_model, cpu_seconds, free_port, memory, metric_samples, read_tail,
};
use pipeline_testenv::TestCluster;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "watch-bench",
    about = "Deployment watch of pipeline-controller with N pipelines over 3 leaf clusters"
)]
struct Args {
    /// Pipelines (each with one HelmRelease, in a namespace of its own, per leaf cluster).
    #[arg(long, default_value_t = 1000)]
    pipelines: usize,
    /// Namespaces the Pipelines are spread over in the management cluster (round robin)
    /// [default: one per pipeline].
    #[arg(long)]
    namespaces: Option<usize>,
    /// API writes in flight while setting up the clusters.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Release rounds: in round r every dev HelmRelease becomes Ready at chart `1.<r>.0`
    /// (a second round shows whether memory keeps growing).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Status writes in flight when the dev HelmReleases become Ready.
    #[arg(long, default_value_t = 32)]
    flip_concurrency: usize,
    /// Longest wait, in seconds, for each phase (controller synced, Promotions recorded,
    /// Promotions succeeded).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The pipeline-controller binary [default: beside this one].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Keep the controller's log (JSON lines) at this path.
    #[arg(long)]
    controller_log: Option<PathBuf>,
    /// The controller's --log-level (a filter such as `info,pipeline_kube=debug`).
    #[arg(long, default_value = "info")]
    controller_log_level: String,
}

/// The chart version every HelmRelease starts at; round r releases `1.<r>.0` in dev.
const OLD: &str = "1.0.0";
/// Namespace of the GitopsClusters and their kubeconfig Secrets.
const CLUSTERS_NS: &str = "clusters";
/// The HMAC Secret of every pipeline, in the pipeline's namespace.
const HMAC_SECRET: &str = "promotion-hmac";
const ENVIRONMENTS: [&str; 3] = ["dev", "staging", "prod"];

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Dropping `run` (on Ctrl-C) drops the controller and cluster guards, which kill them.
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

fn progress(started: Instant, what: &str) {
    eprintln!("[{:7.1} s] {what}", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------
// Names and objects

/// The management namespace of pipeline `i` when there are `namespaces` of them.
fn pipeline_namespace(i: usize, namespaces: usize) -> String {
    format!("team-{:04}", i % namespaces.max(1))
}

/// The Pipeline's name, its app's name, and the namespace of its targets in every leaf.
fn app(i: usize) -> String {
    format!("app-{i:04}")
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn helm_releases() -> ApiResource {
    resource(
        "helm.toolkit.fluxcd.io",
        "v2",
        "HelmRelease",
        "helmreleases",
    )
}

fn pipelines() -> ApiResource {
    resource("pipelines.weave.works", "v1alpha1", "Pipeline", "pipelines")
}

fn promotions() -> ApiResource {
    resource(
        "pipelines.weave.works",
        "v1alpha1",
        "Promotion",
        "promotions",
    )
}

fn gitops_clusters() -> ApiResource {
    resource(
        "gitops.weave.works",
        "v1alpha1",
        "GitopsCluster",
        "gitopsclusters",
    )
}

fn object(value: Value) -> anyhow::Result<DynamicObject> {
    serde_json::from_value(value).context("building an object")
}

/// Pipeline `team-j/app-i`: dev in leaf 1, staging in leaf 2, prod in leaf 3, one target
/// each (namespace `app-i`), the notification strategy and an HMAC Secret.
fn pipeline_object(i: usize, namespace: &str) -> Value {
    let target = |leaf: usize| {
        json!({
            "namespace": app(i),
            "clusterRef": {
                "apiVersion": "gitops.weave.works/v1alpha1",
                "kind": "GitopsCluster",
                "name": format!("leaf-{leaf}"),
                "namespace": CLUSTERS_NS,
            },
        })
    };
    json!({
        "apiVersion": "pipelines.weave.works/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": app(i), "namespace": namespace},
        "spec": {
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": app(i)},
            "environments": [
                {"name": "dev", "targets": [target(1)]},
                {"name": "staging", "targets": [target(2)]},
                {"name": "prod", "targets": [target(3)]},
            ],
            "promotion": {"strategy": {"secretRef": {"name": HMAC_SECRET}, "notification": {}}},
        },
    })
}

fn helm_release_object(i: usize) -> Value {
    json!({
        "apiVersion": "helm.toolkit.fluxcd.io/v2",
        "kind": "HelmRelease",
        "metadata": {"name": app(i), "namespace": app(i)},
        "spec": {
            "interval": "10m",
            "releaseName": app(i),
            "chart": {"spec": {
                "chart": "app",
                "version": OLD,
                "sourceRef": {"kind": "HelmRepository", "name": "charts", "namespace": "flux-system"},
            }},
        },
    })
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// helm-controller's status while the first install is in progress: not Ready.
fn installing_status() -> Value {
    let now = now_rfc3339();
    let condition = |kind: &str, status: &str| {
        json!({
            "type": kind,
            "status": status,
            "observedGeneration": 1,
            "lastTransitionTime": now,
            "reason": "Progressing",
            "message": "Fresh install in progress",
        })
    };
    json!({"status": {
        "observedGeneration": 1,
        "lastAttemptedGeneration": 1,
        "conditions": [condition("Ready", "Unknown"), condition("Reconciling", "True")],
    }})
}

/// helm-controller's status after Helm release number `number` (an install, then
/// upgrades) of chart `version` for `generation`: Ready and Released for that generation,
/// `status.history` holding that release (older entries are left out).
fn released_status(i: usize, generation: i64, version: &str, number: usize) -> Value {
    let now = now_rfc3339();
    let name = app(i);
    let (action, reason) = if number == 1 {
        ("install", "InstallSucceeded")
    } else {
        ("upgrade", "UpgradeSucceeded")
    };
    let message = format!(
        "Helm {action} succeeded for release {name}/{name}.v{number} with chart app@{version}"
    );
    let condition = |kind: &str| {
        json!({
            "type": kind,
            "status": "True",
            "observedGeneration": generation,
            "lastTransitionTime": now,
            "reason": reason,
            "message": message,
        })
    };
    let digest = |what: &str| {
        let hex: String = format!("{what}{i}{version}")
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex:0<64.64}")
    };
    json!({"status": {
        "observedGeneration": generation,
        "lastAttemptedGeneration": generation,
        "lastAttemptedRevision": version,
        "lastAttemptedConfigDigest": digest("config"),
        "lastAttemptedReleaseAction": action,
        "helmChart": format!("flux-system/{name}-{name}"),
        "storageNamespace": name,
        "failures": 0,
        "conditions": [condition("Ready"), condition("Released")],
        "history": [{
            "name": name,
            "namespace": name,
            "version": number,
            "status": "deployed",
            "chartName": "app",
            "chartVersion": version,
            "appVersion": version,
            "configDigest": digest("config"),
            "digest": digest("release"),
            "firstDeployed": now,
            "lastDeployed": now,
        }],
    }})
}

// ---------------------------------------------------------------------------------------
// Setup

/// Runs `f(0..n)` with `concurrency` in flight; the first error wins.
async fn run_all<T, F, Fut>(n: usize, concurrency: usize, f: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await
}

async fn create_namespaces(
    client: &Client,
    names: &[String],
    concurrency: usize,
) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    run_all(names.len(), concurrency, |i| {
        let (api, name) = (api.clone(), names[i].clone());
        async move {
            let namespace: Namespace = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
            }))?;
            api.create(&PostParams::default(), &namespace)
                .await
                .with_context(|| format!("creating namespace {name}"))?;
            Ok(())
        }
    })
    .await?;
    Ok(())
}

async fn create_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    data: Value,
) -> anyhow::Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": data,
    }))?;
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating Secret {namespace}/{name}"))?;
    Ok(())
}

/// The management cluster: GitopsClusters `clusters/leaf-{1,2,3}` with their kubeconfig
/// Secrets, the pipelines' namespaces with an HMAC Secret each, and the Pipelines.
async fn set_up_management(
    management: &TestCluster,
    leaves: &[TestCluster; 3],
    n: usize,
    k: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = management.client();
    let mut namespaces: Vec<String> = (0..k).map(|j| pipeline_namespace(j, k)).collect();
    namespaces.push(CLUSTERS_NS.to_owned());
    create_namespaces(&client, &namespaces, concurrency).await?;
    let gitops: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), CLUSTERS_NS, &gitops_clusters());
    for (index, leaf) in leaves.iter().enumerate() {
        let name = format!("leaf-{}", index + 1);
        let secret = format!("{name}-kubeconfig");
        create_secret(
            &client,
            CLUSTERS_NS,
            &secret,
            json!({"value": leaf.kubeconfig_yaml()?}),
        )
        .await?;
        gitops
            .create(
                &PostParams::default(),
                &object(json!({
                    "apiVersion": "gitops.weave.works/v1alpha1",
                    "kind": "GitopsCluster",
                    "metadata": {"name": name, "namespace": CLUSTERS_NS},
                    "spec": {"secretRef": {"name": secret}},
                }))?,
            )
            .await
            .with_context(|| format!("creating GitopsCluster {name}"))?;
    }
    run_all(k, concurrency, |j| {
        let client = client.clone();
        async move {
            create_secret(
                &client,
                &pipeline_namespace(j, k),
                HMAC_SECRET,
                json!({"hmac-key": format!("watch-bench-hmac-key-{j:04}")}),
            )
            .await
        }
    })
    .await?;
    run_all(n, concurrency, |i| {
        let client = client.clone();
        async move {
            let namespace = pipeline_namespace(i, k);
            Api::<DynamicObject>::namespaced_with(client, &namespace, &pipelines())
                .create(
                    &PostParams::default(),
                    &object(pipeline_object(i, &namespace))?,
                )
                .await
                .with_context(|| format!("creating Pipeline {namespace}/{}", app(i)))?;
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// A leaf: per pipeline a namespace and HelmRelease `app-i/app-i` at [`OLD`], whose
/// status says its install is in progress (not Ready).
async fn set_up_leaf(leaf: &TestCluster, n: usize, concurrency: usize) -> anyhow::Result<()> {
    let client = leaf.client();
    let namespaces: Vec<String> = (0..n).map(app).collect();
    create_namespaces(&client, &namespaces, concurrency).await?;
    run_all(n, concurrency, |i| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &app(i), &helm_releases());
        async move {
            api.create(&PostParams::default(), &object(helm_release_object(i))?)
                .await
                .with_context(|| format!("creating HelmRelease {}", app(i)))?;
            api.patch_status(
                &app(i),
                &PatchParams::default(),
                &Patch::Merge(&installing_status()),
            )
            .await
            .with_context(|| format!("writing the status of HelmRelease {}", app(i)))?;
            Ok(())
        }
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The controller and the notification receiver

/// `pipeline-controller serve` in Kubernetes mode; killed (SIGKILL) and reaped when dropped.
struct Controller {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Controller {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "pipeline-controller exited ({status}); last log lines:\n{}",
                read_tail(&self.log, 30)
            );
        }
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the controller with the management cluster's admin kubeconfig (the Lease in
/// `default`, as the CLI tests do) and waits until `/healthz` answers.
async fn start_controller(
    bin: &Path,
    kubeconfig: &Path,
    events_addr: &str,
    log: &Path,
    log_level: &str,
) -> anyhow::Result<Controller> {
    let address = free_port()?;
    let log_file = File::create(log).context("creating the controller log file")?;
    let child = Command::new(bin)
        .args(["serve", "--listen", &address.to_string()])
        .args(["--internal-listen", &free_port()?.to_string()])
        .args(["--lease-namespace", "default", "--identity", "watch-bench"])
        .args(["--events-addr", events_addr])
        .args(["--log-format", "json", "--log-level", log_level])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("RUST_LOG")
        .env_remove("PIPELINE_CONTROLLER_MANIFESTS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut controller = Controller {
        child,
        address,
        log: log.to_owned(),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = format!("http://{}/healthz", controller.address);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        controller.ensure_running()?;
        if let Ok(response) = client.get(&url).send().await
            && response.status().is_success()
        {
            return Ok(controller);
        }
        ensure!(
            Instant::now() < deadline,
            "pipeline-controller not healthy after 60 s; log:\n{}",
            read_tail(log, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// What this process sees of the Promotions

#[derive(Debug, Clone)]
struct SeenPromotion {
    pipeline: String,
    target: String,
    revision: String,
    recorded_at: Option<DateTime<Utc>>,
    /// When this process's watch first delivered it.
    first_seen: DateTime<Utc>,
    /// When this process's watch first delivered it as `Succeeded`.
    succeeded_at: Option<DateTime<Utc>>,
}

/// Promotions by (namespace, name), from a cluster-wide watch of this process.
struct PromotionTracker {
    seen: Arc<Mutex<BTreeMap<(String, String), SeenPromotion>>>,
    synced: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PromotionTracker {
    fn start(client: Client) -> Self {
        let seen: Arc<Mutex<BTreeMap<(String, String), SeenPromotion>>> = Arc::default();
        let synced = Arc::new(AtomicBool::new(false));
        let api: Api<DynamicObject> = Api::all_with(client, &promotions());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let task = tokio::spawn({
            let (seen, synced) = (seen.clone(), synced.clone());
            async move {
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    let now = Utc::now();
                    match event {
                        Ok(Event::Apply(object) | Event::InitApply(object)) => {
                            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                            record(&mut seen, &object, now);
                        }
                        Ok(Event::InitDone) => synced.store(true, Ordering::SeqCst),
                        Ok(Event::Init | Event::Delete(_)) => {}
                        Err(err) => eprintln!("watch-bench: Promotion watch: {err}"),
                    }
                }
            }
        });
        Self { seen, synced, task }
    }

    fn snapshot(&self) -> Vec<SeenPromotion> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    async fn wait_synced(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.synced.load(Ordering::SeqCst) {
            ensure!(
                Instant::now() < deadline,
                "the Promotion watch never synced"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for PromotionTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(
    seen: &mut BTreeMap<(String, String), SeenPromotion>,
    object: &DynamicObject,
    now: DateTime<Utc>,
) {
    let key = (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    );
    let spec = &object.data["spec"];
    let succeeded = object.data["status"]["phase"] == "Succeeded";
    let entry = seen.entry(key).or_insert_with(|| SeenPromotion {
        pipeline: spec["pipeline"]["name"].as_str().unwrap_or("").to_owned(),
        target: spec["targetEnvironment"].as_str().unwrap_or("").to_owned(),
        revision: spec["revision"].as_str().unwrap_or("").to_owned(),
        recorded_at: spec["recordedAt"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        first_seen: now,
        succeeded_at: None,
    });
    if succeeded && entry.succeeded_at.is_none() {
        entry.succeeded_at = Some(now);
    }
}

// ---------------------------------------------------------------------------------------
// Waiting for the controller

/// The `error` of every target of every Pipeline, as the controller wrote it into
/// `status.environments.<env>.targets[]` (`None`: not written yet).
async fn target_errors(
    management: &TestCluster,
) -> anyhow::Result<Vec<(String, &'static str, Option<String>)>> {
    let api: Api<DynamicObject> = Api::all_with(management.client(), &pipelines());
    let list = api
        .list(&ListParams::default())
        .await
        .context("listing Pipelines")?;
    let mut out = Vec::new();
    for pipeline in &list.items {
        let name = pipeline.metadata.name.clone().unwrap_or_default();
        for env in ENVIRONMENTS {
            let error = pipeline.data["status"]["environments"][env]["targets"][0]["error"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| {
                    // Ready targets have no error field.
                    pipeline.data["status"]["environments"][env]["targets"][0]["ready"]
                        .as_bool()
                        .map(|_| String::new())
                });
            out.push((name.clone(), env, error));
        }
    }
    Ok(out)
}

/// Polls the Pipelines until every target's status satisfies `done` for its environment
/// (and there are `n` Pipelines); bounded by `timeout`.
async fn wait_target_status(
    management: &TestCluster,
    controller: &mut Controller,
    n: usize,
    timeout: Duration,
    what: &str,
    done: impl Fn(&str, Option<&str>) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        controller.ensure_running()?;
        let errors = target_errors(management).await?;
        let pending: Vec<_> = errors
            .iter()
            .filter(|(_, env, error)| !done(env, error.as_deref()))
            .collect();
        if errors.len() == n * ENVIRONMENTS.len() && pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: {} of {} targets not there after {timeout:?}, e.g. {:?}",
                pending.len(),
                errors.len(),
                pending.first()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until the controller used less than 5 % of a core over 2 s (60 s at most);
/// returns the last window's share of a core.
async fn settle(pid: u32) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = cpu_seconds(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let share = (cpu_seconds(pid) - before) / 2.0;
        if share < 0.05 || Instant::now() > deadline {
            return share;
        }
    }
}

// ---------------------------------------------------------------------------------------
// API server metrics

/// Open WATCH requests by resource (`apiserver_longrunning_requests{verb="WATCH"}`) and
/// `apiserver_registered_watchers` by kind, of one API server.
#[derive(Debug, Default, Clone)]
struct Watches {
    longrunning: BTreeMap<String, u64>,
    registered: BTreeMap<String, u64>,
}

fn qualified(name: &str, group: &str) -> String {
    if group.is_empty() {
        name.to_owned()
    } else {
        format!("{name}.{group}")
    }
}

fn parse_watches(metrics: &str) -> Watches {
    let mut watches = Watches::default();
    for (labels, value) in metric_samples(metrics, "apiserver_longrunning_requests") {
        if labels.get("verb") != Some(&"WATCH") {
            continue;
        }
        let group = labels.get("group").copied().unwrap_or("");
        let resource = labels.get("resource").copied().unwrap_or("?");
        *watches
            .longrunning
            .entry(qualified(resource, group))
            .or_default() += value.max(0.0) as u64;
    }
    for (labels, value) in metric_samples(metrics, "apiserver_registered_watchers") {
        let group = labels.get("group").copied().unwrap_or("");
        let kind = labels
            .get("kind")
            .or_else(|| labels.get("resource"))
            .copied()
            .unwrap_or("?");
        *watches
            .registered
            .entry(qualified(kind, group))
            .or_default() += value.max(0.0) as u64;
    }
    watches
}

async fn watches(cluster: &TestCluster) -> anyhow::Result<Watches> {
    Ok(parse_watches(&cluster.metrics_text().await?))
}

// ---------------------------------------------------------------------------------------
// Process and machine facts

/// Open file descriptors of `pid`, and how many of them are sockets.
fn open_files(pid: u32) -> (usize, usize) {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let mut total = 0;
    let mut sockets = 0;
    for entry in entries.flatten() {
        total += 1;
        if std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        {
            sockets += 1;
        }
    }
    (total, sockets)
}

/// The soft open-file limit of `pid` (`Max open files` in `/proc/<pid>/limits`).
fn open_files_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn beside_this_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe.parent().context("this binary has no directory")?;
    Ok(dir.join(name))
}

/// Nearest-rank percentile of sorted `values`.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn millis(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from)
        .num_microseconds()
        .map_or(f64::NAN, |us| us as f64 / 1000.0)
}

fn summary(mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "{:.0} / {:.0} / {:.0}",
        percentile(&values, 0.50),
        percentile(&values, 0.99),
        values.last().copied().unwrap_or(f64::NAN)
    )
}

// ---------------------------------------------------------------------------------------

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.pipelines > 0, "--pipelines must be positive");
    let n = args.pipelines;
    let k = args.namespaces.unwrap_or(n).clamp(1, n);
    let timeout = Duration::from_secs(args.timeout);
    let controller_bin = match args.controller_bin {
        Some(path) => path,
        None => beside_this_binary("pipeline-controller")?,
    };
    ensure!(
        controller_bin.is_file(),
        "{} not found: run `cargo build --release -p pipeline-controller -p pipeline-bench` first",
        controller_bin.display()
    );
    let version = Command::new(&controller_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let load_at_start = load_average();
    let began = Instant::now();

    progress(began, "starting 4 clusters (etcd + kube-apiserver each)");
    let (management, leaf1, leaf2, leaf3) = tokio::join!(
        TestCluster::start_named("management"),
        TestCluster::start_named("leaf-1"),
        TestCluster::start_named("leaf-2"),
        TestCluster::start_named("leaf-3"),
    );
    let management = management?;
    let leaves = [leaf1?, leaf2?, leaf3?];
    progress(began, "installing CRDs");
    let (crds, gitops, flux1, flux2, flux3) = tokio::join!(
        management.install_crds(),
        management.install_gitops_cluster_crd(),
        leaves[0].install_flux_crds(),
        leaves[1].install_flux_crds(),
        leaves[2].install_flux_crds(),
    );
    for result in [crds, gitops, flux1, flux2, flux3] {
        result?;
    }

    progress(
        began,
        &format!(
            "creating {n} Pipelines (namespaces, HMAC Secrets) and {} HelmReleases",
            3 * n
        ),
    );
    let setup_started = Instant::now();
    let c = args.setup_concurrency;
    let (m, l1, l2, l3) = tokio::join!(
        set_up_management(&management, &leaves, n, k, c),
        set_up_leaf(&leaves[0], n, c),
        set_up_leaf(&leaves[1], n, c),
        set_up_leaf(&leaves[2], n, c),
    );
    for result in [m, l1, l2, l3] {
        result?;
    }
    let setup_took = setup_started.elapsed();
    progress(began, &format!("set up in {setup_took:.1?}"));

    // This process's own Promotion watch, started before the baseline is taken.
    let tracker = PromotionTracker::start(management.client());
    tracker.wait_synced().await?;
    // ... and its WATCH request open, so the baseline counts it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while management
        .active_watches("pipelines.weave.works", "promotions")
        .await?
        == 0
    {
        ensure!(
            Instant::now() < deadline,
            "this process's Promotion watch never opened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let clusters: [&TestCluster; 4] = [&management, &leaves[0], &leaves[1], &leaves[2]];
    let mut baseline = Vec::new();
    for cluster in clusters {
        baseline.push(watches(cluster).await?);
    }

    let work = tempfile::Builder::new()
        .prefix("watch-bench")
        .tempdir()
        .context("creating the work directory")?;
    let log = args
        .controller_log
        .clone()
        .unwrap_or_else(|| work.path().join("controller.log"));
    let receiver = Receiver::start().await?;
    progress(began, "starting pipeline-controller (Kubernetes mode)");
    let spawned = Instant::now();
    let mut controller = start_controller(
        &controller_bin,
        management.kubeconfig_path(),
        &receiver.url,
        &log,
        &args.controller_log_level,
    )
    .await?;
    let pid = controller.pid();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !controller.log_text().contains("acquired leadership") {
        controller.ensure_running()?;
        ensure!(
            Instant::now() < deadline,
            "the controller did not lead within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for leaf in &leaves {
        let deadline = Instant::now() + timeout;
        while leaf
            .active_watches("helm.toolkit.fluxcd.io", "helmreleases")
            .await?
            == 0
        {
            controller.ensure_running()?;
            ensure!(
                Instant::now() < deadline,
                "no HelmRelease watch on {} after {timeout:?}",
                leaf.name()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let watching_after = spawned.elapsed();
    progress(
        began,
        &format!(
            "/metrics shows HelmRelease watches in all leaves after {watching_after:.1?} (the gauge lags)"
        ),
    );
    // Synced: every target's status (written by the reconciler from the watches) says
    // what helm-controller wrote, i.e. not Ready.
    wait_target_status(
        &management,
        &mut controller,
        n,
        timeout,
        "waiting for the watches to sync",
        |_, error| error.is_some_and(|e| e.starts_with("not Ready:")),
    )
    .await?;
    let synced_after = spawned.elapsed();
    let cpu_startup = cpu_seconds(pid);
    progress(
        began,
        &format!("every target's status written after {synced_after:.1?}; settling"),
    );
    settle(pid).await;
    let (rss_startup, hwm_startup) = memory(pid);
    // Idle: what the controller costs with nothing happening.
    let idle_window = Duration::from_secs(10);
    let cpu_idle_start = cpu_seconds(pid);
    tokio::time::sleep(idle_window).await;
    let idle_share = (cpu_seconds(pid) - cpu_idle_start) / idle_window.as_secs_f64();
    let mut idle = Vec::new();
    for cluster in clusters {
        idle.push(watches(cluster).await?);
    }
    let (rss_before, hwm_before) = memory(pid);
    let files_before = open_files(pid);

    let fleet = Fleet {
        management: &management,
        dev: &leaves[0],
        tracker: &tracker,
        receiver: &receiver,
        n,
        setup_concurrency: c,
        flip_concurrency: args.flip_concurrency,
        timeout,
        began,
    };
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        rounds.push(release_round(&fleet, &mut controller, round).await?);
    }
    let files_limit = open_files_limit(pid);
    let cpu_total = cpu_seconds(pid);
    let mut after = Vec::new();
    for cluster in clusters {
        after.push(watches(cluster).await?);
    }
    let load_at_end = load_average();
    let log_text = controller.log_text();
    drop(controller);

    // ---- Figures
    let versions: Vec<&str> = rounds.iter().map(|r| r.version.as_str()).collect();
    let unexpected = seen_by_key(&tracker)
        .iter()
        .filter(|(_, p)| p.target != "staging" || !versions.contains(&p.revision.as_str()))
        .count();
    let seconds =
        |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2} s"));

    println!();
    println!("watch-bench  {}", Utc::now().format("%Y-%m-%d %H:%M UTC"));
    println!(
        "machine: {} cores ({}), {}; load average (1/5/15 min) {load_at_start} at the start, {load_at_end} at the end",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
            |_| "unknown kernel".into(),
            |r| format!("Linux {}", r.trim())
        ),
    );
    println!(
        "clusters: management + 3 leaves, each its own etcd + kube-apiserver on loopback; the 4 API servers, \
         the controller and this process share the cores."
    );
    println!(
        "fleet: {n} Pipelines in {k} namespaces (an HMAC Secret in each; notification strategy) × 3 environments, \
         dev/staging/prod in leaf 1/2/3 through GitopsClusters; {} HelmReleases ({n} per leaf, one namespace each)",
        3 * n
    );
    println!(
        "controller: {version}, release build, Kubernetes mode, admin kubeconfig of the management cluster \
         (no RBAC objects), --log-level {} --log-format json, --events-addr to a 200-OK receiver here",
        args.controller_log_level
    );
    println!(
        "releases: {} rounds; in each, every dev HelmRelease is made Ready at a new chart version by status \
         writes ({} in flight); setup took {setup_took:.1?}",
        rounds.len(),
        args.flip_concurrency
    );
    println!();
    println!(
        "controller start → every Pipeline's target status written from the watches (synced): {:.1} s",
        synced_after.as_secs_f64()
    );
    println!("Promotions other than dev → staging at a released version: {unexpected}");
    println!();
    let header: Vec<String> = rounds
        .iter()
        .map(|r| format!("round {} ({})", r.round, r.version))
        .collect();
    println!("| figure | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(rounds.len()));
    let row = |figure: &str, cell: &dyn Fn(&Round) -> String| {
        let cells: Vec<String> = rounds.iter().map(cell).collect();
        println!("| {figure} | {} |", cells.join(" | "));
    };
    row(
        &format!("{n} status writes: first sent → last answered"),
        &|r| format!("{:.2} s", r.write_span_ms / 1000.0),
    );
    row("one status write, p50 / p99 / max (ms)", &|r| {
        summary(r.write_latencies.clone())
    });
    row("Promotions dev → staging recorded", &|r| {
        format!("{} of {n}", r.recorded)
    });
    row(
        "Ready (status write answered) → Promotion `spec.recordedAt`, p50 / p99 / max (ms)",
        &|r| summary(r.to_recorded.clone()),
    );
    row(
        "Ready → Promotion seen by a watch here, p50 / p99 / max (ms)",
        &|r| summary(r.to_visible.clone()),
    );
    row("first status write sent → first `recordedAt`", &|r| {
        seconds(r.first_recorded_s)
    });
    row("first status write sent → last `recordedAt`", &|r| {
        seconds(r.last_recorded_s)
    });
    row(
        "Promotions recorded per second (first → last `recordedAt`)",
        &|r| r.rate.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
    );
    row("last status write answered → last Promotion seen", &|r| {
        seconds(r.last_seen_s)
    });
    row(
        "Promotions Succeeded (notifications received so far)",
        &|r| format!("{} ({})", r.succeeded, r.notifications),
    );
    row("Ready → Succeeded, p50 / p99 / max (ms)", &|r| {
        summary(r.to_succeeded.clone())
    });
    row(
        "last status write answered → last Promotion Succeeded",
        &|r| seconds(r.last_succeeded_s),
    );
    row("Promotions without `spec.recordedAt`", &|r| {
        r.missing_recorded_at.to_string()
    });
    println!();

    println!(
        "| controller | RSS (VmRSS) | peak (VmHWM) | CPU time (user + system) | open files (sockets) |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| watches synced, settled | {rss_startup} | {hwm_startup} | {cpu_startup:.2} s since start | |"
    );
    println!(
        "| idle, before the releases | {rss_before} | {hwm_before} | {:.1} % of a core over {} s | {} ({}) |",
        idle_share * 100.0,
        idle_window.as_secs(),
        files_before.0,
        files_before.1
    );
    for r in &rounds {
        println!(
            "| round {}: all Promotions succeeded | {} | {} | {:.2} s from the first status write | |",
            r.round, r.memory_done.0, r.memory_done.1, r.cpu
        );
        println!(
            "| round {}: settled | {} | {} | | {} ({}) |",
            r.round, r.memory_settled.0, r.memory_settled.1, r.files.0, r.files.1
        );
    }
    println!("| end | | | {cpu_total:.2} s in total | soft limit {files_limit} |");
    println!();

    println!(
        "Open WATCH requests (apiserver_longrunning_requests{{verb=\"WATCH\"}}) per resource; \
         'before' is before the controller started (API server's own and this process's watches), \
         rows where the controller changed something:"
    );
    println!(
        "| cluster | resource | before controller | controller idle | after the releases | controller's |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (index, cluster) in clusters.iter().enumerate() {
        let (b, i, a) = (&baseline[index], &idle[index], &after[index]);
        let keys: BTreeSet<&String> = b
            .longrunning
            .keys()
            .chain(i.longrunning.keys())
            .chain(a.longrunning.keys())
            .collect();
        let get = |w: &Watches, k: &str| w.longrunning.get(k).copied().unwrap_or(0);
        let mut totals = (0, 0, 0);
        for key in keys {
            let (vb, vi, va) = (get(b, key), get(i, key), get(a, key));
            totals = (totals.0 + vb, totals.1 + vi, totals.2 + va);
            if vb != vi || vb != va {
                println!(
                    "| {} | {key} | {vb} | {vi} | {va} | {} |",
                    cluster.name(),
                    vi as i64 - vb as i64
                );
            }
        }
        println!(
            "| {} | all resources | {} | {} | {} | {} |",
            cluster.name(),
            totals.0,
            totals.1,
            totals.2,
            totals.1 as i64 - totals.0 as i64
        );
    }
    println!();
    let registered: Vec<String> = clusters
        .iter()
        .enumerate()
        .flat_map(|(index, cluster)| {
            let (b, i) = (&baseline[index], &idle[index]);
            i.registered
                .iter()
                .filter(|(k, v)| b.registered.get(*k) != Some(*v))
                .map(|(k, v)| {
                    format!(
                        "{} {k}: {} → {v}",
                        cluster.name(),
                        b.registered.get(k).copied().unwrap_or(0)
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if clusters
        .iter()
        .enumerate()
        .all(|(index, _)| idle[index].registered.is_empty())
    {
        println!("apiserver_registered_watchers: not exported by this kube-apiserver");
    } else if registered.is_empty() {
        println!("apiserver_registered_watchers: no change");
    } else {
        println!(
            "apiserver_registered_watchers, before controller → controller idle: {}",
            registered.join("; ")
        );
    }

    // The controller's warnings and errors, by message.
    let mut messages = BTreeMap::<String, usize>::new();
    let mut recorded_lines = 0;
    for line in log_text.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            *messages.entry(format!("(not JSON) {line}")).or_default() += 1;
            continue;
        };
        let level = entry["level"].as_str().unwrap_or("?");
        let message = entry["message"].as_str().unwrap_or("?");
        if message == "promotion recorded" {
            recorded_lines += 1;
        }
        if matches!(level, "WARN" | "ERROR" | "warn" | "error") {
            *messages.entry(format!("{level} {message}")).or_default() += 1;
        }
    }
    println!(
        "controller log: {} lines, {recorded_lines} 'promotion recorded'; warnings/errors by message: {messages:?}",
        log_text.lines().count()
    );
    if let Some(path) = &args.controller_log {
        println!("controller log kept at {}", path.display());
    }
    for r in &rounds {
        ensure!(
            r.recorded == n && r.succeeded == n,
            "round {}: {} of {n} Promotions recorded and {} succeeded within {timeout:?}",
            r.round,
            r.recorded,
            r.succeeded
        );
    }
    ensure!(unexpected == 0, "{unexpected} unexpected Promotions");
    Ok(())
}

/// What a release round needs.
struct Fleet<'a> {
    management: &'a TestCluster,
    /// The leaf of every dev target.
    dev: &'a TestCluster,
    tracker: &'a PromotionTracker,
    receiver: &'a Receiver,
    n: usize,
    setup_concurrency: usize,
    flip_concurrency: usize,
    timeout: Duration,
    began: Instant,
}

/// What one release round measured.
struct Round {
    round: usize,
    version: String,
    write_span_ms: f64,
    write_latencies: Vec<f64>,
    recorded: usize,
    to_recorded: Vec<f64>,
    to_visible: Vec<f64>,
    to_succeeded: Vec<f64>,
    /// From the first status write sent, in seconds.
    first_recorded_s: Option<f64>,
    last_recorded_s: Option<f64>,
    rate: Option<f64>,
    /// From the last status write answered, in seconds.
    last_seen_s: Option<f64>,
    last_succeeded_s: Option<f64>,
    succeeded: usize,
    missing_recorded_at: usize,
    notifications: usize,
    /// Controller CPU from the first status write until every Promotion succeeded.
    cpu: f64,
    memory_done: (String, String),
    memory_settled: (String, String),
    files: (usize, usize),
}

/// Round `round`: the dev HelmReleases' spec asks for chart `1.<round>.0` (not deployed
/// yet), then, once the controller has seen that, all of them become Ready at it at once.
async fn release_round(
    fleet: &Fleet<'_>,
    controller: &mut Controller,
    round: usize,
) -> anyhow::Result<Round> {
    let (n, pid) = (fleet.n, controller.pid());
    let version = format!("1.{round}.0");
    progress(
        fleet.began,
        &format!("round {round}: dev HelmReleases' spec.chart.spec.version {version}"),
    );
    let generations = run_all(n, fleet.setup_concurrency, |i| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(fleet.dev.client(), &app(i), &helm_releases());
        let patch = json!({"spec": {"chart": {"spec": {"version": version}}}});
        async move {
            let object = api
                .patch(&app(i), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("patching HelmRelease {}", app(i)))?;
            let generation = object
                .metadata
                .generation
                .with_context(|| format!("HelmRelease {} has no generation", app(i)))?;
            Ok((i, generation))
        }
    })
    .await?;
    let mut generation = vec![0_i64; n];
    for (i, g) in generations {
        generation[i] = g;
    }
    wait_target_status(
        fleet.management,
        controller,
        n,
        fleet.timeout,
        "waiting for the spec change to be seen",
        |env, error| match env {
            "dev" => error == Some("status not yet updated for the latest spec"),
            _ => error.is_some_and(|e| e.starts_with("not Ready:")),
        },
    )
    .await?;
    settle(pid).await;
    let wanted = |p: &SeenPromotion| p.target == "staging" && p.revision == version;
    let early = fleet
        .tracker
        .snapshot()
        .iter()
        .filter(|p| wanted(p))
        .count();
    ensure!(
        early == 0,
        "{early} Promotions of {version} before its release"
    );

    // Every dev HelmRelease Ready at `version`, as fast as the API server takes it.
    progress(
        fleet.began,
        &format!(
            "round {round}: releasing {version} in dev: {n} status writes, {} in flight",
            fleet.flip_concurrency
        ),
    );
    let cpu_start = cpu_seconds(pid);
    let flip_started = Utc::now();
    let client = fleet.dev.client();
    let writes = run_all(n, fleet.flip_concurrency, |i| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &app(i), &helm_releases());
        let status = released_status(i, generation[i], &version, round);
        async move {
            let started = Utc::now();
            api.patch_status(&app(i), &PatchParams::default(), &Patch::Merge(&status))
                .await
                .with_context(|| format!("writing the status of HelmRelease {}", app(i)))?;
            Ok((i, started, Utc::now()))
        }
    })
    .await?;
    let writes_done = Utc::now();
    let mut written: Vec<DateTime<Utc>> = vec![writes_done; n];
    let mut write_latencies = Vec::with_capacity(n);
    for (i, started, done) in &writes {
        written[*i] = *done;
        write_latencies.push(millis(*started, *done));
    }
    progress(
        fleet.began,
        &format!(
            "round {round}: status writes done in {:.0} ms; waiting for {n} Promotions to be recorded and succeed",
            millis(flip_started, writes_done)
        ),
    );
    let deadline = Instant::now() + fleet.timeout;
    loop {
        controller.ensure_running()?;
        let succeeded = fleet
            .tracker
            .snapshot()
            .iter()
            .filter(|p| wanted(p) && p.succeeded_at.is_some())
            .count();
        if succeeded >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = cpu_seconds(pid) - cpu_start;
    let memory_done = memory(pid);
    // Let the reconciler write the Pipelines' statuses, then measure again.
    settle(pid).await;
    let memory_settled = memory(pid);
    let files = open_files(pid);

    let mut r = Round {
        round,
        version: version.clone(),
        write_span_ms: millis(flip_started, writes_done),
        write_latencies,
        recorded: 0,
        to_recorded: Vec::new(),
        to_visible: Vec::new(),
        to_succeeded: Vec::new(),
        first_recorded_s: None,
        last_recorded_s: None,
        rate: None,
        last_seen_s: None,
        last_succeeded_s: None,
        succeeded: 0,
        missing_recorded_at: 0,
        notifications: fleet.receiver.count(),
        cpu,
        memory_done,
        memory_settled,
        files,
    };
    let mut recorded_times = Vec::new();
    let mut seen_times = Vec::new();
    let mut succeeded_times = Vec::new();
    for p in fleet.tracker.snapshot().iter().filter(|p| wanted(p)) {
        // The pipeline's index, from its name `app-NNNN`.
        let Some(i) = p
            .pipeline
            .strip_prefix("app-")
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|i| *i < n)
        else {
            continue;
        };
        let ready = written[i];
        match p.recorded_at {
            Some(at) => {
                r.to_recorded.push(millis(ready, at));
                recorded_times.push(at);
            }
            None => r.missing_recorded_at += 1,
        }
        r.to_visible.push(millis(ready, p.first_seen));
        seen_times.push(p.first_seen);
        if let Some(done) = p.succeeded_at {
            r.to_succeeded.push(millis(ready, done));
            succeeded_times.push(done);
        }
    }
    r.recorded = seen_times.len();
    r.succeeded = succeeded_times.len();
    let first = recorded_times.iter().min().copied();
    let last = recorded_times.iter().max().copied();
    r.first_recorded_s = first.map(|t| millis(flip_started, t) / 1000.0);
    r.last_recorded_s = last.map(|t| millis(flip_started, t) / 1000.0);
    if let (Some(first), Some(last)) = (first, last)
        && recorded_times.len() > 1
    {
        r.rate = Some((recorded_times.len() - 1) as f64 / (millis(first, last) / 1000.0));
    }
    r.last_seen_s = seen_times
        .iter()
        .max()
        .map(|t| millis(writes_done, *t) / 1000.0);
    r.last_succeeded_s = succeeded_times
        .iter()
        .max()
        .map(|t| millis(writes_done, *t) / 1000.0);
    Ok(r)
}

fn seen_by_key(tracker: &PromotionTracker) -> Vec<((String, String), SeenPromotion)> {
    tracker
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
