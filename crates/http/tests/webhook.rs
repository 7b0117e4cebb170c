//! Every row of the webhook's answer table, driven through the real router with the real
//! core and the real embedded store; only pipeline and secret lookups are in-memory here
//! (the folder loader has its own tests, and the binary's tests use it end to end).

#![allow(clippy::unwrap_used)] // test helpers, not product code

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use chrono::{Duration, Utc};
use futures::StreamExt;
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_core::testing::{MemoryCatalog, MemoryStore};
use pipeline_core::{ApprovalBody, Intake, Metrics, PromotionStore, SystemClock, TimeWindow};
use pipeline_http::{AppState, HttpSettings, RateLimit, router};
use pipeline_store::RedbPromotionStore;
use serde_json::{Value, json};
use tower::ServiceExt;

const KEY: &[u8] = b"s3cret-key";
/// The approval key of the pipeline's Secret; no leaf cluster holds it.
const APPROVER: &[u8] = b"approver-key";
/// The approval key of prod's own Secret (environment-level secretRef).
const PROD_APPROVER: &[u8] = b"prod-approver-key";

fn podinfo_spec(secret_ref: Option<&str>) -> Value {
    let mut promotion = json!({"strategy": {"notification": {}}});
    if let Some(name) = secret_ref {
        promotion["strategy"]["secretRef"] = json!({"name": name});
    }
    json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": [
            {"name": "dev", "targets": [{"namespace": "podinfo-dev"}, {"namespace": "podinfo-dev2"}]},
            {"name": "staging", "targets": [{"namespace": "podinfo-staging"}]},
            {"name": "prod", "targets": [{"namespace": "podinfo-prod"}],
             "promotion": {"manual": true, "strategy": {"notification": {}}}}
        ],
        "promotion": promotion
    })
}

fn catalog() -> MemoryCatalog {
    let hmac = [("hmac-key", KEY), ("approval-key", APPROVER)];
    // Not loadable from a folder (validation refuses it), but a Kubernetes cluster may hold it.
    let mut hollow = podinfo_spec(Some("hmac"));
    hollow["environments"][1]["targets"] = json!([]);
    // Prod names its own Secret: only its approval key decides about prod.
    let mut gated = podinfo_spec(Some("hmac"));
    gated["environments"][2]["promotion"]["strategy"]["secretRef"] =
        json!({"name": "prod-approvers"});
    // An approval key equal to the webhook key would let every leaf cluster approve.
    let same_key = [KEY, b"\n"].concat();
    MemoryCatalog::new()
        .with_pipeline("flux-system", "podinfo", podinfo_spec(Some("hmac")))
        .with_pipeline("flux-system", "nokey", podinfo_spec(None))
        .with_pipeline(
            "flux-system",
            "missing-secret",
            podinfo_spec(Some("absent")),
        )
        .with_pipeline("flux-system", "wrong-secret", podinfo_spec(Some("other")))
        .with_pipeline_spec(
            "flux-system",
            "hollow",
            serde_json::from_value(hollow).unwrap(),
        )
        .with_secret("flux-system", "hmac", hmac)
        .with_pipeline("flux-system", "gated", gated)
        .with_secret(
            "flux-system",
            "prod-approvers",
            [("approval-key", PROD_APPROVER)],
        )
        .with_pipeline("flux-system", "samekey", podinfo_spec(Some("samekey")))
        .with_secret(
            "flux-system",
            "samekey",
            [("hmac-key", KEY), ("approval-key", same_key.as_slice())],
        )
        .with_secret("flux-system", "other", [("token", KEY)])
}

struct Harness {
    app: Router,
    _dir: tempfile::TempDir,
}

fn harness_with(store: Option<Arc<dyn PromotionStore>>, settings: HttpSettings) -> Harness {
    harness_from(catalog(), store, settings, true)
}

