//! Kubernetes mode: `serve` without `--manifests`, and the client commands (`approve`,
//! `promotions list`) without `--server`. Configuration comes from the in-cluster
//! service account or KUBECONFIG.
//!
//! - The webhook is the same router and `Intake` as embedded mode; Pipelines and Secrets
//!   come from watch-backed caches, records are `Promotion` objects.
//! - Every replica serves the webhook; the holder of a Lease runs the executor and the
//!   reconciler, and stops them as soon as it loses the Lease.
//! - A 202 answer keeps `Location: /api/v1/promotions/{id}` (served from the cluster by
//!   any replica; ids hash the pipeline namespace so they are unique cluster-wide) and
//!   adds `X-Promotion-Object` with the Promotion's Kubernetes API path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use clap::Args;
use pipeline_core::{
    Executor, ExecutorSettings, Intake, Metrics, PipelineRef, PromotionFilter, PromotionRecord,
    RetryPolicy, StrategySet, SystemClock, TimeWindow,
};
use pipeline_git::PullRequestStrategy;
use pipeline_http::{AppState, HttpSettings, router};
use pipeline_kube::{
    EventPublisher, KubeNotification, KubePipelineSource, KubePromotionStore, KubeSecretSource,
    LeaderElector, LeaseSettings, Reconciler, promotion_api_path,
};
use pipeline_strategies::{DEFAULT_CONTROLLER_NAME, NotificationWebhook};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::serve::{pull_request_settings, stop_on_signal};

/// Response header naming the Promotion object a 202 answer recorded.
pub const PROMOTION_OBJECT_HEADER: &str = "x-promotion-object";

/// Settings used in Kubernetes mode only.
#[derive(Debug, Args)]
pub struct KubernetesArgs {
    /// Kubernetes mode: where the Flux-format event of each notification promotion is
    /// POSTed (notification-controller's event receiver), as Flux controllers'
    /// --events-addr.
    #[arg(long, env = "PIPELINE_CONTROLLER_EVENTS_ADDR")]
    pub events_addr: Option<reqwest::Url>,
    /// Kubernetes mode: name of the leader-election Lease.
    #[arg(long, default_value = "pipeline-controller-leader")]
    pub lease_name: String,
    /// Kubernetes mode: namespace of the Lease [default: the client's namespace].
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Kubernetes mode: how long the Lease stays valid after its last renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// Kubernetes mode: how often the leader renews the Lease and others retry.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_renew: Duration,
    /// Kubernetes mode: this replica's identity in the Lease and Events
    /// [default: POD_NAME or the host name, with a unique suffix].
    #[arg(long, env = "PIPELINE_CONTROLLER_IDENTITY")]
    pub identity: Option<String>,
}

fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pipeline-controller".to_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{base}-{}-{nanos:08x}", std::process::id())
}

