//! The Flux objects every leaf cluster needs so its deployments reach the webhook: per
//! target namespace of each environment that has a next one, a `Provider` (type
//! `generic-hmac`, addressed to the pipeline's webhook for that environment) and an
//! `Alert` on the pipeline's app object. Plus, for GitOps delivery, a Flux
//! `Kustomization` per leaf cluster that applies those objects there from the
//! management cluster (`spec.kubeConfig`), so Flux keeps them in place and undoes drift.
//!
//! Pure and deterministic: the same pipelines give byte-identical output.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::deployment::{ClusterKey, KubeconfigRef, target_keys};
use crate::pipeline::Pipeline;

/// API versions of the Flux objects written (notification-controller v1.x serves them).
pub const NOTIFICATION_API: &str = "notification.toolkit.fluxcd.io/v1beta3";
pub const KUSTOMIZE_API: &str = "kustomize.toolkit.fluxcd.io/v1";

/// Labels naming what a generated object is for (also how applied ones are found).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PIPELINE_NAMESPACE: &str = "pipelines.weave.works/pipeline-namespace";
pub const LABEL_PIPELINE: &str = "pipelines.weave.works/pipeline";
pub const LABEL_ENVIRONMENT: &str = "pipelines.weave.works/environment";
pub const MANAGER: &str = "pipeline-controller";

/// Matches the message of the controller's promotion announcements (`Promote pipeline
/// <ns>/<name> to <env> with version <v>`): generated Alerts exclude them, an Alert
/// meant to tell people of promotions includes them.
pub const PROMOTION_EVENT_PATTERN: &str = "^Promote pipeline ";

/// Key of the HMAC key in the leaf's Secret, as a Flux Provider reads it.
pub const TOKEN_KEY: &str = "token";

/// The objects of one target namespace of one environment.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetWiring {
    pub cluster: ClusterKey,
    pub namespace: String,
    /// Provider, then Alert.
    pub objects: Vec<Value>,
    /// The Secret (in `namespace`, key `token`) the Provider signs with: it must hold the
    /// pipeline's `hmac-key`.
    pub secret_name: String,
}

/// Everything to wire for `pipeline`, whose webhook is reached at `public_url`.
pub fn pipeline_wiring(pipeline: &Pipeline, public_url: &str) -> Vec<TargetWiring> {
    let base = public_url.trim_end_matches('/');
    let reference = &pipeline.reference;
    let app = &pipeline.spec.app_ref;
    let environments = &pipeline.spec.environments;
    let mut out = Vec::new();
    for (index, environment) in environments.iter().enumerate() {
        // Only an environment with a next one reports deployments.
        if index + 1 >= environments.len() {
            break;
        }
        for key in target_keys(pipeline, index) {
            let name = object_name(&reference.namespace, &reference.name, &environment.name);
            let secret_name = format!("{name}-hmac");
            let labels = json!({
                LABEL_MANAGED_BY: MANAGER,
                LABEL_PIPELINE_NAMESPACE: reference.namespace,
                LABEL_PIPELINE: reference.name,
                LABEL_ENVIRONMENT: environment.name,
            });
            let address = format!(
                "{base}/pipelines/promotions/{}/{}/{}",
                reference.namespace, reference.name, environment.name
            );
            let provider = json!({
                "apiVersion": NOTIFICATION_API,
                "kind": "Provider",
                "metadata": {"name": name, "namespace": key.namespace, "labels": labels},
                "spec": {
                    "type": "generic-hmac",
                    "address": address,
                    "secretRef": {"name": secret_name},
                }
            });
            let alert = json!({
                "apiVersion": NOTIFICATION_API,
                "kind": "Alert",
                "metadata": {"name": name, "namespace": key.namespace, "labels": labels},
                "spec": {
                    "providerRef": {"name": name},
                    "eventSeverity": "info",
                    "eventSources": [{"kind": app.kind, "name": app.name}],
                    // The controller's own promotion announcements (--events-addr) are
                    // about the same object; they are not deployments.
                    "exclusionList": [PROMOTION_EVENT_PATTERN],
                    "eventMetadata": {
                        "pipeline": reference.to_string(),
                        "environment": environment.name,
                        "summary": format!("{} deployed in {} of pipeline {reference}", app.name, environment.name),
                    },
                }
            });
            out.push(TargetWiring {
                cluster: key.cluster,
                namespace: key.namespace,
                objects: vec![provider, alert],
                secret_name,
            });
        }
    }
    out
}

