//! What "an environment is deployed at revision R" means, from what watches saw of each
//! target's app object (a Flux HelmRelease or Kustomization). Pure functions over the
//! objects' JSON; the Kubernetes adapter only feeds them.

use std::fmt;

use serde_json::Value;

use crate::pipeline::{Pipeline, Target};
use crate::promotion::parse_version;

/// The cluster a target lives in: the one the controller runs in, or one a `clusterRef`
/// names (a `GitopsCluster` or a Cluster API `Cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClusterKey {
    Local,
    Remote {
        kind: String,
        namespace: String,
        name: String,
    },
}

impl ClusterKey {
    /// The cluster of `target`, whose pipeline lives in `pipeline_namespace` (a
    /// `clusterRef` without a namespace means the pipeline's).
    pub fn of(target: &Target, pipeline_namespace: &str) -> Self {
        match &target.cluster_ref {
            None => ClusterKey::Local,
            Some(r) => ClusterKey::Remote {
                kind: if r.kind.is_empty() {
                    "GitopsCluster".to_string()
                } else {
                    r.kind.clone()
                },
                namespace: if r.namespace.is_empty() {
                    pipeline_namespace.to_string()
                } else {
                    r.namespace.clone()
                },
                name: r.name.clone(),
            },
        }
    }
}

impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterKey::Local => f.write_str("local"),
            ClusterKey::Remote {
                kind,
                namespace,
                name,
            } => write!(f, "{kind}/{namespace}/{name}"),
        }
    }
}

/// Where the kubeconfig of a remote cluster is kept: a Secret and the keys to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeconfigRef {
    pub namespace: String,
    pub secret: String,
    pub keys: &'static [&'static str],
}

/// Keys of a GitopsCluster's own kubeconfig Secret, in the order Weave GitOps' cluster
/// controller reads them.
const GITOPS_CLUSTER_KEYS: &[&str] = &["value", "value.yaml"];
/// Key of a Cluster API `<cluster>-kubeconfig` Secret.
const CAPI_KEYS: &[&str] = &["value"];

/// The kubeconfig Secret of `cluster`. A `GitopsCluster` names it in `spec.secretRef`
/// (keys `value`, then `value.yaml`) or points at a Cluster API cluster with
/// `spec.capiClusterRef`, whose Secret is `<name>-kubeconfig` (key `value`), as a Cluster
/// API `Cluster` itself does. `gitops_cluster` is the GitopsCluster object, when it is one.
pub fn kubeconfig_ref(
    cluster: &ClusterKey,
    gitops_cluster: Option<&Value>,
) -> Result<KubeconfigRef, String> {
    let ClusterKey::Remote {
        kind,
        namespace,
        name,
    } = cluster
    else {
        return Err("the local cluster needs no kubeconfig".to_string());
    };
    let capi = |cluster_name: &str| KubeconfigRef {
        namespace: namespace.clone(),
        secret: format!("{cluster_name}-kubeconfig"),
        keys: CAPI_KEYS,
    };
    match kind.as_str() {
        "Cluster" => Ok(capi(name)),
        "GitopsCluster" => {
            let object = gitops_cluster
                .ok_or_else(|| format!("GitopsCluster {namespace}/{name} not found"))?;
            let spec = &object["spec"];
            let secret = spec["secretRef"]["name"].as_str().filter(|n| !n.is_empty());
            let capi_name = spec["capiClusterRef"]["name"]
                .as_str()
                .filter(|n| !n.is_empty());
            match (secret, capi_name) {
                (Some(secret), None) => Ok(KubeconfigRef {
                    namespace: namespace.clone(),
                    secret: secret.to_string(),
                    keys: GITOPS_CLUSTER_KEYS,
                }),
                (None, Some(capi_name)) => Ok(capi(capi_name)),
                (Some(_), Some(_)) => Err(format!(
                    "GitopsCluster {namespace}/{name} sets both spec.secretRef and spec.capiClusterRef; it must set one"
                )),
                (None, None) => Err(format!(
                    "GitopsCluster {namespace}/{name} sets neither spec.secretRef nor spec.capiClusterRef"
                )),
            }
        }
        other => Err(format!(
            "clusterRef kind {other:?} is not supported (GitopsCluster or Cluster)"
        )),
    }
}

