//! Turns "path + headers + raw body + time" into a decision: record a promotion, return
//! the one already recorded, ignore the event, or refuse it with a reason. The HTTP layer
//! only maps these to status codes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::event::{FluxEvent, Outcome};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineRef, api_group_of};
use crate::ports::{
    Clock, PipelineSource, PromotionStore, SecretBytes, SecretLookupError, SecretSource, StoreError,
};
use crate::promotion::{PromotionRecord, Trigger, promotion_id};
use crate::signature::{self, SignatureError};

/// Key of the webhook HMAC key in the pipeline's Secret.
pub const HMAC_KEY: &str = "hmac-key";

/// How far event and approval timestamps may be from now.
#[derive(Debug, Clone, Copy)]
pub struct TimeWindow {
    pub max_age: Duration,
    pub max_future: Duration,
}

impl Default for TimeWindow {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(15 * 60),
            max_future: Duration::from_secs(5 * 60),
        }
    }
}

impl TimeWindow {
    fn check(
        &self,
        timestamp: DateTime<Utc>,
        now: DateTime<Utc>,
        what: &str,
    ) -> Result<(), Refusal> {
        let age = now.signed_duration_since(timestamp);
        let max_age = chrono::Duration::from_std(self.max_age).unwrap_or(chrono::Duration::MAX);
        let max_future =
            chrono::Duration::from_std(self.max_future).unwrap_or(chrono::Duration::MAX);
        if age > max_age {
            return Err(Refusal::Stale(format!(
                "{what} timestamp {} is older than the accepted {}s",
                timestamp.to_rfc3339(),
                self.max_age.as_secs()
            )));
        }
        if -age > max_future {
            return Err(Refusal::FromTheFuture(format!(
                "{what} timestamp {} is more than {}s in the future",
                timestamp.to_rfc3339(),
                self.max_future.as_secs()
            )));
        }
        Ok(())
    }
}

/// Broad classes of refusal; the HTTP layer maps each to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalClass {
    NotFound,
    Unauthorized,
    BadRequest,
    Unprocessable,
    Conflict,
    Unavailable,
}

/// Why an event or approval was not accepted. Display is the human message; [`reason`]
/// is the stable snake_case code. Neither ever contains key material.
///
/// [`reason`]: Refusal::reason
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("pipeline {0} not found")]
    PipelineNotFound(PipelineRef),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("request body is not a valid {what}: {detail}")]
    BadBody { what: &'static str, detail: String },
    #[error(
        "event has no revision in its metadata (expected key \"revision\" or \"<group>/revision\")"
    )]
    MissingRevision,
    #[error("{0}")]
    InvalidRevision(String),
    #[error("pipeline {pipeline} has no environment {environment:?}")]
    UnknownEnvironment {
        pipeline: PipelineRef,
        environment: String,
    },
    #[error("environment {0:?} is the last one of the pipeline; there is nothing to promote to")]
    LastEnvironment(String),
    #[error("next environment {0:?} has no targets")]
    NoTargets(String),
    #[error("involved object does not match the pipeline: {0}")]
    ObjectMismatch(String),
    #[error("{0}")]
    Stale(String),
    #[error("{0}")]
    FromTheFuture(String),
    #[error("pipeline {pipeline} has no promotion configured for environment {environment:?}")]
    NoPromotion {
        pipeline: PipelineRef,
        environment: String,
    },
    #[error("no promotion of {revision:?} to {environment:?} recorded for pipeline {pipeline}")]
    PromotionNotFound {
        pipeline: PipelineRef,
        environment: String,
        revision: String,
    },
    #[error("{0}")]
    NotWaitingApproval(String),
    #[error("approval does not match the request path: {0}")]
    ApprovalMismatch(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::PipelineNotFound(_) => "pipeline_not_found",
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::BadBody { .. } => "invalid_body",
            Refusal::MissingRevision => "missing_revision",
            Refusal::InvalidRevision(_) => "invalid_revision",
            Refusal::UnknownEnvironment { .. } => "unknown_environment",
            Refusal::LastEnvironment(_) => "last_environment",
            Refusal::NoTargets(_) => "no_targets",
            Refusal::ObjectMismatch(_) => "involved_object_mismatch",
            Refusal::Stale(_) => "stale_timestamp",
            Refusal::FromTheFuture(_) => "future_timestamp",
            Refusal::NoPromotion { .. } => "no_promotion_configured",
            Refusal::PromotionNotFound { .. } => "promotion_not_found",
            Refusal::NotWaitingApproval(_) => "not_waiting_approval",
            Refusal::ApprovalMismatch(_) => "approval_mismatch",
            Refusal::Unavailable(_) => "unavailable",
        }
    }

    pub fn class(&self) -> RefusalClass {
        match self {
            Refusal::PipelineNotFound(_) | Refusal::PromotionNotFound { .. } => {
                RefusalClass::NotFound
            }
            Refusal::Unauthenticated(_) => RefusalClass::Unauthorized,
            Refusal::BadBody { .. } => RefusalClass::BadRequest,
            Refusal::NotWaitingApproval(_) => RefusalClass::Conflict,
            Refusal::Unavailable(_) => RefusalClass::Unavailable,
            _ => RefusalClass::Unprocessable,
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Transition(t) => Refusal::NotWaitingApproval(t.to_string()),
            other => Refusal::Unavailable(other.to_string()),
        }
    }
}