/// The router over `catalog` and `store` (a fresh redb file when `None`).
fn harness_from(
    catalog: MemoryCatalog,
    store: Option<Arc<dyn PromotionStore>>,
    settings: HttpSettings,
    hmac_approvals: bool,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = store.unwrap_or_else(|| {
        Arc::new(RedbPromotionStore::open(&dir.path().join("state.redb")).unwrap())
    });
    let catalog = Arc::new(catalog);
    let metrics = Arc::new(Metrics::new());
    let intake = Intake::new(
        catalog.clone(),
        catalog,
        store,
        Arc::new(SystemClock),
        TimeWindow::default(),
        metrics.clone(),
        Arc::new(tokio::sync::Notify::new()),
    )
    .with_hmac_approvals(hmac_approvals);
    let app = router(AppState::new(Arc::new(intake), metrics, settings))
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 7], 40000))));
    Harness { app, _dir: dir }
}

fn harness() -> Harness {
    harness_with(None, HttpSettings::default())
}

fn event_with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut event = json!({
        "involvedObject": {"kind": "HelmRelease", "namespace": "podinfo-dev", "name": "podinfo",
                           "uid": "57c3579b", "apiVersion": "helm.toolkit.fluxcd.io/v2", "resourceVersion": "1"},
        "severity": "info",
        "timestamp": Utc::now().to_rfc3339(),
        "message": "Helm upgrade succeeded for release podinfo-dev/podinfo.v2 with chart podinfo@6.5.1",
        "reason": "UpgradeSucceeded",
        "metadata": {"revision": "6.5.1", "summary": "dev"},
        "reportingController": "helm-controller",
        "reportingInstance": "helm-controller-7cdc7874f8-9qpft"
    });
    f(&mut event);
    serde_json::to_vec(&event).unwrap()
}

fn event() -> Vec<u8> {
    event_with(|_| {})
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: Value,
}

async fn send(
    app: &Router,
    method: Method,
    path: &str,
    body: Vec<u8>,
    signature: Option<String>,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(sig) = signature {
        request = request.header("X-Signature", sig);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
    }
}

async fn post_signed(app: &Router, path: &str, body: Vec<u8>) -> Answer {
    let sig = sign(HmacAlgorithm::Sha256, KEY, &body);
    send(app, Method::POST, path, body, Some(sig)).await
}

const DEV: &str = "/pipelines/promotions/flux-system/podinfo/dev";

fn assert_error(answer: &Answer, status: StatusCode, reason: &str) {
    assert_eq!(answer.status, status, "{}", answer.json);
    assert_eq!(answer.json["reason"], reason, "{}", answer.json);
    assert!(
        answer.json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{}",
        answer.json
    );
}

#[tokio::test]
async fn new_event_is_recorded_and_its_duplicate_returns_the_record() {
    let h = harness();
    let first = post_signed(&h.app, DEV, event()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.json);
    let id = first.json["id"].as_str().unwrap().to_string();
    assert_eq!(
        first.headers[header::LOCATION].to_str().unwrap(),
        format!("/api/v1/promotions/{id}")
    );
    assert_eq!(
        first.json["pipeline"],
        json!({"namespace": "flux-system", "name": "podinfo"})
    );
    assert_eq!(first.json["sourceEnvironment"], "dev");
    assert_eq!(first.json["targetEnvironment"], "staging");
    assert_eq!(first.json["revision"], "6.5.1");
    assert_eq!(first.json["phase"], "Pending");
    assert_eq!(first.json["attempts"], 0);
    assert_eq!(first.json["history"].as_array().unwrap().len(), 1);

    // Another delivery of the same deployment (another message, another target namespace).
    let again = post_signed(
        &h.app,
        "/promotion/flux-system/podinfo/dev",
        event_with(|e| {
            e["involvedObject"]["namespace"] = json!("podinfo-dev2");
            e["reason"] = json!("TestSucceeded");
        }),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    assert_eq!(again.json["id"], id.as_str());

    let got = send(
        &h.app,
        Method::GET,
        &format!("/api/v1/promotions/{id}"),
        vec![],
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json, first.json);
    let missing = send(&h.app, Method::GET, "/api/v1/promotions/nope", vec![], None).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "promotion_not_found");
}

