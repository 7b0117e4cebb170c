//! Kubernetes custom resources. `Pipeline` keeps the Go original's
//! `pipelines.weave.works/v1alpha1` shape so existing manifests apply unchanged;
//! `Promotion` is new and holds one promotion record.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use pipeline_core::pipeline::schema::Required;
use pipeline_core::pipeline::{
    CrossNamespaceClusterReference, Environment, LocalAppReference, Promotion as PromotionSettings,
};
use pipeline_core::promotion::{Phase, PhaseChange, Trigger};
use schemars::transform::Transform;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

/// Short names `kubectl` accepts for Pipelines and Promotions (`kubectl get pl,promo`).
pub const PIPELINE_SHORT_NAME: &str = "pl";
pub const PROMOTION_SHORT_NAME: &str = "promo";
/// The category both kinds are in: `kubectl get pipeline-controller` lists both. Not
/// `pipelines`, which `kubectl` would expand before the resource of that name (so
/// `kubectl delete pipelines --all` would delete Promotions too), and not `all`.
pub const CATEGORY: &str = "pipeline-controller";

/// The spec of a Pipeline: an app promoted through ordered environments.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pipelines.weave.works",
    version = "v1alpha1",
    kind = "Pipeline",
    namespaced,
    status = "PipelineStatus",
    doc = "A Pipeline promotes an app (a Flux HelmRelease or Kustomization) through ordered environments: when the app is deployed in one environment, the controller promotes that revision into the next one, by notification or pull request, after an approval if the environment is manual. The shape of the archived Go pipeline-controller's Pipeline, whose manifests apply unchanged.",
    shortname = "pl",
    category = "pipeline-controller",
    printcolumn = r#"{"name":"App","type":"string","jsonPath":".spec.appRef.name","description":"The app promoted (spec.appRef.name)."}"#,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.appRef.kind","priority":1,"description":"Kind of the app (spec.appRef.kind)."}"#,
    printcolumn = r#"{"name":"Environments","type":"string","jsonPath":".status.environmentNames","description":"The environments, in promotion order."}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether the spec is valid and every Secret it names holds its keys."}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","description":"Why the Pipeline is (not) ready."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = Required(&["appRef", "environments"]))]
pub struct PipelineSpec {
    /// The app promoted: a Flux HelmRelease or Kustomization that has this name in every
    /// environment. Webhook events must name it as their `involvedObject`.
    pub app_ref: LocalAppReference,
    /// The environments, in promotion order: a deployment in `environments[i]` is
    /// promoted to `environments[i+1]`. At least one.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub environments: Vec<Environment>,
    /// How promotions are made into every environment without a `promotion` of its own.
    /// Its `strategy.secretRef` names the Secret whose `hmac-key` authenticates the
    /// webhook's events: without it every event for the pipeline is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionSettings>,
}

/// What the controller observed of a Pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions. `Ready`: the spec is valid and every Secret it names exists
    /// with its keys (`False` names what is wrong). `Stalled`: the spec is invalid; only
    /// an edit fixes it. `Reconciling`: the controller waits for something outside the
    /// Pipeline (a missing Secret or key) and checks again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per environment, as in the Go original (`waitingApproval.revision`).
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentStatus>,
    /// The environments' names in promotion order, comma-separated: the `Environments`
    /// column of `kubectl get pipelines` (a column shows only the first value of a list,
    /// so `.spec.environments[*].name` would show the first environment only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub environment_names: String,
}

/// What the controller observed of one environment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatus {
    /// The promotion into this environment that waits for an approval, if any.
    #[serde(default)]
    pub waiting_approval: WaitingApproval,
    /// What the controller's watches see of each target's app object (as the Go original
    /// wrote it): Ready and current, its revision, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
}