/// A webhook delivery as the HTTP layer saw it.
#[derive(Debug, Clone, Copy)]
pub struct EventRequest<'a> {
    pub pipeline: &'a PipelineRef,
    /// The environment that just deployed.
    pub environment: &'a str,
    pub signature: Option<&'a str>,
    pub body: &'a [u8],
}

/// What the core decided about an authenticated, valid event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Recorded(PromotionRecord),
    Duplicate(PromotionRecord),
    Ignored {
        reason: &'static str,
        message: String,
    },
}

/// A signed approval of one waiting promotion. Every field must match the request path
/// and the timestamp must be fresh, so a captured approval approves nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalBody {
    pub pipeline: String,
    pub environment: String,
    pub revision: String,
    pub timestamp: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy)]
pub struct ApprovalRequest<'a> {
    pub pipeline: &'a PipelineRef,
    /// The environment waiting for approval (the promotion's target).
    pub environment: &'a str,
    pub revision: &'a str,
    pub signature: Option<&'a str>,
    pub body: &'a [u8],
}

/// The webhook's decision maker.
pub struct Intake {
    pipelines: Arc<dyn PipelineSource>,
    secrets: Arc<dyn SecretSource>,
    store: Arc<dyn PromotionStore>,
    clock: Arc<dyn Clock>,
    window: TimeWindow,
    metrics: Arc<Metrics>,
    executor_wake: Arc<Notify>,
}

impl Intake {
    pub fn new(
        pipelines: Arc<dyn PipelineSource>,
        secrets: Arc<dyn SecretSource>,
        store: Arc<dyn PromotionStore>,
        clock: Arc<dyn Clock>,
        window: TimeWindow,
        metrics: Arc<Metrics>,
        executor_wake: Arc<Notify>,
    ) -> Self {
        Self {
            pipelines,
            secrets,
            store,
            clock,
            window,
            metrics,
            executor_wake,
        }
    }

    pub fn store(&self) -> &Arc<dyn PromotionStore> {
        &self.store
    }

    async fn pipeline(&self, reference: &PipelineRef) -> Result<Arc<Pipeline>, Refusal> {
        self.pipelines
            .pipeline(reference)
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?
            .ok_or_else(|| Refusal::PipelineNotFound(reference.clone()))
    }

    /// Looks up the pipeline's HMAC key and checks `signature` over `body` with it.
    async fn authenticate(
        &self,
        pipeline: &Pipeline,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), Refusal> {
        let key = self.hmac_key(pipeline).await?;
        signature::verify(signature, key.expose(), body).map_err(|err| {
            let hint = match err {
                SignatureError::Mismatch => " for this pipeline's key",
                _ => "",
            };
            Refusal::Unauthenticated(format!("{err}{hint}"))
        })
    }

    /// The pipeline's webhook key. Unsigned promotions are never accepted, so a pipeline
    /// without one refuses every request.
    pub async fn hmac_key(&self, pipeline: &Pipeline) -> Result<SecretBytes, Refusal> {
        let reference = &pipeline.reference;
        let Some(secret_name) = pipeline.hmac_secret_name() else {
            return Err(Refusal::Unauthenticated(format!(
                "pipeline {reference} has no spec.promotion.strategy.secretRef; unsigned promotions are not accepted"
            )));
        };
        match self
            .secrets
            .secret_value(&reference.namespace, secret_name, HMAC_KEY)
            .await
        {
            Ok(Some(key)) if !key.expose().is_empty() => Ok(key),
            Ok(_) => Err(Refusal::Unauthenticated(format!(
                "secret {}/{secret_name} has no {HMAC_KEY:?} key",
                reference.namespace
            ))),
            Err(SecretLookupError::SecretNotFound { namespace, name }) => {
                Err(Refusal::Unauthenticated(format!(
                    "secret {namespace}/{name} referenced by pipeline {reference} not found"
                )))
            }
            Err(SecretLookupError::Unavailable(e)) => Err(Refusal::Unavailable(e.to_string())),
        }
    }