#[tokio::test]
async fn legacy_and_prefixed_events_count() {
    let h = harness();
    let legacy = post_signed(
        &h.app,
        DEV,
        event_with(|e| {
            e["reason"] = json!("info");
            e["message"] = json!("Helm upgrade succeeded");
            e["involvedObject"]["apiVersion"] = json!("helm.toolkit.fluxcd.io/v2beta1");
        }),
    )
    .await;
    assert_eq!(legacy.status, StatusCode::ACCEPTED, "{}", legacy.json);
    let prefixed = post_signed(
        &h.app,
        DEV,
        event_with(|e| e["metadata"] = json!({"helm.toolkit.fluxcd.io/revision": "6.6.0"})),
    )
    .await;
    assert_eq!(prefixed.status, StatusCode::ACCEPTED, "{}", prefixed.json);
    assert_eq!(prefixed.json["revision"], "6.6.0");
}

#[tokio::test]
async fn events_that_are_not_deployments_are_ignored_and_not_recorded() {
    let h = harness();
    for (reason, severity, message) in [
        ("UpgradeFailed", "error", "Helm upgrade failed"),
        ("RollbackSucceeded", "info", "Helm rollback succeeded"),
        ("info", "info", "Helm upgrade failed: timed out"),
        ("UpgradeSucceeded", "trace", "trace"),
    ] {
        let answer = post_signed(
            &h.app,
            DEV,
            event_with(|e| {
                e["reason"] = json!(reason);
                e["severity"] = json!(severity);
                e["message"] = json!(message);
            }),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{reason}: {}", answer.json);
        assert_eq!(answer.json["status"], "ignored");
        assert!(answer.json["reason"].is_string());
    }
    let list = send(&h.app, Method::GET, "/api/v1/promotions", vec![], None).await;
    assert_eq!(list.json, json!([]));
}

#[tokio::test]
async fn transport_errors() {
    let h = harness_with(
        None,
        HttpSettings {
            max_body_bytes: 4096,
            rate_limit: None,
            body_timeout: std::time::Duration::from_millis(300),
        },
    );
    let get = send(&h.app, Method::GET, DEV, vec![], None).await;
    assert_error(&get, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let put = send(&h.app, Method::PUT, DEV, event(), None).await;
    assert_eq!(put.status, StatusCode::METHOD_NOT_ALLOWED);
    let unknown = send(
        &h.app,
        Method::POST,
        "/pipelines/promotions/flux-system/podinfo",
        event(),
        None,
    )
    .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found");
    let unknown = send(&h.app, Method::POST, "/elsewhere", event(), None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found");

    // Declared too large.
    let big = post_signed(&h.app, DEV, vec![b' '; 5000]).await;
    assert_error(&big, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    // Streamed without a length: refused once the limit is crossed.
    let chunks = (0..100).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024]));
    let request = Request::builder()
        .method(Method::POST)
        .uri(DEV)
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A sender that stops halfway does not hold the connection.
    let stalled = futures::stream::iter([Ok::<_, std::io::Error>(b"{".to_vec())])
        .chain(futures::stream::pending());
    let request = Request::builder()
        .method(Method::POST)
        .uri(DEV)
        .body(Body::from_stream(stalled))
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
}

#[tokio::test]
async fn authentication_is_never_optional() {
    let h = harness();
    let body = event();
    let cases: Vec<(&str, Option<String>)> = vec![
        (DEV, None),
        (DEV, Some("sha256".into())),
        (DEV, Some("sha256=not-hex".into())),
        (DEV, Some(sign(HmacAlgorithm::Sha256, b"wrong key", &body))),
        (DEV, Some(format!("md5={}", "00".repeat(16)))),
        (
            "/pipelines/promotions/flux-system/nokey/dev",
            Some(sign(HmacAlgorithm::Sha256, KEY, &body)),
        ),
        (
            "/pipelines/promotions/flux-system/missing-secret/dev",
            Some(sign(HmacAlgorithm::Sha256, KEY, &body)),
        ),
        (
            "/pipelines/promotions/flux-system/wrong-secret/dev",
            Some(sign(HmacAlgorithm::Sha256, KEY, &body)),
        ),
    ];
    for (path, signature) in cases {
        let answer = send(&h.app, Method::POST, path, body.clone(), signature.clone()).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "unauthenticated");
        let text = answer.json.to_string();
        assert!(!text.contains("s3cret"), "{text}");
        if let Some(sig) = signature.filter(|s| s.len() > 20) {
            assert!(!text.contains(&sig[7..]), "signature echoed: {text}");
        }
    }
    // Other algorithms are fine when correct; tampering after signing is not.
    for algo in [
        HmacAlgorithm::Sha224,
        HmacAlgorithm::Sha384,
        HmacAlgorithm::Sha512,
    ] {
        let b = event_with(|e| e["metadata"]["revision"] = json!(format!("7.0.{}", algo.as_str())));
        let ok = send(
            &h.app,
            Method::POST,
            DEV,
            b.clone(),
            Some(sign(algo, KEY, &b)),
        )
        .await;
        assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.json);
    }
    let sig = sign(HmacAlgorithm::Sha256, KEY, &body);
    let mut tampered = body.clone();
    tampered.push(b' ');
    let answer = send(&h.app, Method::POST, DEV, tampered, Some(sig)).await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn unknown_pipeline_and_bad_bodies() {
    let h = harness();
    let answer = post_signed(
        &h.app,
        "/pipelines/promotions/flux-system/nope/dev",
        event(),
    )
    .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "pipeline_not_found");
    let answer = post_signed(&h.app, DEV, b"not json".to_vec()).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_body");
    let answer = post_signed(&h.app, DEV, br#"{"hello": "world"}"#.to_vec()).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_body");
    let answer = post_signed(
        &h.app,
        DEV,
        event_with(|e| e["timestamp"] = json!("yesterday")),
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_body");
}

#[tokio::test]
async fn unprocessable_events() {
    let h = harness();
    let no_revision = post_signed(
        &h.app,
        DEV,
        event_with(|e| e["metadata"] = json!({"summary": "x"})),
    )
    .await;
    assert_error(
        &no_revision,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_revision",
    );
    let unknown_env = post_signed(
        &h.app,
        "/pipelines/promotions/flux-system/podinfo/qa",
        event(),
    )
    .await;
    assert_error(
        &unknown_env,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_environment",
    );
    let last = post_signed(
        &h.app,
        "/pipelines/promotions/flux-system/podinfo/prod",
        event_with(|e| e["involvedObject"]["namespace"] = json!("podinfo-prod")),
    )
    .await;
    assert_error(&last, StatusCode::UNPROCESSABLE_ENTITY, "last_environment");
    let hollow = post_signed(
        &h.app,
        "/pipelines/promotions/flux-system/hollow/dev",
        event(),
    )
    .await;
    assert_error(&hollow, StatusCode::UNPROCESSABLE_ENTITY, "no_targets");

    for (field, value) in [
        ("apiVersion", "kustomize.toolkit.fluxcd.io/v1"),
        ("kind", "Kustomization"),
        ("name", "other-app"),
        ("namespace", "podinfo-staging"),
    ] {
        let answer = post_signed(
            &h.app,
            DEV,
            event_with(|e| e["involvedObject"][field] = json!(value)),
        )
        .await;
        assert_error(
            &answer,
            StatusCode::UNPROCESSABLE_ENTITY,
            "involved_object_mismatch",
        );
        let named = value.split('/').next().unwrap();
        assert!(
            answer.json["error"].as_str().unwrap().contains(named),
            "{}",
            answer.json
        );
    }
    let old = (Utc::now() - Duration::minutes(16)).to_rfc3339();
    let answer = post_signed(&h.app, DEV, event_with(|e| e["timestamp"] = json!(old))).await;
    assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, "stale_timestamp");
    let future = (Utc::now() + Duration::minutes(6)).to_rfc3339();
    let answer = post_signed(&h.app, DEV, event_with(|e| e["timestamp"] = json!(future))).await;
    assert_error(
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "future_timestamp",
    );
    let slightly_ahead = (Utc::now() + Duration::minutes(4)).to_rfc3339();
    let answer = post_signed(
        &h.app,
        DEV,
        event_with(|e| e["timestamp"] = json!(slightly_ahead)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.json);
}

#[tokio::test]
async fn rate_limit_per_peer_address() {
    let h = harness_with(
        None,
        HttpSettings {
            rate_limit: Some("3/1m".parse::<RateLimit>().unwrap()),
            ..HttpSettings::default()
        },
    );
    for _ in 0..3 {
        let answer = post_signed(&h.app, DEV, event()).await;
        assert!(answer.status.is_success(), "{}", answer.json);
    }
    let limited = post_signed(&h.app, DEV, event()).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = limited.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
}

#[tokio::test]
async fn store_unavailable_asks_the_sender_to_retry() {
    let h = harness_with(
        Some(Arc::new(MemoryStore::unavailable("disk I/O error"))),
        HttpSettings::default(),
    );
    let answer = post_signed(&h.app, DEV, event()).await;
    assert_error(&answer, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    let ready = send(&h.app, Method::GET, "/readyz", vec![], None).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
}

fn approval_body(
    pipeline: &str,
    environment: &str,
    revision: &str,
    at: chrono::DateTime<Utc>,
) -> Vec<u8> {
    decision_body(pipeline, environment, revision, at, None)
}

fn decision_body(
    pipeline: &str,
    environment: &str,
    revision: &str,
    at: chrono::DateTime<Utc>,
    action: Option<&str>,
) -> Vec<u8> {
    serde_json::to_vec(&ApprovalBody {
        pipeline: pipeline.into(),
        environment: environment.into(),
        revision: revision.into(),
        timestamp: at,
        action: action.map(str::to_string),
        by: None,
        reason: None,
    })
    .unwrap()
}

async fn post_approval(app: &Router, path: &str, body: Vec<u8>) -> Answer {
    let sig = sign(HmacAlgorithm::Sha256, APPROVER, &body);
    send(app, Method::POST, path, body, Some(sig)).await
}

#[tokio::test]
async fn manual_promotions_wait_for_a_signed_matching_fresh_approval() {
    let h = harness();
    let staging = event_with(|e| e["involvedObject"]["namespace"] = json!("podinfo-staging"));
    let recorded = post_signed(
        &h.app,
        "/pipelines/promotions/flux-system/podinfo/staging",
        staging,
    )
    .await;
    assert_eq!(recorded.status, StatusCode::ACCEPTED, "{}", recorded.json);
    assert_eq!(recorded.json["phase"], "WaitingApproval");
    assert_eq!(recorded.json["targetEnvironment"], "prod");

    let path = "/pipelines/approvals/flux-system/podinfo/prod/6.5.1";
    let now = Utc::now();
    // Unsigned and wrongly signed approvals are refused.
    let body = approval_body("flux-system/podinfo", "prod", "6.5.1", now);
    let unsigned = send(&h.app, Method::POST, path, body.clone(), None).await;
    assert_error(&unsigned, StatusCode::UNAUTHORIZED, "unauthenticated");
    // A body for another revision cannot approve this one.
    let other = post_approval(
        &h.app,
        path,
        approval_body("flux-system/podinfo", "prod", "9.9.9", now),
    )
    .await;
    assert_error(
        &other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "approval_mismatch",
    );
    let other = post_approval(
        &h.app,
        path,
        approval_body("flux-system/other", "prod", "6.5.1", now),
    )
    .await;
    assert_error(
        &other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "approval_mismatch",
    );
    let stale = post_approval(
        &h.app,
        path,
        approval_body(
            "flux-system/podinfo",
            "prod",
            "6.5.1",
            now - Duration::hours(1),
        ),
    )
    .await;
    assert_error(&stale, StatusCode::UNPROCESSABLE_ENTITY, "stale_timestamp");
    let nothing = post_approval(
        &h.app,
        "/pipelines/approvals/flux-system/podinfo/prod/1.0.0",
        approval_body("flux-system/podinfo", "prod", "1.0.0", now),
    )
    .await;
    assert_error(&nothing, StatusCode::NOT_FOUND, "promotion_not_found");

    // The webhook key every leaf cluster holds approves nothing.
    let leaf = post_signed(&h.app, path, body.clone()).await;
    assert_error(&leaf, StatusCode::UNAUTHORIZED, "unauthenticated");
    let approved = post_approval(
        &h.app,
        "/approval/flux-system/podinfo/prod/6.5.1",
        body.clone(),
    )
    .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.json);
    assert_eq!(approved.json["phase"], "Pending");
    assert_eq!(approved.json["history"][1]["reason"], "Approved");
    let twice = post_approval(&h.app, path, body).await;
    assert_error(&twice, StatusCode::CONFLICT, "not_waiting_approval");
}

#[tokio::test]
async fn url_encoded_revisions_can_be_approved() {
    let h = harness();
    let revision = "feature/x@sha1:0123abcd";
    let staging = event_with(|e| {
        e["involvedObject"]["namespace"] = json!("podinfo-staging");
        e["metadata"]["revision"] = json!(revision);
    });
    let recorded = post_signed(
        &h.app,
        "/pipelines/promotions/flux-system/podinfo/staging",
        staging,
    )
    .await;
    assert_eq!(recorded.status, StatusCode::ACCEPTED);
    let path = "/pipelines/approvals/flux-system/podinfo/prod/feature%2Fx%40sha1%3A0123abcd";
    let approved = post_approval(
        &h.app,
        path,
        approval_body("flux-system/podinfo", "prod", revision, Utc::now()),
    )
    .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.json);
}

