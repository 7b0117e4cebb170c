//! Leader-only housekeeping, driven by a watch on Promotions and the Pipeline cache:
//!
//! - decisions given through the Kubernetes API (`spec.approval.approved` or `.rejected`
//!   on a Promotion in `WaitingApproval`, the retry annotation on a `Failed` one) are
//!   applied through the core's `decide`, so an outdated approval is superseded;
//! - each Pipeline's `status.environments[env].waitingApproval.revision` names the
//!   revision waiting for approval in `env` (empty when none), as the Go original kept it,
//!   and `status.environmentNames` lists the environments for `kubectl get`'s column;
//! - each Pipeline's kstatus conditions: `Ready` says whether its spec is valid and
//!   every Secret it names exists with the keys the controller reads from it (naming the
//!   Secret and key when not); `Stalled` is `True` while the spec is invalid (only an edit
//!   fixes it) and `Reconciling` while a Secret or key is missing (checked again on every
//!   pass and whenever a cached Secret changes). Both are removed when `False`, as
//!   kstatus recommends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use pipeline_core::deployment::{DeploymentView, TargetView, target_keys};
use pipeline_core::intake::HMAC_KEY;
use pipeline_core::pipeline::Promotion as PromotionSettings;
use pipeline_core::{Metrics, Pipeline, PromotionStore};
use pipeline_core::{Phase, PromotionRecord, Refusal, StoreError, Verdict, decide};
use pipeline_crds::{ClusterAppReference, Pipeline as PipelineObject, TargetStatus};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cache::{CachedPromotion, PromotionCache};
use crate::convert;
use crate::sources::{KubePipelineSource, KubeSecretSource, has_key, validate};
use crate::store::{KubePromotionStore, describe};

/// Checkpoint holding the retry request (annotation value) already taken.
const RETRY_CHECKPOINT: &str = "retry-request";

/// Full passes happen at least this often, watch events or not.
const RESYNC: Duration = Duration::from_secs(10);

/// Condition types of a Pipeline's status.
const READY: &str = "Ready";
const STALLED: &str = "Stalled";
const RECONCILING: &str = "Reconciling";

pub struct Reconciler {
    client: Client,
    store: KubePromotionStore,
    pipelines: KubePipelineSource,
    secrets: KubeSecretSource,
    wake: Arc<Notify>,
    /// The shared watch of Promotions (decisions people wrote into them).
    promotions: Arc<PromotionCache>,
    /// What the deployment watches see, for `status.environments.<env>.targets`.
    deployments: Option<(Arc<dyn DeploymentView>, tokio::sync::watch::Receiver<u64>)>,
    /// Where the phases decisions lead to are counted, as the webhook's are.
    metrics: Option<Arc<Metrics>>,
}

