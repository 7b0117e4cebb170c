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

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::{HeaderName, HeaderValue};
use clap::Args;
use kube::Api;
use kube::api::ListParams;
use pipeline_core::{Metrics, PipelineRef, PromotionFilter, PromotionRecord, StrategySet, Verdict};
use pipeline_crds::Promotion;
use pipeline_git::PullRequestStrategy;
use pipeline_http::AppState;
use pipeline_kube::public_url::{Exposure, PublicUrl};
use pipeline_kube::{
    ClusterRegistry, DirectWiring, EventPublisher, KubeClusterSource, KubeNotification,
    KubePipelineSource, KubePromotionStore, KubeSecretSource, LeaderElector, LeaseSettings,
    PromotionCache, Reconciler, promotion_api_path,
};
use pipeline_strategies::{DEFAULT_CONTROLLER_NAME, NotificationWebhook};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::wiring::{
    Ports, bind, build_core, export_insights, http_settings, pull_request_settings, serve_http,
    server_settings, stop_on_signal,
};

/// Response header naming the Promotion object a 202 answer recorded.
pub const PROMOTION_OBJECT_HEADER: &str = "x-promotion-object";

/// Settings used in Kubernetes mode only.
#[derive(Debug, Args)]
pub struct KubernetesArgs {
    /// Kubernetes mode: where the Flux-format event of each notification promotion is
    /// POSTed (notification-controller's event receiver), as Flux controllers'
    /// --events-addr. The event is about the pipeline's app object in the pipeline's
    /// namespace: an Alert there selecting it forwards promotions (README "Wiring leaf
    /// clusters").
    #[arg(long, env = "PIPELINE_CONTROLLER_EVENTS_ADDR", value_name = "URL", value_parser = crate::values::parse_http_url)]
    pub events_addr: Option<reqwest::Url>,
    /// Kubernetes mode: also take approvals, rejections and retries over HTTP signed
    /// with an environment's approval key. Off by default: approving is then only an
    /// RBAC-checked action on the Promotion through the Kubernetes API.
    #[arg(long, env = "PIPELINE_CONTROLLER_ENABLE_HMAC_APPROVALS")]
    pub enable_hmac_approvals: bool,
    /// Kubernetes mode: watch Secrets with one cluster-wide watch instead of one per
    /// namespace holding Pipelines (needs cluster-wide read of Secrets, the chart's
    /// rbac.secrets.clusterWide); for many namespaces, at the cost of caching every Secret.
    #[arg(long, env = "PIPELINE_CONTROLLER_SECRETS_CLUSTER_WIDE")]
    pub secrets_cluster_wide: bool,
    /// Kubernetes mode: base URL leaf clusters reach the webhook at; every generated
    /// Provider's address is `<URL>/pipelines/promotions/<namespace>/<name>/<environment>`.
    /// [default: derived from an Ingress routing /pipelines/promotions/ to --service-name,
    /// else that Service's LoadBalancer address; see README "Wiring leaf clusters"]
    #[arg(long, env = "PIPELINE_CONTROLLER_PUBLIC_URL", value_name = "URL", value_parser = crate::values::parse_http_url)]
    pub public_url: Option<reqwest::Url>,
    /// Kubernetes mode: the controller's own Service, whose Ingress or load balancer gives
    /// the public URL when --public-url is not set.
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_SERVICE_NAME",
        default_value = "pipeline-controller"
    )]
    pub service_name: String,
    /// Kubernetes mode: namespace of that Service [default: the client's namespace].
    #[arg(long, env = "POD_NAMESPACE")]
    pub service_namespace: Option<String>,
    /// Kubernetes mode: who puts the Flux Provider, Alert and key Secret into each
    /// target's cluster: `off` (you do, e.g. with `flux-config` and Flux), or `direct`
    /// (the leader applies and maintains them itself).
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_FLUX_WIRING",
        value_enum,
        default_value = "off"
    )]
    pub flux_wiring: FluxWiringMode,
    /// Kubernetes mode, --flux-wiring direct: how often every object is re-applied (a
    /// changed or deleted one is put back within this time; Pipeline changes apply at once).
    #[arg(long, env = "PIPELINE_CONTROLLER_FLUX_WIRING_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub flux_wiring_interval: Duration,
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

