//! The `Pipeline` model, wire-compatible with `pipelines.weave.works/v1alpha1` of the
//! archived Go controller, and its validation.
//!
//! Parsing goes through [`parse_pipeline_spec`] so that embedded mode (YAML files) and
//! Kubernetes mode (custom resources) reject the same mistakes with the same words.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// API group and version of the `Pipeline` kind.
pub const API_GROUP: &str = "pipelines.weave.works";
pub const API_VERSION: &str = "pipelines.weave.works/v1alpha1";
pub const PIPELINE_KIND: &str = "Pipeline";

/// Git forges the pull-request strategy knows. The first four are the Go original's.
pub const PROVIDER_TYPES: &[&str] = &[
    "github",
    "gitlab",
    "bitbucket-server",
    "azure-devops",
    "gitea",
    "forgejo",
];

/// Kinds `spec.appRef.kind` may name: the Flux objects whose events report deployments
/// (helm-controller's and kustomize-controller's).
pub const APP_KINDS: &[&str] = &["HelmRelease", "Kustomization"];

/// Kinds a target's `clusterRef.kind` may name: Weave GitOps' `GitopsCluster` (the only
/// one the Go original accepted) and Cluster API's `Cluster`.
pub const CLUSTER_KINDS: &[&str] = &["GitopsCluster", "Cluster"];

/// Keys allowed under `strategy`; anything else is a strategy we do not know.
const STRATEGY_KEYS: &[&str] = &["pull-request", "notification", "secretRef"];

/// Namespace and name of a pipeline; displayed as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PipelineRef {
    pub namespace: String,
    pub name: String,
}

impl PipelineRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `namespace/name`.
    pub fn parse(text: &str) -> Option<Self> {
        let (namespace, name) = text.split_once('/')?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(Self::new(namespace, name))
    }
}

impl fmt::Display for PipelineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A loaded, validated pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub reference: PipelineRef,
    pub spec: PipelineSpec,
}

/// What a Pipeline promotes, through which environments, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(transform = schema::Required(&["appRef", "environments"]))
)]
pub struct PipelineSpec {
    /// The app promoted: a Flux HelmRelease or Kustomization that has this name in every
    /// environment. Webhook events must name it as their `involvedObject`.
    pub app_ref: LocalAppReference,
    /// The environments, in promotion order: a deployment in `environments[i]` is
    /// promoted to `environments[i+1]`. At least one.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub environments: Vec<Environment>,
    /// How promotions are made into every environment without a `promotion` of its own.
    /// Its `strategy.secretRef` names the Secret whose `hmac-key` authenticates the
    /// webhook's events: without it every event for the pipeline is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

/// The Flux object a pipeline promotes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(transform = schema::Required(&["apiVersion", "kind", "name"]))
)]
pub struct LocalAppReference {
    /// API version of the app object, e.g. `helm.toolkit.fluxcd.io/v2`. Only its group is
    /// compared with events, so events from any version of the group match.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub api_version: String,
    /// Kind of the app object: `HelmRelease` or `Kustomization`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("enum" = APP_KINDS)))]
    pub kind: String,
    /// Name of the app object, the same in every environment.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub name: String,
}

impl LocalAppReference {
    /// The API group of `apiVersion` (`helm.toolkit.fluxcd.io/v2` → `helm.toolkit.fluxcd.io`).
    pub fn api_group(&self) -> &str {
        api_group_of(&self.api_version)
    }
}

/// The group part of an `apiVersion`; the core group (`v1`) is the empty string.
pub fn api_group_of(api_version: &str) -> &str {
    match api_version.rsplit_once('/') {
        Some((group, _)) => group,
        None => "",
    }
}