/// Reads the kubeconfig `reference` points at through `secrets`.
pub async fn read_kubeconfig(
    secrets: &dyn crate::ports::SecretSource,
    reference: &KubeconfigRef,
) -> Result<crate::ports::SecretBytes, String> {
    for key in reference.keys {
        match secrets
            .secret_value(&reference.namespace, &reference.secret, key)
            .await
        {
            Ok(Some(value)) if !value.expose().is_empty() => return Ok(value),
            Ok(_) => {}
            Err(err) => return Err(format!("kubeconfig Secret: {err}")),
        }
    }
    Err(format!(
        "secret {}/{} has no kubeconfig under {}",
        reference.namespace,
        reference.secret,
        reference
            .keys
            .iter()
            .map(|k| format!("{k:?}"))
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

/// Where the kubeconfigs of remote clusters come from (the management cluster's
/// GitopsClusters and Secrets, or the manifests folder).
#[async_trait::async_trait]
pub trait ClusterSource: Send + Sync {
    /// The kubeconfig (YAML) to reach `cluster`, or why there is none.
    async fn kubeconfig(&self, cluster: &ClusterKey) -> Result<crate::ports::SecretBytes, String>;
}

/// The kinds of app object a pipeline's `appRef` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AppKind {
    HelmRelease,
    Kustomization,
}

impl AppKind {
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "HelmRelease" => Some(AppKind::HelmRelease),
            "Kustomization" => Some(AppKind::Kustomization),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AppKind::HelmRelease => "HelmRelease",
            AppKind::Kustomization => "Kustomization",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            AppKind::HelmRelease => "helm.toolkit.fluxcd.io",
            AppKind::Kustomization => "kustomize.toolkit.fluxcd.io",
        }
    }

    /// API versions to watch, preferred first: the storage version of current Flux,
    /// then the older ones its CRDs still serve (for leaves running an older Flux).
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            AppKind::HelmRelease => &["v2", "v2beta2", "v2beta1"],
            AppKind::Kustomization => &["v1", "v1beta2", "v1beta1"],
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            AppKind::HelmRelease => "helmreleases",
            AppKind::Kustomization => "kustomizations",
        }
    }

    /// What the object's status says about its deployment.
    pub fn state_of(self, object: &Value) -> AppState {
        let status = &object["status"];
        let generation = object["metadata"]["generation"].as_i64();
        let ready_condition = status["conditions"]
            .as_array()
            .and_then(|conditions| conditions.iter().find(|c| c["type"] == "Ready"));
        let ready = ready_condition.is_some_and(|c| c["status"] == "True");
        let message = ready_condition
            .and_then(|c| c["message"].as_str())
            .unwrap_or_default()
            .to_string();
        // Both the status and its Ready condition must speak of the current spec.
        let current = generation.is_some()
            && status["observedGeneration"].as_i64() == generation
            && ready_condition
                .and_then(|c| c["observedGeneration"].as_i64())
                .is_none_or(|g| Some(g) == generation);
        let revision = match self {
            AppKind::HelmRelease => latest_chart_version(status),
            AppKind::Kustomization => None,
        }
        .or_else(|| status["lastAppliedRevision"].as_str().map(str::to_string))
        .filter(|r| !r.is_empty());
        AppState {
            ready,
            current,
            revision,
            message,
        }
    }
}

impl fmt::Display for AppKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The chart version of a HelmRelease's latest release: the `status.history` entry with
/// the highest Helm release number (v2 and v2beta2 keep no `lastAppliedRevision`). This
/// is the revision helm-controller puts in its success events.
fn latest_chart_version(status: &Value) -> Option<String> {
    status["history"]
        .as_array()?
        .iter()
        .max_by_key(|entry| entry["version"].as_i64().unwrap_or(i64::MIN))
        .and_then(|entry| entry["chartVersion"].as_str())
        .map(str::to_string)
}

