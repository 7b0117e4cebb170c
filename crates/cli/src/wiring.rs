//! What both serve modes share: the core built once from a mode's ports
//! ([`build_core`]), the leader's work, settings from flags, and HTTP serving.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use pipeline_core::deployment::DeploymentView;
use pipeline_core::insights::InsightsExporter;
use pipeline_core::observe::Proposer;
use pipeline_core::{
    Executor, ExecutorSettings, HealthGate, Intake, IntakeLoad, Metrics, PipelineSource,
    PortReader, PromotionStore, ReadPort, RetentionPolicy, RetryPolicy, SecretSource, StrategySet,
    SystemClock, TimeWindow,
};
use pipeline_dashboard::{ApproveVia, DashboardSettings};
use pipeline_git::PullRequestSettings;
use pipeline_http::{AppState, HttpSettings, ServerSettings, internal_router, public_router};
use pipeline_kube::{ClusterRegistry, DeploymentWatcher};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cli::{PullRequestArgs, ServeArgs};
use crate::errors::usage;

/// How often finished promotions past the retention policy are deleted.
const RETENTION_SWEEP: std::time::Duration = std::time::Duration::from_secs(600);
/// The shortest time between two retention sweeps a burst of promotions brings forward.
const RETENTION_MIN_GAP: std::time::Duration = std::time::Duration::from_secs(2);

/// What a mode provides to the core.
pub(crate) struct Ports {
    pub pipelines: Arc<dyn PipelineSource>,
    pub secrets: Arc<dyn SecretSource>,
    pub store: Arc<dyn PromotionStore>,
    pub strategies: StrategySet,
    /// How targets' clusters are reached, for watching their deployments; `None` with
    /// --no-deployment-watch.
    pub clusters: Option<Arc<ClusterRegistry>>,
    /// Whether signed HTTP approvals are taken.
    pub hmac_approvals: bool,
    /// Wakes the executor: new records, decisions, deployment changes.
    pub wake: Arc<Notify>,
}

/// The core of the service, the same in both modes.
pub(crate) struct Core {
    pub intake: Arc<Intake>,
    /// What the API and the dashboard read through (with the deployment watch's view
    /// of each environment when there is one).
    pub reader: Arc<dyn ReadPort>,
    store: Arc<dyn PromotionStore>,
    retention: RetentionPolicy,
    pub executor: Arc<Executor>,
    /// Absent with --no-deployment-watch.
    pub watcher: Option<Arc<DeploymentWatcher>>,
    proposer: Option<Arc<Proposer>>,
    pub wake: Arc<Notify>,
}

pub(crate) fn build_core(ports: Ports, args: &ServeArgs, metrics: Arc<Metrics>) -> Core {
    let wake = ports.wake;
    let clock = Arc::new(SystemClock);
    let load = Arc::new(IntakeLoad::default());
    let intake = Arc::new(
        Intake::new(
            ports.pipelines.clone(),
            ports.secrets.clone(),
            ports.store.clone(),
            clock.clone(),
            time_window(args),
            metrics.clone(),
            wake.clone(),
        )
        .with_hmac_approvals(ports.hmac_approvals)
        .with_load(load.clone()),
    );
    let store = ports.store.clone();
    let executor = Executor::new(
        ports.store,
        ports.pipelines.clone(),
        ports.secrets,
        ports.strategies,
        clock,
        metrics,
        executor_settings(args),
        wake.clone(),
    )
    .with_load(load);
    // Watch every target's app object, propose what is deployed, gate on it.
    let watcher = ports.clusters.map(|clusters| {
        Arc::new(DeploymentWatcher::new(
            clusters,
            ports.pipelines,
            wake.clone(),
        ))
    });
    let executor = Arc::new(match &watcher {
        Some(watcher) => executor.with_health_gate(HealthGate {
            view: watcher.clone(),
            timeout: args.health_gate_timeout,
        }),
        None => executor,
    });
    let reader: Arc<dyn ReadPort> = Arc::new(PortReader::new(
        intake.pipelines().clone(),
        store.clone(),
        watcher
            .as_ref()
            .map(|w| w.clone() as Arc<dyn DeploymentView>),
    ));
    let proposer = watcher
        .as_ref()
        .map(|watcher| Arc::new(Proposer::new(intake.clone(), watcher.clone())));
    Core {
        intake,
        reader,
        store,
        retention: RetentionPolicy {
            max_age: Some(args.retention_max_age).filter(|age| !age.is_zero()),
            keep_per_environment: Some(args.retention_per_environment).filter(|n| *n > 0),
        },
        executor,
        watcher,
        proposer,
        wake,
    }
}

