//! The Helm chart: rendered by the real `helm` (built from tools/helm), it produces the
//! same objects as deploy/, and its renderings are accepted by a real kube-apiserver.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use pipeline_testenv::{TestCluster, helm_binary, parse_yaml_documents};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart_dir() -> PathBuf {
    root().join("charts/pipeline-controller")
}

/// `helm template` of the chart with `args`, as JSON documents.
fn render(kube_version: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let helm = helm_binary().unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(helm)
        .arg("template")
        .arg("pipeline-controller")
        .arg(chart_dir())
        .args(["--kube-version", kube_version])
        .args(args)
        // Keep helm's config and cache out of the user's home.
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_yaml_documents(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

fn key(doc: &serde_json::Value) -> String {
    format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap_or_default(),
        doc["metadata"]["namespace"].as_str().unwrap_or_default(),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// The object without its top-level labels (the chart adds Helm's own).
fn comparable(doc: &serde_json::Value) -> serde_json::Value {
    let mut doc = doc.clone();
    if let Some(meta) = doc["metadata"].as_object_mut() {
        meta.remove("labels");
    }
    doc
}

fn to_yaml_stream(docs: &[serde_json::Value]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
        .collect()
}

#[test]
fn chart_crds_match_the_types() {
    let generated = pipeline_crds::crds_yaml().unwrap();
    let path = chart_dir().join("crds/crds.yaml");
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "charts/pipeline-controller/crds/crds.yaml is out of date: run `UPDATE_CRDS=1 cargo test -p pipeline-testenv --test chart`"
    );
}

#[test]
fn default_rendering_equals_the_deploy_manifests() {
    let rendered: BTreeMap<String, serde_json::Value> = render(
        "v1.33.0",
        &["--namespace", "pipeline-system", "--include-crds"],
    )
    .into_iter()
    .map(|d| (key(&d), d))
    .collect();

    let deploy = root().join("deploy");
    let kustomization =
        parse_yaml_documents(&std::fs::read_to_string(deploy.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut expected = BTreeMap::new();
    for file in kustomization[0]["resources"].as_array().unwrap() {
        let text = std::fs::read_to_string(deploy.join(file.as_str().unwrap())).unwrap();
        for doc in parse_yaml_documents(&text).unwrap() {
            // The chart installs into an existing namespace (helm --create-namespace).
            if doc["kind"] != "Namespace" {
                expected.insert(key(&doc), doc);
            }
        }
    }
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "objects of the chart vs deploy/"
    );
    for (k, want) in &expected {
        let got = &rendered[k];
        assert_eq!(
            comparable(got),
            comparable(want),
            "{k} differs between the chart and deploy/"
        );
    }
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run_and_applies() {
    let cluster = TestCluster::start().await.unwrap();
    let version = cluster
        .client()
        .apiserver_version()
        .await
        .unwrap()
        .git_version;
    for ns in ["pipeline-system", "flux-system", "apps"] {
        cluster.ensure_namespace(ns).await.unwrap();
    }

    // Defaults, into an existing namespace.
    let defaults = render(
        &version,
        &["--namespace", "pipeline-system", "--include-crds"],
    );
    cluster
        .dry_run_yaml(&to_yaml_stream(&defaults))
        .await
        .unwrap();

    // Every option switched: own namespace created, cluster-wide Secrets, a custom Lease,
    // notify URLs, extra args and env, no user roles, no PDB. Applied for real (the
    // Namespace comes first in Helm's order).
    let custom = render(
        &version,
        &[
            "--namespace",
            "ignored",
            "--include-crds",
            "--set",
            "namespace=promoter,createNamespace=true,rbac.secrets.clusterWide=true,rbac.userRoles=false,podDisruptionBudget.enabled=false,replicas=3,leaderElection.leaseName=promoter-leader,image.tag=dev,eventsAddr=",
            "--set-json",
            r#"notifyUrls=["http://receiver.apps.svc/hook"]"#,
            "--set-json",
            r#"extraArgs=["--max-attempts=3"]"#,
            "--set-json",
            r#"extraEnv=[{"name":"RUST_LOG","value":"debug"}]"#,
        ],
    );
    let kinds: Vec<String> = custom.iter().map(key).collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("CustomResourceDefinition /pipelines.pipelines.weave.works"),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"Namespace /promoter".to_owned()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"ClusterRoleBinding /pipeline-controller-secrets".to_owned()),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| k.starts_with("RoleBinding flux-system/")),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| k.contains("pipeline-approver") || k.starts_with("PodDisruptionBudget")),
        "{kinds:?}"
    );
    let deployment = custom.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].to_string();
    assert!(
        args.contains("--lease-name=promoter-leader")
            && args.contains("--notify-url=http://receiver.apps.svc/hook")
            && args.contains("--max-attempts=3"),
        "{args}"
    );
    assert!(
        !container["env"]
            .to_string()
            .contains("PIPELINE_CONTROLLER_EVENTS_ADDR")
    );
    assert!(container["image"].as_str().unwrap().ends_with(":dev"));

    // Namespace first for real, then the rest dry-run, then the rest for real.
    let (namespaces, rest): (Vec<_>, Vec<_>) =
        custom.into_iter().partition(|d| d["kind"] == "Namespace");
    cluster
        .apply_yaml(&to_yaml_stream(&namespaces))
        .await
        .unwrap();
    cluster.dry_run_yaml(&to_yaml_stream(&rest)).await.unwrap();
    cluster.apply_yaml(&to_yaml_stream(&rest)).await.unwrap();

    // The cluster-wide Secrets option does what it says, and the Lease rule follows the name.
    let sa = cluster
        .service_account_client("promoter", "pipeline-controller")
        .await
        .unwrap();
    assert!(allowed(&sa, "list", "", "secrets", "", "").await);
    assert!(
        allowed(
            &sa,
            "update",
            "coordination.k8s.io",
            "leases",
            "promoter",
            "promoter-leader"
        )
        .await
    );
    assert!(
        !allowed(
            &sa,
            "update",
            "coordination.k8s.io",
            "leases",
            "promoter",
            "pipeline-controller-leader"
        )
        .await
    );
    assert!(!allowed(&sa, "create", "", "secrets", "apps", "").await);
}

async fn allowed(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                verb: Some(verb.to_owned()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                name: (!name.is_empty()).then(|| name.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}