/// One environment of a pipeline: where the app runs at one stage of its promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(transform = schema::Required(&["name", "targets"]))
)]
pub struct Environment {
    /// Name of the environment, e.g. `dev` or `prod`; unique within the pipeline. It
    /// appears verbatim in webhook paths (`/pipelines/promotions/{namespace}/{pipeline}/{environment}`),
    /// so it may not contain `/`, `?`, `#`, `%`, whitespace or control characters.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub name: String,
    /// Where the app runs in this environment; at least one. An event from this
    /// environment is accepted only from one of these targets' namespaces.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub targets: Vec<Target>,
    /// How promotions into this environment are made. When set it replaces
    /// `spec.promotion` for this environment entirely (the two are not merged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

/// A place an environment's app runs: a namespace, on the Pipeline's own cluster or on
/// the cluster `clusterRef` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(transform = schema::Required(&["namespace"])))]
pub struct Target {
    /// Namespace of the app object (`spec.appRef`) in this target.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub namespace: String,
    /// The cluster the target is on: a `GitopsCluster` or a Cluster API `Cluster`. When
    /// absent, the target is on the cluster the Pipeline lives on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ref: Option<CrossNamespaceClusterReference>,
}

/// A cluster object, possibly in another namespace than the Pipeline's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(transform = schema::Required(&["kind", "name"]))
)]
pub struct CrossNamespaceClusterReference {
    /// API version of the cluster object, e.g. `gitops.weave.works/v1alpha1` or
    /// `cluster.x-k8s.io/v1beta1`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    /// Kind of the cluster object: `GitopsCluster` (Weave GitOps) or `Cluster` (Cluster API).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("enum" = CLUSTER_KINDS)))]
    pub kind: String,
    /// Name of the cluster object.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub name: String,
    /// Namespace of the cluster object; defaults to the Pipeline's namespace.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// How promotions are made: whether they wait for an approval, and the strategy that
/// carries them out.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(transform = schema::Required(&["strategy"])))]
pub struct Promotion {
    /// Promotions wait in `WaitingApproval` until approved (`pipeline-controller
    /// approve`, or `spec.approval` on the Promotion object in Kubernetes mode).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
    /// How a promotion is carried out: exactly one of `notification` and `pull-request`.
    #[serde(default)]
    pub strategy: Strategy,
}

/// Exactly one of `notification` and `pull-request`, and optionally the Secret of the
/// webhook's (or the environment's approval) key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "has(self.notification) != has(self.pull__dash__request)",
        "message": "set exactly one strategy: notification or pull-request",
    }]))
)]
pub struct Strategy {
    /// Open (or update) a pull request that sets the promoted version in a Git
    /// repository; merging it deploys the version.
    #[serde(
        rename = "pull-request",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pull_request: Option<PullRequestPromotion>,
    /// Announce the promotion: a signed Flux-format event to every `--notify-url` (and,
    /// in Kubernetes mode, a `Promote` Kubernetes Event on the Pipeline); whatever
    /// receives it deploys the version. Takes no settings: `notification: {}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<NotificationPromotion>,
    /// A Secret in the Pipeline's namespace. At pipeline level (`spec.promotion`) its key
    /// `hmac-key` is the HMAC key that authenticates webhook events and signs
    /// notifications. On an environment it holds the `approval-key` of signed approvals of
    /// promotions into that environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
}

/// What a promotion does once decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    Notification,
    PullRequest,
}

impl StrategyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::Notification => "notification",
            StrategyKind::PullRequest => "pull-request",
        }
    }
}

impl Strategy {
    /// The configured strategy; validation guarantees exactly one for loaded pipelines.
    pub fn kind(&self) -> Option<StrategyKind> {
        match (&self.pull_request, &self.notification) {
            (Some(_), None) => Some(StrategyKind::PullRequest),
            (None, Some(_)) => Some(StrategyKind::Notification),
            _ => None,
        }
    }
}

/// A promotion by pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(transform = schema::Required(&["type", "url", "baseBranch", "secretRef"]))
)]
pub struct PullRequestPromotion {
    /// The Git forge hosting the repository: `github`, `gitlab`, `gitea`, `forgejo`,
    /// `bitbucket-server` or `azure-devops`.
    #[serde(rename = "type", default)]
    #[cfg_attr(feature = "schema", schemars(extend("enum" = PROVIDER_TYPES)))]
    pub provider: String,
    /// URL of the repository whose files are changed, HTTPS (`https://host/owner/repo`)
    /// or SSH (`ssh://git@host/owner/repo.git`, `git@host:owner/repo.git`).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub url: String,
    /// The branch the pull request targets; merging it deploys the promotion. The
    /// pull request's own branch is named by the controller.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub base_branch: String,
    /// Secret in the Pipeline's namespace with the credentials: `token` for the forge's
    /// API (required), and for git `username` and `password` (HTTPS; the token is used
    /// when they are absent) or `identity` and `known_hosts` (SSH).
    #[serde(default)]
    pub secret_ref: LocalObjectReference,
}

/// Settings of the notification strategy: none in v1alpha1 (`notification: {}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NotificationPromotion {}

/// A Secret in the Pipeline's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(transform = schema::Required(&["name"])))]
pub struct LocalObjectReference {
    /// Name of the Secret.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub name: String,
}