/// Who creates the Flux objects that send deployment events to the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FluxWiringMode {
    /// Not the controller (`flux-config` output applied by Flux, or by hand).
    Off,
    /// The leader applies them to every target's cluster and keeps them there.
    Direct,
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

/// Without a cluster, what to do instead of reading records from it.
const READ_INSTEAD: &str = "pass --server URL to read from a running pipeline-controller";

/// Without a cluster, what to do instead of deciding through it.
const DECIDE_INSTEAD: &str =
    "pass --server URL --key-file FILE to send the decision to a running pipeline-controller";

async fn kube_client(instead: &str) -> anyhow::Result<kube::Client> {
    crate::kubeconfig::client(instead).await
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let k8s = &args.kubernetes;
    if k8s.lease_renew.is_zero() || k8s.lease_renew >= k8s.lease_duration {
        return Err(crate::errors::usage(format!(
            "--lease-renew ({}) must be shorter than --lease-duration ({}), e.g. a third of it",
            humantime::format_duration(k8s.lease_renew),
            humantime::format_duration(k8s.lease_duration)
        )));
    }
    let client = kube_client("pass --manifests DIR for embedded mode").await?;
    let identity = k8s.identity.clone().unwrap_or_else(default_identity);
    let lease_namespace = k8s
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());

    let pipelines = KubePipelineSource::start(client.clone());
    let secrets = if k8s.secrets_cluster_wide {
        KubeSecretSource::cluster_wide(client.clone())
    } else {
        KubeSecretSource::new(client.clone())
    };
    let publisher = EventPublisher::new(client.clone(), identity.clone());
    // One watch of every Promotion, shared by the store, the reconciler and the
    // executor's wake-ups: no LIST on a timer, duplicates answered without a call.
    let wake = Arc::new(tokio::sync::Notify::new());
    let promotions = PromotionCache::start(client.clone(), wake.clone());
    let store = KubePromotionStore::new(client.clone())
        .with_events(publisher.clone(), pipelines.clone())
        .with_cache(promotions.clone());
    let metrics = Arc::new(Metrics::new().with_collector(crate::heap::HeapStats));
    if let Some(address) = &k8s.events_addr {
        tracing::info!(events_addr = %address, "--events-addr: promotions are posted as events of each pipeline's app object in the pipeline's namespace; notification-controller forwards them only to the Alerts selecting that object");
    }
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
    // Targets in this cluster, and in leaf clusters named by clusterRefs (GitopsClusters
    // and Cluster API kubeconfig Secrets in this cluster).
    let direct = k8s.flux_wiring == FluxWiringMode::Direct;
    let registry = (!args.no_deployment_watch || direct).then(|| {
        Arc::new(ClusterRegistry::new(
            Some(client.clone()),
            Arc::new(KubeClusterSource::start(client.clone(), secrets.clone())),
        ))
    });
    let clusters = registry.clone().filter(|_| !args.no_deployment_watch);
    let exposure = Exposure {
        flag: k8s.public_url.as_ref().map(|u| u.as_str().to_string()),
        service_namespace: k8s
            .service_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string()),
        service_name: k8s.service_name.clone(),
    };
    let wiring = registry.filter(|_| direct).map(|registry| {
        Arc::new(DirectWiring::new(
            client.clone(),
            registry,
            pipelines.clone(),
            Arc::new(secrets.clone()),
            exposure.clone(),
            k8s.flux_wiring_interval,
        ))
    });
    let core = Arc::new(build_core(
        Ports {
            pipelines: Arc::new(pipelines.clone()),
            secrets: Arc::new(secrets.clone()),
            store: Arc::new(store.clone()),
            strategies,
            clusters,
            hmac_approvals: k8s.enable_hmac_approvals,
            wake,
        },
        &args,
        metrics.clone(),
    ));

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let (listener, address) = bind(&args).await?;
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
    let insights_interval = listener.insights_interval;
    let lead = {
        let metrics = metrics.clone();
        let client = client.clone();
        let store = store.clone();
        let pipelines = pipelines.clone();
        let secrets = secrets.clone();
        let promotions = promotions.clone();
        let core = core.clone();
        let wiring = wiring.clone();
        let exposure = exposure.clone();
        move |stop: CancellationToken| {
            let metrics = metrics.clone();
            let core = core.clone();
            let wiring = wiring.clone();
            let exposure = exposure.clone();
            let client = client.clone();
            let reconciler = Reconciler::new(
                client.clone(),
                store.clone(),
                pipelines.clone(),
                promotions.clone(),
                core.wake.clone(),
            )
            .with_secrets(secrets.clone())
            .with_metrics(metrics.clone());
            let reconciler = match &core.watcher {
                Some(watcher) => reconciler.with_deployments(watcher.clone(), watcher.subscribe()),
                None => reconciler,
            };
            async move {
                let flux_wiring = async {
                    match wiring {
                        Some(wiring) => wiring.run(stop.clone()).await,
                        // Said once per leadership, for `flux-config --public-url`.
                        None => {
                            match pipeline_kube::public_url::resolve(&client, &exposure).await {
                                PublicUrl::Found { url, source } => {
                                    tracing::info!(public_url = %url, from = %source, "public URL of the webhook (--flux-wiring off: use it with `flux-config --public-url`)")
                                }
                                missing => {
                                    tracing::info!(public_url = %missing, "no public URL of the webhook (--flux-wiring off: pass one to `flux-config --public-url`)")
                                }
                            }
                        }
                    }
                };
                // Only the leader exports the insights: with several replicas, a sum
                // over them counts each deployment once.
                let insights = export_insights(
                    core.reader.clone(),
                    metrics,
                    insights_interval,
                    stop.clone(),
                );
                tokio::join!(
                    core.lead(stop.clone()),
                    reconciler.run(stop.clone()),
                    flux_wiring,
                    insights
                );
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
                        secrets.prune(&pipelines.secret_namespaces());
                    }
                }
            }
        }
    });

    let state = AppState::new(core.intake.clone(), metrics, http_settings(&args))
        .with_reader(core.reader.clone())
        .with_record_headers(Arc::new(|record: &PromotionRecord| {
            let path = promotion_api_path(&record.pipeline.namespace, &record.id);
            HeaderValue::from_str(&path)
                .map(|value| vec![(HeaderName::from_static(PROMOTION_OBJECT_HEADER), value)])
                .unwrap_or_default()
        }));
    // The leader's direct wiring says on /readyz when it cannot do its work.
    let state = match &wiring {
        Some(wiring) => {
            let wiring = wiring.clone();
            state.with_readiness_detail(Arc::new(move || wiring.degradations()))
        }
        None => state,
    };
    serve_http(listener, state, server_settings(&args), &shutdown).await?;
    let _ = election.await;
    let _ = prune.await;
    tracing::info!("stopped");
    Ok(())
}

