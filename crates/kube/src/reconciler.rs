//! Leader-only housekeeping, driven by a watch on Promotions and the Pipeline cache:
//!
//! - decisions given through the Kubernetes API (`spec.approval.approved` or `.rejected`
//!   on a Promotion in `WaitingApproval`, the retry annotation on a `Failed` one) are
//!   applied through the core's `decide`, so an outdated approval is superseded;
//! - each Pipeline's `status.environments[env].waitingApproval.revision` names the
//!   revision waiting for approval in `env` (empty when none), as the Go original kept it;
//! - each Pipeline's `Ready` condition says whether its spec is valid, and why not.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use pipeline_core::PromotionStore;
use pipeline_core::{Phase, PromotionRecord, Refusal, StoreError, Verdict, decide};
use pipeline_crds::{
    Pipeline as PipelineObject, Promotion, RETRIED_BY_ANNOTATION, RETRY_ANNOTATION,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::convert;
use crate::sources::{KubePipelineSource, validate};
use crate::store::{KubePromotionStore, describe};

/// Checkpoint holding the retry request (annotation value) already taken.
const RETRY_CHECKPOINT: &str = "retry-request";

/// Full passes happen at least this often, watch events or not.
const RESYNC: Duration = Duration::from_secs(10);

pub struct Reconciler {
    client: Client,
    store: KubePromotionStore,
    pipelines: KubePipelineSource,
    wake: Arc<Notify>,
}

impl Reconciler {
    pub fn new(
        client: Client,
        store: KubePromotionStore,
        pipelines: KubePipelineSource,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            client,
            store,
            pipelines,
            wake,
        }
    }

    /// Runs until `stop` is cancelled (leadership lost or shutdown).
    pub async fn run(self, stop: CancellationToken) {
        let (promotions, writer) = reflector::store::<Promotion>();
        let changed = Arc::new(Notify::new());
        let signal = changed.clone();
        let stream = reflector::reflector(
            writer,
            watcher(
                Api::<Promotion>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects();
        let watch = async move {
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(_) => signal.notify_one(),
                    Err(err) => tracing::warn!(error = %err, "Promotion watch failed; retrying"),
                }
            }
        };
        let work = async {
            let _ = promotions.wait_until_ready().await;
            loop {
                self.pass(&promotions).await;
                tokio::select! {
                    () = changed.notified() => {
                        // Let a burst of changes settle into one pass.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    () = tokio::time::sleep(RESYNC) => {}
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = watch => {}
            () = work => {}
        }
    }

    async fn pass(&self, promotions: &Store<Promotion>) {
        let records: Vec<(Arc<Promotion>, PromotionRecord)> = promotions
            .state()
            .into_iter()
            .filter_map(|p| convert::record_of(&p).map(|r| (p, r)))
            .collect();
        let mut waiting: Vec<&PromotionRecord> = Vec::new();
        for (object, record) in &records {
            match record.phase {
                Phase::WaitingApproval => {
                    if !self.take_decision(object, record).await {
                        waiting.push(record);
                    }
                }
                Phase::Failed => self.take_retry_request(object, record).await,
                _ => {}
            }
        }
        for pipeline in self.pipelines.cache().state() {
            if let Err(err) = self.update_pipeline(&pipeline, &waiting).await {
                tracing::warn!(pipeline = %format!("{}/{}", pipeline.namespace().unwrap_or_default(), pipeline.name_any()), error = %describe(&err), "cannot update the Pipeline status");
            }
        }
    }

    /// Applies `spec.approval` of a waiting Promotion, if it holds a decision. Returns
    /// whether the promotion stopped waiting.
    async fn take_decision(&self, object: &Promotion, record: &PromotionRecord) -> bool {
        let Some(approval) = object
            .spec
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
    async fn take_retry_request(&self, object: &Promotion, record: &PromotionRecord) {
        let annotations = object.metadata.annotations.as_ref();
        let Some(request) = annotations
            .and_then(|a| a.get(RETRY_ANNOTATION))
            .filter(|v| !v.is_empty())
        else {
            return;
        };
        if record.checkpoints.get(RETRY_CHECKPOINT) == Some(request) {
            return;
        }
        let by = annotations
            .and_then(|a| a.get(RETRIED_BY_ANNOTATION))
            .cloned()
            .unwrap_or_else(|| "an unnamed Kubernetes user".to_string());
        let now = Utc::now();
        let change = |r: &mut PromotionRecord| {
            r.retry(&by, now)?;
            r.checkpoints
                .insert(RETRY_CHECKPOINT.to_string(), request.clone());
            Ok(())
        };
        match self.store.modify(&record.id, &change).await {
            Ok(_) => {
                tracing::info!(promotion = %record.id, by = %by, "failed promotion re-queued through the Kubernetes API");
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

        let (ready, reason, message) = match validate(pipeline) {
            Ok(_) => ("True", "Valid", "pipeline is valid".to_string()),
            Err(errors) => (
                "False",
                "InvalidSpec",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        let mut condition =
            convert::condition("Ready", ready, reason, &message, Utc::now(), generation);
        let previous = status.conditions.iter().find(|c| c.type_ == "Ready");
        if let Some(before) = previous
            && before.status == condition.status
        {
            condition.last_transition_time = before.last_transition_time.clone();
        }
        let conditions_unchanged = previous.is_some_and(|before| {
            before.status == condition.status
                && before.reason == condition.reason
                && before.message == condition.message
                && before.observed_generation == condition.observed_generation
        });

        let mut environments = BTreeMap::new();
        for env in &pipeline.spec.environments {
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
                environments.insert(
                    env.name.clone(),
                    serde_json::json!({"waitingApproval": {"revision": newest}}),
                );
            }
        }
        if conditions_unchanged
            && environments.is_empty()
            && status.observed_generation == generation
        {
            return Ok(());
        }
        let mut others: Vec<_> = status
            .conditions
            .iter()
            .filter(|c| c.type_ != "Ready")
            .cloned()
            .collect();
        others.insert(0, condition);
        let patch = serde_json::json!({
            "status": {
                "observedGeneration": generation,
                "conditions": others,
                "environments": environments,
            }
        });
        let api: Api<PipelineObject> = Api::namespaced(self.client.clone(), &namespace);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}
