//! The HTTP face of pipeline-controller, on two listeners: [`public_router`] (the webhook
//! and signed decisions, what leaf clusters and approvers call) and [`internal_router`]
//! (the promotions API, health and metrics, and the dashboard). It maps the core's
//! decisions to status codes and JSON and does nothing else.
#![forbid(unsafe_code)]

mod error;
mod rate_limit;
pub mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use pipeline_core::{
    ApprovalRequest, Decision, EventRequest, Intake, Metrics, PipelineRef, PortReader,
    PromotionFilter, PromotionRecord, ReadPort, Throttle,
};
use serde::Deserialize;

pub use error::ApiError;
pub use rate_limit::{PeerRateLimiter, RateLimit};
pub use server::{ServerSettings, serve};

/// Header carrying the HMAC signature of the body.
pub const SIGNATURE_HEADER: &str = "x-signature";

/// Default largest request body, as documented for `--max-body-bytes`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// Longest a sender may take to deliver a body; Flux itself gives up after 15 s, and a
/// slow sender must not hold a connection for ever.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    pub rate_limit: Option<RateLimit>,
    pub body_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            rate_limit: None,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// Lines describing what works in a degraded way, for `/readyz`; empty when all is well.
pub type ReadinessDetail = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Extra response headers for a newly recorded promotion, e.g. where a mode keeps it.
pub type RecordHeaders =
    Arc<dyn Fn(&PromotionRecord) -> Vec<(HeaderName, HeaderValue)> + Send + Sync>;

#[derive(Clone)]
pub struct AppState {
    intake: Arc<Intake>,
    /// What the API reads through: never the intake, which can change things.
    reader: Arc<dyn ReadPort>,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    body_timeout: Duration,
    limiter: Option<Arc<PeerRateLimiter>>,
    record_headers: Option<RecordHeaders>,
    readiness_detail: Option<ReadinessDetail>,
}

impl AppState {
    pub fn new(intake: Arc<Intake>, metrics: Arc<Metrics>, settings: HttpSettings) -> Self {
        let reader = Arc::new(PortReader::new(
            intake.pipelines().clone(),
            intake.store().clone(),
            None,
        ));
        Self {
            intake,
            reader,
            metrics,
            max_body_bytes: settings.max_body_bytes,
            body_timeout: settings.body_timeout,
            limiter: settings
                .rate_limit
                .map(|limit| Arc::new(PeerRateLimiter::new(limit))),
            record_headers: None,
            readiness_detail: None,
        }
    }

    /// Reads through `reader` (e.g. one that also sees the deployment watch) instead of
    /// the plain one over the intake's pipelines and store.
    pub fn with_reader(mut self, reader: Arc<dyn ReadPort>) -> Self {
        self.reader = reader;
        self
    }

    /// The metrics the service records into and serves.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The read-only port the API (and the dashboard) read through.
    pub fn reader(&self) -> Arc<dyn ReadPort> {
        self.reader.clone()
    }

    /// Adds headers to every 202 answer, computed from the recorded promotion.
    pub fn with_record_headers(mut self, headers: RecordHeaders) -> Self {
        self.record_headers = Some(headers);
        self
    }

    /// Adds degradations that do not stop the service to `/readyz`'s answer (still 200,
    /// with `"detail": [...]` when the list is not empty), e.g. configuration files
    /// served from their last good version.
    pub fn with_readiness_detail(mut self, detail: ReadinessDetail) -> Self {
        self.readiness_detail = Some(detail);
        self
    }
}

/// What leaf clusters and approvers call: the webhook and signed decisions. The only
/// routes to expose beyond the cluster. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so rate limiting sees peers.
pub fn public_router(state: AppState) -> Router {
    public_routes()
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(error_as_json))
        .with_state(state)
}

/// What stays inside the cluster: the promotions API, health and metrics, plus `extra`
/// (e.g. the dashboard, which answers its own errors as HTML).
pub fn internal_router(state: AppState, extra: Router) -> Router {
    internal_routes()
        .route("/healthz", get(healthz))
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(error_as_json))
        .with_state(state)
        .merge(extra)
}

/// Both route sets on one router, for tests that drive the service in-process.
pub fn router(state: AppState) -> Router {
    public_routes()
        .merge(internal_routes())
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(error_as_json))
        .with_state(state)
}

fn public_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/pipelines/promotions/{namespace}/{name}/{environment}",
            post(promotion_event),
        )
        .route(
            "/promotion/{namespace}/{name}/{environment}",
            post(promotion_event),
        )
        .route(
            "/pipelines/approvals/{namespace}/{name}/{environment}/{revision}",
            post(|state, path, request| decision(state, path, request, "approve")),
        )
        .route(
            "/approval/{namespace}/{name}/{environment}/{revision}",
            post(|state, path, request| decision(state, path, request, "approve")),
        )
        .route(
            "/pipelines/rejections/{namespace}/{name}/{environment}/{revision}",
            post(|state, path, request| decision(state, path, request, "reject")),
        )
        .route(
            "/pipelines/retries/{namespace}/{name}/{environment}/{revision}",
            post(|state, path, request| decision(state, path, request, "retry")),
        )
        // Liveness only (no state): load balancers and ingress controllers health-check
        // the port they route to, which is this one.
        .route("/healthz", get(healthz))
}

