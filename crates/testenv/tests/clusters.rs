//! The test environment itself: real etcd + kube-apiserver pairs, several at once.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use pipeline_testenv::TestCluster;

#[tokio::test]
async fn two_independent_clusters_run_at_once() {
    let (management, leaf) = tokio::join!(
        TestCluster::start_named("management"),
        TestCluster::start_named("leaf")
    );
    let (management, leaf) = (management.unwrap(), leaf.unwrap());
    eprintln!(
        "startup (concurrent): management {:?}, leaf {:?}",
        management.started_in(),
        leaf.started_in()
    );
    assert_ne!(management.server_url(), leaf.server_url());

    // An object created in one is absent from the other: separate etcds.
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "only-in-management"},
        "data": {"k": "v"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(management.client(), "default")
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let on_leaf = Api::<ConfigMap>::namespaced(leaf.client(), "default")
        .get_opt("only-in-management")
        .await
        .unwrap();
    assert!(on_leaf.is_none());
    let on_mgmt = Api::<ConfigMap>::namespaced(management.client(), "default")
        .get("only-in-management")
        .await
        .unwrap();
    assert_eq!(on_mgmt.data.unwrap()["k"], "v");

    // The kubeconfig file works for a child process's loader too.
    let kubeconfig = kube::config::Kubeconfig::read_from(leaf.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let from_file = kube::Client::try_from(config).unwrap();
    Api::<Namespace>::all(from_file)
        .get("default")
        .await
        .unwrap();

    management.stop().await;
    leaf.stop().await;
}

#[tokio::test]
async fn rbac_applies_to_users_but_not_admin() {
    let cluster = TestCluster::start().await.unwrap();
    eprintln!("startup (alone): {:?}", cluster.started_in());
    let alice = cluster.user_client("alice", &["devs", "qa"]).await.unwrap();
    let err = Api::<Namespace>::all(alice)
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403 && s.message.contains("\"alice\"")),
        "{err:?}"
    );
    // Both groups from the certificate reach the authorizer.
    let review = whoami(&cluster.user_client("bob", &["g1", "g2"]).await.unwrap()).await;
    assert_eq!(review["status"]["userInfo"]["username"], "bob");
    let groups = review["status"]["userInfo"]["groups"].to_string();
    assert!(groups.contains("g1") && groups.contains("g2"), "{groups}");

    cluster
        .ensure_service_account("apps", "robot")
        .await
        .unwrap();
    let robot = cluster
        .service_account_client("apps", "robot")
        .await
        .unwrap();
    let review = whoami(&robot).await;
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "system:serviceaccount:apps:robot"
    );
}

#[tokio::test]
async fn apiserver_can_be_stopped_and_restarted() {
    let mut cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    cluster.install_crds().await.unwrap();
    cluster.stop_apiserver().await;
    assert!(!cluster.apiserver_running());
    assert!(
        Api::<Namespace>::all(client.clone())
            .get("default")
            .await
            .is_err()
    );
    cluster.restart_apiserver().await.unwrap();
    // Same address, same data: the old client works and the CRDs are still there.
    Api::<Namespace>::all(client.clone())
        .get("default")
        .await
        .unwrap();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.get("pipelines.pipelines.weave.works").await.unwrap();
    cluster.kill_apiserver();
    assert!(Api::<Namespace>::all(client).get("default").await.is_err());
}

#[tokio::test]
async fn missing_binaries_fail_with_the_build_command() {
    // Only this test's process-wide environment is changed; run it in a child process to
    // keep other tests unaffected.
    if std::env::var_os("PIPELINE_TESTENV_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "missing_binaries_fail_with_the_build_command",
                "--nocapture",
            ])
            .env("PIPELINE_TESTENV_CHILD", "1")
            .env("PIPELINE_ETCD_BIN", "/nonexistent/etcd")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let err = TestCluster::start().await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("scripts/ensure-test-binaries.sh"), "{msg}");
    assert!(msg.contains("/nonexistent/etcd"), "{msg}");
}

async fn whoami(client: &kube::Client) -> serde_json::Value {
    let request = http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .header("Content-Type", "application/json")
        .body(
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"
            }))
            .unwrap(),
        )
        .unwrap();
    client.request::<serde_json::Value>(request).await.unwrap()
}