/// One target's app object, as far as promotions care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppState {
    /// `Ready` condition is `True`.
    pub ready: bool,
    /// The status (and its Ready condition) was written for the current generation.
    pub current: bool,
    /// The deployed revision, in the form Flux's events carry it.
    pub revision: Option<String>,
    /// The Ready condition's message, for people.
    pub message: String,
}

impl AppState {
    /// The revision this object is deployed at, if it is healthy and up to date.
    pub fn deployed(&self) -> Option<&str> {
        (self.ready && self.current)
            .then_some(self.revision.as_deref())
            .flatten()
    }
}

/// The app object of one target of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub cluster: ClusterKey,
    pub namespace: String,
    pub kind: AppKind,
    pub name: String,
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.cluster, self.kind, self.namespace, self.name
        )
    }
}

/// What the controller knows of one target right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetView {
    /// The controller cannot watch it, and says why: no cluster to reach it through
    /// (embedded mode), a clusterRef whose GitopsCluster or kubeconfig Secret is missing,
    /// a cluster without Flux. Promotions from such environments rest on the signed event.
    NotWatched(String),
    /// The watch has not reported on it yet (just started, or just connected).
    Connecting,
    /// Its cluster cannot be reached, or its watch fails.
    Unreachable(String),
    /// The cluster answers, and has no such object.
    Missing,
    Seen(AppState),
}

impl TargetView {
    pub fn deployed(&self) -> Option<&str> {
        match self {
            TargetView::Seen(state) => state.deployed(),
            _ => None,
        }
    }

    /// Why this target is not deployed at `revision`, if it is not.
    pub fn problem(&self, revision: &str) -> Option<String> {
        match self {
            TargetView::NotWatched(why) => Some(format!("not watched: {why}")),
            TargetView::Connecting => Some("watch starting".to_string()),
            TargetView::Unreachable(why) => Some(format!("unreachable: {why}")),
            TargetView::Missing => Some("no such object".to_string()),
            TargetView::Seen(state) => {
                if !state.current {
                    Some("status not yet updated for the latest spec".to_string())
                } else if !state.ready {
                    Some(format!("not Ready: {}", state.message))
                } else if state.revision.as_deref() != Some(revision) {
                    Some(format!(
                        "at {}",
                        state.revision.as_deref().unwrap_or("no revision")
                    ))
                } else {
                    None
                }
            }
        }
    }
}

/// Where the controller looks for targets' app objects.
pub trait DeploymentView: Send + Sync {
    fn target(&self, key: &TargetKey) -> TargetView;
}

/// The app objects of environment `index` of `pipeline`; empty when its `appRef` kind
/// is not one that can be watched.
pub fn target_keys(pipeline: &Pipeline, index: usize) -> Vec<TargetKey> {
    let Some(kind) = AppKind::parse(&pipeline.spec.app_ref.kind) else {
        return Vec::new();
    };
    let Some(environment) = pipeline.spec.environments.get(index) else {
        return Vec::new();
    };
    environment
        .targets
        .iter()
        .map(|target| TargetKey {
            cluster: ClusterKey::of(target, &pipeline.reference.namespace),
            namespace: target.namespace.clone(),
            kind,
            name: pipeline.spec.app_ref.name.clone(),
        })
        .collect()
}

/// Namespaces holding the kubeconfig Secrets of the clusters `pipelines` target: the
/// controller reads Secrets there too, so their caches must be kept.
pub fn cluster_namespaces<'a>(
    pipelines: impl IntoIterator<Item = &'a Pipeline>,
) -> std::collections::BTreeSet<String> {
    pipelines
        .into_iter()
        .flat_map(|p| (0..p.spec.environments.len()).flat_map(move |i| target_keys(p, i)))
        .filter_map(|key| match key.cluster {
            ClusterKey::Remote { namespace, .. } => Some(namespace),
            ClusterKey::Local => None,
        })
        .collect()
}

/// Every target of one environment, as seen now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentState {
    pub targets: Vec<(TargetKey, TargetView)>,
}

impl EnvironmentState {
    pub fn observe(pipeline: &Pipeline, index: usize, view: &dyn DeploymentView) -> Self {
        Self {
            targets: target_keys(pipeline, index)
                .into_iter()
                .map(|key| {
                    let seen = view.target(&key);
                    (key, seen)
                })
                .collect(),
        }
    }