/// The internal listener's routes but `/healthz`, which both listeners answer.
fn internal_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/promotions", get(list_promotions))
        .route("/api/v1/promotions/{id}", get(get_promotion))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Longest path segment accepted; names in Kubernetes are at most 253 bytes.
const MAX_SEGMENT_BYTES: usize = 253;

/// Path parameters, percent-decoded, each valid UTF-8, printable and bounded: they name
/// pipelines and environments and end up in logs and lookups. Refusals are JSON.
struct ApiPath<T>(T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid =
            |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", message);
        let Path(segments) = Path::<Vec<String>>::from_request_parts(parts, state)
            .await
            .map_err(|rejection: PathRejection| invalid(rejection.body_text()))?;
        for segment in &segments {
            if segment.is_empty() || segment.len() > MAX_SEGMENT_BYTES {
                return Err(invalid(format!(
                    "path segments must be 1 to {MAX_SEGMENT_BYTES} bytes long"
                )));
            }
            if segment.chars().any(pipeline_core::event::is_unprintable) {
                return Err(invalid(
                    "path segments must not contain control, space or invisible characters".into(),
                ));
            }
        }
        let Path(value) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|rejection: PathRejection| invalid(rejection.body_text()))?;
        Ok(ApiPath(value))
    }
}

/// Every error answer has the documented JSON shape, including those that axum's own
/// extractors produce as plain text.
async fn error_as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let reason = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let mut rebuilt = ApiError::new(status, reason, text).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rebuilt.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rebuilt
}

async fn unknown_path(request: Request) -> ApiError {
    ApiError::not_found(format!("no such path: {}", request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "method {} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

fn peer_ip(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ConnectInfo(addr)| {
            addr.ip()
        })
}

/// Most a refused oversized body is read (and discarded) before answering, so a
/// client still sending gets the 413 instead of a connection reset.
const DRAIN_LIMIT_BYTES: usize = 8 * 1024 * 1024;

/// Rate limit, then read the body without buffering past the limit.
async fn admit(state: &AppState, request: Request) -> Result<(HeaderMap, Bytes), ApiError> {
    if let Some(limiter) = &state.limiter {
        limiter.check(peer_ip(&request)).map_err(|wait| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this address",
            )
            .with_retry_after(wait)
        })?;
    }
    let (parts, mut body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = state.max_body_bytes;
    let deadline = tokio::time::Instant::now() + state.body_timeout;
    let timed_out = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "request body not received within {}s",
                state.body_timeout.as_secs()
            ),
        )
    };
    let mut received = bytes::BytesMut::new();
    let mut too_large = declared.is_some_and(|len| len > limit as u64);
    let mut drained = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if too_large => break,
            Err(_) => return Err(timed_out()),
            Ok(None) => break,
            Ok(Some(Err(_))) if too_large => break,
            Ok(Some(Err(_))) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    "request body could not be read",
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if too_large {
            drained += data.len();
            if drained > DRAIN_LIMIT_BYTES {
                break;
            }
        } else if received.len() + data.len() > limit {
            too_large = true;
            drained = received.len() + data.len();
            received = bytes::BytesMut::new();
        } else {
            received.extend_from_slice(&data);
        }
    }
    if too_large {
        let mut error = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {limit} bytes"),
        );
        error.close_connection = true;
        return Err(error);
    }
    Ok((parts.headers, received.freeze()))
}

/// The one `X-Signature` value; several are ambiguous and refused outright, since
/// whichever one a proxy or library picks could differ from the one we check.
fn signature(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "request has more than one X-Signature header; send exactly one",
        ));
    }
    Ok(first.and_then(|v| v.to_str().ok()))
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    (status, Json(value)).into_response()
}

/// Refusals of client requests are logged at debug level only, so anyone who can reach
/// the port cannot flood the logs; `pipeline_controller_requests_total` counts them all.
/// Our own failures (5xx) are warnings.
fn log_refusal(what: &str, pipeline: &PipelineRef, environment: &str, err: &ApiError) {
    static SERVER_ERRORS: Throttle = Throttle::new(std::time::Duration::from_secs(10));
    if err.status.is_server_error() {
        // An outage answers every request alike; one line per interval tells it.
        if let Some(held_back) = SERVER_ERRORS.admit() {
            tracing::warn!(%pipeline, environment, status = err.status.as_u16(), reason = err.reason, error = %err.message, refusals_not_logged = held_back, "{what}");
        }
    } else {
        tracing::debug!(%pipeline, environment, status = err.status.as_u16(), reason = err.reason, error = %err.message, "{what}");
    }
}

