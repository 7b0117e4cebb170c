//! The watch loop notices changes by polling.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use pipeline_core::pipeline::PipelineRef;
use pipeline_core::ports::{PipelineSource, SecretSource};
use pipeline_manifests::ManifestCatalog;

const PIPELINE: &str = "apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata: {name: watched, namespace: ns}
spec:
  appRef: {apiVersion: helm.toolkit.fluxcd.io/v2, kind: HelmRelease, name: app}
  environments:
    - {name: dev, targets: [{namespace: dev}]}
    - {name: prod, targets: [{namespace: prod}]}
  promotion:
    strategy: {secretRef: {name: hmac}, notification: {}}
";

/// Waits (at most 5 s) until `check` holds.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn watch_reloads_on_change_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let source = Arc::new(ManifestCatalog::new(dir.path()));
    let reference = PipelineRef::new("ns", "watched");
    assert!(source.pipeline(&reference).await.unwrap().is_none());

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(Arc::clone(&source).watch(Duration::from_millis(50), async {
        let _ = stopped.await;
    }));

    fs::create_dir(dir.path().join("team")).unwrap();
    fs::write(dir.path().join("team/pipe.yaml"), PIPELINE).unwrap();
    eventually("the new pipeline is served", || async {
        source.pipeline(&reference).await.unwrap().is_some()
    })
    .await;

    fs::write(
        dir.path().join("team/hmac.yaml"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: hmac, namespace: ns}\nstringData: {hmac-key: k1}\n",
    )
    .unwrap();
    eventually("the secret is served", || async {
        source.secret_value("ns", "hmac", "hmac-key").await.is_ok()
    })
    .await;

    fs::remove_file(dir.path().join("team/pipe.yaml")).unwrap();
    eventually("the deleted pipeline is gone", || async {
        source.pipeline(&reference).await.unwrap().is_none()
    })
    .await;

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("watch stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn watch_keeps_the_last_good_version_of_a_file_that_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipe.yaml");
    fs::write(&file, PIPELINE).unwrap();
    let source = Arc::new(ManifestCatalog::new(dir.path()));
    let reference = PipelineRef::new("ns", "watched");
    assert!(source.pipeline(&reference).await.unwrap().is_some());

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(Arc::clone(&source).watch(Duration::from_millis(50), async {
        let _ = stopped.await;
    }));

    fs::write(
        &file,
        "apiVersion: pipelines.weave.works/v1alpha1\nkind: Pipeline\n  bad: [indent\n",
    )
    .unwrap();
    eventually("the broken file is noticed", || async {
        !source.last_good_files().is_empty()
    })
    .await;
    assert!(source.pipeline(&reference).await.unwrap().is_some());

    fs::write(&file, PIPELINE.replace("watched", "fixed")).unwrap();
    eventually("the fixed file is served", || async {
        source.last_good_files().is_empty()
            && source
                .pipeline(&PipelineRef::new("ns", "fixed"))
                .await
                .unwrap()
                .is_some()
    })
    .await;
    assert!(source.pipeline(&reference).await.unwrap().is_none());

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("watch stops on shutdown")
        .unwrap();
}
