//! Turns "path + headers + raw body + time" into a decision: record a promotion, return
//! the one already recorded, ignore the event, or refuse it with a reason. The HTTP layer
//! only maps these to status codes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::event::{FluxEvent, Outcome};
use crate::intake_load::IntakeLoad;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineRef, api_group_of};
use crate::ports::PromotionFilter;
use crate::ports::{
    Clock, PipelineSource, PromotionStore, SecretBytes, SecretLookupError, SecretSource, StoreError,
};
use crate::promotion::{Phase, PromotionRecord, Trigger, promotion_id};
use crate::signature::{self, SignatureError};

/// Key of the webhook HMAC key in the pipeline's Secret.
pub const HMAC_KEY: &str = "hmac-key";

/// Key of the approval key: signs HTTP approvals, rejections and retries. Kept apart
/// from [`HMAC_KEY`], which every leaf cluster holds to send events.
pub const APPROVAL_KEY: &str = "approval-key";

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
    Forbidden,
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
    #[error(
        "signed HTTP approvals are disabled: approve through the Kubernetes API (`pipeline-controller approve NAMESPACE/NAME ENVIRONMENT REVISION`, allowed by RBAC), or start the controller with --enable-hmac-approvals"
    )]
    ApprovalsDisabled,
    #[error(
        "an approval signed over an empty body (the Go pipeline-controller's protocol) is refused: that one signature would approve any revision at any time; sign the JSON body {{pipeline, environment, revision, timestamp, action}} with the environment's approval-key, as `pipeline-controller approve --server` does"
    )]
    LegacyApproval,
    #[error("{0}")]
    Superseded(String),
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
            Refusal::ApprovalsDisabled => "hmac_approvals_disabled",
            Refusal::LegacyApproval => "legacy_approval",
            Refusal::Superseded(_) => "superseded",
            Refusal::Unavailable(_) => "unavailable",
        }
    }

    pub fn class(&self) -> RefusalClass {
        match self {
            Refusal::PipelineNotFound(_) | Refusal::PromotionNotFound { .. } => {
                RefusalClass::NotFound
            }
            Refusal::Unauthenticated(_) => RefusalClass::Unauthorized,
            Refusal::ApprovalsDisabled => RefusalClass::Forbidden,
            Refusal::BadBody { .. } | Refusal::LegacyApproval => RefusalClass::BadRequest,
            Refusal::NotWaitingApproval(_) | Refusal::Superseded(_) => RefusalClass::Conflict,
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

/// What an approver decides about one promotion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let a promotion waiting for approval run.
    Approve,
    /// Refuse a promotion waiting for approval, for good.
    Reject { reason: String },
    /// Re-queue a `Failed` promotion.
    Retry,
}

impl Verdict {
    /// The `action` an HTTP body states, so a signed body for one verdict cannot be
    /// replayed as another.
    pub fn action(&self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Reject { .. } => "reject",
            Verdict::Retry => "retry",
        }
    }
}

/// A signed decision about one promotion. Every field must match the request path and
/// the timestamp must be fresh, so a captured body decides nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalBody {
    pub pipeline: String,
    pub environment: String,
    pub revision: String,
    pub timestamp: DateTime<Utc>,
    /// `approve` (the default, as bodies before rejections had none), `reject`, `retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Who decides, as the approval-key holder states it; recorded, not trusted further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why, for a rejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Longest `by` and `reason` an approval body may carry.
const MAX_DECISION_TEXT: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct ApprovalRequest<'a> {
    pub pipeline: &'a PipelineRef,
    /// The environment of the promotion's target.
    pub environment: &'a str,
    pub revision: &'a str,
    /// The action the path names (`approve`, `reject`, `retry`).
    pub action: &'a str,
    pub signature: Option<&'a str>,
    pub body: &'a [u8],
}

