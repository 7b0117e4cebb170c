//! The dashboard's pages through its real router over the core's in-memory ports:
//! what they show, that foreign text never becomes markup, and the security headers.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::Utc;
use pipeline_core::testing::{MemoryCatalog, MemoryStore};
use pipeline_core::{PipelineRef, PortReader, PromotionRecord, PromotionStore, Trigger};
use pipeline_dashboard::{ApproveVia, DashboardSettings, PAGE_SIZE, router};
use serde_json::json;
use tower::ServiceExt;

const XSS: &str = "<img src=x onerror=alert(1)>";

fn catalog() -> Arc<MemoryCatalog> {
    let spec = |manual_prod: bool| {
        json!({
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "web"},
            "environments": [
                {"name": "dev", "targets": [{"namespace": "dev"}]},
                {"name": "prod", "targets": [{"namespace": "prod"}],
                 "promotion": {"manual": manual_prod, "strategy": {"notification": {}}}}
            ],
            "promotion": {"strategy": {"secretRef": {"name": "hmac"}, "notification": {}}}
        })
    };
    Arc::new(
        MemoryCatalog::new()
            .with_pipeline("apps", "web", spec(true))
            .with_pipeline("apps", "quiet", spec(false))
            .with_pipeline("team-b", "api", spec(false)),
    )
}

async fn app(records: Vec<PromotionRecord>) -> Router {
    app_with(records).await.0
}

async fn app_with(records: Vec<PromotionRecord>) -> (Router, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    for record in records {
        store.create_if_absent(record).await.unwrap();
    }
    let catalog = catalog();
    let reader = Arc::new(PortReader::new(catalog, store.clone(), None));
    let app = router(
        reader,
        DashboardSettings {
            approve_via: ApproveVia::Http {
                server: "http://127.0.0.1:8080".into(),
            },
            poll_interval: std::time::Duration::from_millis(50),
        },
    );
    (app, store)
}

fn record(pipeline: &str, to: &str, revision: &str, manual: bool) -> PromotionRecord {
    PromotionRecord::new(
        PipelineRef::new("apps", pipeline),
        "dev",
        to,
        revision,
        manual,
        Trigger {
            source: "webhook".into(),
            ..Trigger::default()
        },
        Utc::now(),
    )
}

