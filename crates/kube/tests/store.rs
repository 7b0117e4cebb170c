//! The Kubernetes adapters against a real kube-apiserver (pipeline-testenv).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use kube::Api;
use kube::api::PostParams;
use pipeline_core::{Phase, PipelineRef, PromotionRecord, PromotionStore, StoreError, Trigger};
use pipeline_crds::Promotion;
use pipeline_kube::convert::promotion_for;
use pipeline_kube::{KubePromotionStore, LeaderElector, LeaseSettings};
use pipeline_testenv::TestCluster;
use tokio_util::sync::CancellationToken;

fn record(revision: &str, manual: bool) -> PromotionRecord {
    PromotionRecord::new(
        PipelineRef::new("flux-system", "podinfo"),
        "dev",
        "staging",
        revision,
        manual,
        Trigger {
            source: "webhook".into(),
            ..Trigger::default()
        },
        Utc::now(),
    )
}

async fn cluster() -> TestCluster {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    cluster.ensure_namespace("flux-system").await.unwrap();
    cluster
}

#[tokio::test]
async fn store_semantics_against_the_api_server() {
    let mut cluster = cluster().await;
    let store = KubePromotionStore::new(cluster.client());

    // Creation dedupes; the second creator gets the stored record.
    let r = record("1.0.0", false);
    let (stored, created) = store.create_if_absent(r.clone()).await.unwrap();
    assert!(created);
    assert_eq!(stored, r);
    let mut other = record("1.0.0", false);
    other.created_at = Utc::now() + chrono::Duration::seconds(5);
    let (existing, created) = store.create_if_absent(other).await.unwrap();
    assert!(!created);
    assert_eq!(existing.created_at, r.created_at);
    assert_eq!(
        store.get(&r.id).await.unwrap().unwrap().phase,
        Phase::Pending
    );

    // A creator that died between creating and writing the status left an object
    // without status: it reads as its initial phase and is worked on.
    for (revision, manual, phase) in [
        ("2.0.0", false, Phase::Pending),
        ("3.0.0", true, Phase::WaitingApproval),
    ] {
        let half = record(revision, manual);
        let api: Api<Promotion> = Api::namespaced(cluster.client(), "flux-system");
        api.create(&PostParams::default(), &promotion_for(&half, manual))
            .await
            .unwrap();
        let read = store.get(&half.id).await.unwrap().unwrap();
        assert_eq!(read.phase, phase);
        assert_eq!(read.history.len(), 1);
        let unfinished = store.unfinished().await.unwrap();
        assert_eq!(unfinished.iter().any(|u| u.id == half.id), !manual);
    }

    // Transitions are checked; concurrent modifications all land (409 retries).
    let err = store
        .modify(&r.id, &|x| x.succeed("no".into(), None, Utc::now()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Transition(_)), "{err}");
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let store = store.clone();
        let id = r.id.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            store
                .modify(&id, &move |x| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    x.message = format!("{} {i}", x.message);
                    x.attempts += 1;
                    Ok(())
                })
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.get(&r.id).await.unwrap().unwrap().attempts, 5);
    assert!(calls.load(Ordering::SeqCst) >= 5);

    // Listing: newest first, filtered.
    let all = store.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].created_at >= w[1].created_at));
    assert_eq!(store.get("no-such-promotion").await.unwrap(), None);
    assert!(matches!(
        store.modify("no-such-promotion", &|_| Ok(())).await,
        Err(StoreError::NotFound(_))
    ));

    // API server down: every operation is Unavailable (the webhook's 503).
    cluster.stop_apiserver().await;
    assert!(matches!(
        store.create_if_absent(record("9.9.9", false)).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.get(&r.id).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.unfinished().await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn exactly_one_elector_leads_and_a_released_lease_fails_over() {
    let cluster = cluster().await;
    let leading = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let mut shutdowns = Vec::new();
    let mut handles = Vec::new();
    let led_by: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    for name in ["a", "b", "c"] {
        let shutdown = CancellationToken::new();
        let elector = LeaderElector::new(
            cluster.client(),
            LeaseSettings {
                name: "test-lease".into(),
                namespace: "default".into(),
                identity: name.into(),
                duration: Duration::from_secs(3),
                renew: Duration::from_secs(1),
            },
        );
        let (leading, max_seen, led_by) = (leading.clone(), max_seen.clone(), led_by.clone());
        handles.push(tokio::spawn(elector.run(shutdown.clone(), move |stop| {
            let (leading, max_seen, led_by) = (leading.clone(), max_seen.clone(), led_by.clone());
            async move {
                let now = leading.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                led_by.lock().unwrap().push(name.to_string());
                stop.cancelled().await;
                leading.fetch_sub(1, Ordering::SeqCst);
            }
        })));
        shutdowns.push(shutdown);
    }
    wait_until(Duration::from_secs(30), || {
        leading.load(Ordering::SeqCst) == 1
    })
    .await;
    // Give the others a few renew periods: they must stay followers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leading.load(Ordering::SeqCst), 1);
    let first = led_by.lock().unwrap()[0].clone();
    let index = ["a", "b", "c"].iter().position(|n| *n == first).unwrap();
    // The leader shuts down and releases the Lease: another takes over promptly.
    shutdowns[index].cancel();
    wait_until(Duration::from_secs(30), || {
        led_by.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(leading.load(Ordering::SeqCst), 1);
    assert_eq!(led_by.lock().unwrap().len(), 2);
    assert_eq!(max_seen.load(Ordering::SeqCst), 1);
    for s in &shutdowns {
        s.cancel();
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// Polls `done` every 50 ms until it holds; fails after `limit`.
async fn wait_until(limit: Duration, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