/// A DNS-label name for the objects of (pipeline, environment): readable, unique by a
/// hash suffix, at most 63 characters.
fn object_name(namespace: &str, name: &str, environment: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [namespace, name, environment] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hex::encode(hasher.finalize());
    let readable: String = format!("pipeline-{name}-{environment}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut readable = readable
        .split('-')
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    readable.truncate(46);
    let readable = readable.trim_end_matches('-');
    format!("{readable}-{}", &digest[..8])
}

/// One file to write: a comment header, then YAML documents.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WiringFile {
    pub header: String,
    pub documents: Vec<Value>,
}

/// A folder of files to write: relative path → file.
pub type Files = BTreeMap<String, WiringFile>;

/// What `gitops_files` produced, and what it could not.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GitOpsOutput {
    pub files: Files,
    /// Clusters whose management Kustomization was left out, and why (e.g. their
    /// GitopsCluster is not known, so neither is their kubeconfig Secret).
    pub warnings: Vec<String>,
}

/// How the GitOps output is laid out and applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitOpsLayout {
    /// Path of the output folder inside the Git repository the management cluster's Flux
    /// reads (for the Kustomizations' `spec.path`), e.g. `./pipelines-wiring`.
    pub repo_path: String,
    /// The management cluster's `GitRepository` holding that folder.
    pub source_name: String,
    pub source_namespace: String,
    /// Namespace of the per-cluster Kustomizations (Flux's, usually `flux-system`).
    pub kustomization_namespace: String,
}

/// The folder `flux-config` writes for `pipelines`:
/// `clusters/<cluster>/<namespace>/{provider,alert}.yaml` with a `kustomization.yaml`
/// per cluster, and `management/<cluster>.yaml`, a Flux Kustomization applying that
/// cluster's folder (remotely, through its kubeconfig Secret, for leaf clusters).
/// `kubeconfig` says where each remote cluster's kubeconfig Secret is (a GitopsCluster
/// names its own, see [`kubeconfig_ref`]).
pub fn gitops_files(
    pipelines: &[&Pipeline],
    public_url: &str,
    layout: &GitOpsLayout,
    kubeconfig: &dyn Fn(&ClusterKey) -> Result<KubeconfigRef, String>,
) -> GitOpsOutput {
    let mut files = Files::new();
    let mut warnings = Vec::new();
    let mut per_cluster: BTreeMap<String, (ClusterKey, Vec<String>)> = BTreeMap::new();
    let mut secrets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut sorted: Vec<&&Pipeline> = pipelines.iter().collect();
    sorted.sort_by_key(|p| p.reference.to_string());
    for pipeline in sorted {
        for target in pipeline_wiring(pipeline, public_url) {
            let cluster_dir = cluster_dir(&target.cluster);
            for object in &target.objects {
                let kind = object["kind"]
                    .as_str()
                    .unwrap_or("object")
                    .to_ascii_lowercase();
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                let file = format!("{}/{}-{kind}.yaml", target.namespace, name);
                files.insert(
                    format!("clusters/{cluster_dir}/{file}"),
                    WiringFile {
                        header: String::new(),
                        documents: vec![object.clone()],
                    },
                );
                per_cluster
                    .entry(cluster_dir.clone())
                    .or_insert_with(|| (target.cluster.clone(), Vec::new()))
                    .1
                    .push(file);
            }
            secrets
                .entry(cluster_dir.clone())
                .or_default()
                .push(format!(
                    "{}/{} (key {TOKEN_KEY:?}: the hmac-key of pipeline {})",
                    target.namespace, target.secret_name, pipeline.reference
                ));
        }
    }
    for (cluster_dir, (cluster, mut resources)) in per_cluster {
        resources.sort();
        resources.dedup();
        let kustomization = json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": resources,
        });
        let needed = secrets.remove(&cluster_dir).unwrap_or_default();
        let header = format!(
            "# Generated by `pipeline-controller flux-config`; re-run it rather than editing.\n# Secrets these Providers sign with (create them in the cluster; never commit the keys):\n{}\n",
            needed
                .iter()
                .map(|s| format!("#   {s}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        files.insert(
            format!("clusters/{cluster_dir}/kustomization.yaml"),
            WiringFile {
                header,
                documents: vec![kustomization],
            },
        );
        let kubeconfig = match &cluster {
            ClusterKey::Local => None,
            remote => match kubeconfig(remote) {
                Ok(reference) => Some(reference),
                Err(why) => {
                    warnings.push(format!(
                        "no management Kustomization for cluster {remote}: {why}; apply clusters/{cluster_dir} there yourself, or add its GitopsCluster and run again"
                    ));
                    continue;
                }
            },
        };
        files.insert(
            format!("management/{cluster_dir}.yaml"),
            WiringFile {
                header: String::new(),
                documents: vec![management_kustomization(
                    &cluster_dir,
                    kubeconfig.as_ref(),
                    layout,
                )],
            },
        );
    }
    GitOpsOutput { files, warnings }
}

