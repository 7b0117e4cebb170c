//! The read-only dashboard: every pipeline as a row of environment lanes, each
//! pipeline's promotion timeline and delivery insights. Server-rendered HTML (maud,
//! which escapes every value), one CSS and one JS file embedded in the binary (no CDN,
//! no Node toolchain), a Content-Security-Policy that allows no inline script or style,
//! and live updates over server-sent events; with JavaScript off the pages still read
//! correctly (and reload themselves every 30 s).
//!
//! It reads only through [`ReadPort`]; it can change nothing.
#![forbid(unsafe_code)]

mod charts;
mod pages;
pub mod view;

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use futures::Stream;
use maud::Markup;
use pipeline_core::insights::pipeline_insights;
use pipeline_core::{PipelineRef, PromotionFilter, ReadPort};
use serde::Deserialize;
use tokio::sync::watch;

pub use view::ApproveVia;

pub(crate) const CSS_PATH: &str = "/ui/assets/app.css";
pub(crate) const JS_PATH: &str = "/ui/assets/live.js";
const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/live.js");

/// Records per timeline page.
pub const PAGE_SIZE: usize = 20;

/// What only the deployment knows.
#[derive(Debug, Clone)]
pub struct DashboardSettings {
    /// How approvers reach the controller, for the `approve` command shown.
    pub approve_via: ApproveVia,
    /// How often the live endpoint looks for changes.
    pub poll_interval: Duration,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        Self {
            approve_via: ApproveVia::Kubernetes,
            poll_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Clone)]
struct Dashboard {
    reader: Arc<dyn ReadPort>,
    settings: Arc<DashboardSettings>,
    /// The current version for every live page: one poller for all of them, started by
    /// the first and idle while none listens.
    versions: Arc<watch::Sender<Option<u64>>>,
    poller: Arc<std::sync::Once>,
}

/// Scripts and styles only from this origin, nothing inline; no framing, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The dashboard's routes: `/` (overview), `/ui/pipelines/{namespace}/{name}`, their
/// fragments under `/ui/fragment/...`, `/ui/events` (server-sent events) and the assets.
pub fn router(reader: Arc<dyn ReadPort>, settings: DashboardSettings) -> Router {
    let state = Dashboard {
        reader,
        settings: Arc::new(settings),
        versions: Arc::new(watch::channel(None).0),
        poller: Arc::new(std::sync::Once::new()),
    };
    Router::new()
        .route("/", get(overview_page))
        .route("/ui", get(overview_page))
        .route("/ui/fragment/overview", get(overview_fragment))
        .route("/ui/pipelines/{namespace}/{name}", get(pipeline_page))
        .route(
            "/ui/fragment/pipelines/{namespace}/{name}",
            get(pipeline_fragment),
        )
        .route("/ui/events", get(events))
        .route(CSS_PATH, get(|| asset("text/css; charset=utf-8", CSS)))
        .route(JS_PATH, get(|| asset("text/javascript; charset=utf-8", JS)))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A path segment, percent-encoded for links.
pub(crate) fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Something the read port could not answer, as an HTML page with the reason.
struct Unreadable(String);

impl IntoResponse for Unreadable {
    fn into_response(self) -> Response {
        tracing::debug!(error = %self.0, "dashboard could not read");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Html(
                pages::layout(
                    "unavailable",
                    "/ui/fragment/overview",
                    0,
                    pages::message(&format!(
                        "Cannot read the controller's state now: {}",
                        self.0
                    )),
                )
                .into_string(),
            ),
        )
            .into_response()
    }
}

/// A digest of everything the pages show, to tell when they changed.
async fn version(reader: &dyn ReadPort) -> Result<u64, Unreadable> {
    let pipelines = reader
        .pipelines()
        .await
        .map_err(|e| Unreadable(e.to_string()))?;
    let records = reader
        .records(&PromotionFilter::default())
        .await
        .map_err(|e| Unreadable(e.to_string()))?;
    let mut hasher = DefaultHasher::new();
    for pipeline in &pipelines {
        pipeline.reference.hash(&mut hasher);
        for (index, env) in pipeline.spec.environments.iter().enumerate() {
            env.name.hash(&mut hasher);
            if let Some(state) = reader.environment(pipeline, index) {
                format!("{:?}", state.targets).hash(&mut hasher);
            }
        }
    }
    for record in &records {
        (&record.id, record.phase.as_str(), record.updated_at).hash(&mut hasher);
    }
    Ok(hasher.finish())
}

async fn overview_markup(
    dashboard: &Dashboard,
    filter: &view::Filter,
) -> Result<Markup, Unreadable> {
    let reader = &dashboard.reader;
    let pipelines = reader
        .pipelines()
        .await
        .map_err(|e| Unreadable(e.to_string()))?;
    let records = reader
        .records(&PromotionFilter::default())
        .await
        .map_err(|e| Unreadable(e.to_string()))?;
    let mut rows: Vec<view::Row> = pipelines
        .iter()
        .filter(|p| filter.matches(&p.reference))
        .map(|pipeline| {
            let states: Vec<_> = (0..pipeline.spec.environments.len())
                .map(|index| reader.environment(pipeline, index))
                .collect();
            view::row(pipeline, &records, &states, &dashboard.settings.approve_via)
        })
        .collect();
    view::sort_rows(&mut rows);
    Ok(pages::overview(&rows, filter, pipelines.len(), Utc::now()))
}