async fn promotion_event(
    State(state): State<AppState>,
    ApiPath((namespace, name, environment)): ApiPath<(String, String, String)>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let pipeline = PipelineRef::new(namespace, name);
    let result = handle_event(&state, &pipeline, &environment, request).await;
    let (outcome, response) = match result {
        Ok((outcome, response)) => (outcome, response),
        Err(err) => {
            log_refusal("promotion event refused", &pipeline, &environment, &err);
            (err.reason, err.into_response())
        }
    };
    state
        .metrics
        .observe_request("promotion", outcome, started.elapsed().as_secs_f64());
    response
}

async fn handle_event(
    state: &AppState,
    pipeline: &PipelineRef,
    environment: &str,
    request: Request,
) -> Result<(&'static str, Response), ApiError> {
    let (headers, body) = admit(state, request).await?;
    let decision = state
        .intake
        .handle_event(EventRequest {
            pipeline,
            environment,
            signature: signature(&headers)?,
            body: &body,
        })
        .await?;
    Ok(match decision {
        Decision::Recorded(record) => {
            tracing::info!(promotion = %record.id, pipeline = %record.pipeline, from = %record.source_environment, to = %record.target_environment, revision = %record.revision, phase = %record.phase, "promotion recorded");
            let mut response = json_response(StatusCode::ACCEPTED, &record);
            if let Ok(location) =
                HeaderValue::from_str(&format!("/api/v1/promotions/{}", record.id))
            {
                response.headers_mut().insert(header::LOCATION, location);
            }
            for (name, value) in state.record_headers.iter().flat_map(|f| f(&record)) {
                response.headers_mut().insert(name, value);
            }
            ("recorded", response)
        }
        Decision::Duplicate(record) => {
            tracing::debug!(promotion = %record.id, "duplicate promotion event");
            ("duplicate", json_response(StatusCode::OK, &record))
        }
        Decision::Ignored { reason, message } => {
            tracing::info!(pipeline = %pipeline, environment, reason, message = %message, "event ignored");
            let body =
                serde_json::json!({"status": "ignored", "reason": reason, "message": message});
            ("ignored", json_response(StatusCode::OK, &body))
        }
    })
}

/// An approver's signed decision: `action` is what the path asks for.
async fn decision(
    State(state): State<AppState>,
    ApiPath((namespace, name, environment, revision)): ApiPath<(String, String, String, String)>,
    request: Request,
    action: &'static str,
) -> Response {
    let started = Instant::now();
    let pipeline = PipelineRef::new(namespace, name);
    let result = async {
        let (headers, body) = admit(&state, request).await?;
        let record = state
            .intake
            .handle_approval(ApprovalRequest {
                pipeline: &pipeline,
                environment: &environment,
                revision: &revision,
                action,
                signature: signature(&headers)?,
                body: &body,
            })
            .await?;
        tracing::info!(promotion = %record.id, pipeline = %pipeline, environment = %environment, revision = %revision, action, phase = %record.phase, by = ?record.decided_by, "promotion decided");
        Ok::<_, ApiError>(json_response(StatusCode::OK, &record))
    }
    .await;
    let (outcome, response) = match result {
        Ok(response) => (action, response),
        Err(err) => {
            log_refusal("decision refused", &pipeline, &environment, &err);
            (err.reason, err.into_response())
        }
    };
    state
        .metrics
        .observe_request("approval", outcome, started.elapsed().as_secs_f64());
    response
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    pipeline: Option<String>,
    environment: Option<String>,
}

async fn list_promotions(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let pipeline = match query.pipeline.as_deref() {
        None | Some("") => None,
        Some(text) => Some(PipelineRef::parse(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_filter",
                format!("pipeline filter {text:?} is not of the form namespace/name"),
            )
        })?),
    };
    let filter = PromotionFilter {
        pipeline,
        environment: query.environment.filter(|e| !e.is_empty()),
    };
    let records = state.reader.records(&filter).await?;
    Ok(json_response(StatusCode::OK, &records))
}

async fn get_promotion(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    match state.reader.record(&id).await? {
        Some(record) => Ok(json_response(StatusCode::OK, &record)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "promotion_not_found",
            format!("promotion {id} not found"),
        )),
    }
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// Ready when the promotion store answers: without it no event can be recorded.
async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    state.intake.store().ready().await?;
    let detail = state
        .readiness_detail
        .as_ref()
        .map(|detail| detail())
        .unwrap_or_default();
    let body = if detail.is_empty() {
        serde_json::json!({"status": "ready"})
    } else {
        serde_json::json!({"status": "ready", "detail": detail})
    };
    Ok(json_response(StatusCode::OK, &body))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        Body::from(state.metrics.render()),
    )
        .into_response()
}
