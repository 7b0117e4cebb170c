//! Kubernetes custom resources. `Pipeline` keeps the Go original's
//! `pipelines.weave.works/v1alpha1` shape so existing manifests apply unchanged;
//! `Promotion` is new and holds one promotion record.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use pipeline_core::pipeline::{
    CrossNamespaceClusterReference, Environment, LocalAppReference, Promotion as PromotionSettings,
};
use pipeline_core::promotion::{Phase, PhaseChange, Trigger};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pipeline: an app promoted through ordered environments.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pipelines.weave.works",
    version = "v1alpha1",
    kind = "Pipeline",
    namespaced,
    status = "PipelineStatus",
    printcolumn = r#"{"name":"App","type":"string","jsonPath":".spec.appRef.name"}"#,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.appRef.kind","priority":1}"#,
    printcolumn = r#"{"name":"Environments","type":"string","jsonPath":".spec.environments[*].name"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PipelineSpec {
    pub app_ref: LocalAppReference,
    #[serde(default)]
    pub environments: Vec<Environment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionSettings>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per environment, as in the Go original (`waitingApproval.revision`).
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatus {
    #[serde(default)]
    pub waiting_approval: WaitingApproval,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
}

/// Kept from the Go original's status so its objects round-trip.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    pub cluster_app_ref: ClusterAppReference,
    #[serde(default)]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAppReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ref: Option<CrossNamespaceClusterReference>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct WaitingApproval {
    #[serde(default)]
    pub revision: String,
}

/// One promotion of a revision into an environment. Its name is the record id, so any
/// number of deliveries or replicas converge on one object.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pipelines.weave.works",
    version = "v1alpha1",
    kind = "Promotion",
    namespaced,
    status = "PromotionStatus",
    printcolumn = r#"{"name":"Pipeline","type":"string","jsonPath":".spec.pipeline.name"}"#,
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".spec.sourceEnvironment"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.targetEnvironment"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attempts","priority":1}"#,
    printcolumn = r#"{"name":"Result","type":"string","jsonPath":".status.result","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("!has(oldSelf.spec) || (self.spec.pipeline == oldSelf.spec.pipeline && self.spec.sourceEnvironment == oldSelf.spec.sourceEnvironment && self.spec.targetEnvironment == oldSelf.spec.targetEnvironment && self.spec.revision == oldSelf.spec.revision && self.spec.manual == oldSelf.spec.manual && self.spec.recordedAt == oldSelf.spec.recordedAt && self.spec.trigger == oldSelf.spec.trigger)").message("a Promotion's spec is immutable, except spec.approval")
)]
#[serde(rename_all = "camelCase")]
pub struct PromotionSpec {
    pub pipeline: PipelineReference,
    pub source_environment: String,
    pub target_environment: String,
    pub revision: String,
    /// Promotions into this environment need an approval before they run.
    #[serde(default)]
    pub manual: bool,
    #[serde(default)]
    pub trigger: Trigger,
    /// When the promotion was recorded, with sub-second precision (metadata timestamps
    /// have whole seconds only).
    pub recorded_at: DateTime<Utc>,
    /// Set by an approver (`pipeline-controller approve`, or any client allowed to
    /// `patch` Promotions) to let a promotion waiting in `WaitingApproval` run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

/// An approval of a manual promotion, given through the Kubernetes API so that
/// Kubernetes RBAC decides who may approve.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// Let the promotion run.
    #[serde(default)]
    pub approved: bool,
    /// Refuse the promotion for good (wins over `approved`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rejected: bool,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who decided: the approver's Kubernetes username. The admission policy shipped with
    /// the controller refuses any other value, so it can be trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// Annotation asking the controller to re-queue a `Failed` Promotion; any new value is a
/// new request. [`RETRIED_BY_ANNOTATION`] names who asks.
pub const RETRY_ANNOTATION: &str = "pipelines.weave.works/retry";
/// Who asked for the retry: the requester's Kubernetes username (checked by the shipped
/// admission policy).
pub const RETRIED_BY_ANNOTATION: &str = "pipelines.weave.works/retried-by";

/// The pipeline a Promotion belongs to; it lives in the Promotion's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PipelineReference {
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromotionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus-style conditions: `Ready`, `Reconciling`, `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<PhaseChange>,
    /// What strategies already did in earlier attempts, so retries do not repeat it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checkpoints: BTreeMap<String, String>,
    /// Who approved, rejected or retried it last, as the controller verified it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

/// Every CRD this controller owns.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Pipeline::crd(), Promotion::crd()]
}

/// The CRDs as one multi-document YAML stream, as committed under `deploy/crds/`.
pub fn crds_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_types() {
        let generated = crds_yaml().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crds/crds.yaml");
        if std::env::var_os("UPDATE_CRDS").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "deploy/crds/crds.yaml is out of date: run `UPDATE_CRDS=1 cargo test -p pipeline-crds` (or `pipeline-controller crds > deploy/crds/crds.yaml`)"
        );
    }

    #[test]
    fn go_original_manifest_decodes() {
        let manifest = serde_json::json!({
            "apiVersion": "pipelines.weave.works/v1alpha1",
            "kind": "Pipeline",
            "metadata": {"name": "podinfo-02", "namespace": "flux-system"},
            "spec": {
                "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2beta1", "kind": "HelmRelease", "name": "podinfo"},
                "environments": [
                    {"name": "dev", "targets": [{"namespace": "podinfo-02-dev", "clusterRef": {"kind": "GitopsCluster", "name": "dev", "namespace": "flux-system"}}]},
                    {"name": "prod", "targets": [{"namespace": "podinfo-02-prod"}]}
                ],
                "promotion": {"manual": true, "strategy": {"secretRef": {"name": "hmac"}, "notification": {}}}
            },
            "status": {"environments": {"prod": {"waitingApproval": {"revision": "1.2.3"}}}}
        });
        let pipeline: Pipeline = serde_json::from_value(manifest.clone()).unwrap();
        assert_eq!(pipeline.spec.environments.len(), 2);
        let back = serde_json::to_value(&pipeline).unwrap();
        assert_eq!(back["spec"], manifest["spec"]);
        assert_eq!(
            back["status"]["environments"],
            manifest["status"]["environments"]
        );
    }
}