fn query_string(filter: &view::Filter) -> String {
    let mut parts = Vec::new();
    if !filter.namespace.is_empty() {
        parts.push(format!("namespace={}", path_segment(&filter.namespace)));
    }
    if !filter.name.is_empty() {
        parts.push(format!("name={}", path_segment(&filter.name)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

async fn overview_page(
    State(dashboard): State<Dashboard>,
    Query(filter): Query<view::Filter>,
) -> Result<Html<String>, Unreadable> {
    let version = version(dashboard.reader.as_ref()).await?;
    let main = overview_markup(&dashboard, &filter).await?;
    let fragment = format!("/ui/fragment/overview{}", query_string(&filter));
    Ok(Html(
        pages::layout("Pipelines", &fragment, version, main).into_string(),
    ))
}

async fn overview_fragment(
    State(dashboard): State<Dashboard>,
    Query(filter): Query<view::Filter>,
) -> Result<Html<String>, Unreadable> {
    Ok(Html(
        overview_markup(&dashboard, &filter).await?.into_string(),
    ))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    page: Option<usize>,
}

async fn pipeline_markup(
    dashboard: &Dashboard,
    reference: &PipelineRef,
    page: usize,
) -> Result<Option<Markup>, Unreadable> {
    let reader = &dashboard.reader;
    let Some(pipeline) = reader
        .pipeline(reference)
        .await
        .map_err(|e| Unreadable(e.to_string()))?
    else {
        return Ok(None);
    };
    let records = reader
        .records(&PromotionFilter {
            pipeline: Some(reference.clone()),
            environment: None,
        })
        .await
        .map_err(|e| Unreadable(e.to_string()))?;
    let insights = pipeline_insights(&pipeline, &records);
    let pages = records.len().div_ceil(PAGE_SIZE).max(1);
    let page = page.clamp(1, pages);
    let start = (page - 1) * PAGE_SIZE;
    let shown = &records[start.min(records.len())..(start + PAGE_SIZE).min(records.len())];
    Ok(Some(pages::pipeline(
        reference,
        &insights,
        &pages::Timeline {
            records: shown,
            page,
            pages,
            total: records.len(),
        },
        Utc::now(),
    )))
}

fn not_found(reference: &PipelineRef) -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(
            pages::layout(
                "not found",
                "/ui/fragment/overview",
                0,
                pages::message(&format!("No pipeline {reference}.")),
            )
            .into_string(),
        ),
    )
        .into_response()
}

async fn pipeline_page(
    State(dashboard): State<Dashboard>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<PageQuery>,
) -> Result<Response, Unreadable> {
    let reference = PipelineRef::new(namespace, name);
    let page = query.page.unwrap_or(1);
    let version = version(dashboard.reader.as_ref()).await?;
    let Some(main) = pipeline_markup(&dashboard, &reference, page).await? else {
        return Ok(not_found(&reference));
    };
    let fragment = format!(
        "/ui/fragment/pipelines/{}/{}?page={page}",
        path_segment(&reference.namespace),
        path_segment(&reference.name)
    );
    Ok(
        Html(pages::layout(&reference.to_string(), &fragment, version, main).into_string())
            .into_response(),
    )
}

async fn pipeline_fragment(
    State(dashboard): State<Dashboard>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<PageQuery>,
) -> Result<Response, Unreadable> {
    let reference = PipelineRef::new(namespace, name);
    match pipeline_markup(&dashboard, &reference, query.page.unwrap_or(1)).await? {
        Some(main) => Ok(Html(main.into_string()).into_response()),
        None => Ok(not_found(&reference)),
    }
}

/// Looks for changes every `poll_interval` while anyone listens; ends with the router.
async fn poll_versions(
    reader: Arc<dyn ReadPort>,
    settings: Arc<DashboardSettings>,
    versions: std::sync::Weak<watch::Sender<Option<u64>>>,
) {
    loop {
        let Some(sender) = versions.upgrade() else {
            return;
        };
        if sender.receiver_count() > 0
            && let Ok(current) = version(reader.as_ref()).await
        {
            sender.send_if_modified(|last| {
                let changed = *last != Some(current);
                *last = Some(current);
                changed
            });
        }
        drop(sender);
        tokio::time::sleep(settings.poll_interval).await;
    }
}

/// Server-sent events: `change` with the new version whenever what the pages show
/// changed, starting with the current one. One poller serves every connection.
async fn events(
    State(dashboard): State<Dashboard>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    dashboard.poller.call_once(|| {
        tokio::spawn(poll_versions(
            dashboard.reader.clone(),
            dashboard.settings.clone(),
            Arc::downgrade(&dashboard.versions),
        ));
    });
    let mut receiver = dashboard.versions.subscribe();
    // The first event says where things stand now (once the poller knows).
    receiver.mark_changed();
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            receiver.changed().await.ok()?;
            let current = *receiver.borrow_and_update();
            if let Some(current) = current {
                let event = Event::default().event("change").data(current.to_string());
                return Some((Ok(event), receiver));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