/// One target's app object, as the controller's watch last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// The app object of the target, and its cluster.
    pub cluster_app_ref: ClusterAppReference,
    /// The app object exists and is ready.
    #[serde(default)]
    pub ready: bool,
    /// The revision the app object last applied.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    /// Why the app object is missing or not ready.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// An app object on a cluster (Go original's status).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAppReference {
    /// API version of the app object.
    #[serde(default)]
    pub api_version: String,
    /// Kind of the app object.
    #[serde(default)]
    pub kind: String,
    /// Name of the app object.
    #[serde(default)]
    pub name: String,
    /// Namespace of the app object (the target's namespace).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The cluster of the app object; absent for the Pipeline's own cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ref: Option<CrossNamespaceClusterReference>,
}

/// The revision waiting for approval in an environment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct WaitingApproval {
    /// The newest revision waiting for an approval to be promoted into the environment;
    /// empty when none waits.
    #[serde(default)]
    pub revision: String,
}

/// The spec of a Promotion: one promotion of a revision into an environment. Its name is
/// the record id, so any number of deliveries or replicas converge on one object.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pipelines.weave.works",
    version = "v1alpha1",
    kind = "Promotion",
    namespaced,
    status = "PromotionStatus",
    doc = "A Promotion records one promotion of a revision of a Pipeline's app into one of its environments, from the deployment that caused it to its outcome. Created and run by the controller (Kubernetes mode); approvers set spec.approval. Its spec is immutable except spec.approval.",
    shortname = "promo",
    category = "pipeline-controller",
    printcolumn = r#"{"name":"Pipeline","type":"string","jsonPath":".spec.pipeline.name","description":"The Pipeline, in the Promotion's namespace."}"#,
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".spec.sourceEnvironment","description":"The environment that deployed the revision."}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.targetEnvironment","description":"The environment promoted into."}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".spec.revision","description":"The revision promoted."}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Where the promotion is."}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attempts","priority":1,"description":"Attempts started so far."}"#,
    printcolumn = r#"{"name":"Result","type":"string","jsonPath":".status.result","priority":1,"description":"What the promotion produced, e.g. the pull request URL."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("!has(oldSelf.spec) || (self.spec.pipeline == oldSelf.spec.pipeline && self.spec.sourceEnvironment == oldSelf.spec.sourceEnvironment && self.spec.targetEnvironment == oldSelf.spec.targetEnvironment && self.spec.revision == oldSelf.spec.revision && self.spec.manual == oldSelf.spec.manual && self.spec.recordedAt == oldSelf.spec.recordedAt && self.spec.trigger == oldSelf.spec.trigger)").message("a Promotion's spec is immutable, except spec.approval")
)]
#[serde(rename_all = "camelCase")]
pub struct PromotionSpec {
    /// The Pipeline whose app is promoted.
    pub pipeline: PipelineReference,
    /// The environment that deployed the revision (the webhook path's environment).
    pub source_environment: String,
    /// The environment the revision is promoted into: the one after `sourceEnvironment`.
    pub target_environment: String,
    /// The revision promoted, as the deployment reported it (e.g. a chart version).
    pub revision: String,
    /// Promotions into this environment need an approval before they run.
    #[serde(default)]
    pub manual: bool,
    /// What caused the promotion: kept for audit, never used for decisions.
    #[serde(default)]
    #[schemars(transform = Describe(&[
        ("reason", "The reason of the deployment event, e.g. `UpgradeSucceeded`."),
        ("reportingController", "The controller that reported the deployment, e.g. `helm-controller`."),
        ("object", "The deployed object, as `Kind/namespace/name`."),
    ]))]
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
    /// When the decision was made, as the approver's client reported it.
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
    /// Name of the Pipeline.
    pub name: String,
}

