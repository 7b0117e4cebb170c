//! The retention policy keeps up with a burst of promotions (embedded mode, the real
//! binary): finished promotions past the per-environment count are deleted soon after
//! the burst, not only by the periodic sweep ten minutes later.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;

const KEEP: usize = 5;
const BURST: usize = 60;

#[tokio::test]
async fn a_burst_of_promotions_is_swept_without_waiting_for_the_timer() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &[
            "--notify-url",
            &receiver.url(),
            "--retention-per-environment",
            &KEEP.to_string(),
        ],
    );
    for i in 0..BURST {
        let (status, body) =
            post_event(&service, "dev", event("podinfo-dev", &format!("7.0.{i}"))).await;
        assert_eq!(status, 202, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.count() < BURST {
        assert!(
            Instant::now() < deadline,
            "only {} of {BURST} promotions notified",
            receiver.count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The sweep is brought forward once enough promotions finished (at least 10 here),
    // so at most KEEP plus fewer than 10 stay until the timer; without it all 60 would.
    let deadline = Instant::now() + Duration::from_secs(30);
    let revisions = loop {
        let records = get_json(&service, "/api/v1/promotions").await;
        let revisions: Vec<String> = records
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["targetEnvironment"] == "staging")
            .map(|r| r["revision"].as_str().unwrap().to_owned())
            .collect();
        if revisions.len() < KEEP + 10 {
            break revisions;
        }
        assert!(
            Instant::now() < deadline,
            "{} promotions to staging still kept 30 s after the burst (keep {KEEP})",
            revisions.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(revisions.len() >= KEEP, "{revisions:?}");
    // The newest are the ones kept.
    for i in BURST - KEEP..BURST {
        assert!(
            revisions.contains(&format!("7.0.{i}")),
            "7.0.{i} was deleted: kept {revisions:?}"
        );
    }
    // The sweep logs once its last delete is done, which can be after the listing
    // above already showed the deletions.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = service.logs();
        if logs.contains("finished promotions past the retention policy deleted") {
            break;
        }
        assert!(Instant::now() < deadline, "{logs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
