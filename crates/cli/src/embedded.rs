//! Embedded mode: the manifests folder (pipelines, Secrets, GitopsClusters), the redb
//! state file and HTTP notification receivers around the core, until SIGINT or SIGTERM.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use pipeline_core::{Metrics, StrategySet};
use pipeline_git::PullRequestStrategy;
use pipeline_http::AppState;
use pipeline_kube::ClusterRegistry;
use pipeline_manifests::ManifestCatalog;
use pipeline_store::{OpenOptions, RedbPromotionStore};
use pipeline_strategies::{DEFAULT_CONTROLLER_NAME, NotificationWebhook};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::wiring::{
    Ports, bind, build_core, http_settings, pull_request_settings, serve_http, server_settings,
    stop_on_signal,
};

pub(crate) async fn serve(args: ServeArgs, manifests: &Path) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().with_collector(crate::heap::HeapStats));
    let catalog = Arc::new(ManifestCatalog::new(manifests).with_metrics(metrics.clone()));
    let store = Arc::new(
        RedbPromotionStore::open_with(
            &args.state,
            OpenOptions {
                init_empty_file: args.init_empty_state,
            },
        )
        .with_context(|| format!("opening state file {}", args.state.display()))?,
    );
    let notification = NotificationWebhook::new(
        args.notify_urls.clone(),
        NotificationWebhook::client().context("building the notification HTTP client")?,
        DEFAULT_CONTROLLER_NAME,
    );
    let strategies = StrategySet {
        notification: Arc::new(notification),
        pull_request: Arc::new(PullRequestStrategy::new(
            pull_request_settings(&args.pull_request)?,
            pipeline_git::forge::http_client().context("building the forge HTTP client")?,
        )),
    };
    // No cluster of its own: only targets with a clusterRef (a GitopsCluster and its
    // kubeconfig Secret in the folder) are watched.
    let core = build_core(
        Ports {
            pipelines: catalog.clone(),
            secrets: catalog.clone(),
            store,
            strategies,
            clusters: (!args.no_deployment_watch)
                .then(|| Arc::new(ClusterRegistry::new(None, catalog.clone()))),
            hmac_approvals: true,
            wake: Arc::new(tokio::sync::Notify::new()),
        },
        &args,
        metrics.clone(),
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let (listener, address) = bind(&args).await?;
    tracing::info!(%address, manifests = %manifests.display(), state = %args.state.display(), "listening");

    let core = Arc::new(core);
    let lead_task = tokio::spawn({
        let core = core.clone();
        let stop = shutdown.clone();
        async move { core.lead(stop).await }
    });
    let watch_task = tokio::spawn(
        catalog
            .clone()
            .watch(args.reload_interval, shutdown.clone().cancelled_owned()),
    );
    // Files served from their last good version: /readyz stays 200 and names them.
    let readiness = {
        let catalog = catalog.clone();
        Arc::new(move || {
            catalog
                .last_good_files()
                .iter()
                .map(|file| format!("manifests: {file}"))
                .collect()
        })
    };
    serve_http(
        listener,
        AppState::new(core.intake.clone(), metrics, http_settings(&args))
            .with_reader(core.reader.clone())
            .with_readiness_detail(readiness),
        server_settings(&args),
        &shutdown,
    )
    .await?;
    let _ = lead_task.await;
    let _ = watch_task.await;
    tracing::info!("stopped");
    Ok(())
}
