//! Client-side operations of the CLI in Kubernetes mode: approving, rejecting and
//! retrying promotions, and listing them, through the Kubernetes API with the caller's own credentials,
//! so Kubernetes RBAC decides who may.

use chrono::Utc;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use pipeline_core::{
    Phase, PipelineRef, PromotionFilter, PromotionRecord, PromotionStore, Verdict, promotion_id,
};
use pipeline_crds::{Promotion, RETRIED_BY_ANNOTATION, RETRY_ANNOTATION};

use crate::convert;
use crate::store::{KubePromotionStore, describe};

#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    #[error("no promotion of {revision:?} to {environment:?} recorded for pipeline {pipeline} (looked for Promotion {namespace}/{name})", namespace = pipeline.namespace)]
    NotFound {
        pipeline: PipelineRef,
        environment: String,
        revision: String,
        name: String,
    },
    #[error("promotion {name} is {phase}; cannot {action} it")]
    NotWaiting {
        name: String,
        phase: Phase,
        action: &'static str,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error("Kubernetes API: {0}")]
    Api(String),
}

fn api_error(err: kube::Error, verb: &str, namespace: &str) -> ApproveError {
    match &err {
        kube::Error::Api(status) if status.is_forbidden() => ApproveError::Forbidden(format!(
            "forbidden: you may not {verb} Promotions (pipelines.weave.works) in namespace {namespace:?}; ask for a binding to the pipeline-approver ClusterRole ({})",
            status.message
        )),
        _ => ApproveError::Api(describe(&err)),
    }
}

/// Who the API server says the caller is, if it will say.
async fn whoami(client: &Client) -> Option<String> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .ok()?;
    review.status?.user_info?.username
}

/// Records an approver's verdict on the Promotion of `revision` into `environment`, with
/// the caller's own credentials: `spec.approval` for an approval or a rejection, the
/// retry annotations for a retry. The leader applies it; the shipped admission policy
/// makes sure `by` is the caller's username. Returns the record as it stands.
pub async fn decide(
    client: Client,
    pipeline: &PipelineRef,
    environment: &str,
    revision: &str,
    verdict: &Verdict,
) -> Result<PromotionRecord, ApproveError> {
    let name = promotion_id(pipeline, environment, revision);
    let api: Api<Promotion> = Api::namespaced(client.clone(), &pipeline.namespace);
    let not_found = || ApproveError::NotFound {
        pipeline: pipeline.clone(),
        environment: environment.to_string(),
        revision: revision.to_string(),
        name: name.clone(),
    };
    let current = api
        .get_opt(&name)
        .await
        .map_err(|e| api_error(e, "get", &pipeline.namespace))?
        .ok_or_else(not_found)?;
    let record = convert::record_of(&current).ok_or_else(not_found)?;
    let wanted = match verdict {
        Verdict::Approve | Verdict::Reject { .. } => Phase::WaitingApproval,
        Verdict::Retry => Phase::Failed,
    };
    if record.phase != wanted {
        return Err(ApproveError::NotWaiting {
            name,
            phase: record.phase,
            action: verdict.action(),
        });
    }
    let by = whoami(&client).await;
    let now = Utc::now();
    let patch = match verdict {
        Verdict::Approve => serde_json::json!({
            "spec": {"approval": {"approved": true, "by": by, "at": now}}
        }),
        Verdict::Reject { reason } => serde_json::json!({
            "spec": {"approval": {"approved": false, "rejected": true, "reason": reason, "by": by, "at": now}}
        }),
        Verdict::Retry => serde_json::json!({
            "metadata": {"annotations": {
                RETRY_ANNOTATION: now.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                RETRIED_BY_ANNOTATION: by,
            }}
        }),
    };
    let patched = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, "patch", &pipeline.namespace))?;
    convert::record_of(&patched).ok_or_else(not_found)
}

/// The Promotion named `id`, from `namespace` or, without one, from any namespace.
pub async fn find_promotion(
    client: Client,
    namespace: Option<&str>,
    id: &str,
) -> Result<Option<PromotionRecord>, ApproveError> {
    let promotion = match namespace {
        Some(namespace) => Api::<Promotion>::namespaced(client, namespace)
            .get_opt(id)
            .await
            .map_err(|e| api_error(e, "get", namespace))?,
        None => {
            let params = kube::api::ListParams::default().fields(&format!("metadata.name={id}"));
            Api::<Promotion>::all(client)
                .list(&params)
                .await
                .map_err(|e| api_error(e, "list", "(all)"))?
                .items
                .into_iter()
                .next()
        }
    };
    Ok(promotion.as_ref().and_then(convert::record_of))
}

/// Promotions from the cluster, newest first.
pub async fn list_promotions(
    client: Client,
    filter: &PromotionFilter,
) -> Result<Vec<PromotionRecord>, String> {
    KubePromotionStore::new(client)
        .list(filter)
        .await
        .map_err(|e| e.to_string())
}
