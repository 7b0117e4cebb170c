//! The read commands in Kubernetes mode for a user whose RBAC covers one namespace:
//! `promotions list -n`, `promotions get` (with and without `-n`), and the one-line
//! refusal of a cluster-wide list. Real etcd + kube-apiserver on loopback.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::Value;
use support::k8s::{Controller, cluster, post_ready, recorded_id, run_cli};

#[tokio::test]
async fn a_namespace_scoped_viewer_lists_and_gets_promotions() {
    let cluster = cluster().await;
    cluster
        .apply_yaml(include_str!("../../../deploy/user-roles.yaml"))
        .await
        .unwrap();
    cluster
        .apply_yaml(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: viewers\n  namespace: flux-system\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: pipeline-viewer\nsubjects:\n  - kind: User\n    name: carol\n    apiGroup: rbac.authorization.k8s.io\n",
        )
        .await
        .unwrap();
    let controller = Controller::start(&cluster, "cli-reads", &[]);
    let id = recorded_id(post_ready(&controller, "dev", "4.0.0", "podinfo-dev").await).await;

    let carol = cluster.user_kubeconfig("carol", &[]).unwrap();
    // Cluster-wide: refused, in one line saying what to do (exit code 2).
    let (code, _, err) = run_cli(&carol, &["promotions", "list"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("you may not list Promotions in all namespaces; pass -n NAMESPACE"),
        "{err}"
    );
    // One namespace: allowed.
    let (code, out, err) = run_cli(
        &carol,
        &["promotions", "list", "-n", "flux-system", "-o", "json"],
    );
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["id"], id.as_str());
    let (code, out, err) = run_cli(&carol, &["promotions", "list", "-n", "flux-system"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID ") && out.contains(&id), "{out}");
    // --pipeline implies its namespace.
    let (code, out, err) = run_cli(
        &carol,
        &["promotions", "list", "--pipeline", "flux-system/podinfo"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");

    // get with -n: YAML by default.
    let (code, out, err) = run_cli(&carol, &["promotions", "get", &id, "-n", "flux-system"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("id: {id}")), "{out}");
    // get without -n: the cluster-wide search is refused, the context's namespace
    // (default here) does not have it: one line saying to pass -n.
    let (code, _, err) = run_cli(&carol, &["promotions", "get", &id]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pass -n NAMESPACE"), "{err}");
    // With flux-system as the context's namespace, get finds it without -n.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&carol).unwrap()).unwrap();
    for context in config["contexts"].as_array_mut().unwrap() {
        context["context"]["namespace"] = "flux-system".into();
    }
    let in_flux_system = carol.with_file_name("kubeconfig-carol-flux-system");
    std::fs::write(&in_flux_system, config.to_string()).unwrap();
    let (code, out, err) = run_cli(&in_flux_system, &["promotions", "get", &id, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["id"], id.as_str());

    // The admin finds it in any namespace, and an unknown id is one line.
    let (code, out, err) = run_cli(cluster.kubeconfig_path(), &["promotions", "get", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("phase: "), "{out}");
    let (code, _, err) = run_cli(
        cluster.kubeconfig_path(),
        &["promotions", "get", "podinfo-staging-0000000000000000"],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim(),
        "error: no promotion podinfo-staging-0000000000000000 in any namespace"
    );
}