async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("configuring the Kubernetes client (in-cluster, or KUBECONFIG)")
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let client = kube_client().await?;
    let k8s = &args.kubernetes;
    if k8s.lease_renew.is_zero() || k8s.lease_renew >= k8s.lease_duration {
        anyhow::bail!("--lease-renew must be shorter than --lease-duration");
    }
    let identity = k8s.identity.clone().unwrap_or_else(default_identity);
    let lease_namespace = k8s
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());

    let pipelines = KubePipelineSource::start(client.clone());
    let secrets = KubeSecretSource::new(client.clone());
    let publisher = EventPublisher::new(client.clone(), identity.clone());
    let store =
        KubePromotionStore::new(client.clone()).with_events(publisher.clone(), pipelines.clone());
    let metrics = Arc::new(Metrics::new());
    let wake = Arc::new(Notify::new());
    let clock = Arc::new(SystemClock);
    let intake = Arc::new(Intake::new(
        Arc::new(pipelines.clone()),
        Arc::new(secrets.clone()),
        Arc::new(store.clone()),
        clock.clone(),
        TimeWindow {
            max_age: args.max_event_age,
            ..TimeWindow::default()
        },
        metrics.clone(),
        wake.clone(),
    ));
    let http = NotificationWebhook::client().context("building the notification HTTP client")?;
    let webhook = (!args.notify_urls.is_empty()).then(|| {
        NotificationWebhook::new(
            args.notify_urls.clone(),
            http.clone(),
            DEFAULT_CONTROLLER_NAME,
        )
    });
    let strategies = StrategySet {
        notification: Arc::new(KubeNotification::new(
            publisher,
            pipelines.clone(),
            k8s.events_addr.clone(),
            http,
            webhook,
        )),
        pull_request: Arc::new(PullRequestStrategy::new(
            pull_request_settings(&args.pull_request)?,
            pipeline_git::forge::http_client().context("building the forge HTTP client")?,
        )),
    };
    let executor = Arc::new(Executor::new(
        Arc::new(store.clone()),
        Arc::new(pipelines.clone()),
        Arc::new(secrets.clone()),
        strategies,
        clock,
        metrics.clone(),
        ExecutorSettings {
            retry: RetryPolicy {
                base_delay: args.retry_base,
                max_delay: args.retry_max,
                max_attempts: args.max_attempts.max(1),
            },
            ..ExecutorSettings::default()
        },
        wake.clone(),
    ));

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%address, mode = "kubernetes", %identity, lease = %format!("{lease_namespace}/{}", k8s.lease_name), "listening");

    let elector = LeaderElector::new(
        client.clone(),
        LeaseSettings {
            name: k8s.lease_name.clone(),
            namespace: lease_namespace,
            identity,
            duration: k8s.lease_duration,
            renew: k8s.lease_renew,
        },
    );
    let lead = {
        let client = client.clone();
        let store = store.clone();
        let pipelines = pipelines.clone();
        move |stop: CancellationToken| {
            let executor = executor.clone();
            let reconciler = Reconciler::new(
                client.clone(),
                store.clone(),
                pipelines.clone(),
                wake.clone(),
            );
            async move {
                let executing = executor.run(stop.clone().cancelled_owned());
                tokio::join!(executing, reconciler.run(stop));
            }
        }
    };
    let election = tokio::spawn(elector.run(shutdown.clone(), lead));
    let prune = tokio::spawn({
        let shutdown = shutdown.clone();
        let pipelines = pipelines.clone();
        async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(60)) => {
                        secrets.prune(&pipelines.namespaces());
                    }
                }
            }
        }
    });

    let app = router(AppState::new(
        intake,
        metrics,
        HttpSettings {
            max_body_bytes: args.max_body_bytes,
            rate_limit: args.rate_limit,
        },
    ))
    .layer(axum::middleware::from_fn(promotion_object_header));
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .await
    .context("serving HTTP")?;
    shutdown.cancel();
    let _ = election.await;
    let _ = prune.await;
    tracing::info!("stopped");
    Ok(())
}

/// Adds [`PROMOTION_OBJECT_HEADER`] to answers that recorded a promotion.
async fn promotion_object_header(request: Request, next: Next) -> Response {
    let segments: Vec<String> = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let namespace = match segments.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["pipelines", "promotions", ns, _, _] | ["promotion", ns, _, _] => Some(ns.to_string()),
        _ => None,
    };
    let mut response = next.run(request).await;
    if let Some(namespace) = namespace
        && let Some(id) = response
            .headers()
            .get(axum::http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.strip_prefix("/api/v1/promotions/"))
        && let Ok(value) = HeaderValue::from_str(&promotion_api_path(&namespace, id))
    {
        response
            .headers_mut()
            .insert(PROMOTION_OBJECT_HEADER, value);
    }
    response
}

/// `approve` without `--server`: sets `spec.approval` on the Promotion with the caller's
/// own Kubernetes credentials.
pub async fn approve(pipeline: &str, environment: &str, revision: &str) -> anyhow::Result<()> {
    let reference = PipelineRef::parse(pipeline)
        .with_context(|| format!("pipeline {pipeline:?} is not of the form NAMESPACE/NAME"))?;
    let client = kube_client().await?;
    let record = pipeline_kube::approve(client, &reference, environment, revision).await?;
    println!(
        "approved {} of {} to {} (Promotion {}/{}); the controller runs it next",
        record.revision, record.pipeline, record.target_environment, reference.namespace, record.id
    );
    Ok(())
}

/// `promotions list` without `--server`: Promotions from the cluster.
pub async fn list(
    pipeline: Option<&str>,
    environment: Option<&str>,
) -> anyhow::Result<Vec<PromotionRecord>> {
    let pipeline =
        match pipeline {
            None => None,
            Some(text) => Some(PipelineRef::parse(text).with_context(|| {
                format!("--pipeline {text:?} is not of the form NAMESPACE/NAME")
            })?),
        };
    let filter = PromotionFilter {
        pipeline,
        environment: environment.map(str::to_string),
    };
    let client = kube_client().await?;
    pipeline_kube::list_promotions(client, &filter)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}
