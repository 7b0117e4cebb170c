//! The notification strategy against a real HTTP receiver on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use pipeline_core::event::FluxEvent;
use pipeline_core::pipeline::parse_pipeline_spec;
use pipeline_core::testing::MemoryCatalog;
use pipeline_core::{
    Pipeline, PipelineRef, PromotionContext, PromotionRecord, PromotionStrategy, StrategyError,
    StrategyOutcome, Trigger,
};
use pipeline_strategies::{
    DEFAULT_CONTROLLER_NAME, NotificationWebhook, StrategyNotAvailable, delivered_checkpoint,
};
use reqwest::Url;
use serde_json::json;

const KEY: &[u8] = b"webhook-key-0123456789";

/// A request the receiver got, exactly as it arrived.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
}

/// `/status/<code>` answers `<code>`; `/slow` answers after two seconds; `/redirect`
/// points elsewhere. Everything is recorded.
async fn receive(
    State(receiver): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receiver.received.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        headers,
        body,
    });
    let path = uri.path();
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
        return StatusCode::OK.into_response();
    }
    if path == "/redirect" {
        return (
            StatusCode::FOUND,
            [(header::LOCATION, "http://elsewhere.invalid/steal")],
        )
            .into_response();
    }
    let code = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::IM_A_TEAPOT);
    code.into_response()
}

struct Server {
    base: Url,
    receiver: Receiver,
}

impl Server {
    async fn start() -> Self {
        let receiver = Receiver::default();
        let app = Router::new().fallback(receive).with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base: Url::parse(&format!("http://{addr}/")).unwrap(),
            receiver,
        }
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).unwrap()
    }

    fn received(&self) -> Vec<Received> {
        self.receiver.received.lock().unwrap().clone()
    }
}

/// A URL on which nothing listens.
async fn closed_port_url(path: &str) -> Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    Url::parse(&format!("http://{addr}{path}")).unwrap()
}

/// Secret apps/webhook with `key` as its webhook key.
fn with_key(key: &[u8]) -> MemoryCatalog {
    MemoryCatalog::new().with_secret("apps", "webhook", [("hmac-key", key)])
}

fn pipeline(secret_ref: bool) -> Pipeline {
    let mut promotion = json!({"strategy": {"notification": {}}});
    if secret_ref {
        promotion["strategy"]["secretRef"] = json!({"name": "webhook"});
    }
    let spec = parse_pipeline_spec(json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": [
            {"name": "dev", "targets": [{"namespace": "podinfo-dev"}]},
            {"name": "prod", "targets": [{"namespace": "podinfo-prod"}]}
        ],
        "promotion": promotion,
    }))
    .unwrap();
    Pipeline {
        reference: PipelineRef::new("apps", "podinfo"),
        spec,
    }
}

fn record() -> PromotionRecord {
    PromotionRecord::new(
        PipelineRef::new("apps", "podinfo"),
        "dev",
        "prod",
        "6.5.1",
        false,
        Trigger::default(),
        Utc::now(),
    )
}

fn client() -> reqwest::Client {
    NotificationWebhook::client().unwrap()
}

fn webhook(receivers: Vec<Url>) -> NotificationWebhook {
    NotificationWebhook::new(receivers, client(), DEFAULT_CONTROLLER_NAME)
}

async fn promote_with(
    strategy: &dyn PromotionStrategy,
    pipeline: &Pipeline,
    secrets: &MemoryCatalog,
) -> Result<StrategyOutcome, StrategyError> {
    promote_record(strategy, pipeline, secrets, &record()).await
}

async fn promote_record(
    strategy: &dyn PromotionStrategy,
    pipeline: &Pipeline,
    secrets: &MemoryCatalog,
    record: &PromotionRecord,
) -> Result<StrategyOutcome, StrategyError> {
    let record = record.clone();
    let promotion = pipeline.promotion_for(&record.target_environment).unwrap();
    strategy
        .promote(PromotionContext {
            record: &record,
            pipeline,
            promotion,
            secrets,
        })
        .await
}