/// One problem in a pipeline, located by its field path (`spec.environments[1].name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Decodes and validates a pipeline `spec` given as JSON (YAML documents are converted to
/// JSON values first). Returns every problem found, not just the first.
pub fn parse_pipeline_spec(spec: serde_json::Value) -> Result<PipelineSpec, Vec<FieldError>> {
    let mut errors = unknown_strategy_errors(&spec);
    let parsed: Result<PipelineSpec, _> = serde_path_to_error::deserialize(spec);
    match parsed {
        Ok(parsed) => {
            errors.extend(parsed.validate());
            if errors.is_empty() {
                Ok(parsed)
            } else {
                Err(errors)
            }
        }
        Err(err) => {
            let path = err.path().to_string();
            let field = if path == "." {
                "spec".to_string()
            } else {
                format!("spec.{path}")
            };
            errors.push(FieldError::new(field, err.into_inner().to_string()));
            Err(errors)
        }
    }
}

/// Unknown keys under `strategy` would be silently dropped by serde; name them instead.
fn unknown_strategy_errors(spec: &serde_json::Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut check = |promotion: Option<&serde_json::Value>, field: String| {
        let Some(strategy) = promotion
            .and_then(|p| p.get("strategy"))
            .and_then(|s| s.as_object())
        else {
            return;
        };
        for key in strategy.keys() {
            if !STRATEGY_KEYS.contains(&key.as_str()) {
                errors.push(FieldError::new(
                    format!("{field}.strategy.{key}"),
                    format!("unknown strategy {key:?} (known: notification, pull-request)"),
                ));
            }
        }
    };
    check(spec.get("promotion"), "spec.promotion".to_string());
    if let Some(envs) = spec.get("environments").and_then(|e| e.as_array()) {
        for (i, env) in envs.iter().enumerate() {
            check(
                env.get("promotion"),
                format!("spec.environments[{i}].promotion"),
            );
        }
    }
    errors
}

impl PipelineSpec {
    /// Semantic checks on a decoded spec.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.app_ref.api_version.is_empty() {
            errors.push(FieldError::new("spec.appRef.apiVersion", "must be set"));
        }
        if self.app_ref.kind.is_empty() {
            errors.push(FieldError::new("spec.appRef.kind", "must be set"));
        } else if !APP_KINDS.contains(&self.app_ref.kind.as_str()) {
            errors.push(FieldError::new(
                "spec.appRef.kind",
                format!(
                    "unknown kind {:?} (known: {})",
                    self.app_ref.kind,
                    APP_KINDS.join(", ")
                ),
            ));
        }
        if self.app_ref.name.is_empty() {
            errors.push(FieldError::new("spec.appRef.name", "must be set"));
        }
        if self.environments.is_empty() {
            errors.push(FieldError::new(
                "spec.environments",
                "at least one environment is required",
            ));
        }
        let mut seen = HashSet::new();
        for (i, env) in self.environments.iter().enumerate() {
            let field = format!("spec.environments[{i}]");
            if env.name.is_empty() {
                errors.push(FieldError::new(format!("{field}.name"), "must be set"));
            } else if !is_path_segment(&env.name) {
                errors.push(FieldError::new(
                    format!("{field}.name"),
                    format!(
                        "{:?} cannot be used in a webhook path (no '/', '?', '#', '%' or spaces)",
                        env.name
                    ),
                ));
            } else if !seen.insert(env.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{field}.name"),
                    format!("duplicate environment name {:?}", env.name),
                ));
            }
            if env.targets.is_empty() {
                errors.push(FieldError::new(
                    format!("{field}.targets"),
                    format!("environment {:?} has no targets", env.name),
                ));
            }
            for (j, target) in env.targets.iter().enumerate() {
                if target.namespace.is_empty() {
                    errors.push(FieldError::new(
                        format!("{field}.targets[{j}].namespace"),
                        "must be set",
                    ));
                }
                if let Some(cluster) = &target.cluster_ref {
                    let cluster_field = format!("{field}.targets[{j}].clusterRef");
                    if cluster.kind.is_empty() {
                        errors.push(FieldError::new(
                            format!("{cluster_field}.kind"),
                            "must be set",
                        ));
                    } else if !CLUSTER_KINDS.contains(&cluster.kind.as_str()) {
                        errors.push(FieldError::new(
                            format!("{cluster_field}.kind"),
                            format!(
                                "unknown kind {:?} (known: {})",
                                cluster.kind,
                                CLUSTER_KINDS.join(", ")
                            ),
                        ));
                    }
                    if cluster.name.is_empty() {
                        errors.push(FieldError::new(
                            format!("{cluster_field}.name"),
                            "must be set",
                        ));
                    }
                }
            }
            if let Some(promotion) = &env.promotion {
                validate_promotion(promotion, &format!("{field}.promotion"), &mut errors);
            }
        }
        if let Some(promotion) = &self.promotion {
            validate_promotion(promotion, "spec.promotion", &mut errors);
        }
        errors
    }
}

