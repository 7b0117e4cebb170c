//! The controller's API client against a real API server: requests over HTTP/2, watches
//! on HTTP/1.1 connections of their own (so they never take the requests' streams),
//! both side by side, and a new connection after the API server restarts.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use pipeline_kube::api_client::api_client;
use pipeline_testenv::TestCluster;

async fn client_of(cluster: &TestCluster) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    api_client(config).unwrap()
}

async fn version_over(client: &kube::Client) -> Result<http::Version, kube::Error> {
    version_of(client, "/version").await
}

async fn version_of(client: &kube::Client, uri: &str) -> Result<http::Version, kube::Error> {
    let request = http::Request::get(uri)
        .body(Vec::new())
        .unwrap()
        .map(Into::into);
    Ok(client.send(request).await?.version())
}

fn config_map(i: usize) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("cm-{i}"), "namespace": "default"},
        "data": {"i": i.to_string()}
    }))
    .unwrap()
}

#[tokio::test]
async fn requests_over_http2_and_watches_beside_them_survive_an_api_server_restart() {
    let mut cluster = TestCluster::start().await.unwrap();
    let client = client_of(&cluster).await;
    assert_eq!(version_over(&client).await.unwrap(), http::Version::HTTP_2);
    assert_eq!(
        version_of(&client, "/api/v1/namespaces/default/configmaps?limit=1")
            .await
            .unwrap(),
        http::Version::HTTP_2
    );
    // A watch holds what carries it until it ends: its own HTTP/1.1 connection, not one
    // of the limited streams of the requests' connection.
    assert_eq!(
        version_of(
            &client,
            "/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1"
        )
        .await
        .unwrap(),
        http::Version::HTTP_11
    );

    // A watch and 64 concurrent creates on the same client: all created, all seen.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let watch = watcher(api.clone(), watcher::Config::default().labels("!absent"));
    let seen = tokio::spawn(async move {
        futures::pin_mut!(watch);
        let mut names = std::collections::HashSet::new();
        while let Some(event) = watch.next().await {
            if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = event
                && let Some(name) = cm.metadata.name
                && name.starts_with("cm-")
            {
                names.insert(name);
                if names.len() == 64 {
                    return names.len();
                }
            }
        }
        names.len()
    });
    let creates = futures::future::join_all((0..64).map(|i| {
        let api = api.clone();
        async move { api.create(&PostParams::default(), &config_map(i)).await }
    }))
    .await;
    assert!(creates.iter().all(Result::is_ok), "{creates:?}");
    let seen = tokio::time::timeout(Duration::from_secs(30), seen)
        .await
        .expect("the watch did not see every create within 30 s")
        .unwrap();
    assert_eq!(seen, 64);

    // The connection dies with the API server; the next requests get a new one.
    cluster.stop_apiserver().await;
    assert!(version_over(&client).await.is_err());
    cluster.restart_apiserver().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match version_over(&client).await {
            Ok(version) => {
                assert_eq!(version, http::Version::HTTP_2);
                break;
            }
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "no answer after the restart: {err}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(api.get("cm-0").await.is_ok());
}