impl Core {
    /// The work one process at a time does (the Lease holder in Kubernetes mode): run
    /// promotions, watch deployments, propose what they show. Until `stop`.
    pub async fn lead(&self, stop: CancellationToken) {
        let executing = self.executor.clone().run(stop.clone().cancelled_owned());
        let observing = async {
            if let (Some(watcher), Some(proposer)) = (&self.watcher, &self.proposer) {
                let changes = watcher.subscribe();
                tokio::join!(
                    watcher.clone().run(stop.clone()),
                    proposer
                        .clone()
                        .run(changes, stop.clone().cancelled_owned())
                );
            }
        };
        let sweeping = self.sweep_retained(stop.clone());
        tokio::join!(executing, observing, sweeping);
    }

    /// Deletes finished promotions past the retention policy: every [`RETENTION_SWEEP`],
    /// and sooner once enough promotions finished since the last sweep (see
    /// [`pipeline_core::RetentionPolicy::sweep_after`]), so a burst of promotions does
    /// not pile up in the store, the API server and every cache of Promotions until the
    /// timer fires.
    async fn sweep_retained(&self, stop: CancellationToken) {
        let mut finished = self.executor.finished();
        loop {
            let swept_at = *finished.borrow_and_update();
            let due_after = match self
                .retention
                .sweep(self.store.as_ref(), chrono::Utc::now())
                .await
            {
                Ok(sweep) => {
                    if sweep.removed > 0 {
                        tracing::info!(
                            removed = sweep.removed,
                            examined = sweep.examined,
                            "finished promotions past the retention policy deleted"
                        );
                    }
                    self.retention.sweep_after(&sweep)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "retention sweep failed; trying again later");
                    None
                }
            };
            // Sooner than the timer once enough promotions finished, and then at most
            // one early sweep per RETENTION_MIN_GAP.
            let enough_finished = async {
                // No count limit, or the executor gone: the timer alone.
                let Some(n) = due_after else {
                    return std::future::pending().await;
                };
                let reached = finished
                    .wait_for(|done| done.saturating_sub(swept_at) >= n)
                    .await
                    .is_ok();
                if !reached {
                    return std::future::pending().await;
                }
                tokio::time::sleep(RETENTION_MIN_GAP).await;
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RETENTION_SWEEP) => {}
                () = enough_finished => {}
            }
        }
    }
}

pub(crate) fn time_window(args: &ServeArgs) -> TimeWindow {
    TimeWindow {
        max_age: args.max_event_age,
        ..TimeWindow::default()
    }
}

pub(crate) fn executor_settings(args: &ServeArgs) -> ExecutorSettings {
    ExecutorSettings {
        retry: RetryPolicy {
            base_delay: args.retry_base,
            max_delay: args.retry_max,
            max_attempts: args.max_attempts.max(1),
        },
        ..ExecutorSettings::default()
    }
}

pub(crate) fn http_settings(args: &ServeArgs) -> HttpSettings {
    HttpSettings {
        max_body_bytes: args.max_body_bytes,
        rate_limit: args.rate_limit,
        ..HttpSettings::default()
    }
}

pub(crate) fn server_settings(args: &ServeArgs) -> ServerSettings {
    ServerSettings {
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: pipeline_http::server::fit_connection_cap(args.max_connections),
    }
}

/// The two bound listeners: public (webhook, approvals) and internal (API, dashboard,
/// metrics, health).
pub(crate) struct Listeners {
    public: TcpListener,
    internal: TcpListener,
    /// How the dashboard tells approvers to approve (it depends on the mode).
    approve_via: ApproveVia,
    /// `--insights-interval`.
    pub insights_interval: std::time::Duration,
    /// Whether serving also exports the delivery insights (embedded mode; in Kubernetes
    /// mode only the leader does, so that a sum over replicas counts each event once).
    export_insights: bool,
}

async fn bind_one(address: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(address).await {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            anyhow::bail!(
                "cannot listen on {address}: the address is in use; stop what listens there or pass another {flag}"
            )
        }
        Err(err) => Err(err).with_context(|| format!("listening on {address} ({flag})")),
    }
}