async fn promote(strategy: &dyn PromotionStrategy) -> Result<StrategyOutcome, StrategyError> {
    promote_with(strategy, &pipeline(true), &with_key(KEY)).await
}

#[tokio::test]
async fn delivers_a_signed_flux_event_to_every_receiver() {
    let server = Server::start().await;
    let strategy = webhook(vec![server.url("/status/200"), server.url("/status/202")]);
    let before = Utc::now();
    let outcome = promote(&strategy).await.unwrap();
    assert_eq!(
        outcome,
        StrategyOutcome {
            message: "notified 2 receiver(s) of 6.5.1 for prod".into(),
            result: None,
        }
    );

    let received = server.received();
    assert_eq!(received.len(), 2);
    let mut paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/status/200", "/status/202"]);
    assert_eq!(received[0].body, received[1].body, "one event per attempt");

    for request in &received {
        assert_eq!(request.headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(request.headers["gotk-component"], "pipeline-controller");
        let signature = request.headers["x-signature"].to_str().unwrap();
        assert!(signature.starts_with("sha256="), "{signature}");
        assert_eq!(
            pipeline_core::signature::verify(Some(signature), KEY, &request.body),
            Ok(())
        );
        assert!(
            pipeline_core::signature::verify(Some(signature), b"other key", &request.body).is_err()
        );

        let event = FluxEvent::from_json(&request.body).unwrap();
        assert_eq!(event.involved_object.kind, "Pipeline");
        assert_eq!(
            event.involved_object.api_version,
            "pipelines.weave.works/v1alpha1"
        );
        assert_eq!(event.involved_object.namespace, "apps");
        assert_eq!(event.involved_object.name, "podinfo");
        assert_eq!(event.severity, "info");
        assert_eq!(event.reason, "Promote");
        assert_eq!(
            event.message,
            "Promote pipeline apps/podinfo to prod with version 6.5.1"
        );
        assert_eq!(event.reporting_controller, "pipeline-controller");
        let metadata: Vec<(&str, &str)> = event
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            metadata,
            [
                ("environment", "prod"),
                ("promotion", record().id.as_str()),
                ("sourceEnvironment", "dev"),
                ("version", "6.5.1"),
            ]
        );
        let age = Utc::now() - event.timestamp;
        assert!(
            event.timestamp >= before - chrono::Duration::seconds(1) && age.num_seconds() < 5,
            "timestamp {} is not now",
            event.timestamp
        );

        let raw: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(raw["involvedObject"]["kind"], "Pipeline");
        assert_eq!(raw["reportingController"], "pipeline-controller");
        assert_eq!(raw["metadata"]["sourceEnvironment"], "dev");
    }
}