/// A decision without `--server`: recorded on the Promotion with the caller's own
/// Kubernetes credentials; the leader applies it.
pub async fn decide(
    pipeline: &PipelineRef,
    environment: &str,
    revision: &str,
    verdict: &Verdict,
) -> anyhow::Result<PromotionRecord> {
    let client = kube_client(DECIDE_INSTEAD).await?;
    Ok(pipeline_kube::decide(client, pipeline, environment, revision, verdict).await?)
}

/// The promotion with `id`, from the cluster.
pub async fn find(namespace: Option<&str>, id: &str) -> anyhow::Result<PromotionRecord> {
    let client = kube_client(DECIDE_INSTEAD).await?;
    pipeline_kube::find_promotion(client, namespace, id)
        .await?
        .with_context(|| match namespace {
            Some(namespace) => format!("no Promotion {namespace}/{id}"),
            None => format!("no Promotion named {id} in any namespace"),
        })
}

/// Reads Promotions in `namespace` (all namespaces when `None`), explaining a refusal.
async fn list_in(
    client: kube::Client,
    namespace: Option<&str>,
    params: &ListParams,
) -> anyhow::Result<Vec<Promotion>> {
    let api: Api<Promotion> = match namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    match api.list(params).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if status.is_forbidden() => Err(match namespace {
            None => crate::errors::usage(
                "you may not list Promotions in all namespaces; pass -n NAMESPACE (or --pipeline NAMESPACE/NAME) for a namespace you may read",
            ),
            Some(namespace) => anyhow::anyhow!(
                "you may not list Promotions in namespace {namespace}; ask for a RoleBinding to the pipeline-viewer ClusterRole there"
            ),
        }),
        Err(err) => Err(anyhow::anyhow!(
            "listing Promotions: {}",
            pipeline_core::report::error_chain(&err)
        )),
    }
}

