//! The notification strategy: a signed Flux event, POSTed to every configured receiver.
//!
//! The event has the shape Flux's own event recorder sends to notification-controller,
//! so a receiver can be a notification-controller `Receiver`-style endpoint, a generic
//! webhook, or another pipeline-controller. It is signed the way Flux's `generic-hmac`
//! provider signs (`X-Signature: sha256=<hex>` over the raw body) with the pipeline's
//! webhook key, so receivers can tell it came from whoever holds that key.
//!
//! An attempt delivers to every receiver and succeeds only if all of them accepted, so a
//! retried attempt may deliver the same event again: the `promotion` metadata key carries
//! the record id for receivers that want to deduplicate.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{SubsecRound, Utc};
use pipeline_core::event::{FluxEvent, ObjectReference};
use pipeline_core::intake::HMAC_KEY;
use pipeline_core::pipeline::{API_VERSION, PIPELINE_KIND};
use pipeline_core::report::error_chain;
use pipeline_core::signature::{self, HmacAlgorithm};
use pipeline_core::{
    Pipeline, PromotionContext, PromotionRecord, PromotionStrategy, SecretBytes, SecretLookupError,
    SecretSource, StrategyError, StrategyOutcome,
};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

/// How long one delivery may take, connection included.
pub const RECEIVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Name reported as `reportingController` and in the `gotk-component` header.
pub const DEFAULT_CONTROLLER_NAME: &str = "pipeline-controller";

/// Posts a signed Flux `Promote` event about each promotion to a fixed list of receivers.
#[derive(Clone)]
pub struct NotificationWebhook {
    receivers: Vec<Url>,
    client: reqwest::Client,
    controller: String,
}

impl fmt::Debug for NotificationWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let receivers: Vec<String> = self.receivers.iter().map(redact_url).collect();
        f.debug_struct("NotificationWebhook")
            .field("receivers", &receivers)
            .field("controller", &self.controller)
            .finish_non_exhaustive()
    }
}

impl NotificationWebhook {
    /// `client` should come from [`NotificationWebhook::client`] (or be configured the
    /// same way: a timeout and no redirects). `controller` is reported as the event's
    /// `reportingController` and `gotk-component`; usually [`DEFAULT_CONTROLLER_NAME`].
    ///
    /// Credentials in a receiver URL's userinfo are sent as HTTP basic auth; they, and
    /// the query string, never appear in messages or logs.
    pub fn new(
        receivers: Vec<Url>,
        client: reqwest::Client,
        controller: impl Into<String>,
    ) -> Self {
        Self {
            receivers,
            client,
            controller: controller.into(),
        }
    }