#[tokio::test]
async fn userinfo_becomes_basic_auth_and_query_is_sent() {
    let server = Server::start().await;
    let mut url = server.url("/status/204?token=abc");
    url.set_username("bot").unwrap();
    url.set_password(Some("s3cret")).unwrap();
    let outcome = promote(&webhook(vec![url])).await.unwrap();
    assert_eq!(outcome.message, "notified 1 receiver(s) of 6.5.1 for prod");
    let received = server.received();
    assert_eq!(received[0].query.as_deref(), Some("token=abc"));
    let auth = received[0].headers[header::AUTHORIZATION].to_str().unwrap();
    assert!(auth.starts_with("Basic "), "{auth}");
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retryable() {
    let server = Server::start().await;
    for code in [500, 503, 429] {
        let url = server.url(&format!("/status/{code}"));
        let err = promote(&webhook(vec![url.clone()])).await.unwrap_err();
        assert!(err.retryable, "{code}: {err}");
        assert!(err.message.contains(&format!("HTTP {code}")), "{err}");
        assert!(err.message.contains(url.as_str()), "{err}");
        assert!(err.message.contains("1 of 1 receiver(s)"), "{err}");
    }
}

/// "2xx means delivered, otherwise retried": a client error too, within the attempts.
#[tokio::test]
async fn client_errors_are_retried_too() {
    let server = Server::start().await;
    for code in [404, 400, 401] {
        let err = promote(&webhook(vec![server.url(&format!("/status/{code}"))]))
            .await
            .unwrap_err();
        assert!(err.retryable, "{code}: {err}");
        assert!(err.message.contains(&format!("HTTP {code}")), "{err}");
    }
}

#[tokio::test]
async fn success_needs_every_receiver_and_failures_are_listed() {
    let server = Server::start().await;
    let ok = server.url("/status/200");
    let broken = server.url("/status/502");
    let err = promote(&webhook(vec![ok.clone(), broken.clone()]))
        .await
        .unwrap_err();
    assert!(err.retryable, "{err}");
    assert!(err.message.contains("1 of 2 receiver(s)"), "{err}");
    assert!(
        err.message
            .contains(&format!("{broken}: HTTP 502 Bad Gateway")),
        "{err}"
    );
    assert!(!err.message.contains(ok.as_str()), "{err}");
    // Both were attempted.
    assert_eq!(server.received().len(), 2);

    // Every failed receiver is listed; the attempt is retried as a whole.
    let gone = server.url("/status/404");
    let err = promote(&webhook(vec![broken.clone(), gone.clone()]))
        .await
        .unwrap_err();
    assert!(err.retryable, "{err}");
    assert!(err.message.contains("2 of 2 receiver(s)"), "{err}");
    assert!(err.message.contains(broken.as_str()), "{err}");
    assert!(err.message.contains(gone.as_str()), "{err}");
}

/// A retry sends only to the receivers that did not get the promotion yet.
#[tokio::test]
async fn retries_skip_receivers_already_notified() {
    let server = Server::start().await;
    let ok = server.url("/status/200");
    let broken = server.url("/status/503");
    let strategy = webhook(vec![ok.clone(), broken.clone()]);
    let (pipeline, secrets) = (pipeline(true), with_key(KEY));
    let mut record = record();
    let err = promote_record(&strategy, &pipeline, &secrets, &record)
        .await
        .unwrap_err();
    assert!(err.retryable);
    assert_eq!(err.checkpoints.len(), 1, "{:?}", err.checkpoints);
    assert!(err.checkpoints.contains_key(&delivered_checkpoint(&ok)));
    record.checkpoints.extend(err.checkpoints);

    let err = promote_record(&strategy, &pipeline, &secrets, &record)
        .await
        .unwrap_err();
    assert!(err.message.contains("1 of 2 receiver(s)"), "{err}");
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths.iter().filter(|p| *p == "/status/200").count(),
        1,
        "{paths:?}"
    );
    assert_eq!(
        paths.iter().filter(|p| *p == "/status/503").count(),
        2,
        "{paths:?}"
    );

    // Checkpoint keys carry no credentials or query.
    let secret_url = Url::parse("https://user:pa55@hooks.example/x?token=t0k").unwrap();
    let key = delivered_checkpoint(&secret_url);
    assert!(
        !key.contains("pa55") && !key.contains("t0k") && !key.contains("user"),
        "{key}"
    );
    assert_ne!(
        key,
        delivered_checkpoint(&Url::parse("https://hooks.example/x?token=other").unwrap())
    );
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let url = closed_port_url("/hook").await;
    let err = promote(&webhook(vec![url.clone()])).await.unwrap_err();
    assert!(err.retryable, "{err}");
    assert!(err.message.contains(url.as_str()), "{err}");
}