#[tokio::test]
async fn listing_filters_and_orders_newest_first() {
    let h = harness();
    for revision in ["1.0.0", "1.0.1"] {
        let answer = post_signed(
            &h.app,
            DEV,
            event_with(|e| e["metadata"]["revision"] = json!(revision)),
        )
        .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let staging = event_with(|e| e["involvedObject"]["namespace"] = json!("podinfo-staging"));
    post_signed(
        &h.app,
        "/pipelines/promotions/flux-system/podinfo/staging",
        staging,
    )
    .await;

    let all = send(&h.app, Method::GET, "/api/v1/promotions", vec![], None).await;
    let revisions: Vec<&str> = all
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revision"].as_str().unwrap())
        .collect();
    assert_eq!(revisions, ["6.5.1", "1.0.1", "1.0.0"]);
    let prod = send(
        &h.app,
        Method::GET,
        "/api/v1/promotions?environment=prod",
        vec![],
        None,
    )
    .await;
    assert_eq!(prod.json.as_array().unwrap().len(), 1);
    let mine = send(
        &h.app,
        Method::GET,
        "/api/v1/promotions?pipeline=flux-system/podinfo&environment=staging",
        vec![],
        None,
    )
    .await;
    assert_eq!(mine.json.as_array().unwrap().len(), 3);
    let other = send(
        &h.app,
        Method::GET,
        "/api/v1/promotions?pipeline=flux-system/nope",
        vec![],
        None,
    )
    .await;
    assert_eq!(other.json, json!([]));
    let bad = send(
        &h.app,
        Method::GET,
        "/api/v1/promotions?pipeline=nonsense",
        vec![],
        None,
    )
    .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "invalid_filter");
}

