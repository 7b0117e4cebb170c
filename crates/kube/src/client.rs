//! Client-side operations of the CLI in Kubernetes mode: approving a waiting promotion
//! and listing promotions, through the Kubernetes API with the caller's own credentials,
//! so Kubernetes RBAC decides who may.

use chrono::Utc;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use pipeline_core::{
    Phase, PipelineRef, PromotionFilter, PromotionRecord, PromotionStore, promotion_id,
};
use pipeline_crds::Promotion;

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
    #[error("promotion {name} is {phase}, not waiting for approval")]
    NotWaiting { name: String, phase: Phase },
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

/// Approves the promotion of `revision` waiting in `environment` by setting
/// `spec.approval` on its Promotion; the leader moves it on. Returns the Promotion's name.
pub async fn approve(
    client: Client,
    pipeline: &PipelineRef,
    environment: &str,
    revision: &str,
) -> Result<PromotionRecord, ApproveError> {
    let name = promotion_id(pipeline, environment, revision);
    let api: Api<Promotion> = Api::namespaced(client.clone(), &pipeline.namespace);
    let current = api
        .get_opt(&name)
        .await
        .map_err(|e| api_error(e, "get", &pipeline.namespace))?
        .ok_or_else(|| ApproveError::NotFound {
            pipeline: pipeline.clone(),
            environment: environment.to_string(),
            revision: revision.to_string(),
            name: name.clone(),
        })?;
    let record = convert::record_of(&current).ok_or_else(|| ApproveError::NotFound {
        pipeline: pipeline.clone(),
        environment: environment.to_string(),
        revision: revision.to_string(),
        name: name.clone(),
    })?;
    if record.phase != Phase::WaitingApproval {
        return Err(ApproveError::NotWaiting {
            name,
            phase: record.phase,
        });
    }
    let by = whoami(&client).await;
    let patch = serde_json::json!({
        "spec": {"approval": {"approved": true, "by": by, "at": Utc::now()}}
    });
    let patched = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, "patch", &pipeline.namespace))?;
    convert::record_of(&patched).ok_or(ApproveError::NotWaiting {
        name,
        phase: record.phase,
    })
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
