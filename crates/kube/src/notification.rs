//! The notification strategy of Kubernetes mode.
//!
//! 1. A Kubernetes Event on the Pipeline, reason `Promote`, with the promotion's details
//!    as annotations under the `pipelines.weave.works/` prefix.
//! 2. When `--events-addr` is set (notification-controller's event receiver), the same
//!    event in Flux's format POSTed there, unsigned, as Flux's own controllers post it.
//!    A stock notification-controller (v1.6.0, `internal/server/event_handlers.go`)
//!    forwards only events matching an Alert's `eventSources` (same namespace and kind,
//!    name or `*`), whose `kind` enum holds Flux kinds only, so the event is about the
//!    pipeline's app object (`appRef`: a HelmRelease or Kustomization) named in the
//!    pipeline's namespace: an Alert there selecting that kind and name (with
//!    `inclusionList: ["^Promote pipeline "]`) forwards promotions to its Provider. The
//!    details are in the metadata twice: under Flux's event group prefix, which
//!    notification-controller keeps and strips, and under `pipelines.weave.works/` for
//!    other receivers. The answer (202 whether an Alert matched or not) is not taken for
//!    delivery: the record says it was posted and accepted.
//! 3. When `--notify-url`s are configured, the embedded-mode signed webhook too.
//!
//! The generated Alerts that send deployments to the webhook exclude these events
//! (`exclusionList`), so a promotion never comes back as a deployment.
//!
//! A retried attempt may repeat the Event and the POST; the `promotion` key carries the
//! record id for receivers that deduplicate.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{SubsecRound, Utc};
use pipeline_core::pipeline::API_GROUP;
use pipeline_core::{PromotionContext, PromotionStrategy, StrategyError, StrategyOutcome};
use pipeline_strategies::NotificationWebhook;
use reqwest::Url;

use crate::CONTROLLER_NAME;
use crate::events::{EventPublisher, EventType, pipeline_reference};
use crate::sources::KubePipelineSource;

pub struct KubeNotification {
    events: EventPublisher,
    pipelines: KubePipelineSource,
    events_addr: Option<Url>,
    http: reqwest::Client,
    webhook: Option<NotificationWebhook>,
}

impl KubeNotification {
    /// `http` should not follow redirects and should time out (as
    /// [`NotificationWebhook::client`]).
    pub fn new(
        events: EventPublisher,
        pipelines: KubePipelineSource,
        events_addr: Option<Url>,
        http: reqwest::Client,
        webhook: Option<NotificationWebhook>,
    ) -> Self {
        Self {
            events,
            pipelines,
            events_addr,
            http,
            webhook,
        }
    }
}

/// Checkpoint: the Promote Event exists on the Pipeline.
const EVENT_CHECKPOINT: &str = "kubernetes event";
/// Checkpoint: `--events-addr` accepted the event.
const EVENTS_ADDR_CHECKPOINT: &str = "events-addr";

/// What an accepted `--events-addr` POST means, in the record and the startup log.
pub const EVENTS_ADDR_CAVEAT: &str = "accepted, which is not delivery: notification-controller forwards it only to the Alerts selecting that object";

/// The metadata prefix notification-controller keeps on any event and strips before
/// forwarding (Flux's event API group).
pub const FLUX_EVENT_PREFIX: &str = "event.toolkit.fluxcd.io/";

/// The object an `--events-addr` event is about, as `Kind namespace/name`: the
/// pipeline's app object named in the pipeline's namespace.
pub fn events_addr_object(pipeline: &pipeline_core::Pipeline) -> String {
    let app = &pipeline.spec.app_ref;
    format!("{} {}/{}", app.kind, pipeline.reference.namespace, app.name)
}

/// The promotion's details, keys prefixed with the Pipeline API group.
pub fn annotations(ctx: &PromotionContext<'_>) -> BTreeMap<String, String> {
    let record = ctx.record;
    // The triggering event's enrichment (an Alert's summary, eventMetadata), then ours.
    let enrichment = record
        .trigger
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()));
    enrichment
        .chain([
            ("environment", record.target_environment.clone()),
            ("version", record.revision.clone()),
            ("sourceEnvironment", record.source_environment.clone()),
            ("promotion", record.id.clone()),
        ])
        .map(|(k, v)| (format!("{API_GROUP}/{k}"), v))
        .collect()
}