    /// The HTTP client receivers are meant to be called with: [`RECEIVER_TIMEOUT`] per
    /// request, and redirects are not followed (a redirect could carry the signed event
    /// to another host), so a 3xx counts as a failed delivery.
    pub fn client() -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .timeout(RECEIVER_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pipeline-controller/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    pub fn receivers(&self) -> &[Url] {
        &self.receivers
    }

    pub fn controller(&self) -> &str {
        &self.controller
    }

    /// The event announcing `record`, timestamped now (whole seconds, as Kubernetes
    /// timestamps are).
    pub fn event(&self, record: &PromotionRecord, pipeline: &Pipeline) -> FluxEvent {
        let reference = &pipeline.reference;
        // What the triggering event's Alert added (summary, cluster, team...), under
        // its own keys; ours win where they clash.
        let mut metadata = record.trigger.metadata.clone();
        metadata.extend([
            ("environment".to_string(), record.target_environment.clone()),
            ("version".to_string(), record.revision.clone()),
            (
                "sourceEnvironment".to_string(),
                record.source_environment.clone(),
            ),
            ("promotion".to_string(), record.id.clone()),
        ]);
        FluxEvent {
            involved_object: ObjectReference {
                kind: PIPELINE_KIND.to_string(),
                namespace: reference.namespace.clone(),
                name: reference.name.clone(),
                api_version: API_VERSION.to_string(),
                ..Default::default()
            },
            severity: "info".to_string(),
            timestamp: Utc::now().trunc_subsecs(0),
            message: format!(
                "Promote pipeline {reference} to {} with version {}",
                record.target_environment, record.revision
            ),
            reason: "Promote".to_string(),
            metadata,
            reporting_controller: self.controller.clone(),
            reporting_instance: None,
        }
    }

    /// Sends `body` to every receiver at once; results come back in receiver order.
    async fn deliver_all(
        &self,
        receivers: &[&Url],
        body: Vec<u8>,
        signature: String,
    ) -> Vec<(Url, Result<StatusCode, Failure>)> {
        let mut deliveries = JoinSet::new();
        for (index, url) in receivers.iter().enumerate() {
            let request = self
                .client
                .post((*url).clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("gotk-component", self.controller.as_str())
                .header("X-Signature", signature.as_str())
                .body(body.clone());
            let url = (*url).clone();
            deliveries.spawn(async move {
                let result = deliver(&url, request).await;
                (index, url, result)
            });
        }
        let mut results = Vec::with_capacity(receivers.len());
        while let Some(joined) = deliveries.join_next().await {
            match joined {
                Ok(done) => results.push(done),
                // A delivery task cannot panic short of a bug in the HTTP stack; its
                // receiver is then missing from the results and counted as failed below.
                Err(err) => tracing::error!(error = %err, "notification delivery task failed"),
            }
        }
        results.sort_by_key(|(index, _, _)| *index);
        let mut by_receiver = Vec::with_capacity(receivers.len());
        let mut done = results.into_iter().peekable();
        for (index, url) in receivers.iter().enumerate() {
            match done.next_if(|(i, _, _)| *i == index) {
                Some((_, url, result)) => by_receiver.push((url, result)),
                None => by_receiver.push(((*url).clone(), Err(Failure::Aborted))),
            }
        }
        by_receiver
    }
}

#[async_trait]
impl PromotionStrategy for NotificationWebhook {
    async fn promote(&self, ctx: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError> {
        let record = ctx.record;
        if self.receivers.is_empty() {
            return Err(StrategyError::permanent(
                "notification strategy has no receivers: start the service with --notify-url",
            ));
        }
        let key = hmac_key(ctx.pipeline, ctx.secrets).await?;
        let event = self.event(record, ctx.pipeline);
        let body = serde_json::to_vec(&event).map_err(|err| {
            StrategyError::permanent(format!("cannot encode the notification event: {err}"))
        })?;
        let signature = signature::sign(HmacAlgorithm::Sha256, key.expose(), &body);
        drop(key);

        // Receivers that got this promotion in an earlier attempt are not sent it again.
        let pending: Vec<&Url> = self
            .receivers
            .iter()
            .filter(|url| !record.checkpoints.contains_key(&delivered_checkpoint(url)))
            .collect();
        let total = self.receivers.len();
        let results = self.deliver_all(&pending, body, signature).await;
        let mut failures = Vec::new();
        let mut delivered = std::collections::BTreeMap::new();
        let mut retryable = true;
        for (url, result) in &results {
            let receiver = redact_url(url);
            match result {
                Ok(status) => {
                    tracing::info!(
                        promotion = %record.id,
                        receiver = %receiver,
                        status = status.as_u16(),
                        "promotion notification delivered"
                    );
                    delivered.insert(delivered_checkpoint(url), status.as_u16().to_string());
                }
                Err(failure) => {
                    let text = scrub(failure.to_string(), url);
                    tracing::warn!(
                        promotion = %record.id,
                        receiver = %receiver,
                        retryable = failure.retryable(),
                        error = %text,
                        "promotion notification not delivered"
                    );
                    retryable &= failure.retryable();
                    failures.push(format!("{receiver}: {text}"));
                }
            }
        }
        if failures.is_empty() {
            return Ok(StrategyOutcome {
                message: format!(
                    "notified {total} receiver(s) of {} for {}",
                    record.revision, record.target_environment
                ),
                result: None,
            });
        }
        // Success needs every receiver; once one refuses for good, retrying cannot get there.
        let message = format!(
            "notifying receivers of {} for {} failed for {} of {total} receiver(s): {}",
            record.revision,
            record.target_environment,
            failures.len(),
            failures.join("; ")
        );
        let error = if retryable {
            StrategyError::retryable(message)
        } else {
            StrategyError::permanent(message)
        };
        Err(error.with_checkpoints(delivered))
    }
}

/// Checkpoint key saying `url` got the notification: the URL without credentials or
/// query (records are readable through the API) and a digest telling such URLs apart.
pub fn delivered_checkpoint(url: &Url) -> String {
    let digest = hex::encode(Sha256::digest(url.as_str().as_bytes()));
    format!("notified {} #{}", redact_url(url), &digest[..12])
}

/// The pipeline's webhook key, which signs its notifications. Messages name the Secret,
/// never its contents.
async fn hmac_key(
    pipeline: &Pipeline,
    secrets: &dyn SecretSource,
) -> Result<SecretBytes, StrategyError> {
    let reference = &pipeline.reference;
    let Some(secret_name) = pipeline.hmac_secret_name() else {
        return Err(StrategyError::permanent(format!(
            "pipeline {reference} has no spec.promotion.strategy.secretRef: notifications are signed with its {HMAC_KEY:?}, so none can be sent"
        )));
    };
    match secrets
        .secret_value(&reference.namespace, secret_name, HMAC_KEY)
        .await
    {
        Ok(Some(key)) if !key.expose().trim_ascii().is_empty() => Ok(key.trimmed()),
        Ok(_) => Err(StrategyError::permanent(format!(
            "secret {}/{secret_name} referenced by pipeline {reference} has no {HMAC_KEY:?} key to sign notifications with",
            reference.namespace
        ))),
        Err(SecretLookupError::SecretNotFound { namespace, name }) => {
            Err(StrategyError::permanent(format!(
                "secret {namespace}/{name} referenced by pipeline {reference} not found: cannot sign notifications"
            )))
        }
        Err(SecretLookupError::Unavailable(err)) => Err(StrategyError::retryable(format!(
            "cannot read the webhook key of pipeline {reference}: {err}"
        ))),
    }
}

/// Why one receiver did not take the event.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("HTTP {0}")]
    Status(StatusCode),
    #[error("HTTP {0} (redirects are not followed)")]
    Redirect(StatusCode),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Transport(String),
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("not an http or https URL")]
    Scheme,
    #[error("delivery aborted")]
    Aborted,
}

impl Failure {
    /// Any answer but 2xx is retried with the record's backoff (a receiver may be
    /// mid-deploy or misconfigured for a while); only our own configuration errors,
    /// which no retry can fix, are permanent.
    fn retryable(&self) -> bool {
        match self {
            Failure::Status(_)
            | Failure::Redirect(_)
            | Failure::Timeout(_)
            | Failure::Transport(_)
            | Failure::Aborted => true,
            Failure::Request(_) | Failure::Scheme => false,
        }
    }
}

async fn deliver(url: &Url, request: reqwest::RequestBuilder) -> Result<StatusCode, Failure> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Failure::Scheme);
    }
    let response = request.send().await.map_err(classify)?;
    let status = response.status();
    // The body is not needed; dropping the response closes or frees the connection.
    drop(response);
    if status.is_success() {
        Ok(status)
    } else if status.is_redirection() {
        Err(Failure::Redirect(status))
    } else {
        Err(Failure::Status(status))
    }
}