#[tokio::test]
async fn timeouts_are_retryable() {
    let server = Server::start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let strategy =
        NotificationWebhook::new(vec![server.url("/slow")], client, DEFAULT_CONTROLLER_NAME);
    let err = promote(&strategy).await.unwrap_err();
    assert!(err.retryable, "{err}");
    assert!(err.message.contains("timed out"), "{err}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = Server::start().await;
    let err = promote(&webhook(vec![server.url("/redirect")]))
        .await
        .unwrap_err();
    assert!(err.retryable, "{err}");
    assert!(err.message.contains("HTTP 302"), "{err}");
    assert!(err.message.contains("redirects are not followed"), "{err}");
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn userinfo_and_query_never_appear_in_messages() {
    let server = Server::start().await;
    let mut failing = server.url("/status/500?token=tok-abc&sig=xyz");
    failing.set_username("bot-user").unwrap();
    failing.set_password(Some("s3cret-pass")).unwrap();
    let mut refused = closed_port_url("/hook?access_token=tok-def").await;
    refused.set_username("other-user").unwrap();
    refused.set_password(Some("other-pass")).unwrap();
    let mut missing = server.url("/status/404?key=tok-ghi#frag-jkl");
    missing.set_username("tok-mno").unwrap();

    let strategy = webhook(vec![failing, refused.clone(), missing]);
    let err = promote(&strategy).await.unwrap_err();
    for secret in [
        "bot-user",
        "s3cret-pass",
        "other-user",
        "other-pass",
        "tok-",
        "sig=",
        "frag-jkl",
        "?",
        "@",
    ] {
        assert!(!err.message.contains(secret), "{secret:?} in {err}");
    }
    assert!(
        err.message
            .contains(&format!("{}status/500: HTTP 500", server.base)),
        "{err}"
    );
    assert!(
        err.message.contains(&format!(
            "http://127.0.0.1:{}/hook: ",
            refused.port().unwrap()
        )),
        "{err}"
    );
    let debug = format!("{strategy:?}");
    assert!(
        !debug.contains("tok-") && !debug.contains("pass"),
        "{debug}"
    );
}

#[tokio::test]
async fn no_key_means_no_notification() {
    let server = Server::start().await;
    let strategy = webhook(vec![server.url("/status/200")]);

    let err = promote_with(&strategy, &pipeline(false), &with_key(KEY))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err}");
    assert!(
        err.message
            .contains("pipeline apps/podinfo has no spec.promotion.strategy.secretRef"),
        "{err}"
    );

    let err = promote_with(&strategy, &pipeline(true), &MemoryCatalog::new())
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err}");
    assert!(
        err.message
            .contains("secret apps/webhook referenced by pipeline apps/podinfo not found"),
        "{err}"
    );

    let no_key = MemoryCatalog::new().with_secret("apps", "webhook", [("token", b"unrelated")]);
    let err = promote_with(&strategy, &pipeline(true), &no_key)
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err}");
    assert!(err.message.contains("has no \"hmac-key\" key"), "{err}");
    assert!(!err.message.contains("unrelated"), "{err}");

    let err = promote_with(&strategy, &pipeline(true), &with_key(b""))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err}");

    assert!(server.received().is_empty(), "nothing unsigned is sent");
}

#[tokio::test]
async fn unreadable_secrets_are_retryable() {
    let server = Server::start().await;
    let secrets = with_key(KEY);
    secrets.fail("secret store is down");
    let err = promote_with(
        &webhook(vec![server.url("/status/200")]),
        &pipeline(true),
        &secrets,
    )
    .await
    .unwrap_err();
    assert!(err.retryable, "{err}");
    assert!(err.message.contains("secret store is down"), "{err}");
    assert!(server.received().is_empty());
}

#[tokio::test]
async fn no_receivers_is_permanent() {
    let err = promote(&webhook(Vec::new())).await.unwrap_err();
    assert_eq!(
        err,
        StrategyError::permanent(
            "notification strategy has no receivers: start the service with --notify-url"
        )
    );
}

#[tokio::test]
async fn non_http_receivers_are_refused() {
    let err = promote(&webhook(vec![Url::parse("ftp://example.com/x").unwrap()]))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err}");
    assert!(err.message.contains("not an http or https URL"), "{err}");
}

#[tokio::test]
async fn unavailable_strategy_never_pretends() {
    let strategy = StrategyNotAvailable::pull_request("it has not landed");
    let err = promote(&strategy).await.unwrap_err();
    assert_eq!(
        err,
        StrategyError::permanent(
            "pull-request strategy is not available in this build yet: it has not landed"
        )
    );
}