#[async_trait]
impl PromotionStrategy for KubeNotification {
    async fn promote(&self, ctx: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError> {
        let record = ctx.record;
        let reference = &ctx.pipeline.reference;
        let metadata = annotations(&ctx);
        let message = format!(
            "Promote pipeline {reference} to {} with version {}",
            record.target_environment, record.revision
        );
        let uid = self.pipelines.uid(reference);
        let object = pipeline_reference(&reference.namespace, &reference.name, uid.clone());
        // Steps done in an earlier attempt are not repeated; steps done in this one are
        // handed back with a later step's failure.
        let mut done = BTreeMap::new();
        let mut delivered = vec![];
        let mut posted = None;
        if !record.checkpoints.contains_key(EVENT_CHECKPOINT) {
            self.events
                .publish(
                    &object,
                    EventType::Normal,
                    "Promote",
                    &message,
                    metadata.clone(),
                )
                .await
                .map_err(|err| {
                    StrategyError::retryable(format!(
                        "cannot create the Promote event on pipeline {reference}: {}",
                        crate::store::describe(&err)
                    ))
                })?;
            done.insert(EVENT_CHECKPOINT.to_string(), "created".to_string());
        }
        delivered.push("a Kubernetes Event".to_string());

        if let Some(address) = &self.events_addr
            && !record.checkpoints.contains_key(EVENTS_ADDR_CHECKPOINT)
        {
            let app = &ctx.pipeline.spec.app_ref;
            let mut flux_metadata = metadata.clone();
            let prefix = format!("{API_GROUP}/");
            for (key, value) in &metadata {
                if let Some(bare) = key.strip_prefix(&prefix) {
                    flux_metadata.insert(format!("{FLUX_EVENT_PREFIX}{bare}"), value.clone());
                }
            }
            let event = serde_json::json!({
                "involvedObject": {
                    "kind": app.kind,
                    "namespace": reference.namespace,
                    "name": app.name,
                    "apiVersion": app.api_version,
                },
                "severity": "info",
                "timestamp": Utc::now().trunc_subsecs(0),
                "message": message,
                "reason": "Promote",
                "metadata": flux_metadata,
                "reportingController": CONTROLLER_NAME,
                "reportingInstance": self.events.instance(),
            });
            let response = self
                .http
                .post(address.clone())
                .json(&event)
                .send()
                .await
                .map_err(|err| {
                    StrategyError::retryable(format!(
                        "posting the event to --events-addr failed: {}",
                        err.without_url()
                    ))
                    .with_checkpoints(done.clone())
                })?;
            let status = response.status();
            if !status.is_success() {
                // As for --notify-url: anything but 2xx is retried with the record's backoff.
                return Err(StrategyError::retryable(format!(
                    "--events-addr answered HTTP {status}"
                ))
                .with_checkpoints(done));
            }
            done.insert(
                EVENTS_ADDR_CHECKPOINT.to_string(),
                status.as_u16().to_string(),
            );
        }
        if let Some(address) = &self.events_addr {
            // Accepted is not delivered: notification-controller answers 202 whether an
            // Alert selected the event or not.
            posted = Some(format!(
                "; posted to --events-addr {} as an event of {} ({EVENTS_ADDR_CAVEAT})",
                address.as_str(),
                events_addr_object(ctx.pipeline)
            ));
        }

        if let Some(webhook) = &self.webhook
            && !webhook.receivers().is_empty()
        {
            let outcome = webhook
                .promote(PromotionContext {
                    record: ctx.record,
                    pipeline: ctx.pipeline,
                    promotion: ctx.promotion,
                    secrets: ctx.secrets,
                })
                .await
                .map_err(|mut err| {
                    err.checkpoints.extend(done);
                    err
                })?;
            delivered.push(outcome.message);
        }
        Ok(StrategyOutcome {
            message: format!(
                "announced the promotion of {} to {} with {}{}",
                record.revision,
                record.target_environment,
                delivered.join(", "),
                posted.unwrap_or_default()
            ),
            result: None,
        })
    }
}