impl Reconciler {
    /// A reconciler with a Secret cache of its own; [`Reconciler::with_secrets`] shares
    /// the one the webhook uses instead, so each namespace's Secrets are watched once.
    pub fn new(
        client: Client,
        store: KubePromotionStore,
        pipelines: KubePipelineSource,
        promotions: Arc<PromotionCache>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            promotions,
            secrets: KubeSecretSource::new(client.clone()),
            client,
            store,
            pipelines,
            wake,
            deployments: None,
            metrics: None,
        }
    }

    /// Counts the phases that decisions and retry requests lead to in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count_phase(&self, phase: Phase) {
        if let Some(metrics) = &self.metrics {
            metrics.record_phase(phase);
        }
    }

    /// Writes each target's observed state into the Pipeline's status, and passes again
    /// whenever `changes` says the view changed.
    pub fn with_deployments(
        mut self,
        view: Arc<dyn DeploymentView>,
        changes: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        self.deployments = Some((view, changes));
        self
    }

    /// Reads Secrets through `secrets` (whose caches it also prunes).
    pub fn with_secrets(mut self, secrets: KubeSecretSource) -> Self {
        self.secrets = secrets;
        self
    }

    /// Runs until `stop` is cancelled (leadership lost or shutdown).
    pub async fn run(self, stop: CancellationToken) {
        let changed = self.promotions.changed();
        let pipelines_changed = self.pipelines.changed();
        let secrets_changed = self.secrets.changed();
        let mut deployments_changed = self.deployments.as_ref().map(|(_, rx)| rx.clone());
        let work = async {
            while !self.promotions.wait_synced(Duration::from_secs(5)).await {
                tracing::debug!("waiting for the Promotion cache to list");
            }
            loop {
                self.pass().await;
                let deployments = async {
                    match deployments_changed.as_mut() {
                        Some(rx) => {
                            if rx.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = changed.notified() => {}
                    () = pipelines_changed.notified() => {}
                    () = secrets_changed.notified() => {}
                    () = deployments => {}
                    () = tokio::time::sleep(RESYNC) => continue,
                }
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = work => {}
        }
    }

    async fn pass(&self) {
        // Only these can hold a decision to take; a pass runs after every change, so it
        // must not copy the finished history.
        let promotions = self
            .promotions
            .entries(|p| matches!(p.record.phase, Phase::WaitingApproval | Phase::Failed));
        let mut waiting: Vec<&PromotionRecord> = Vec::new();
        for promotion in &promotions {
            match promotion.record.phase {
                Phase::WaitingApproval => {
                    let decided = self.take_decision(promotion).await;
                    if !decided {
                        waiting.push(&promotion.record);
                    }
                }
                Phase::Failed => self.take_retry_request(promotion).await,
                _ => {}
            }
        }
        self.secrets.prune(&self.pipelines.secret_namespaces());
        for pipeline in self.pipelines.cache().state() {
            if let Err(err) = self.update_pipeline(&pipeline, &waiting).await {
                tracing::warn!(pipeline = %crate::sources::reference_of(&pipeline), error = %describe(&err), "cannot update the Pipeline status");
            }
        }
    }

    /// Applies `spec.approval` of a waiting Promotion, if it holds a decision. Returns
    /// whether the promotion stopped waiting.
    async fn take_decision(&self, promotion: &CachedPromotion) -> bool {
        let record = &promotion.record;
        let Some(approval) = promotion
            .approval
            .as_ref()
            .filter(|a| a.approved || a.rejected)
        else {
            return false;
        };
        let by = approval
            .by
            .clone()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "an unnamed Kubernetes user".to_string());
        let verdict = if approval.rejected {
            Verdict::Reject {
                reason: approval.reason.clone().unwrap_or_default(),
            }
        } else {
            Verdict::Approve
        };
        match decide(
            &self.store,
            &record.pipeline,
            &record.target_environment,
            &record.revision,
            &verdict,
            &by,
            Utc::now(),
        )
        .await
        {
            Ok(decided) => {
                tracing::info!(promotion = %record.id, by = %by, action = verdict.action(), phase = %decided.phase, "promotion decided through the Kubernetes API");
                self.count_phase(decided.phase);
                if decided.phase == Phase::Pending {
                    self.wake.notify_one();
                }
                true
            }
            Err(Refusal::Superseded(message)) => {
                tracing::info!(promotion = %record.id, by = %by, %message, "approval refused: superseded");
                true
            }
            Err(Refusal::NotWaitingApproval(_)) => true,
            Err(err) => {
                tracing::warn!(promotion = %record.id, error = %err, "cannot record a decision");
                false
            }
        }
    }

    /// Re-queues a `Failed` Promotion whose retry annotation holds a request not taken
    /// yet; the request's value is kept in the record so it is taken once.
    async fn take_retry_request(&self, promotion: &CachedPromotion) {
        let record = &promotion.record;
        let Some((request, requested_by)) = &promotion.retry_request else {
            return;
        };
        if record.checkpoints.get(RETRY_CHECKPOINT) == Some(request) {
            return;
        }
        let by = requested_by
            .clone()
            .unwrap_or_else(|| "an unnamed Kubernetes user".to_string());
        let now = Utc::now();
        let change = |r: &mut PromotionRecord| {
            r.retry(&by, now)?;
            r.checkpoints
                .insert(RETRY_CHECKPOINT.to_string(), request.clone());
            Ok(())
        };
        match self.store.modify(&record.id, &change).await {
            Ok(requeued) => {
                tracing::info!(promotion = %record.id, by = %by, "failed promotion re-queued through the Kubernetes API");
                self.count_phase(requeued.phase);
                self.wake.notify_one();
            }
            Err(StoreError::Transition(_)) => {}
            Err(err) => {
                tracing::warn!(promotion = %record.id, error = %err, "cannot re-queue a failed promotion");
            }
        }
    }

    async fn update_pipeline(
        &self,
        pipeline: &PipelineObject,
        waiting: &[&PromotionRecord],
    ) -> Result<(), kube::Error> {
        let namespace = pipeline.namespace().unwrap_or_default();
        let name = pipeline.name_any();
        let status = pipeline.status.clone().unwrap_or_default();
        let generation = pipeline.metadata.generation;

        let validated = validate(pipeline);
        let health = match &validated {
            Ok(model) => match self.secret_problems(model).await {
                Ok(problems) => Some(Health::of_secrets(&problems)),
                Err(err) => {
                    // Cannot tell: keep what the conditions say until the API answers.
                    tracing::warn!(pipeline = %model.reference, error = %err.0, "cannot check the Pipeline's Secrets");
                    None
                }
            },
            Err(errors) => Some(Health::InvalidSpec(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        };
        let conditions = match &health {
            Some(health) => health.conditions(&status.conditions, Utc::now(), generation),
            None => status.conditions.clone(),
        };
        let conditions_unchanged = same_conditions(&conditions, &status.conditions);

        let model = validated.ok();
        let mut environments = BTreeMap::new();
        for (index, env) in pipeline.spec.environments.iter().enumerate() {
            // What the watches see of each target (absent without watches).
            let targets = match (&self.deployments, &model) {
                (Some((view, _)), Some(model)) => Some(target_statuses(
                    model,
                    index,
                    view.as_ref(),
                    &pipeline.spec.app_ref.api_version,
                    &env.targets,
                )),
                _ => None,
            };
            let current_targets = status
                .environments
                .get(&env.name)
                .map(|e| e.targets.clone())
                .unwrap_or_default();
            if let Some(targets) = &targets
                && *targets != current_targets
            {
                let entry = environments
                    .entry(env.name.clone())
                    .or_insert_with(|| serde_json::json!({}));
                entry["targets"] = serde_json::to_value(targets).unwrap_or_default();
            }
            let newest = waiting
                .iter()
                .filter(|r| {
                    r.pipeline.namespace == namespace
                        && r.pipeline.name == name
                        && r.target_environment == env.name
                })
                .max_by_key(|r| r.created_at)
                .map(|r| r.revision.clone())
                .unwrap_or_default();
            let current = status
                .environments
                .get(&env.name)
                .map(|e| e.waiting_approval.revision.clone())
                .unwrap_or_default();
            if newest != current || !status.environments.contains_key(&env.name) {
                let entry = environments
                    .entry(env.name.clone())
                    .or_insert_with(|| serde_json::json!({}));
                entry["waitingApproval"] = serde_json::json!({"revision": newest});
            }
        }
        let environment_names = pipeline
            .spec
            .environments
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let generation_unchanged = health.is_none() || status.observed_generation == generation;
        if conditions_unchanged
            && environments.is_empty()
            && generation_unchanged
            && status.environment_names == environment_names
        {
            return Ok(());
        }
        let mut patch = serde_json::json!({
            "status": {
                "conditions": conditions,
                "environments": environments,
                "environmentNames": environment_names,
            }
        });
        if health.is_some() {
            patch["status"]["observedGeneration"] = serde_json::json!(generation);
        }
        let api: Api<PipelineObject> = Api::namespaced(self.client.clone(), &namespace);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// What is wrong with the Secrets a valid Pipeline names, read from the Secret cache
    /// (no request per pass once the namespace's cache is ready).
    async fn secret_problems(
        &self,
        pipeline: &Pipeline,
    ) -> Result<Vec<SecretProblem>, pipeline_core::Unavailable> {
        let namespace = &pipeline.reference.namespace;
        let mut problems = Vec::new();
        for need in secret_needs(pipeline) {
            match self.secrets.cached_secret(namespace, &need.secret).await? {
                None => problems.push(SecretProblem {
                    missing_key: None,
                    message: format!(
                        "Secret {namespace}/{} not found ({})",
                        need.secret,
                        need.fields.join(", ")
                    ),
                }),
                Some(secret) => {
                    for (key, purpose, field) in &need.keys {
                        if !has_key(&secret, key) {
                            problems.push(SecretProblem {
                                missing_key: Some(key),
                                message: format!(
                                    "Secret {namespace}/{} has no {key:?} key, or it is empty ({field}: {purpose})",
                                    need.secret
                                ),
                            });
                        }
                    }
                }
            }
        }
        Ok(problems)
    }
}

/// A Secret a Pipeline names, the fields naming it and the keys read from it.
struct SecretNeed {
    secret: String,
    fields: Vec<String>,
    /// (key, what it is for, the field that asks for it)
    keys: Vec<(&'static str, &'static str, String)>,
}

struct SecretProblem {
    /// `None`: the Secret itself is missing.
    missing_key: Option<&'static str>,
    message: String,
}

/// Every Secret the controller reads for `pipeline`, in field order:
///
/// - `spec.promotion.strategy.secretRef`: key `hmac-key`, which authenticates the
///   webhook's events and signs notifications;
/// - an environment's `promotion.strategy.secretRef`: the Secret (its `approval-key` is
///   read only when signed HTTP approvals are enabled, so no key is required);
/// - every `pull-request.secretRef`: key `token` for the forge's API, and `identity` and
///   `known_hosts` for an SSH repository URL (the pull-request strategy fails without
///   them; `username`/`password` are optional, the token stands in).
fn secret_needs(pipeline: &Pipeline) -> Vec<SecretNeed> {
    let mut needs = SecretNeeds::default();
    if let Some(promotion) = &pipeline.spec.promotion {
        if let Some(secret) = promotion.strategy.secret_ref.as_ref() {
            needs.add(
                &secret.name,
                "spec.promotion.strategy.secretRef",
                &[(HMAC_KEY, "the webhook's HMAC key")],
            );
        }
        needs.pull_request(promotion, "spec.promotion");
    }
    for (i, env) in pipeline.spec.environments.iter().enumerate() {
        let Some(promotion) = &env.promotion else {
            continue;
        };
        let field = format!("spec.environments[{i}].promotion");
        if let Some(secret) = promotion.strategy.secret_ref.as_ref() {
            needs.add(&secret.name, &format!("{field}.strategy.secretRef"), &[]);
        }
        needs.pull_request(promotion, &field);
    }
    needs.0
}

#[derive(Default)]
struct SecretNeeds(Vec<SecretNeed>);

impl SecretNeeds {
    fn add(&mut self, secret: &str, field: &str, keys: &[(&'static str, &'static str)]) {
        let index = match self.0.iter().position(|n| n.secret == secret) {
            Some(index) => index,
            None => {
                self.0.push(SecretNeed {
                    secret: secret.to_string(),
                    fields: Vec::new(),
                    keys: Vec::new(),
                });
                self.0.len() - 1
            }
        };
        let need = &mut self.0[index];
        for (key, purpose) in keys {
            if !need.keys.iter().any(|(k, _, _)| k == key) {
                need.keys.push((key, purpose, field.to_string()));
            }
        }
        if !need.fields.iter().any(|f| f == field) {
            need.fields.push(field.to_string());
        }
    }

    fn pull_request(&mut self, promotion: &PromotionSettings, field: &str) {
        let Some(pr) = &promotion.strategy.pull_request else {
            return;
        };
        let mut keys = vec![(TOKEN_KEY, "the forge API token")];
        if is_ssh_url(&pr.url) {
            keys.push(("identity", "the SSH private key for the repository"));
            keys.push(("known_hosts", "the SSH host keys of the repository's host"));
        }
        self.add(
            &pr.secret_ref.name,
            &format!("{field}.strategy.pull-request.secretRef"),
            &keys,
        );
    }
}

/// The key of a pull-request Secret holding the forge API token.
const TOKEN_KEY: &str = "token";

/// SSH repository URLs (`ssh://…`, or scp-like `user@host:path` without a scheme), as the
/// pull-request strategy tells them apart.
fn is_ssh_url(url: &str) -> bool {
    let url = url.trim();
    match url.split_once("://") {
        Some((scheme, _)) => scheme.eq_ignore_ascii_case("ssh"),
        None => true,
    }
}

/// A Pipeline's state, as its conditions say it.
enum Health {
    Ready,
    /// The spec does not validate; the message lists every problem.
    InvalidSpec(String),
    /// A Secret (or a key in one) is missing.
    MissingSecret {
        reason: &'static str,
        message: String,
    },
}

impl Health {
    fn of_secrets(problems: &[SecretProblem]) -> Self {
        if problems.is_empty() {
            return Health::Ready;
        }
        let reason = if problems.iter().any(|p| p.missing_key.is_none()) {
            "SecretNotFound"
        } else {
            "SecretKeyNotFound"
        };
        Health::MissingSecret {
            reason,
            message: problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// The conditions for this state, keeping each unchanged condition's transition time
    /// and any condition of another type.
    fn conditions(
        &self,
        previous: &[Condition],
        now: DateTime<Utc>,
        generation: Option<i64>,
    ) -> Vec<Condition> {
        let wanted: Vec<(&str, &str, &str, &str)> = match self {
            Health::Ready => vec![(
                READY,
                "True",
                "Ready",
                "pipeline is valid and its Secrets hold their keys",
            )],
            Health::InvalidSpec(message) => vec![
                (READY, "False", "InvalidSpec", message.as_str()),
                (STALLED, "True", "InvalidSpec", message.as_str()),
            ],
            Health::MissingSecret { reason, message } => vec![
                (READY, "False", reason, message.as_str()),
                (RECONCILING, "True", reason, message.as_str()),
            ],
        };
        let mut conditions: Vec<Condition> = wanted
            .into_iter()
            .map(|(type_, status, reason, message)| {
                let mut condition =
                    convert::condition(type_, status, reason, message, now, generation);
                if let Some(before) = previous.iter().find(|c| c.type_ == type_)
                    && before.status == condition.status
                {
                    condition.last_transition_time = before.last_transition_time.clone();
                }
                condition
            })
            .collect();
        conditions.extend(
            previous
                .iter()
                .filter(|c| ![READY, STALLED, RECONCILING].contains(&c.type_.as_str()))
                .cloned(),
        );
        conditions
    }
}

/// Equal but for the order of types.
fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().all(|x| {
            b.iter().any(|y| {
                x.type_ == y.type_
                    && x.status == y.status
                    && x.reason == y.reason
                    && x.message == y.message
                    && x.observed_generation == y.observed_generation
                    && x.last_transition_time == y.last_transition_time
            })
        })
}

/// `status.environments.<env>.targets` as the Go original wrote it, from what the watches
/// see: `ready` when the app object is Ready and current, its revision, and why not.
fn target_statuses(
    model: &Pipeline,
    index: usize,
    view: &dyn DeploymentView,
    api_version: &str,
    targets: &[pipeline_core::pipeline::Target],
) -> Vec<TargetStatus> {
    target_keys(model, index)
        .into_iter()
        .zip(targets)
        .map(|(key, target)| {
            let seen = view.target(&key);
            let (ready, revision, error) = match &seen {
                TargetView::Seen(state) => (
                    state.deployed().is_some(),
                    state.revision.clone().unwrap_or_default(),
                    if state.deployed().is_some() {
                        String::new()
                    } else if !state.current {
                        "status not yet updated for the latest spec".to_string()
                    } else {
                        format!("not Ready: {}", state.message)
                    },
                ),
                TargetView::Connecting => (false, String::new(), "watch starting".to_string()),
                TargetView::Unreachable(why) => {
                    (false, String::new(), format!("unreachable: {why}"))
                }
                TargetView::Missing => (false, String::new(), "no such object".to_string()),
                TargetView::NotWatched(why) => {
                    (false, String::new(), format!("not watched: {why}"))
                }
            };
            TargetStatus {
                cluster_app_ref: ClusterAppReference {
                    api_version: api_version.to_string(),
                    kind: key.kind.as_str().to_string(),
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    cluster_ref: target.cluster_ref.clone(),
                },
                ready,
                revision,
                error,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use pipeline_core::PipelineRef;
    use pipeline_core::pipeline::parse_pipeline_spec;

    #[test]
    fn ssh_urls_as_the_pull_request_strategy_tells_them() {
        for ssh in [
            "ssh://git@host/o/r.git",
            "SSH://git@host:2222/o/r",
            "git@host:o/r.git",
        ] {
            assert!(is_ssh_url(ssh), "{ssh}");
        }
        for https in ["https://host/o/r", "http://host:3000/o/r.git"] {
            assert!(!is_ssh_url(https), "{https}");
        }
    }

    #[test]
    fn one_need_per_secret_with_every_field_and_key() {
        let spec = parse_pipeline_spec(serde_json::json!({
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "app"},
            "environments": [
                {"name": "dev", "targets": [{"namespace": "dev"}]},
                {"name": "prod", "targets": [{"namespace": "prod"}],
                 "promotion": {"strategy": {"secretRef": {"name": "shared"}, "pull-request": {
                     "type": "github", "url": "git@github.com:o/r.git", "baseBranch": "main", "secretRef": {"name": "shared"}}}}}
            ],
            "promotion": {"strategy": {"secretRef": {"name": "shared"}, "notification": {}}}
        }))
        .unwrap();
        let pipeline = Pipeline {
            reference: PipelineRef::new("ns", "p"),
            spec,
        };
        let needs = secret_needs(&pipeline);
        assert_eq!(needs.len(), 1);
        assert_eq!(needs[0].secret, "shared");
        assert_eq!(
            needs[0].fields,
            [
                "spec.promotion.strategy.secretRef",
                "spec.environments[1].promotion.strategy.secretRef",
                "spec.environments[1].promotion.strategy.pull-request.secretRef",
            ]
        );
        let keys: Vec<&str> = needs[0].keys.iter().map(|(k, _, _)| *k).collect();
        assert_eq!(keys, ["hmac-key", "token", "identity", "known_hosts"]);
    }

    #[test]
    fn conditions_keep_transition_times_and_drop_false_abnormal_ones() {
        let then = Utc::now() - chrono::Duration::hours(1);
        let now = Utc::now();
        let missing = Health::MissingSecret {
            reason: "SecretNotFound",
            message: "Secret ns/s not found (spec.promotion.strategy.secretRef)".into(),
        };
        let other = convert::condition("Custom", "True", "Mine", "kept", then, Some(1));
        let first = missing.conditions(std::slice::from_ref(&other), then, Some(1));
        let types: Vec<&str> = first.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Reconciling", "Custom"]);
        // The same state later: the same conditions, so no write.
        let again = missing.conditions(&first, now, Some(1));
        assert!(same_conditions(&again, &first));
        // Fixed: Reconciling goes, Ready turns True at a new transition time.
        let ready = Health::Ready.conditions(&again, now, Some(1));
        let types: Vec<&str> = ready.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Custom"]);
        assert_ne!(ready[0].last_transition_time, first[0].last_transition_time);
        // Invalid: Stalled.
        let invalid =
            Health::InvalidSpec("spec.environments: x".into()).conditions(&ready, now, Some(2));
        let stalled = invalid.iter().find(|c| c.type_ == "Stalled").unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert_eq!(stalled.observed_generation, Some(2));
    }
}
