//! The Secret sources against a real API server.
#![allow(clippy::unwrap_used)]

use pipeline_core::{SecretLookupError, SecretSource};
use pipeline_kube::KubeSecretSource;
use pipeline_testenv::TestCluster;

#[tokio::test]
async fn a_cluster_wide_secret_source_reads_every_namespace_through_one_watch() {
    let cluster = TestCluster::start().await.unwrap();
    for namespace in ["team-a", "team-b"] {
        cluster.ensure_namespace(namespace).await.unwrap();
        cluster
            .apply_yaml(&format!(
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: hmac\n  namespace: {namespace}\nstringData:\n  hmac-key: key-of-{namespace}\n"
            ))
            .await
            .unwrap();
    }
    let secrets = KubeSecretSource::cluster_wide(cluster.client());
    for namespace in ["team-a", "team-b"] {
        let value = secrets
            .secret_value(namespace, "hmac", "hmac-key")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(value.expose(), format!("key-of-{namespace}").as_bytes());
    }
    assert!(matches!(
        secrets.secret_value("team-a", "absent", "hmac-key").await,
        Err(SecretLookupError::SecretNotFound { .. })
    ));
    // No per-namespace watches were started.
    assert!(secrets.watched().is_empty());
    // One watch of Secrets on the API server, whatever the namespaces.
    let watches = cluster.active_watches("", "secrets").await.unwrap();
    assert!(watches <= 2, "{watches} Secret watches");
}