/// Binds both listeners; returns them and the public address (the one logged as
/// `address`; the internal one is logged here as `internal_address`).
pub(crate) async fn bind(args: &ServeArgs) -> anyhow::Result<(Listeners, SocketAddr)> {
    if args.listen == args.internal_listen && args.listen.port() != 0 {
        return Err(usage(format!(
            "--listen and --internal-listen are both {}; the public and the internal listener need different addresses",
            args.listen
        )));
    }
    let public = bind_one(args.listen, "--listen").await?;
    let internal = bind_one(args.internal_listen, "--internal-listen").await?;
    let address = public.local_addr().context("reading the bound address")?;
    let internal_address = internal
        .local_addr()
        .context("reading the bound internal address")?;
    tracing::info!(%internal_address, "internal listener bound (API, dashboard, metrics, health)");
    // Embedded mode takes decisions over signed HTTP only; Kubernetes mode through the
    // API with the approver's own credentials.
    let approve_via = if args.manifests.is_some() {
        let shown = if address.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
        } else {
            address
        };
        ApproveVia::Http {
            server: format!("http://{shown}"),
        }
    } else {
        ApproveVia::Kubernetes
    };
    Ok((
        Listeners {
            public,
            internal,
            approve_via,
            insights_interval: args
                .insights_interval
                .max(std::time::Duration::from_millis(100)),
            export_insights: args.manifests.is_some(),
        },
        address,
    ))
}

/// Exports the delivery insights read through `reader` to `metrics` until `stop`,
/// counting what ends from now on.
pub(crate) async fn export_insights(
    reader: Arc<dyn ReadPort>,
    metrics: Arc<Metrics>,
    interval: std::time::Duration,
    stop: CancellationToken,
) {
    InsightsExporter::new(chrono::Utc::now())
        .run(
            reader,
            metrics,
            Arc::new(SystemClock),
            interval,
            stop.cancelled_owned(),
        )
        .await;
}

/// Serves the public and the internal listener until `shutdown`, then cancels it for
/// everything else. In embedded mode also exports the delivery insights meanwhile.
pub(crate) async fn serve_http(
    listeners: Listeners,
    state: AppState,
    settings: ServerSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let exporter = listeners.export_insights.then(|| {
        tokio::spawn(export_insights(
            state.reader(),
            state.metrics(),
            listeners.insights_interval,
            shutdown.clone(),
        ))
    });
    let dashboard = pipeline_dashboard::router(
        state.reader(),
        DashboardSettings {
            approve_via: listeners.approve_via,
            ..DashboardSettings::default()
        },
    );
    let internal = internal_router(state.clone(), dashboard);
    let (public, internal) = tokio::join!(
        pipeline_http::serve(
            listeners.public,
            public_router(state),
            settings,
            shutdown.clone()
        ),
        async {
            let served =
                pipeline_http::serve(listeners.internal, internal, settings, shutdown.clone())
                    .await;
            // Either listener failing stops the service.
            shutdown.cancel();
            served
        },
    );
    shutdown.cancel();
    if let Some(exporter) = exporter {
        let _ = exporter.await;
    }
    public.context("serving the public listener")?;
    internal.context("serving the internal listener")?;
    Ok(())
}

pub(crate) fn pull_request_settings(args: &PullRequestArgs) -> anyhow::Result<PullRequestSettings> {
    let defaults = PullRequestSettings::default();
    let mut api_overrides = Vec::new();
    for entry in &args.forge_api {
        let Some((prefix, base)) = entry.split_once('=') else {
            return Err(usage(format!(
                "--forge-api {entry:?} has no '='; expected REPOSITORY_URL_PREFIX=API_BASE_URL, e.g. https://git.example/gitlab/=https://git.example/gitlab/api/v4"
            )));
        };
        api_overrides.push((prefix.to_string(), base.to_string()));
    }
    Ok(PullRequestSettings {
        author: pipeline_git::git::Author {
            name: args.git_author_name.clone(),
            email: args.git_author_email.clone(),
        },
        message_template: args.pr_title.clone().unwrap_or(defaults.message_template),
        work_dir: args.pr_work_dir.clone().unwrap_or(defaults.work_dir),
        push_attempts: defaults.push_attempts,
        api_overrides,
        clone_cache_max_bytes: args.pr_clone_cache_max_bytes,
        clone_cache_max_clones: args.pr_clone_cache_max_clones,
    })
}

pub(crate) async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