fn classify(err: reqwest::Error) -> Failure {
    let err = err.without_url();
    let text = error_chain(&err);
    if err.is_builder() {
        Failure::Request(text)
    } else if err.is_timeout() {
        Failure::Timeout(text)
    } else {
        Failure::Transport(text)
    }
}

/// Removes any trace of `url`'s credentials and query from `text`, in case a lower layer
/// quoted the URL.
fn scrub(mut text: String, url: &Url) -> String {
    let user = (!url.username().is_empty()).then(|| format!("{}@", url.username()));
    let secrets = [
        url.password().map(str::to_string),
        user,
        url.query().map(str::to_string),
    ];
    for secret in secrets.into_iter().flatten() {
        if !secret.is_empty() {
            text = text.replace(&secret, "<redacted>");
        }
    }
    text
}

/// `url` fit for messages and logs: without userinfo, query or fragment, which may hold
/// tokens.
pub fn redact_url(url: &Url) -> String {
    let mut url = url.clone();
    // Both fail only for URLs that cannot have credentials in the first place.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_query_and_fragment() {
        let url = Url::parse("https://bot:s3cret@hooks.example.com/p/a?token=abc&x=1#frag")
            .expect("valid URL");
        assert_eq!(redact_url(&url), "https://hooks.example.com/p/a");
        let plain = Url::parse("http://127.0.0.1:9/hook").expect("valid URL");
        assert_eq!(redact_url(&plain), "http://127.0.0.1:9/hook");
    }

    #[test]
    fn scrubs_credentials_quoted_by_lower_layers() {
        let url = Url::parse("https://bot:s3cret@example.com/?token=abc").expect("valid URL");
        let text = scrub(
            "error for https://bot:s3cret@example.com/?token=abc".to_string(),
            &url,
        );
        assert!(
            !text.contains("s3cret") && !text.contains("token=abc"),
            "{text}"
        );
    }

    #[test]
    fn classifies_statuses() {
        for (status, retryable) in [
            (StatusCode::INTERNAL_SERVER_ERROR, true),
            (StatusCode::BAD_GATEWAY, true),
            (StatusCode::SERVICE_UNAVAILABLE, true),
            (StatusCode::TOO_MANY_REQUESTS, true),
            (StatusCode::REQUEST_TIMEOUT, true),
            (StatusCode::NOT_FOUND, true),
            (StatusCode::UNAUTHORIZED, true),
            (StatusCode::BAD_REQUEST, true),
        ] {
            assert_eq!(Failure::Status(status).retryable(), retryable, "{status}");
        }
        assert!(Failure::Redirect(StatusCode::FOUND).retryable());
        assert!(!Failure::Scheme.retryable());
    }
}