    /// Whether a watch has yet to report on some target: too early to say anything.
    pub fn settling(&self) -> bool {
        self.targets
            .iter()
            .any(|(_, view)| *view == TargetView::Connecting)
    }

    /// Why the controller cannot judge this environment, if it cannot.
    pub fn unobserved_because(&self) -> Option<String> {
        if self.targets.is_empty() {
            return Some("no watchable targets".to_string());
        }
        let reasons: Vec<String> = self
            .targets
            .iter()
            .filter_map(|(key, view)| match view {
                TargetView::NotWatched(why) => Some(format!("{key}: {why}")),
                _ => None,
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Whether the controller can judge this environment: it has targets and watches
    /// every one of them (reachable or not).
    pub fn observable(&self) -> bool {
        !self.targets.is_empty()
            && self
                .targets
                .iter()
                .all(|(_, view)| !matches!(view, TargetView::NotWatched(_)))
    }

    /// The revision every target is deployed at, if they all agree.
    pub fn deployed_at(&self) -> Option<&str> {
        let mut revisions = self.targets.iter().map(|(_, view)| view.deployed());
        let first = revisions.next()??;
        revisions.all(|r| r == Some(first)).then_some(first)
    }

    /// How many targets are deployed at `revision`, of how many.
    pub fn count_at(&self, revision: &str) -> (usize, usize) {
        let ready = self
            .targets
            .iter()
            .filter(|(_, view)| view.deployed() == Some(revision))
            .count();
        (ready, self.targets.len())
    }

    /// One line on the targets not deployed at `revision`.
    pub fn shortfall(&self, revision: &str) -> String {
        let (ready, total) = self.count_at(revision);
        let problems: Vec<String> = self
            .targets
            .iter()
            .filter_map(|(key, view)| view.problem(revision).map(|p| format!("{key}: {p}")))
            .collect();
        format!(
            "waiting for {} of {total} targets to be deployed at {revision} ({ready} ready; {})",
            total - ready,
            problems.join("; ")
        )
    }

    /// Whether this environment already runs `revision` or, where both are versions, a
    /// newer one: then proposing `revision` to it would repeat or roll back.
    pub fn runs_or_passed(&self, revision: &str) -> bool {
        let Some(running) = self.deployed_at() else {
            return false;
        };
        if running == revision {
            return true;
        }
        match (parse_version(running), parse_version(revision)) {
            (Some(running), Some(proposed)) => running >= proposed,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn helm_release(generation: i64, observed: i64, ready: &str, history: Value) -> Value {
        json!({
            "metadata": {"name": "podinfo", "namespace": "dev", "generation": generation},
            "status": {
                "observedGeneration": observed,
                "conditions": [{"type": "Ready", "status": ready, "observedGeneration": observed,
                                "reason": "UpgradeSucceeded", "message": "Helm upgrade succeeded"}],
                "history": history,
            }
        })
    }

    #[test]
    fn helm_release_revision_is_the_latest_releases_chart_version() {
        // history is newest first, but the latest is the highest release number.
        let history = json!([
            {"version": 3, "chartVersion": "6.5.2", "status": "deployed"},
            {"version": 4, "chartVersion": "6.5.3", "status": "deployed"},
            {"version": 2, "chartVersion": "6.5.1", "status": "superseded"},
        ]);
        let state = AppKind::HelmRelease.state_of(&helm_release(5, 5, "True", history.clone()));
        assert_eq!(state.deployed(), Some("6.5.3"));
        // A status written for an older generation says nothing about the current spec.
        let stale = AppKind::HelmRelease.state_of(&helm_release(6, 5, "True", history.clone()));
        assert!(!stale.current);
        assert_eq!(stale.deployed(), None);
        let failed = AppKind::HelmRelease.state_of(&helm_release(5, 5, "False", history));
        assert_eq!(failed.deployed(), None);
    }

    #[test]
    fn kustomization_revision_is_last_applied_revision() {
        let object = json!({
            "metadata": {"generation": 2},
            "status": {"observedGeneration": 2, "lastAppliedRevision": "main@sha1:0123",
                       "conditions": [{"type": "Ready", "status": "True", "observedGeneration": 2}]}
        });
        assert_eq!(
            AppKind::Kustomization.state_of(&object).deployed(),
            Some("main@sha1:0123")
        );
        // An old HelmRelease (v2beta1) kept lastAppliedRevision: still understood.
        assert_eq!(
            AppKind::HelmRelease.state_of(&object).deployed(),
            Some("main@sha1:0123")
        );
    }

    fn seen(revision: &str) -> TargetView {
        TargetView::Seen(AppState {
            ready: true,
            current: true,
            revision: Some(revision.into()),
            message: String::new(),
        })
    }

    fn key(namespace: &str) -> TargetKey {
        TargetKey {
            cluster: ClusterKey::Local,
            namespace: namespace.into(),
            kind: AppKind::HelmRelease,
            name: "podinfo".into(),
        }
    }

    #[test]
    fn an_environment_is_deployed_when_every_target_is() {
        let both = EnvironmentState {
            targets: vec![(key("a"), seen("1.0.0")), (key("b"), seen("1.0.0"))],
        };
        assert_eq!(both.deployed_at(), Some("1.0.0"));
        assert!(both.observable());
        let one = EnvironmentState {
            targets: vec![(key("a"), seen("1.0.0")), (key("b"), seen("0.9.0"))],
        };
        assert_eq!(one.deployed_at(), None);
        assert_eq!(one.count_at("1.0.0"), (1, 2));
        assert!(one.shortfall("1.0.0").contains("waiting for 1 of 2"));
        let unreachable = EnvironmentState {
            targets: vec![
                (key("a"), seen("1.0.0")),
                (key("b"), TargetView::Unreachable("down".into())),
            ],
        };
        assert_eq!(unreachable.deployed_at(), None);
        assert!(unreachable.observable());
        let unwatched = EnvironmentState {
            targets: vec![(key("a"), TargetView::NotWatched("no cluster".into()))],
        };
        assert!(!unwatched.observable());
    }

    #[test]
    fn kubeconfig_secrets_of_gitops_and_capi_clusters() {
        let remote = |kind: &str| ClusterKey::Remote {
            kind: kind.into(),
            namespace: "fleet".into(),
            name: "leaf-1".into(),
        };
        let own = json!({"spec": {"secretRef": {"name": "leaf-1-kubeconfig-secret"}}});
        let found = kubeconfig_ref(&remote("GitopsCluster"), Some(&own)).unwrap();
        assert_eq!(found.secret, "leaf-1-kubeconfig-secret");
        assert_eq!(found.keys, ["value", "value.yaml"]);
        let capi = json!({"spec": {"capiClusterRef": {"name": "capi-leaf"}}});
        let found = kubeconfig_ref(&remote("GitopsCluster"), Some(&capi)).unwrap();
        assert_eq!(
            (found.secret.as_str(), found.keys),
            ("capi-leaf-kubeconfig", &["value"][..])
        );
        let found = kubeconfig_ref(&remote("Cluster"), None).unwrap();
        assert_eq!(found.secret, "leaf-1-kubeconfig");
        assert!(kubeconfig_ref(&remote("GitopsCluster"), None).is_err());
        assert!(kubeconfig_ref(&remote("GitopsCluster"), Some(&json!({"spec": {}}))).is_err());
        assert!(kubeconfig_ref(&remote("Secret"), None).is_err());
    }

    #[test]
    fn runs_or_passed_stops_repeats_and_downgrades() {
        let at = |r: &str| EnvironmentState {
            targets: vec![(key("a"), seen(r))],
        };
        assert!(at("1.2.0").runs_or_passed("1.2.0"));
        assert!(at("1.2.0").runs_or_passed("1.1.0"));
        assert!(!at("1.2.0").runs_or_passed("1.3.0"));
        // Git revisions have no order: only the same one counts.
        assert!(!at("main@sha1:b").runs_or_passed("main@sha1:a"));
        assert!(at("main@sha1:b").runs_or_passed("main@sha1:b"));
    }
}