/// The webhook's decision maker.
pub struct Intake {
    /// Whether decisions signed with an approval key are taken over HTTP. Kubernetes
    /// mode turns them off by default: there, approving is an RBAC-checked API action.
    hmac_approvals: bool,
    pipelines: Arc<dyn PipelineSource>,
    secrets: Arc<dyn SecretSource>,
    store: Arc<dyn PromotionStore>,
    clock: Arc<dyn Clock>,
    window: TimeWindow,
    metrics: Arc<Metrics>,
    executor_wake: Arc<Notify>,
    load: Arc<IntakeLoad>,
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
            hmac_approvals: true,
            pipelines,
            secrets,
            store,
            clock,
            window,
            metrics,
            executor_wake,
            load: Arc::default(),
        }
    }

    /// Reports recordings to `load`, which the executor shares to yield to them.
    pub fn with_load(mut self, load: Arc<IntakeLoad>) -> Self {
        self.load = load;
        self
    }

    /// Takes (or refuses) HTTP decisions signed with an approval key.
    pub fn with_hmac_approvals(mut self, enabled: bool) -> Self {
        self.hmac_approvals = enabled;
        self
    }

    pub fn store(&self) -> &Arc<dyn PromotionStore> {
        &self.store
    }

    pub fn pipelines(&self) -> &Arc<dyn PipelineSource> {
        &self.pipelines
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
        check_signature(&key, signature, body)
    }

    /// The approval key for promotions into `environment`: key [`APPROVAL_KEY`] of the
    /// environment's Secret (else the pipeline's). Refused when missing, or when equal to
    /// a webhook key, since every leaf cluster holds those.
    pub async fn approval_key(
        &self,
        pipeline: &Pipeline,
        environment: &str,
    ) -> Result<SecretBytes, Refusal> {
        let reference = &pipeline.reference;
        let Some(secret_name) = pipeline.approval_secret_name(environment) else {
            return Err(Refusal::Unauthenticated(format!(
                "pipeline {reference} names no Secret for environment {environment:?} (promotion.strategy.secretRef): signed approvals need its {APPROVAL_KEY:?}"
            )));
        };
        let key = self
            .secret_key(&reference.namespace, secret_name, APPROVAL_KEY)
            .await?
            .ok_or_else(|| {
                Refusal::Unauthenticated(format!(
                    "secret {}/{secret_name} has no {APPROVAL_KEY:?} key: signed approvals need a key of their own that no leaf cluster holds",
                    reference.namespace
                ))
            })?;
        let mut webhook_keys = vec![self.hmac_key(pipeline).await.ok()];
        webhook_keys.push(
            self.secret_key(&reference.namespace, secret_name, HMAC_KEY)
                .await
                .ok()
                .flatten(),
        );
        if webhook_keys
            .iter()
            .flatten()
            .any(|webhook| same_key(webhook, &key))
        {
            return Err(Refusal::Unauthenticated(format!(
                "the {APPROVAL_KEY:?} of secret {}/{secret_name} equals a webhook {HMAC_KEY:?}, which every leaf cluster holds; give approvals a different key",
                reference.namespace
            )));
        }
        Ok(key)
    }

    /// A non-empty value of `key` in Secret `namespace/name`, if there is one.
    async fn secret_key(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<SecretBytes>, Refusal> {
        match self.secrets.secret_value(namespace, name, key).await {
            Ok(value) => Ok(value
                .map(SecretBytes::trimmed)
                .filter(|v| !v.expose().is_empty())),
            Err(SecretLookupError::SecretNotFound { namespace, name }) => Err(
                Refusal::Unauthenticated(format!("secret {namespace}/{name} not found")),
            ),
            Err(SecretLookupError::Unavailable(e)) => Err(Refusal::Unavailable(e.to_string())),
        }
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
            Ok(Some(key)) if !key.expose().trim_ascii().is_empty() => Ok(key.trimmed()),
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
            cluster: String::new(),
            metadata: event.enrichment(),
        };
        if !trigger.metadata.is_empty() {
            tracing::info!(pipeline = %pipeline.reference, environment = %source.name, %revision, enrichment = ?trigger.metadata, "event enrichment");
        }
        self.propose(&pipeline, &source.name, revision, trigger)
            .await
    }

    /// Records the promotion of `revision`, just deployed in `source_environment`, to the
    /// environment after it: the one path every trigger (webhook event, watcher
    /// observation) takes. The record is durable when this returns; running it is the
    /// executor's business.
    pub async fn propose(
        &self,
        pipeline: &Pipeline,
        source_environment: &str,
        revision: &str,
        trigger: Trigger,
    ) -> Result<Decision, Refusal> {
        let environments = &pipeline.spec.environments;
        let index = pipeline
            .environment_index(source_environment)
            .ok_or_else(|| Refusal::UnknownEnvironment {
                pipeline: pipeline.reference.clone(),
                environment: source_environment.to_string(),
            })?;
        let source = &environments[index];
        let target = environments
            .get(index + 1)
            .ok_or_else(|| Refusal::LastEnvironment(source.name.clone()))?;
        if target.targets.is_empty() {
            return Err(Refusal::NoTargets(target.name.clone()));
        }
        crate::event::check_revision(revision).map_err(Refusal::InvalidRevision)?;
        let promotion =
            pipeline
                .promotion_for(&target.name)
                .ok_or_else(|| Refusal::NoPromotion {
                    pipeline: pipeline.reference.clone(),
                    environment: target.name.clone(),
                })?;
        let record = PromotionRecord::new(
            pipeline.reference.clone(),
            &source.name,
            &target.name,
            revision,
            promotion.manual,
            trigger,
            self.clock.now(),
        );
        let recording = self.load.recording();
        let (stored, created) = self.store.create_if_absent(record).await?;
        drop(recording);
        if !created {
            return Ok(Decision::Duplicate(stored));
        }
        // Only waiting promotions take part: those that run are not held back.
        let stored = if stored.phase == Phase::WaitingApproval {
            match supersede_around(self.store.as_ref(), &stored, self.clock.now()).await {
                Ok(updated) => updated,
                Err(err) => {
                    // The record is durable; an approval of an older one is checked
                    // again then, and refused.
                    tracing::warn!(promotion = %stored.id, error = %err, "could not supersede older waiting promotions");
                    stored
                }
            }
        } else {
            stored
        };
        self.metrics.record_phase(stored.phase);
        self.executor_wake.notify_one();
        Ok(Decision::Recorded(stored))
    }

    /// Takes an approver's signed decision (approve, reject, retry) about one promotion.
    pub async fn handle_approval(
        &self,
        request: ApprovalRequest<'_>,
    ) -> Result<PromotionRecord, Refusal> {
        if !self.hmac_approvals {
            return Err(Refusal::ApprovalsDisabled);
        }
        let pipeline = self.pipeline(request.pipeline).await?;
        if request.body.trim_ascii().is_empty() {
            return Err(Refusal::LegacyApproval);
        }
        let key = self.approval_key(&pipeline, request.environment).await?;
        check_signature(&key, request.signature, request.body)?;
        let body: ApprovalBody =
            crate::event::decode_exactly_one(request.body).map_err(|detail| Refusal::BadBody {
                what: "approval",
                detail,
            })?;
        let expected_pipeline = request.pipeline.to_string();
        let action = body.action.as_deref().unwrap_or("approve");
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
            ("action", action, request.action),
        ] {
            if got != want {
                return Err(Refusal::ApprovalMismatch(format!(
                    "{field} is {got:?} in the body but {want:?} in the path"
                )));
            }
        }
        for (field, text) in [("by", &body.by), ("reason", &body.reason)] {
            if let Some(text) = text
                && (text.len() > MAX_DECISION_TEXT || text.chars().any(char::is_control))
            {
                return Err(Refusal::BadBody {
                    what: "approval",
                    detail: format!(
                        "{field}: at most {MAX_DECISION_TEXT} bytes without control characters"
                    ),
                });
            }
        }
        self.window
            .check(body.timestamp, self.clock.now(), "approval")?;
        let verdict = match action {
            "approve" => Verdict::Approve,
            "reject" => Verdict::Reject {
                reason: body.reason.clone().unwrap_or_default(),
            },
            "retry" => Verdict::Retry,
            other => {
                return Err(Refusal::BadBody {
                    what: "approval",
                    detail: format!("action {other:?} is not approve, reject or retry"),
                });
            }
        };
        let by = match body.by.as_deref().filter(|b| !b.trim().is_empty()) {
            Some(name) => format!("{name} (approval key)"),
            None => "the approval-key holder".to_string(),
        };
        let record = decide(
            self.store.as_ref(),
            request.pipeline,
            request.environment,
            request.revision,
            &verdict,
            &by,
            self.clock.now(),
        )
        .await?;
        self.metrics.record_phase(record.phase);
        if record.phase == Phase::Pending {
            self.executor_wake.notify_one();
        }
        Ok(record)
    }
}

