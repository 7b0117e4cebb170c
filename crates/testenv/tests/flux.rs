//! The Flux and GitopsCluster CRDs and the inline kubeconfigs that the deployment-watch
//! tests (crates/cli/tests/watch.rs) build on.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use pipeline_testenv::TestCluster;
use serde_json::json;

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

async fn client_of(yaml: &str) -> kube::Client {
    // As the controller reads a leaf cluster's kubeconfig Secret.
    let kubeconfig = Kubeconfig::from_yaml(yaml).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn flux_and_gitops_cluster_crds_are_served_and_kubeconfigs_are_inline() {
    let cluster = TestCluster::start_named("flux").await.unwrap();
    cluster.install_flux_crds().await.unwrap();
    cluster.install_gitops_cluster_crd().await.unwrap();
    cluster.ensure_namespace("apps").await.unwrap();
    let kube = cluster.client();

    // A HelmRelease as Flux's own CRD validates it (its CEL rules survived the apply)...
    let hr = resource(
        "helm.toolkit.fluxcd.io",
        "v2",
        "HelmRelease",
        "helmreleases",
    );
    let releases: Api<DynamicObject> = Api::namespaced_with(kube.clone(), "apps", &hr);
    let without_chart: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
        "metadata": {"name": "nochart"}, "spec": {"interval": "5m"}
    }))
    .unwrap();
    let refused = releases
        .create(&PostParams::default(), &without_chart)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("either chart or chartRef must be set"),
        "{refused}"
    );
    let podinfo: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
        "metadata": {"name": "podinfo"},
        "spec": {"interval": "5m", "chart": {"spec": {"chart": "podinfo", "version": "6.5.0",
                 "sourceRef": {"kind": "HelmRepository", "name": "podinfo"}}}}
    }))
    .unwrap();
    let created = releases
        .create(&PostParams::default(), &podinfo)
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    // ... with a status subresource: status writes do not move the generation.
    let status = json!({"status": {"observedGeneration": 1, "history": [{
        "name": "podinfo", "namespace": "apps", "version": 1, "status": "deployed",
        "chartName": "podinfo", "chartVersion": "6.5.0", "appVersion": "6.5.0",
        "configDigest": "sha256:00", "digest": "sha256:01",
        "firstDeployed": "2025-01-01T00:00:00Z", "lastDeployed": "2025-01-01T00:00:00Z"}]}});
    let patched = releases
        .patch_status("podinfo", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(1));
    assert_eq!(
        patched.data["status"]["history"][0]["chartVersion"],
        "6.5.0"
    );

    let ks = resource(
        "kustomize.toolkit.fluxcd.io",
        "v1",
        "Kustomization",
        "kustomizations",
    );
    Api::<DynamicObject>::namespaced_with(kube.clone(), "apps", &ks)
        .list(&Default::default())
        .await
        .unwrap();

    // A GitopsCluster keeps whatever spec it is given.
    cluster
        .apply_yaml(
            "apiVersion: gitops.weave.works/v1alpha1\nkind: GitopsCluster\nmetadata:\n  name: leaf\n  namespace: apps\nspec:\n  secretRef:\n    name: leaf-kubeconfig\n",
        )
        .await
        .unwrap();
    let gc = resource(
        "gitops.weave.works",
        "v1alpha1",
        "GitopsCluster",
        "gitopsclusters",
    );
    let leaf = Api::<DynamicObject>::namespaced_with(kube.clone(), "apps", &gc)
        .get("leaf")
        .await
        .unwrap();
    assert_eq!(leaf.data["spec"]["secretRef"]["name"], "leaf-kubeconfig");

    // Kubeconfigs as YAML with everything inline reach the cluster; a user kubeconfig is
    // minted afresh each time.
    let admin = cluster.kubeconfig_yaml().unwrap();
    assert!(!admin.trim_start().starts_with('{'), "not YAML: {admin}");
    assert!(admin.contains("client-certificate-data"));
    assert!(admin.contains(cluster.server_url()));
    Api::<Namespace>::all(client_of(&admin).await)
        .get("apps")
        .await
        .unwrap();
    let other = cluster
        .user_kubeconfig_yaml("other-admin", &["system:masters"])
        .unwrap();
    let again = cluster
        .user_kubeconfig_yaml("other-admin", &["system:masters"])
        .unwrap();
    assert_ne!(other, again);
    Api::<Namespace>::all(client_of(&other).await)
        .get("apps")
        .await
        .unwrap();
    let nobody = cluster.user_kubeconfig_yaml("nobody", &[]).unwrap();
    let err = Api::<Namespace>::all(client_of(&nobody).await)
        .get("apps")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("forbidden"), "{err}");

    // Nothing watches HelmReleases here (crates/cli/tests/watch.rs counts the
    // controller's watches this way).
    assert!(
        cluster
            .metrics_text()
            .await
            .unwrap()
            .contains("apiserver_longrunning_requests")
    );
    assert_eq!(
        cluster
            .active_watches("helm.toolkit.fluxcd.io", "helmreleases")
            .await
            .unwrap(),
        0
    );
    cluster.stop().await;
}
