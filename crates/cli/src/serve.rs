//! `serve`: wires the embedded adapters (manifests folder, redb store, HTTP notification)
//! around the core and runs until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use pipeline_core::{
    Executor, ExecutorSettings, Intake, Metrics, RetryPolicy, StrategySet, SystemClock, TimeWindow,
};
use pipeline_git::{PullRequestSettings, PullRequestStrategy};
use pipeline_http::{AppState, HttpSettings, ServerSettings, router};
use pipeline_manifests::ManifestCatalog;
use pipeline_store::{OpenOptions, RedbPromotionStore};
use pipeline_strategies::{DEFAULT_CONTROLLER_NAME, NotificationWebhook};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cli::{PullRequestArgs, ServeArgs};
use crate::errors::usage;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let Some(manifests) = args.manifests.clone() else {
        // Checked before logging starts, so a mistaken invocation is one line.
        if !crate::kubeconfig::present() {
            return Err(crate::kubeconfig::missing(
                "pass --manifests DIR for embedded mode",
            ));
        }
        crate::logging::init(args.log_format, &args.log_level);
        return crate::kubernetes::serve(args).await;
    };
    if !manifests.is_dir() {
        return Err(usage(format!(
            "--manifests {} is not a directory; pass the folder holding the Pipeline and Secret manifests",
            manifests.display()
        )));
    }
    crate::logging::init(args.log_format, &args.log_level);
    let metrics = Arc::new(Metrics::new());
    let catalog = Arc::new(ManifestCatalog::new(&manifests).with_metrics(metrics.clone()));
    let store = Arc::new(
        RedbPromotionStore::open_with(
            &args.state,
            OpenOptions {
                init_empty_file: args.init_empty_state,
            },
        )
        .with_context(|| format!("opening state file {}", args.state.display()))?,
    );
    let wake = Arc::new(Notify::new());
    let clock = Arc::new(SystemClock);

    let intake = Arc::new(Intake::new(
        catalog.clone(),
        catalog.clone(),
        store.clone(),
        clock.clone(),
        time_window(&args),
        metrics.clone(),
        wake.clone(),
    ));
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
    let executor = Arc::new(Executor::new(
        store.clone(),
        catalog.clone(),
        catalog.clone(),
        strategies,
        clock,
        metrics.clone(),
        executor_settings(&args),
        wake,
    ));

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let (listener, address) = bind(&args).await?;
    tracing::info!(%address, manifests = %manifests.display(), state = %args.state.display(), "listening");

    let executor_task = tokio::spawn(executor.run(shutdown.clone().cancelled_owned()));
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
        AppState::new(intake, metrics, http_settings(&args)).with_readiness_detail(readiness),
        server_settings(&args),
        &shutdown,
    )
    .await?;
    let _ = executor_task.await;
    let _ = watch_task.await;
    tracing::info!("stopped");
    Ok(())
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