/// Applies an approver's verdict to the promotion of `revision` into `environment`,
/// whoever vouched for the approver (an approval key, Kubernetes RBAC). An approval of
/// a revision older than one already waiting, running or promoted there supersedes it
/// instead, so approving never rolls an environment back.
pub async fn decide(
    store: &dyn PromotionStore,
    pipeline: &PipelineRef,
    environment: &str,
    revision: &str,
    verdict: &Verdict,
    by: &str,
    now: DateTime<Utc>,
) -> Result<PromotionRecord, Refusal> {
    let id = promotion_id(pipeline, environment, revision);
    let not_found = || Refusal::PromotionNotFound {
        pipeline: pipeline.clone(),
        environment: environment.to_string(),
        revision: revision.to_string(),
    };
    if *verdict == Verdict::Approve {
        let record = store.get(&id).await?.ok_or_else(not_found)?;
        if let Some(newer) = newer_in_environment(store, &record).await? {
            let superseded = store
                .modify(&id, &|r| r.supersede(&newer.revision, now))
                .await;
            if let Err(err) = superseded
                && !matches!(err, StoreError::Transition(_))
            {
                return Err(err.into());
            }
            return Err(Refusal::Superseded(format!(
                "promotion of {revision} to {environment} is superseded by {} ({}): approving it would roll {environment} back",
                newer.revision, newer.phase
            )));
        }
    }
    let change = |r: &mut PromotionRecord| match verdict {
        Verdict::Approve => r.approve(by, now),
        Verdict::Reject { reason } => r.reject(by, reason, now),
        Verdict::Retry => r.retry(by, now),
    };
    match store.modify(&id, &change).await {
        Ok(record) => Ok(record),
        Err(StoreError::NotFound(_)) => Err(not_found()),
        Err(other) => Err(other.into()),
    }
}