#[tokio::test]
async fn many_identical_events_at_once_give_one_record() {
    let h = harness();
    let body = event();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let app = h.app.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            post_signed(&app, DEV, body).await.status
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::ACCEPTED => created += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 1);
    let all = send(&h.app, Method::GET, "/api/v1/promotions", vec![], None).await;
    assert_eq!(all.json.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let h = harness();
    assert_eq!(
        send(&h.app, Method::GET, "/healthz", vec![], None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&h.app, Method::GET, "/readyz", vec![], None)
            .await
            .status,
        StatusCode::OK
    );
    post_signed(&h.app, DEV, event()).await;
    post_signed(&h.app, DEV, b"{".to_vec()).await;
    let response = h
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(
            r#"pipeline_controller_requests_total{endpoint="promotion",outcome="recorded"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"pipeline_controller_requests_total{endpoint="promotion",outcome="invalid_body"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"pipeline_controller_promotions_total{phase="Pending"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("pipeline_controller_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn hostile_input_is_refused_with_json_and_records_nothing() {
    let h = harness();
    // A valid event followed by anything but whitespace.
    for tail in [&b"{}"[..], b"\0", b"garbage", b"\n{\"a\":1}"] {
        let mut body = event();
        body.extend_from_slice(tail);
        assert_error(
            &post_signed(&h.app, DEV, body).await,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        );
    }
    // Revisions that would forge log lines, hide characters or bloat records.
    let long = "1".repeat(257);
    for revision in ["1.0\n2.0", "1.0\u{1b}[31m", "1.0\0", "1.0 beta", &long] {
        let body = event_with(|e| e["metadata"]["revision"] = json!(revision));
        assert_error(
            &post_signed(&h.app, DEV, body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_revision",
        );
    }
    // Invalid UTF-8 and control characters in path segments.
    for path in [
        "/pipelines/promotions/flux-system/podinfo/%FF",
        "/pipelines/promotions/flux-system/pod%0Ainfo/dev",
        "/pipelines/promotions/flux%00system/podinfo/dev",
    ] {
        let answer = post_signed(&h.app, path, event()).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_path");
        assert_eq!(
            answer.headers[header::CONTENT_TYPE],
            "application/json",
            "{path}"
        );
    }
    // Two signatures, one of them valid: ambiguous.
    let body = event();
    let response = h
        .app
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri(DEV)
                .header("X-Signature", sign(HmacAlgorithm::Sha256, KEY, &body))
                .header("X-Signature", "sha256=00")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["reason"], "unauthenticated");

    let listed = send(&h.app, Method::GET, "/api/v1/promotions", vec![], None).await;
    assert_eq!(listed.json, json!([]), "a refusal left a record");
}

async fn record_waiting(app: &Router, pipeline: &str, revision: &str) -> Value {
    let staging = event_with(|e| {
        e["involvedObject"]["namespace"] = json!("podinfo-staging");
        e["metadata"]["revision"] = json!(revision);
    });
    let recorded = post_signed(
        app,
        &format!("/pipelines/promotions/flux-system/{pipeline}/staging"),
        staging,
    )
    .await;
    assert_eq!(recorded.status, StatusCode::ACCEPTED, "{}", recorded.json);
    recorded.json
}

#[tokio::test]
async fn approval_keys_are_their_own_and_per_environment() {
    let h = harness();
    let now = Utc::now();
    // An environment's own Secret decides: the pipeline-level approval key does not.
    record_waiting(&h.app, "gated", "6.5.1").await;
    let path = "/pipelines/approvals/flux-system/gated/prod/6.5.1";
    let body = approval_body("flux-system/gated", "prod", "6.5.1", now);
    let pipeline_level = post_approval(&h.app, path, body.clone()).await;
    assert_error(&pipeline_level, StatusCode::UNAUTHORIZED, "unauthenticated");
    let sig = sign(HmacAlgorithm::Sha256, PROD_APPROVER, &body);
    let approved = send(&h.app, Method::POST, path, body, Some(sig)).await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.json);
    assert_eq!(approved.json["decidedBy"], "the approval-key holder");

    // An approval key equal to the webhook key (whitespace aside) is refused outright.
    record_waiting(&h.app, "samekey", "6.5.1").await;
    let path = "/pipelines/approvals/flux-system/samekey/prod/6.5.1";
    let body = approval_body("flux-system/samekey", "prod", "6.5.1", now);
    let refused = post_signed(&h.app, path, body).await;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(
        refused.json["error"]
            .as_str()
            .unwrap()
            .contains("equals a webhook"),
        "{}",
        refused.json
    );
}

