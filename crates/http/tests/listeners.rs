//! The two listeners' route sets: the public one answers only what leaf clusters and
//! approvers call (and a liveness probe); the API, readiness and metrics are internal.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Method, Request};
use pipeline_core::testing::{MemoryCatalog, MemoryStore};
use pipeline_core::{Intake, Metrics, SystemClock, TimeWindow};
use pipeline_http::{AppState, HttpSettings, internal_router, public_router};
use tower::ServiceExt;

fn state() -> AppState {
    let catalog = Arc::new(MemoryCatalog::new());
    let metrics = Arc::new(Metrics::new());
    let intake = Intake::new(
        catalog.clone(),
        catalog,
        Arc::new(MemoryStore::new()),
        Arc::new(SystemClock),
        TimeWindow::default(),
        metrics.clone(),
        Arc::new(tokio::sync::Notify::new()),
    );
    AppState::new(Arc::new(intake), metrics, HttpSettings::default())
}

/// The status, and the error reason when there is one (`not_found` is "no such path").
async fn answer(app: &Router, method: Method, path: &str) -> (u16, String) {
    let app = app
        .clone()
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 4000))));
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (
        status,
        json["reason"].as_str().unwrap_or_default().to_string(),
    )
}

async fn status(app: &Router, method: Method, path: &str) -> u16 {
    answer(app, method, path).await.0
}

#[tokio::test]
async fn public_listener_serves_only_webhook_approvals_and_liveness() {
    let public = public_router(state());
    for path in [
        "/api/v1/promotions",
        "/api/v1/promotions/x",
        "/metrics",
        "/readyz",
    ] {
        let (status, reason) = answer(&public, Method::GET, path).await;
        assert_eq!((status, reason.as_str()), (404, "not_found"), "{path}");
    }
    assert_eq!(status(&public, Method::GET, "/healthz").await, 200);
    // Unsigned, so refused, but routed (not 404).
    for path in [
        "/pipelines/promotions/ns/p/dev",
        "/promotion/ns/p/dev",
        "/pipelines/approvals/ns/p/prod/1.0.0",
        "/approval/ns/p/prod/1.0.0",
        "/pipelines/rejections/ns/p/prod/1.0.0",
        "/pipelines/retries/ns/p/prod/1.0.0",
    ] {
        let (status, reason) = answer(&public, Method::POST, path).await;
        assert!(
            reason != "not_found" && status != 405,
            "{path}: {status} {reason}"
        );
    }
}

#[tokio::test]
async fn internal_listener_serves_api_health_metrics_and_no_webhook() {
    let internal = internal_router(state(), Router::new());
    for path in ["/api/v1/promotions", "/metrics", "/readyz", "/healthz"] {
        assert_eq!(status(&internal, Method::GET, path).await, 200, "{path}");
    }
    assert_eq!(
        status(&internal, Method::GET, "/api/v1/promotions/nope").await,
        404
    );
    for path in [
        "/pipelines/promotions/ns/p/dev",
        "/pipelines/approvals/ns/p/prod/1.0.0",
    ] {
        let (status, reason) = answer(&internal, Method::POST, path).await;
        assert_eq!((status, reason.as_str()), (404, "not_found"), "{path}");
    }
}