/// A record for the same pipeline and target environment, newer than `record`, that is
/// waiting, under way or done: the one that makes `record` obsolete, if any.
async fn newer_in_environment(
    store: &dyn PromotionStore,
    record: &PromotionRecord,
) -> Result<Option<PromotionRecord>, StoreError> {
    let others = store
        .list(&PromotionFilter {
            pipeline: Some(record.pipeline.clone()),
            environment: Some(record.target_environment.clone()),
        })
        .await?;
    Ok(others.into_iter().find(|other| {
        other.id != record.id
            && other.target_environment == record.target_environment
            && matches!(
                other.phase,
                Phase::WaitingApproval | Phase::Pending | Phase::Running | Phase::Succeeded
            )
            && other.is_newer_than(record)
    }))
}

/// After `record` was recorded: older promotions into its environment still waiting for
/// approval are superseded by it; if it is itself older than one there, it is.
async fn supersede_around(
    store: &dyn PromotionStore,
    record: &PromotionRecord,
    now: DateTime<Utc>,
) -> Result<PromotionRecord, StoreError> {
    let others = store
        .list(&PromotionFilter {
            pipeline: Some(record.pipeline.clone()),
            environment: Some(record.target_environment.clone()),
        })
        .await?;
    let mut current = record.clone();
    for other in others
        .iter()
        .filter(|o| o.id != record.id && o.target_environment == record.target_environment)
    {
        if other.phase == Phase::WaitingApproval && record.is_newer_than(other) {
            match store
                .modify(&other.id, &|r| r.supersede(&record.revision, now))
                .await
            {
                Ok(_) | Err(StoreError::Transition(_)) => {}
                Err(err) => return Err(err),
            }
        } else if current.phase == Phase::WaitingApproval
            && matches!(
                other.phase,
                Phase::WaitingApproval | Phase::Pending | Phase::Running | Phase::Succeeded
            )
            && other.is_newer_than(record)
        {
            match store
                .modify(&record.id, &|r| r.supersede(&other.revision, now))
                .await
            {
                Ok(updated) => current = updated,
                Err(StoreError::Transition(_)) => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(current)
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

/// Keys compare equal the way Flux would sign with them: surrounding whitespace aside.
fn same_key(a: &SecretBytes, b: &SecretBytes) -> bool {
    a.expose().trim_ascii() == b.expose().trim_ascii()
}

fn check_signature(key: &SecretBytes, signature: Option<&str>, body: &[u8]) -> Result<(), Refusal> {
    signature::verify(signature, key.expose(), body).map_err(|err| {
        let hint = match err {
            SignatureError::Mismatch => " for this key",
            _ => "",
        };
        Refusal::Unauthenticated(format!("{err}{hint}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FixedClock, MemoryCatalog, MemoryStore};

    fn spec() -> serde_json::Value {
        serde_json::json!({
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "app"},
            "environments": [
                {"name": "dev", "targets": [{"namespace": "dev"}]},
                {"name": "staging", "targets": [{"namespace": "staging"}]},
                {"name": "prod", "targets": [{"namespace": "prod"}],
                 "promotion": {"manual": true, "strategy": {"notification": {}}}}
            ],
            "promotion": {"strategy": {"notification": {}}}
        })
    }

    struct Fixture {
        store: Arc<MemoryStore>,
        catalog: Arc<MemoryCatalog>,
        clock: Arc<FixedClock>,
        wake: Arc<Notify>,
        intake: Intake,
    }

    impl Fixture {
        fn new(catalog: MemoryCatalog) -> Self {
            let store = Arc::new(MemoryStore::new());
            let catalog = Arc::new(catalog);
            let clock = Arc::new(FixedClock::default());
            let wake = Arc::new(Notify::new());
            let intake = Intake::new(
                catalog.clone(),
                catalog.clone(),
                store.clone(),
                clock.clone(),
                TimeWindow::default(),
                Arc::new(Metrics::new()),
                wake.clone(),
            );
            Self {
                store,
                catalog,
                clock,
                wake,
                intake,
            }
        }

        async fn pipeline(&self, name: &str) -> Arc<Pipeline> {
            self.catalog
                .pipeline(&PipelineRef::new("ns", name))
                .await
                .unwrap()
                .unwrap()
        }

        async fn propose(&self, source: &str, revision: &str) -> Result<Decision, Refusal> {
            let pipeline = self.pipeline("app").await;
            self.intake
                .propose(&pipeline, source, revision, trigger())
                .await
        }
    }

    fn fixture() -> Fixture {
        Fixture::new(MemoryCatalog::new().with_pipeline("ns", "app", spec()))
    }

    fn trigger() -> Trigger {
        Trigger {
            source: "webhook".into(),
            reason: "UpgradeSucceeded".into(),
            reporting_controller: "helm-controller".into(),
            object: "HelmRelease/dev/app".into(),
            cluster: String::new(),
            metadata: Default::default(),
        }
    }

    fn recorded(decision: Decision) -> PromotionRecord {
        match decision {
            Decision::Recorded(record) => record,
            other => panic!("expected a recorded promotion, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn propose_records_the_promotion_to_the_next_environment() {
        let f = fixture();
        let record = recorded(f.propose("dev", "1.0.0").await.unwrap());
        assert_eq!(record.pipeline, PipelineRef::new("ns", "app"));
        assert_eq!(
            (
                record.source_environment.as_str(),
                record.target_environment.as_str()
            ),
            ("dev", "staging")
        );
        assert_eq!(record.revision, "1.0.0");
        assert_eq!(record.phase, Phase::Pending);
        assert_eq!(record.trigger, trigger());
        assert_eq!(record.created_at, f.clock.now());
        assert_eq!(
            record.id,
            promotion_id(&PipelineRef::new("ns", "app"), "staging", "1.0.0")
        );
        assert_eq!(f.store.record(&record.id), Some(record));
        // The executor is told there is work.
        tokio::time::timeout(Duration::from_secs(1), f.wake.notified())
            .await
            .expect("executor not woken");

        // Into a manual environment, it waits for approval.
        let waiting = recorded(f.propose("staging", "1.0.0").await.unwrap());
        assert_eq!(waiting.target_environment, "prod");
        assert_eq!(waiting.phase, Phase::WaitingApproval);
    }

    #[tokio::test]
    async fn propose_refuses_what_cannot_be_promoted() {
        let mut hollow = spec();
        hollow["environments"][1]["targets"] = serde_json::json!([]);
        let f = Fixture::new(
            MemoryCatalog::new()
                .with_pipeline("ns", "app", spec())
                .with_pipeline_spec("ns", "hollow", serde_json::from_value(hollow).unwrap()),
        );
        assert_eq!(
            f.propose("qa", "1.0.0").await,
            Err(Refusal::UnknownEnvironment {
                pipeline: PipelineRef::new("ns", "app"),
                environment: "qa".into()
            })
        );
        assert_eq!(
            f.propose("prod", "1.0.0").await,
            Err(Refusal::LastEnvironment("prod".into()))
        );
        let hollow = f.pipeline("hollow").await;
        assert_eq!(
            f.intake.propose(&hollow, "dev", "1.0.0", trigger()).await,
            Err(Refusal::NoTargets("staging".into()))
        );
        for revision in [" 1.0.0", "1.0.0\u{85}", "1.0\n.0"] {
            let refusal = f.propose("dev", revision).await.unwrap_err();
            assert!(
                matches!(refusal, Refusal::InvalidRevision(_)),
                "{revision:?}: {refusal:?}"
            );
        }
        let too_long = "1".repeat(crate::event::MAX_REVISION_BYTES + 1);
        assert!(matches!(
            f.propose("dev", &too_long).await,
            Err(Refusal::InvalidRevision(_))
        ));
        // Nothing refused reached the store.
        assert_eq!(f.store.calls().create_if_absent, 0);
        assert!(f.store.records().is_empty());
    }

    #[tokio::test]
    async fn proposing_again_returns_the_record_already_there() {
        let f = fixture();
        let first = recorded(f.propose("dev", "1.0.0").await.unwrap());
        f.clock.advance(chrono::Duration::seconds(30));
        assert_eq!(
            f.propose("dev", "1.0.0").await,
            Ok(Decision::Duplicate(first.clone()))
        );
        assert_eq!(f.store.records(), [first]);
    }

    #[tokio::test]
    async fn a_waiting_promotion_supersedes_older_waiting_ones() {
        let f = fixture();
        let old = recorded(f.propose("staging", "1.0.0").await.unwrap());
        assert_eq!(old.phase, Phase::WaitingApproval);
        f.clock.advance(chrono::Duration::seconds(10));
        let new = recorded(f.propose("staging", "1.1.0").await.unwrap());
        assert_eq!(new.phase, Phase::WaitingApproval);
        let old = f.store.record(&old.id).unwrap();
        assert_eq!(old.phase, Phase::Superseded);
        assert!(
            old.message.contains("superseded by 1.1.0"),
            "{}",
            old.message
        );

        // An older revision arriving late is superseded at once by the newer one waiting.
        f.clock.advance(chrono::Duration::seconds(10));
        let late = recorded(f.propose("staging", "0.9.0").await.unwrap());
        assert_eq!(late.phase, Phase::Superseded);
        assert!(
            late.message.contains("superseded by 1.1.0"),
            "{}",
            late.message
        );
        assert_eq!(
            f.store.record(&new.id).unwrap().phase,
            Phase::WaitingApproval
        );
    }
}