/// Where a promotion is, written by the controller only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromotionStatus {
    /// `Pending`, `WaitingApproval`, `Running`, `Succeeded`, `Failed`, `Rejected` or
    /// `Superseded` (the last four are final). Absent for a moment after creation: such
    /// an object reads as its initial phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Attempts started so far.
    #[serde(default)]
    #[schemars(extend("format" = "int64", "minimum" = 0))]
    pub attempts: u32,
    /// What happened last, e.g. the reason of the last failure and when it is retried.
    #[serde(default)]
    pub message: String,
    /// What the promotion produced for people to follow, e.g. the pull request's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// When a `Pending` promotion is attempted again; absent means now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// The `metadata.generation` the status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus-style conditions: `Ready`, `Reconciling`, `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Every phase change, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = DescribeItems(&[
        ("phase", "The phase entered."),
        ("at", "When."),
        ("reason", "Why, as a CamelCase reason (Kubernetes Events use the same)."),
        ("message", "What happened, for people."),
    ]))]
    pub history: Vec<PhaseChange>,
    /// What strategies already did in earlier attempts, so retries do not repeat it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checkpoints: BTreeMap<String, String>,
    /// Who approved, rejected or retried it last, as the controller verified it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

/// Adds descriptions to properties of an object schema that have none (types defined in
/// `pipeline-core` without doc comments on every field).
struct Describe(&'static [(&'static str, &'static str)]);

impl Transform for Describe {
    fn transform(&mut self, schema: &mut Schema) {
        describe_properties(schema, self.0);
    }
}

/// [`Describe`] for the items of an array schema.
struct DescribeItems(&'static [(&'static str, &'static str)]);

impl Transform for DescribeItems {
    fn transform(&mut self, schema: &mut Schema) {
        if let Some(items) = schema.get_mut("items")
            && let Ok(items) = <&mut Schema>::try_from(items)
        {
            describe_properties(items, self.0);
        }
    }
}

fn describe_properties(schema: &mut Schema, descriptions: &[(&str, &str)]) {
    let Some(properties) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for (name, description) in descriptions {
        if let Some(property) = properties.get_mut(*name).and_then(|p| p.as_object_mut()) {
            property
                .entry("description")
                .or_insert_with(|| (*description).into());
        }
    }
}

/// Every CRD this controller owns.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![Pipeline::crd(), Promotion::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                unwrap_descriptions(schema);
            }
        }
    }
    crds
}

/// Doc comments keep their line breaks in descriptions, and `kubectl explain` prints
/// them where they fall in its own wrapping: joins the lines of each paragraph.
fn unwrap_descriptions(schema: &mut JSONSchemaProps) {
    if let Some(description) = schema.description.as_mut() {
        *description = description
            .split("\n\n")
            .map(|paragraph| {
                paragraph
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n\n");
    }
    for property in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        unwrap_descriptions(property);
    }
    match &mut schema.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => unwrap_descriptions(items),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => {
            items.iter_mut().for_each(unwrap_descriptions);
        }
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &mut schema.additional_properties {
        unwrap_descriptions(values);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of]
        .into_iter()
        .flatten()
    {
        list.iter_mut().for_each(unwrap_descriptions);
    }
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
    fn names_and_one_line_descriptions() {
        let crds = crds();
        for (crd, short) in crds.iter().zip([PIPELINE_SHORT_NAME, PROMOTION_SHORT_NAME]) {
            assert_eq!(crd.spec.names.short_names, Some(vec![short.to_string()]));
            assert_eq!(crd.spec.names.categories, Some(vec![CATEGORY.to_string()]));
            let schema = serde_json::to_string(&crd.spec.versions[0].schema).unwrap();
            assert!(!schema.contains("Auto-generated"), "{schema}");
        }
        let mut descriptions = Vec::new();
        fn collect(value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, value) in map {
                        match value {
                            serde_json::Value::String(text) if key == "description" => {
                                out.push(text.clone())
                            }
                            _ => collect(value, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        collect(&serde_json::to_value(&crds).unwrap(), &mut descriptions);
        assert!(descriptions.len() > 50);
        for description in descriptions {
            assert!(
                !description.replace("\n\n", "").contains('\n'),
                "{description:?}"
            );
        }
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