async fn get(app: &Router, path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let response = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 4 << 20)
        .await
        .unwrap();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn overview_shows_lanes_waiting_approvals_and_escapes_foreign_text() {
    let app = app(vec![
        record("web", "prod", XSS, true),
        record("web", "prod", "1.0.0", true),
    ])
    .await;
    let (status, headers, html) = get(&app, "/").await;
    assert_eq!(status, 200);
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("style-src 'self'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    // The revision is text, never markup: nowhere does the raw tag appear.
    assert!(!html.contains("<img"), "{html}");
    assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
    // The approve command, shell-quoted, for the embedded mode's signed HTTP.
    assert!(html.contains(
        "pipeline-controller approve apps/web prod &#39;&lt;img src=x onerror=alert(1)&gt;&#39; --server http://127.0.0.1:8080 --key-file APPROVAL_KEY_FILE"
    ) || html.contains(
        "pipeline-controller approve apps/web prod '&lt;img src=x onerror=alert(1)&gt;' --server http://127.0.0.1:8080 --key-file APPROVAL_KEY_FILE"
    ), "{html}");
    assert!(html.contains("pipeline-controller approve apps/web prod 1.0.0 --server"));
    // No inline script or style anywhere.
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "{html}"
    );
    assert!(html.contains(r#"<script src="/ui/assets/live.js" defer></script>"#));
    // Most recent activity first: apps/web (records) before the others.
    let web = html.find(r#"data-pipeline="apps/web""#).unwrap();
    let api = html.find(r#"data-pipeline="team-b/api""#).unwrap();
    assert!(web < api);
}

#[tokio::test]
async fn overview_filters_by_namespace_and_name() {
    let app = app(vec![]).await;
    let (_, _, html) = get(&app, "/?namespace=apps").await;
    assert!(html.contains(r#"data-pipeline="apps/web""#));
    assert!(!html.contains(r#"data-pipeline="team-b/api""#));
    let (_, _, html) = get(&app, "/?namespace=apps&name=qui").await;
    assert!(html.contains(r#"data-pipeline="apps/quiet""#));
    assert!(!html.contains(r#"data-pipeline="apps/web""#));
    assert!(html.contains("1 of 3 pipelines"));
    // The fragment the script swaps in keeps the filter.
    assert!(html.contains(r#"data-fragment="/ui/fragment/overview?namespace=apps&amp;name=qui""#));
}

#[tokio::test]
async fn pipeline_page_pages_the_timeline_newest_first_with_history() {
    let mut records = Vec::new();
    for i in 0..(PAGE_SIZE + 5) {
        let mut r = record("web", "prod", &format!("1.0.{i}"), false);
        r.created_at += chrono::Duration::seconds(i as i64);
        r.updated_at = r.created_at;
        records.push(r);
    }
    let app = app(records).await;
    let (status, _, html) = get(&app, "/ui/pipelines/apps/web").await;
    assert_eq!(status, 200);
    assert!(html.contains(&format!("Promotions ({})", PAGE_SIZE + 5)));
    assert!(html.contains("page 1 of 2"));
    let newest = html
        .find(&format!(r#"data-revision="1.0.{}""#, PAGE_SIZE + 4))
        .unwrap();
    let older = html.find(r#"data-revision="1.0.10""#).unwrap();
    assert!(newest < older, "newest first");
    assert!(
        !html.contains(r#"data-revision="1.0.0""#),
        "the oldest is on page 2"
    );
    assert!(html.contains("phase history"));
    assert!(html.contains("Delivery insights"));
    assert!(html.contains("<svg"));
    let (_, _, page2) = get(&app, "/ui/pipelines/apps/web?page=2").await;
    assert!(page2.contains(r#"data-revision="1.0.0""#));
    let (status, _, _) = get(&app, "/ui/pipelines/apps/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn assets_are_embedded_and_events_start_with_the_current_version() {
    let app = app(vec![]).await;
    let (status, headers, css) = get(&app, "/ui/assets/app.css").await;
    assert_eq!(status, 200);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    assert!(css.contains("section.pipeline"));
    let (_, headers, js) = get(&app, "/ui/assets/live.js").await;
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.contains("EventSource"));

    let response = app
        .clone()
        .oneshot(Request::get("/ui/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body().into_data_stream();
    use futures::StreamExt;
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8(first.to_vec()).unwrap();
    assert!(text.starts_with("event: change\ndata: "), "{text}");
}

/// Reads the next server-sent event of `body` (bounded), as text.
async fn next_event(
    body: &mut (impl futures::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
) -> String {
    use futures::StreamExt;
    loop {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), body.next())
            .await
            .expect("no event within 5 s")
            .unwrap()
            .unwrap();
        let text = String::from_utf8(chunk.to_vec()).unwrap();
        // Keep-alive comments are not events.
        if text.starts_with("event: ") {
            return text;
        }
    }
}

#[tokio::test]
async fn events_announce_a_change_to_every_listener() {
    let (app, store) = app_with(vec![]).await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let response = app
            .clone()
            .oneshot(Request::get("/ui/events").body(Body::empty()).unwrap())
            .await
            .unwrap();
        streams.push(response.into_body().into_data_stream());
    }
    let mut first = Vec::new();
    for stream in &mut streams {
        first.push(next_event(stream).await);
    }
    assert_eq!(first[0], first[1], "both start at the same version");
    store
        .create_if_absent(record("web", "prod", "2.0.0", true))
        .await
        .unwrap();
    for stream in &mut streams {
        let changed = next_event(stream).await;
        assert!(changed.starts_with("event: change\ndata: "), "{changed}");
        assert_ne!(changed, first[0], "a new version after the change");
    }
}

#[tokio::test]
async fn result_links_only_for_web_addresses() {
    let now = Utc::now();
    let mut pr = record("web", "prod", "3.0.0", false);
    pr.start_attempt(now).unwrap();
    pr.succeed(
        "opened".into(),
        Some("https://git.example/o/r/pulls/7".into()),
        now,
    )
    .unwrap();
    let earlier = now - chrono::Duration::minutes(1);
    let mut odd = record("web", "prod", "3.0.1", false);
    odd.start_attempt(earlier).unwrap();
    odd.succeed("done".into(), Some("javascript:alert(1)".into()), earlier)
        .unwrap();
    let app = app(vec![pr, odd]).await;
    let (_, _, html) = get(&app, "/ui/pipelines/apps/web").await;
    assert!(
        html.contains(r#"<a href="https://git.example/o/r/pulls/7" rel="noreferrer">"#),
        "{html}"
    );
    assert!(html.contains("javascript:alert(1)"), "shown as text");
    assert!(!html.contains(r#"href="javascript"#), "{html}");
    // The overview links the pull request of prod's latest success (prod is not known
    // to run its revision).
    let (_, _, overview) = get(&app, "/").await;
    assert!(
        overview.contains(
            r#"<a href="https://git.example/o/r/pulls/7" rel="noreferrer">pull request</a>"#
        ),
        "{overview}"
    );
    assert!(!overview.contains(r#"href="javascript"#));
}