/// The Flux Kustomization that applies `clusters/<cluster_dir>`: in the management
/// cluster itself, or remotely through `kubeconfig` for a leaf cluster.
fn management_kustomization(
    cluster_dir: &str,
    kubeconfig: Option<&KubeconfigRef>,
    layout: &GitOpsLayout,
) -> Value {
    let path = format!(
        "{}/clusters/{cluster_dir}",
        layout.repo_path.trim_end_matches('/')
    );
    let mut spec = json!({
        "interval": "10m",
        // A failed apply (the folder not fetched yet, a leaf cluster away) is retried
        // sooner than the next interval.
        "retryInterval": "1m",
        "path": path,
        "prune": true,
        "sourceRef": {
            "kind": "GitRepository",
            "name": layout.source_name,
            "namespace": layout.source_namespace,
        },
    });
    if let Some(reference) = kubeconfig {
        // Flux reads `value`, else `value.yaml`, when no key is named: the keys a
        // GitopsCluster's or a Cluster API Secret holds.
        spec["kubeConfig"] = json!({"secretRef": {"name": reference.secret}});
    }
    json!({
        "apiVersion": KUSTOMIZE_API,
        "kind": "Kustomization",
        "metadata": {
            "name": format!("pipeline-wiring-{cluster_dir}"),
            "namespace": layout.kustomization_namespace,
            "labels": {LABEL_MANAGED_BY: MANAGER},
        },
        "spec": spec,
    })
}