fn validate_promotion(promotion: &Promotion, field: &str, errors: &mut Vec<FieldError>) {
    let strategy = &promotion.strategy;
    match (&strategy.pull_request, &strategy.notification) {
        (Some(_), Some(_)) => errors.push(FieldError::new(
            format!("{field}.strategy"),
            "set exactly one strategy, not both notification and pull-request",
        )),
        (None, None) => errors.push(FieldError::new(
            format!("{field}.strategy"),
            "no strategy set (notification or pull-request)",
        )),
        _ => {}
    }
    if strategy
        .secret_ref
        .as_ref()
        .is_some_and(|s| s.name.is_empty())
    {
        errors.push(FieldError::new(
            format!("{field}.strategy.secretRef.name"),
            "must be set",
        ));
    }
    if let Some(pr) = &strategy.pull_request {
        let pr_field = format!("{field}.strategy.pull-request");
        if !PROVIDER_TYPES.contains(&pr.provider.as_str()) {
            errors.push(FieldError::new(
                format!("{pr_field}.type"),
                format!(
                    "unknown provider type {:?} (known: {})",
                    pr.provider,
                    PROVIDER_TYPES.join(", ")
                ),
            ));
        }
        if pr.url.is_empty() {
            errors.push(FieldError::new(format!("{pr_field}.url"), "must be set"));
        }
        if pr.base_branch.is_empty() {
            errors.push(FieldError::new(
                format!("{pr_field}.baseBranch"),
                "must be set",
            ));
        }
        if pr.secret_ref.name.is_empty() {
            errors.push(FieldError::new(
                format!("{pr_field}.secretRef.name"),
                "must be set",
            ));
        }
    }
}

/// Environment names appear verbatim in webhook paths.
fn is_path_segment(name: &str) -> bool {
    !name
        .chars()
        .any(|c| matches!(c, '/' | '?' | '#' | '%') || c.is_whitespace() || c.is_control())
}

impl Pipeline {
    pub fn environment_index(&self, name: &str) -> Option<usize> {
        self.spec.environments.iter().position(|e| e.name == name)
    }

    /// The promotion that applies when promoting *into* `target_environment`: the
    /// environment's own wins over the pipeline-level one (as in the Go original).
    pub fn promotion_for(&self, target_environment: &str) -> Option<&Promotion> {
        self.spec
            .environments
            .iter()
            .find(|e| e.name == target_environment)
            .and_then(|e| e.promotion.as_ref())
            .or(self.spec.promotion.as_ref())
    }

    /// Name of the Secret holding the `approval-key` for promotions into
    /// `target_environment`: the environment's own `promotion.strategy.secretRef`, else
    /// the pipeline's.
    pub fn approval_secret_name(&self, target_environment: &str) -> Option<&str> {
        self.spec
            .environments
            .iter()
            .find(|e| e.name == target_environment)
            .and_then(|e| e.promotion.as_ref())
            .and_then(|p| p.strategy.secret_ref.as_ref())
            .map(|s| s.name.as_str())
            .filter(|n| !n.is_empty())
            .or_else(|| self.hmac_secret_name())
    }

    /// Name of the Secret holding the webhook's `hmac-key`, if any.
    pub fn hmac_secret_name(&self) -> Option<&str> {
        self.spec
            .promotion
            .as_ref()
            .and_then(|p| p.strategy.secret_ref.as_ref())
            .map(|s| s.name.as_str())
            .filter(|n| !n.is_empty())
    }
}

/// Schema details serde attributes cannot express, for the generated CRD.
#[cfg(feature = "schema")]
pub mod schema {
    use schemars::Schema;
    use schemars::transform::Transform;