#[tokio::test]
async fn the_go_originals_empty_body_approval_is_refused_with_what_changed() {
    let h = harness();
    record_waiting(&h.app, "podinfo", "6.5.1").await;
    for key in [KEY, APPROVER] {
        let sig = sign(HmacAlgorithm::Sha256, key, b"");
        let answer = send(
            &h.app,
            Method::POST,
            "/pipelines/approvals/flux-system/podinfo/prod/6.5.1",
            vec![],
            Some(sig),
        )
        .await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "legacy_approval");
        assert!(
            answer.json["error"]
                .as_str()
                .unwrap()
                .contains("approval-key"),
            "{}",
            answer.json
        );
    }
}

#[tokio::test]
async fn rejections_and_actions_cannot_be_swapped() {
    let h = harness();
    let now = Utc::now();
    let waiting = record_waiting(&h.app, "podinfo", "6.5.1").await;
    // A signed approval replayed against the rejection endpoint is not a rejection.
    let approve = approval_body("flux-system/podinfo", "prod", "6.5.1", now);
    let swapped = post_approval(
        &h.app,
        "/pipelines/rejections/flux-system/podinfo/prod/6.5.1",
        approve,
    )
    .await;
    assert_error(
        &swapped,
        StatusCode::UNPROCESSABLE_ENTITY,
        "approval_mismatch",
    );
    let reject = decision_body("flux-system/podinfo", "prod", "6.5.1", now, Some("reject"));
    let rejected = post_approval(
        &h.app,
        "/pipelines/rejections/flux-system/podinfo/prod/6.5.1",
        reject,
    )
    .await;
    assert_eq!(rejected.status, StatusCode::OK, "{}", rejected.json);
    assert_eq!(rejected.json["phase"], "Rejected");
    assert_eq!(rejected.json["id"], waiting["id"]);
    // Retrying is for failed promotions only.
    let retry = decision_body("flux-system/podinfo", "prod", "6.5.1", now, Some("retry"));
    let refused = post_approval(
        &h.app,
        "/pipelines/retries/flux-system/podinfo/prod/6.5.1",
        retry,
    )
    .await;
    assert_error(&refused, StatusCode::CONFLICT, "not_waiting_approval");
}

