//! What both serve modes share: the core built once from a mode's ports
//! ([`build_core`]), the leader's work, settings from flags, and HTTP serving.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use pipeline_core::observe::Proposer;
use pipeline_core::{
    Executor, ExecutorSettings, HealthGate, Intake, Metrics, PipelineSource, PromotionStore,
    RetentionPolicy, RetryPolicy, SecretSource, StrategySet, SystemClock, TimeWindow,
};
use pipeline_git::PullRequestSettings;
use pipeline_http::{AppState, HttpSettings, ServerSettings, router};
use pipeline_kube::{ClusterRegistry, DeploymentWatcher};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cli::{PullRequestArgs, ServeArgs};
use crate::errors::usage;

/// How often finished promotions past the retention policy are deleted.
const RETENTION_SWEEP: std::time::Duration = std::time::Duration::from_secs(600);

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
        .with_hmac_approvals(ports.hmac_approvals),
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
    );
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
    let proposer = watcher
        .as_ref()
        .map(|watcher| Arc::new(Proposer::new(intake.clone(), watcher.clone())));
    Core {
        intake,
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
        let sweeping = async {
            loop {
                match self
                    .retention
                    .sweep(self.store.as_ref(), chrono::Utc::now())
                    .await
                {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(
                        removed,
                        "finished promotions past the retention policy deleted"
                    ),
                    Err(err) => {
                        tracing::warn!(error = %err, "retention sweep failed; trying again later")
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETENTION_SWEEP) => {}
                }
            }
        };
        tokio::join!(executing, observing, sweeping);
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

pub(crate) async fn bind(args: &ServeArgs) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            anyhow::bail!(
                "cannot listen on {}: the address is in use; stop what listens there or pass another --listen",
                args.listen
            )
        }
        Err(err) => {
            return Err(err).with_context(|| format!("listening on {}", args.listen));
        }
    };
    let address = listener.local_addr().context("reading the bound address")?;
    Ok((listener, address))
}

/// Serves the webhook and API until `shutdown`, then cancels it for everything else.
pub(crate) async fn serve_http(
    listener: TcpListener,
    state: AppState,
    settings: ServerSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    pipeline_http::serve(listener, router(state), settings, shutdown.clone())
        .await
        .context("serving HTTP")?;
    shutdown.cancel();
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