/// `promotions list` without `--server`: Promotions from the cluster, newest first; from
/// `namespace` only when given (so RBAC on that namespace is enough), else from all.
pub async fn list(
    namespace: Option<&str>,
    pipeline: Option<PipelineRef>,
    environment: Option<String>,
) -> anyhow::Result<Vec<PromotionRecord>> {
    let filter = PromotionFilter {
        pipeline,
        environment,
    };
    let client = kube_client(READ_INSTEAD).await?;
    let items = list_in(client, namespace, &ListParams::default()).await?;
    let mut records: Vec<PromotionRecord> = items
        .iter()
        .filter_map(pipeline_kube::convert::record_of)
        .filter(|r| filter.matches(r))
        .collect();
    records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(records)
}

/// `promotions get ID` without `--server`: the Promotion named `id`, in `namespace` or
/// else in any namespace; when listing all namespaces is not allowed, in the current
/// context's namespace.
pub async fn get(namespace: Option<&str>, id: &str) -> anyhow::Result<PromotionRecord> {
    let is_name = !id.is_empty()
        && id.len() <= 253
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !is_name {
        return Err(crate::errors::usage(format!(
            "{id:?} is not a promotion id (ids are lowercase names such as podinfo-staging-1a2b3c4d5e6f7a8b); see `promotions list`"
        )));
    }
    let client = kube_client(READ_INSTEAD).await?;
    let by_name = ListParams::default().fields(&format!("metadata.name={id}"));
    let (items, searched) = match namespace {
        Some(namespace) => (
            list_in(client, Some(namespace), &by_name).await?,
            format!("namespace {namespace}"),
        ),
        None => match list_in(client.clone(), None, &by_name).await {
            Ok(items) => (items, "any namespace".to_string()),
            Err(err) if err.is::<crate::errors::UsageError>() => {
                let namespace = client.default_namespace().to_string();
                let items = match list_in(client, Some(&namespace), &by_name).await {
                    Ok(items) => items,
                    Err(_) => {
                        return Err(crate::errors::usage(format!(
                            "you may not search Promotions in all namespaces, nor in {namespace} (the current context's); pass -n NAMESPACE"
                        )));
                    }
                };
                if items.is_empty() {
                    return Err(crate::errors::usage(format!(
                        "no promotion {id} in namespace {namespace} (you may not search all namespaces); pass -n NAMESPACE"
                    )));
                }
                (items, format!("namespace {namespace}"))
            }
            Err(err) => return Err(err),
        },
    };
    items
        .iter()
        .filter_map(pipeline_kube::convert::record_of)
        // Ids hash the pipeline's namespace: a same-named object elsewhere is not ours.
        .find(|r| {
            r.id == id
                && r.id
                    == pipeline_core::promotion_id(&r.pipeline, &r.target_environment, &r.revision)
        })
        .with_context(|| format!("no promotion {id} in {searched}"))
}