#[tokio::test]
async fn newer_revisions_supersede_older_waiting_ones() {
    let h = harness();
    let older = record_waiting(&h.app, "podinfo", "1.9.0").await;
    let newer = record_waiting(&h.app, "podinfo", "1.10.0").await;
    assert_eq!(newer["phase"], "WaitingApproval");
    let id = older["id"].as_str().unwrap();
    let old = send(
        &h.app,
        Method::GET,
        &format!("/api/v1/promotions/{id}"),
        vec![],
        None,
    )
    .await;
    assert_eq!(old.json["phase"], "Superseded", "{}", old.json);
    let approve = post_approval(
        &h.app,
        "/pipelines/approvals/flux-system/podinfo/prod/1.9.0",
        approval_body("flux-system/podinfo", "prod", "1.9.0", Utc::now()),
    )
    .await;
    assert_error(&approve, StatusCode::CONFLICT, "superseded");
    // An older revision arriving late is superseded at once and cannot be approved.
    let late = record_waiting(&h.app, "podinfo", "1.2.0").await;
    assert_eq!(late["phase"], "Superseded", "{late}");
}

#[tokio::test]
async fn signed_approvals_can_be_turned_off() {
    let h = harness_from(catalog(), None, HttpSettings::default(), false);
    let app = h.app.clone();
    record_waiting(&app, "podinfo", "6.5.1").await;
    let answer = post_approval(
        &app,
        "/pipelines/approvals/flux-system/podinfo/prod/6.5.1",
        approval_body("flux-system/podinfo", "prod", "6.5.1", Utc::now()),
    )
    .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "hmac_approvals_disabled");
}

#[tokio::test]
async fn a_key_stored_with_a_trailing_newline_verifies_what_flux_signs() {
    // `kubectl create secret --from-file` keeps the file's newline; notification-controller
    // trims the Provider's token before signing. Both sides must agree.
    let catalog = MemoryCatalog::new()
        .with_pipeline("flux-system", "podinfo", podinfo_spec(Some("newline")))
        .with_secret(
            "flux-system",
            "newline",
            [("hmac-key", [KEY, b"\n"].concat())],
        );
    let h = harness_from(catalog, None, HttpSettings::default(), true);
    let app = h.app.clone();
    let answer = post_signed(&app, DEV, event()).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.json);
}