/// A folder name for a cluster: `management` for the local one, else
/// `<namespace>-<name>` of its clusterRef.
pub fn cluster_dir(cluster: &ClusterKey) -> String {
    match cluster {
        ClusterKey::Local => "management".to_string(),
        ClusterKey::Remote {
            namespace, name, ..
        } => format!("{namespace}-{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{PipelineRef, parse_pipeline_spec};

    fn pipeline() -> Pipeline {
        Pipeline {
            reference: PipelineRef::new("flux-system", "podinfo"),
            spec: parse_pipeline_spec(json!({
                "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
                "environments": [
                    {"name": "dev", "targets": [
                        {"namespace": "podinfo-dev", "clusterRef": {"kind": "GitopsCluster", "name": "dev"}},
                        {"namespace": "podinfo-dev2"}
                    ]},
                    {"name": "staging", "targets": [{"namespace": "podinfo-staging", "clusterRef": {"kind": "Cluster", "name": "staging", "namespace": "fleet"}}]},
                    {"name": "prod", "targets": [{"namespace": "podinfo-prod"}]}
                ],
                "promotion": {"strategy": {"notification": {}, "secretRef": {"name": "hmac"}}}
            }))
            .unwrap(),
        }
    }

    #[test]
    fn every_target_of_an_environment_with_a_next_one_gets_a_provider_and_an_alert() {
        let wiring = pipeline_wiring(&pipeline(), "https://pc.example/");
        // dev (2 targets) and staging (1); prod is last.
        assert_eq!(wiring.len(), 3);
        let provider = &wiring[0].objects[0];
        assert_eq!(provider["spec"]["type"], "generic-hmac");
        assert_eq!(
            provider["spec"]["address"],
            "https://pc.example/pipelines/promotions/flux-system/podinfo/dev"
        );
        assert_eq!(provider["metadata"]["namespace"], "podinfo-dev");
        let alert = &wiring[0].objects[1];
        assert_eq!(
            alert["spec"]["eventSources"][0],
            json!({"kind": "HelmRelease", "name": "podinfo"})
        );
        assert_eq!(alert["spec"]["eventSeverity"], "info");
        assert_eq!(
            alert["spec"]["exclusionList"],
            json!(["^Promote pipeline "])
        );
        assert_eq!(alert["spec"]["eventMetadata"]["environment"], "dev");
        assert_eq!(
            alert["spec"]["eventMetadata"]["pipeline"],
            "flux-system/podinfo"
        );
        assert_eq!(
            provider["spec"]["secretRef"]["name"],
            json!(wiring[0].secret_name)
        );
        let staging = &wiring[2].objects[0];
        assert_eq!(
            staging["spec"]["address"],
            "https://pc.example/pipelines/promotions/flux-system/podinfo/staging"
        );
        let name = provider["metadata"]["name"].as_str().unwrap();
        assert!(
            name.len() <= 63 && name.starts_with("pipeline-podinfo-dev-"),
            "{name}"
        );
    }

    #[test]
    fn the_gitops_folder_is_deterministic_and_names_no_key() {
        let p = pipeline();
        let layout = GitOpsLayout {
            repo_path: "./wiring".into(),
            source_name: "flux-system".into(),
            source_namespace: "flux-system".into(),
            kustomization_namespace: "flux-system".into(),
        };
        let resolve = |cluster: &ClusterKey| {
            crate::deployment::kubeconfig_ref(
                cluster,
                Some(&json!({"spec": {"secretRef": {"name": "dev-kubeconfig-secret"}}})),
            )
        };
        let first = gitops_files(&[&p], "https://pc.example", &layout, &resolve);
        let again = gitops_files(&[&p], "https://pc.example", &layout, &resolve);
        assert_eq!(first, again);
        assert!(first.warnings.is_empty(), "{:?}", first.warnings);
        let first = first.files;
        let paths: Vec<&str> = first.keys().map(String::as_str).collect();
        assert!(
            paths.contains(&"clusters/flux-system-dev/kustomization.yaml"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"clusters/management/kustomization.yaml"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"management/fleet-staging.yaml"),
            "{paths:?}"
        );
        let remote = &first["management/flux-system-dev.yaml"].documents[0];
        assert_eq!(
            remote["spec"]["kubeConfig"]["secretRef"]["name"],
            "dev-kubeconfig-secret"
        );
        assert_eq!(remote["spec"]["path"], "./wiring/clusters/flux-system-dev");
        let capi = &first["management/fleet-staging.yaml"].documents[0];
        assert_eq!(
            capi["spec"]["kubeConfig"]["secretRef"]["name"],
            "staging-kubeconfig"
        );
        let local = &first["management/management.yaml"].documents[0];
        assert!(local["spec"].get("kubeConfig").is_none());
        let kustomization = &first["clusters/flux-system-dev/kustomization.yaml"];
        assert!(
            kustomization.header.contains("key \"token\""),
            "{}",
            kustomization.header
        );
        assert_eq!(
            kustomization.documents[0]["resources"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