    /// Decides what to do with a deployment event. The record, if any, is durable when
    /// this returns; executing it is the executor's business.
    pub async fn handle_event(&self, request: EventRequest<'_>) -> Result<Decision, Refusal> {
        let pipeline = self.pipeline(request.pipeline).await?;
        self.authenticate(&pipeline, request.signature, request.body)
            .await?;
        let event = FluxEvent::from_json(request.body).map_err(|detail| Refusal::BadBody {
            what: "Flux event",
            detail,
        })?;

        let environments = &pipeline.spec.environments;
        let index = pipeline
            .environment_index(request.environment)
            .ok_or_else(|| Refusal::UnknownEnvironment {
                pipeline: pipeline.reference.clone(),
                environment: request.environment.to_string(),
            })?;
        let source = &environments[index];
        let target = environments
            .get(index + 1)
            .ok_or_else(|| Refusal::LastEnvironment(source.name.clone()))?;
        if target.targets.is_empty() {
            return Err(Refusal::NoTargets(target.name.clone()));
        }
        check_involved_object(&pipeline, source, &event)?;
        self.window
            .check(event.timestamp, self.clock.now(), "event")?;

        if let Outcome::NotADeployment { reason, message } = event.outcome() {
            return Ok(Decision::Ignored { reason, message });
        }
        let revision = event.revision().ok_or(Refusal::MissingRevision)?;
        crate::event::check_revision(revision).map_err(Refusal::InvalidRevision)?;
        let promotion =
            pipeline
                .promotion_for(&target.name)
                .ok_or_else(|| Refusal::NoPromotion {
                    pipeline: pipeline.reference.clone(),
                    environment: target.name.clone(),
                })?;

        let trigger = Trigger {
            source: "webhook".to_string(),
            reason: event.reason.clone(),
            reporting_controller: event.reporting_controller.clone(),
            object: format!(
                "{}/{}/{}",
                event.involved_object.kind,
                event.involved_object.namespace,
                event.involved_object.name
            ),
        };
        let record = PromotionRecord::new(
            pipeline.reference.clone(),
            &source.name,
            &target.name,
            revision,
            promotion.manual,
            trigger,
            self.clock.now(),
        );
        let (stored, created) = self.store.create_if_absent(record).await?;
        if created {
            self.metrics.record_phase(stored.phase);
            self.executor_wake.notify_one();
            Ok(Decision::Recorded(stored))
        } else {
            Ok(Decision::Duplicate(stored))
        }
    }

    /// Approves a promotion waiting in `WaitingApproval`.
    pub async fn handle_approval(
        &self,
        request: ApprovalRequest<'_>,
    ) -> Result<PromotionRecord, Refusal> {
        let pipeline = self.pipeline(request.pipeline).await?;
        self.authenticate(&pipeline, request.signature, request.body)
            .await?;
        let body: ApprovalBody =
            crate::event::decode_exactly_one(request.body).map_err(|detail| Refusal::BadBody {
                what: "approval",
                detail,
            })?;
        let expected_pipeline = request.pipeline.to_string();
        for (field, got, want) in [
            (
                "pipeline",
                body.pipeline.as_str(),
                expected_pipeline.as_str(),
            ),
            (
                "environment",
                body.environment.as_str(),
                request.environment,
            ),
            ("revision", body.revision.as_str(), request.revision),
        ] {
            if got != want {
                return Err(Refusal::ApprovalMismatch(format!(
                    "{field} is {got:?} in the body but {want:?} in the path"
                )));
            }
        }
        self.window
            .check(body.timestamp, self.clock.now(), "approval")?;

        let id = promotion_id(request.pipeline, request.environment, request.revision);
        let now = self.clock.now();
        match self.store.modify(&id, &|r| r.approve(now)).await {
            Ok(record) => {
                self.metrics.record_phase(record.phase);
                self.executor_wake.notify_one();
                Ok(record)
            }
            Err(StoreError::NotFound(_)) => Err(Refusal::PromotionNotFound {
                pipeline: request.pipeline.clone(),
                environment: request.environment.to_string(),
                revision: request.revision.to_string(),
            }),
            Err(other) => Err(other.into()),
        }
    }
}

/// The event must come from the pipeline's app, in a namespace targeted by the
/// environment it claims to come from.
fn check_involved_object(
    pipeline: &Pipeline,
    source: &crate::pipeline::Environment,
    event: &FluxEvent,
) -> Result<(), Refusal> {
    let app = &pipeline.spec.app_ref;
    let object = &event.involved_object;
    let object_group = api_group_of(&object.api_version);
    if object_group != app.api_group() {
        return Err(Refusal::ObjectMismatch(format!(
            "API group {object_group:?} differs from appRef's {:?}",
            app.api_group()
        )));
    }
    if object.kind != app.kind {
        return Err(Refusal::ObjectMismatch(format!(
            "kind {:?} differs from appRef's {:?}",
            object.kind, app.kind
        )));
    }
    if object.name != app.name {
        return Err(Refusal::ObjectMismatch(format!(
            "name {:?} differs from appRef's {:?}",
            object.name, app.name
        )));
    }
    if !source
        .targets
        .iter()
        .any(|t| t.namespace == object.namespace)
    {
        return Err(Refusal::ObjectMismatch(format!(
            "namespace {:?} is not a target of environment {:?}",
            object.namespace, source.name
        )));
    }
    Ok(())
}