    /// Marks properties of an object schema required and drops the `default` serde's
    /// `#[serde(default)]` gave them: the API server fills in defaults before it checks
    /// required fields, so a defaulted field is never missing. Parsing keeps the serde
    /// defaults, so that [`super::PipelineSpec::validate`] names every missing field
    /// rather than serde only the first.
    pub struct Required(pub &'static [&'static str]);

    impl Transform for Required {
        fn transform(&mut self, schema: &mut Schema) {
            if let Some(properties) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
                for field in self.0 {
                    if let Some(property) =
                        properties.get_mut(*field).and_then(|p| p.as_object_mut())
                    {
                        property.remove("default");
                    }
                }
            }
            let object = schema.ensure_object();
            let mut required: Vec<String> = object
                .get("required")
                .and_then(|r| r.as_array())
                .map(|r| {
                    r.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            for field in self.0 {
                if !required.iter().any(|r| r == field) {
                    required.push((*field).to_string());
                }
            }
            required.sort();
            object.insert("required".into(), required.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> serde_json::Value {
        json!({
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2beta1", "kind": "HelmRelease", "name": "podinfo"},
            "environments": [
                {"name": "dev", "targets": [{"namespace": "podinfo-dev", "clusterRef": {"kind": "GitopsCluster", "name": "dev"}}]},
                {"name": "prod", "targets": [{"namespace": "podinfo-prod"}],
                 "promotion": {"manual": true, "strategy": {"notification": {}}}}
            ],
            "promotion": {"strategy": {"secretRef": {"name": "hmac"}, "pull-request": {
                "type": "github", "url": "https://github.com/o/r", "baseBranch": "main", "secretRef": {"name": "pr"}}}}
        })
    }

    #[test]
    fn go_original_manifest_parses_and_round_trips() {
        let spec = parse_pipeline_spec(minimal()).expect("valid");
        assert_eq!(spec.environments.len(), 2);
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back, minimal());
        let p = Pipeline {
            reference: PipelineRef::new("ns", "p"),
            spec,
        };
        assert_eq!(p.hmac_secret_name(), Some("hmac"));
        assert!(p.promotion_for("prod").unwrap().manual);
        assert_eq!(
            p.promotion_for("dev").unwrap().strategy.kind(),
            Some(StrategyKind::PullRequest)
        );
    }

    #[test]
    fn reports_every_problem_with_its_field() {
        let mut spec = minimal();
        spec["environments"][1]["name"] = json!("dev");
        spec["environments"][0]["targets"] = json!([]);
        spec["promotion"]["strategy"]["carrier-pigeon"] = json!({});
        spec["promotion"]["strategy"]["pull-request"]["type"] = json!("svn");
        let errors = parse_pipeline_spec(spec).unwrap_err();
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            text.contains(
                &"spec.promotion.strategy.carrier-pigeon: unknown strategy \"carrier-pigeon\" (known: notification, pull-request)".to_string()
            ),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t == "spec.environments[1].name: duplicate environment name \"dev\""),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t == "spec.environments[0].targets: environment \"dev\" has no targets"),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with(
                "spec.promotion.strategy.pull-request.type: unknown provider type \"svn\""
            )),
            "{text:?}"
        );
    }

    #[test]
    fn no_environments_and_type_errors_are_located() {
        let errors = parse_pipeline_spec(
            json!({"appRef": {"apiVersion": "v1", "kind": "HelmRelease", "name": "n"}, "environments": []}),
        )
        .unwrap_err();
        assert_eq!(errors[0].field, "spec.environments");
        let errors = parse_pipeline_spec(json!({"appRef": {"apiVersion": "v1", "kind": "HelmRelease", "name": "n"}, "environments": [{"name": "a", "targets": "oops"}]})).unwrap_err();
        assert_eq!(errors[0].field, "spec.environments[0].targets");
    }

    #[test]
    fn strategy_needs_exactly_one() {
        let mut spec = minimal();
        spec["environments"][1]["promotion"]["strategy"] = json!({});
        let errors = parse_pipeline_spec(spec).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "spec.environments[1].promotion.strategy: no strategy set (notification or pull-request)"
        );
    }

    #[test]
    fn pipeline_ref_parse() {
        assert_eq!(PipelineRef::parse("a/b"), Some(PipelineRef::new("a", "b")));
        assert_eq!(PipelineRef::parse("a/b/c"), None);
        assert_eq!(PipelineRef::parse("/b"), None);
        assert_eq!(
            api_group_of("helm.toolkit.fluxcd.io/v2"),
            "helm.toolkit.fluxcd.io"
        );
        assert_eq!(api_group_of("v1"), "");
    }
}
