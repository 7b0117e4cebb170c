use std::collections::HashSet;

use chrono::TimeZone;
use pipeline_core::{PipelineRef, RetryPolicy, Trigger};

use super::*;

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
}

fn record(
    pipeline: &str,
    source: &str,
    target: &str,
    revision: &str,
    created: DateTime<Utc>,
) -> PromotionRecord {
    let (namespace, name) = pipeline.split_once('/').unwrap();
    PromotionRecord::new(
        PipelineRef::new(namespace, name),
        source,
        target,
        revision,
        false,
        Trigger {
            source: "webhook".into(),
            reason: "ReconciliationSucceeded".into(),
            reporting_controller: "helm-controller".into(),
            object: "HelmRelease/podinfo".into(),
            cluster: String::new(),
            metadata: Default::default(),
        },
        created,
    )
}

fn manual(pipeline: &str, target: &str, revision: &str, created: DateTime<Utc>) -> PromotionRecord {
    let (namespace, name) = pipeline.split_once('/').unwrap();
    PromotionRecord::new(
        PipelineRef::new(namespace, name),
        "dev",
        target,
        revision,
        true,
        Trigger::default(),
        created,
    )
}

fn open_in(dir: &tempfile::TempDir) -> RedbPromotionStore {
    RedbPromotionStore::open(&dir.path().join("promotions.redb")).unwrap()
}

fn ids(records: &[PromotionRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

#[tokio::test]
async fn create_then_get_and_second_create_returns_the_stored_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let first = record("flux-system/podinfo", "dev", "staging", "1.0.0", at(0));
    assert_eq!(store.get(&first.id).await.unwrap(), None);

    let (stored, created) = store.create_if_absent(first.clone()).await.unwrap();
    assert!(created);
    assert_eq!(stored, first);
    assert_eq!(store.get(&first.id).await.unwrap(), Some(first.clone()));

    // Same id, different content: the first one wins and is returned.
    let mut again = record("flux-system/podinfo", "dev", "staging", "1.0.0", at(60));
    again.message = "another trigger".into();
    assert_eq!(again.id, first.id);
    let (stored, created) = store.create_if_absent(again).await.unwrap();
    assert!(!created);
    assert_eq!(stored, first);
    assert_eq!(store.get(&first.id).await.unwrap(), Some(first));
}

#[tokio::test]
async fn list_is_newest_first_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let old = record("ns/app", "dev", "staging", "1", at(-2_000_000_000)); // before 1970
    let mid = record("ns/app", "staging", "prod", "2", at(10));
    let new = record("ns/app", "dev", "staging", "3", at(20));
    // Same pipeline name prefix and a same-time tie, to exercise index boundaries.
    let other = record("ns/app2", "dev", "staging", "4", at(20));
    let other_ns = record("ns2/app", "dev", "staging", "5", at(30));
    let mut tie_a = record("ns/app", "dev", "qa", "tie-a", at(15));
    let mut tie_b = record("ns/app", "dev", "qa", "tie-b", at(15));
    tie_a.created_at = at(15) + chrono::Duration::nanoseconds(5);
    tie_b.created_at = tie_a.created_at;
    let mut ties = [tie_a.id.clone(), tie_b.id.clone()];
    ties.sort();
    for r in [&mid, &other_ns, &old, &tie_b, &new, &other, &tie_a] {
        assert!(store.create_if_absent(r.clone()).await.unwrap().1);
    }

    let all = store.list(&PromotionFilter::default()).await.unwrap();
    let newest_two: HashSet<&str> = ids(&all[1..3]).into_iter().collect();
    assert_eq!(all[0].id, other_ns.id);
    assert_eq!(
        newest_two,
        HashSet::from([new.id.as_str(), other.id.as_str()])
    );
    assert_eq!(
        ids(&all[3..]),
        [ties[0].as_str(), ties[1].as_str(), &mid.id, &old.id]
    );

    let app = PromotionFilter {
        pipeline: Some(PipelineRef::new("ns", "app")),
        environment: None,
    };
    let listed = store.list(&app).await.unwrap();
    assert_eq!(
        ids(&listed),
        [
            &new.id,
            ties[0].as_str(),
            ties[1].as_str(),
            &mid.id,
            &old.id
        ]
    );
    assert_eq!(listed[0], new);

    // Environment matches source or target.
    let staging = PromotionFilter {
        pipeline: Some(PipelineRef::new("ns", "app")),
        environment: Some("staging".into()),
    };
    assert_eq!(
        ids(&store.list(&staging).await.unwrap()),
        [&new.id, &mid.id, &old.id]
    );
    let prod_anywhere = PromotionFilter {
        pipeline: None,
        environment: Some("prod".into()),
    };
    assert_eq!(ids(&store.list(&prod_anywhere).await.unwrap()), [&mid.id]);

    let missing = PromotionFilter {
        pipeline: Some(PipelineRef::new("ns", "ap")),
        environment: None,
    };
    assert!(store.list(&missing).await.unwrap().is_empty());
}

#[tokio::test]
async fn modify_applies_transitions_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let r = manual("ns/app", "prod", "1.2.3", at(0));
    store.create_if_absent(r.clone()).await.unwrap();
    assert!(store.unfinished().await.unwrap().is_empty());

    let err = store
        .modify(&r.id, &|r| r.start_attempt(at(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Transition(e) if e.id == r.id && e.phase == Phase::WaitingApproval),
        "{err}"
    );
    assert_eq!(
        store.get(&r.id).await.unwrap(),
        Some(r.clone()),
        "refused change is not written"
    );

    let approved = store
        .modify(&r.id, &|r| r.approve("alice", at(2)))
        .await
        .unwrap();
    assert_eq!(approved.phase, Phase::Pending);
    assert_eq!(ids(&store.unfinished().await.unwrap()), [&r.id]);

    let running = store
        .modify(&r.id, &|r| r.start_attempt(at(3)))
        .await
        .unwrap();
    assert_eq!((running.phase, running.attempts), (Phase::Running, 1));
    let retry = store
        .modify(&r.id, &|r| {
            r.fail_attempt("flaky".into(), true, &RetryPolicy::default(), at(4))
        })
        .await
        .unwrap();
    assert_eq!(retry.phase, Phase::Pending);
    assert!(retry.next_attempt_at.is_some());
    store
        .modify(&r.id, &|r| r.start_attempt(at(5)))
        .await
        .unwrap();
    let done = store
        .modify(&r.id, &|r| {
            r.succeed("merged".into(), Some("https://x/pr/1".into()), at(6))
        })
        .await
        .unwrap();
    assert_eq!(done.phase, Phase::Succeeded);
    assert_eq!(store.get(&r.id).await.unwrap(), Some(done.clone()));
    assert!(store.unfinished().await.unwrap().is_empty());
    assert!(matches!(
        store.modify(&r.id, &|r| r.start_attempt(at(7))).await,
        Err(StoreError::Transition(_))
    ));

    // A no-op change returns the record as stored.
    assert_eq!(store.modify(&r.id, &|_| Ok(())).await.unwrap(), done);

    let missing = store
        .modify("no-such-id", &|r| r.approve("alice", at(8)))
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, StoreError::NotFound(id) if id == "no-such-id"),
        "{missing}"
    );

    let renamed = store
        .modify(&r.id, &|r| {
            r.id = "other".into();
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(renamed, StoreError::Unavailable(_)));
    assert_eq!(store.get(&r.id).await.unwrap(), Some(done));
    assert_eq!(store.get("other").await.unwrap(), None);
}

#[tokio::test]
async fn modify_moves_index_entries_when_creation_time_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let a = record("ns/app", "dev", "staging", "a", at(0));
    let b = record("ns/app", "dev", "staging", "b", at(10));
    store.create_if_absent(a.clone()).await.unwrap();
    store.create_if_absent(b.clone()).await.unwrap();
    store
        .modify(&a.id, &|r| {
            r.created_at = at(20);
            Ok(())
        })
        .await
        .unwrap();
    let all = store.list(&PromotionFilter::default()).await.unwrap();
    assert_eq!(ids(&all), [&a.id, &b.id]);
    let app = PromotionFilter {
        pipeline: Some(PipelineRef::new("ns", "app")),
        environment: None,
    };
    assert_eq!(ids(&store.list(&app).await.unwrap()), [&a.id, &b.id]);
}

#[tokio::test]
async fn unfinished_lists_only_pending_and_running() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let policy = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    let pending = record("ns/app", "dev", "staging", "pending", at(0));
    let running = record("ns/app", "dev", "staging", "running", at(1));
    let waiting = manual("ns/app", "prod", "waiting", at(2));
    let succeeded = record("ns/app", "dev", "staging", "succeeded", at(3));
    let failed = record("ns/app", "dev", "staging", "failed", at(4));
    for r in [&pending, &running, &waiting, &succeeded, &failed] {
        store.create_if_absent(r.clone()).await.unwrap();
    }
    for id in [&running.id, &succeeded.id, &failed.id] {
        store.modify(id, &|r| r.start_attempt(at(5))).await.unwrap();
    }
    store
        .modify(&succeeded.id, &|r| r.succeed("ok".into(), None, at(6)))
        .await
        .unwrap();
    store
        .modify(&failed.id, &|r| {
            r.fail_attempt("no".into(), true, &policy, at(6))
        })
        .await
        .unwrap();

    let unfinished = store.unfinished().await.unwrap();
    let found: HashSet<(&str, Phase)> = unfinished
        .iter()
        .map(|r| (r.id.as_str(), r.phase))
        .collect();
    assert_eq!(
        found,
        HashSet::from([
            (pending.id.as_str(), Phase::Pending),
            (running.id.as_str(), Phase::Running)
        ])
    );
    let phases: HashSet<Phase> = store
        .list(&PromotionFilter::default())
        .await
        .unwrap()
        .iter()
        .map(|r| r.phase)
        .collect();
    assert_eq!(phases.len(), 5, "every phase is stored: {phases:?}");
}

#[tokio::test]
async fn records_survive_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dirs/promotions.redb");
    let store = RedbPromotionStore::open(&path).unwrap();
    let a = record("ns/app", "dev", "staging", "1", at(0));
    let b = manual("ns/app", "prod", "1", at(1));
    let mut c = record("other/app", "dev", "staging", "9", at(2));
    c.created_at += chrono::Duration::nanoseconds(123_456_789);
    for r in [&a, &b, &c] {
        store.create_if_absent(r.clone()).await.unwrap();
    }
    store
        .modify(&a.id, &|r| r.start_attempt(at(3)))
        .await
        .unwrap();
    store
        .modify(&a.id, &|r| {
            r.succeed("done".into(), Some("https://x/pr/7".into()), at(4))
        })
        .await
        .unwrap();
    store
        .modify(&c.id, &|r| r.start_attempt(at(5)))
        .await
        .unwrap();
    let before = store.list(&PromotionFilter::default()).await.unwrap();
    let unfinished_before = store.unfinished().await.unwrap();
    drop(store);

    let store = RedbPromotionStore::open(&path).unwrap();
    assert_eq!(
        store.list(&PromotionFilter::default()).await.unwrap(),
        before
    );
    assert_eq!(store.unfinished().await.unwrap(), unfinished_before);
    for r in &before {
        assert_eq!(store.get(&r.id).await.unwrap().as_ref(), Some(r));
    }
    let a_after = store.get(&a.id).await.unwrap().unwrap();
    assert_eq!(a_after.phase, Phase::Succeeded);
    assert_eq!(a_after.result.as_deref(), Some("https://x/pr/7"));
    assert_eq!(a_after.history.len(), 3);
    assert_eq!(a_after.trigger, a.trigger);
    assert_eq!(
        store.get(&c.id).await.unwrap().unwrap().created_at,
        c.created_at
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_creators_converge_on_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut r = record("ns/app", "dev", "staging", "1.0.0", at(i));
            r.message = format!("creator {i}");
            store.create_if_absent(r).await.unwrap()
        });
    }
    let results = tasks.join_all().await;
    assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
    let winner = &results.iter().find(|(_, created)| *created).unwrap().0;
    assert!(results.iter().all(|(r, _)| r == winner));
    assert_eq!(store.get(&winner.id).await.unwrap().as_ref(), Some(winner));
    assert_eq!(
        store.list(&PromotionFilter::default()).await.unwrap().len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_modifies_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let r = record("ns/app", "dev", "staging", "1.0.0", at(0));
    store.create_if_absent(r.clone()).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let store = store.clone();
        let id = r.id.clone();
        tasks.spawn(async move {
            store
                .modify(&id, &|r| {
                    r.attempts += 1;
                    Ok(())
                })
                .await
                .unwrap()
        });
    }
    tasks.join_all().await;
    assert_eq!(store.get(&r.id).await.unwrap().unwrap().attempts, 50);
}

#[tokio::test]
async fn second_open_of_the_same_file_fails_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    let store = RedbPromotionStore::open(&path).unwrap();
    let err = RedbPromotionStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, OpenError::AlreadyOpen { path: p } if *p == path),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    // The refused open left the first handle working, and closing frees the file.
    let r = record("ns/app", "dev", "staging", "1", at(0));
    store.create_if_absent(r.clone()).await.unwrap();
    drop(store);
    let store = RedbPromotionStore::open(&path).unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r));
}

const CHILD_ENV: &str = "PIPELINE_STORE_TEST_CHILD_OPEN";

/// Spawns this test binary again, running only `child_process_open`, against a file
/// this process holds open: redb's lock must stop the other process too.
#[test]
fn second_process_cannot_open_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    let _store = RedbPromotionStore::open(&path).unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::child_process_open",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("child refused: promotion store"),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
}

/// The child half of `second_process_cannot_open_the_same_file`; a no-op otherwise.
#[test]
fn child_process_open() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let err = RedbPromotionStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, OpenError::AlreadyOpen { path: p } if *p == path),
        "{err}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
    println!("child refused: {err}");
}

#[tokio::test]
async fn corrupt_json_is_unavailable_naming_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    let store = RedbPromotionStore::open(&path).unwrap();
    let good = record("ns/app", "dev", "staging", "good", at(0));
    let bad = record("ns/app", "dev", "staging", "bad", at(1));
    store.create_if_absent(good.clone()).await.unwrap();
    store.create_if_absent(bad.clone()).await.unwrap();
    store
        .modify(&bad.id, &|r| r.start_attempt(at(2)))
        .await
        .unwrap();
    drop(store);

    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(RECORDS)
            .unwrap()
            .insert(bad.id.as_str(), b"{\"id\": truncated".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    let store = RedbPromotionStore::open(&path).unwrap();
    assert_eq!(store.get(&good.id).await.unwrap(), Some(good.clone()));
    let expect_unavailable = |result: Result<_, StoreError>, what: &str| match result {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains(&bad.id), "{what}: {message}");
        }
        Err(other) => panic!("{what}: {other}"),
        Ok(_) => panic!("{what}: read a corrupt record"),
    };
    expect_unavailable(store.get(&bad.id).await.map(|_| ()), "get");
    expect_unavailable(
        store.list(&PromotionFilter::default()).await.map(|_| ()),
        "list",
    );
    expect_unavailable(store.unfinished().await.map(|_| ()), "unfinished");
    expect_unavailable(
        store
            .modify(&bad.id, &|r| r.approve("alice", at(3)))
            .await
            .map(|_| ()),
        "modify",
    );
    expect_unavailable(
        store.create_if_absent(bad.clone()).await.map(|_| ()),
        "create_if_absent",
    );
    // The store stays usable for other records.
    let next = record("ns/app", "dev", "staging", "next", at(4));
    assert!(store.create_if_absent(next).await.unwrap().1);
}

#[test]
fn refuses_a_newer_schema_version_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    drop(RedbPromotionStore::open(&path).unwrap());
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = RedbPromotionStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, OpenError::UnsupportedSchema { found, supported, .. } if *found == SCHEMA_VERSION + 1 && *supported == SCHEMA_VERSION),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    let db = Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let version = txn
        .open_table(META)
        .unwrap()
        .get(SCHEMA_VERSION_KEY)
        .unwrap()
        .unwrap()
        .value();
    assert_eq!(version, SCHEMA_VERSION + 1);
}

#[test]
fn a_file_that_is_not_a_database_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    std::fs::write(
        &path,
        b"this is not a redb file, just some text that is long enough",
    )
    .unwrap();
    let err = RedbPromotionStore::open(&path).unwrap_err();
    assert!(matches!(err, OpenError::Storage { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn newest_first_key_orders_time_descending() {
    let epoch = |seconds: i64, nanos: u32| Utc.timestamp_opt(seconds, nanos).unwrap();
    let times = [
        epoch(-3_000_000_000, 0),
        epoch(-1, 0),
        epoch(-1, 999_999_999),
        epoch(0, 0),
        epoch(0, 1),
        epoch(1, 0),
        at(0),
        DateTime::<Utc>::MAX_UTC,
    ];
    let keys: Vec<(u64, u32)> = times.iter().map(|t| newest_first(*t)).collect();
    for pair in keys.windows(2) {
        assert!(pair[0] > pair[1], "{pair:?}");
    }
    assert!(newest_first(DateTime::<Utc>::MIN_UTC) > keys[0]);
}

#[tokio::test]
async fn a_panicking_change_writes_nothing_and_frees_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let r = record("ns/app", "dev", "staging", "1", at(0));
    store.create_if_absent(r.clone()).await.unwrap();
    let panicking = {
        let store = store.clone();
        let id = r.id.clone();
        tokio::spawn(async move {
            store
                .modify(&id, &|r| {
                    r.attempts = 99;
                    panic!("change panicked");
                })
                .await
        })
    };
    assert!(panicking.await.unwrap_err().is_panic());
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    let started = store
        .modify(&r.id, &|r| r.start_attempt(at(1)))
        .await
        .unwrap();
    assert_eq!(started.attempts, 1);
}

#[tokio::test]
async fn an_empty_existing_file_is_refused_unless_asked_to_start_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    std::fs::write(&path, b"").unwrap();
    let err = RedbPromotionStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, OpenError::EmptyFile { path: p } if *p == path),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("--init-empty-state"), "{text}");
    // Refusing changed nothing.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);

    let store = RedbPromotionStore::open_with(
        &path,
        OpenOptions {
            init_empty_file: true,
        },
    )
    .unwrap();
    let r = record("ns/app", "dev", "staging", "1", at(0));
    store.create_if_absent(r.clone()).await.unwrap();
    store.ready().await.unwrap();
    drop(store);
    // Once written, the plain open works again.
    let store = RedbPromotionStore::open(&path).unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r));
}

#[tokio::test]
async fn delete_removes_the_record_and_its_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let kept = record("ns/app", "dev", "staging", "1", at(0));
    let gone = record("ns/app", "dev", "staging", "2", at(1));
    store.create_if_absent(kept.clone()).await.unwrap();
    store.create_if_absent(gone.clone()).await.unwrap();
    store.delete(&gone.id).await.unwrap();
    // Deleting again, or something never stored, is fine.
    store.delete(&gone.id).await.unwrap();
    store.delete("no-such-id").await.unwrap();
    assert_eq!(store.get(&gone.id).await.unwrap(), None);
    let all = store.list(&PromotionFilter::default()).await.unwrap();
    assert_eq!(ids(&all), [kept.id.as_str()]);
    let filter = PromotionFilter {
        pipeline: Some(PipelineRef::new("ns", "app")),
        environment: None,
    };
    assert_eq!(ids(&store.list(&filter).await.unwrap()), [kept.id.as_str()]);
    assert_eq!(ids(&store.unfinished().await.unwrap()), [kept.id.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_are_committed_together_and_all_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    let store = RedbPromotionStore::open(&path).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let store = store.clone();
        tasks.spawn(async move {
            // Every third one repeats an earlier revision: a duplicate in the same batch
            // or against the file.
            let revision = (i - i % 3).to_string();
            store
                .create_if_absent(record("ns/app", "dev", "staging", &revision, at(i)))
                .await
                .unwrap()
        });
    }
    let results = tasks.join_all().await;
    let created = results.iter().filter(|(_, created)| *created).count();
    assert_eq!(created, 100);
    drop(store);
    let store = RedbPromotionStore::open(&path).unwrap();
    let all = store.list(&PromotionFilter::default()).await.unwrap();
    assert_eq!(all.len(), 100);
    for (record, _) in &results {
        assert!(store.get(&record.id).await.unwrap().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_and_creates_share_commits_and_all_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("promotions.redb");
    let store = RedbPromotionStore::open(&path).unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        let r = record(
            "ns/app",
            "dev",
            "staging",
            &format!("1.{i}.0"),
            at(i as i64),
        );
        ids.push(store.create_if_absent(r).await.unwrap().0.id);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let (store, id) = (store.clone(), id.clone());
        tasks.spawn(async move {
            store
                .modify(&id, &|r| r.start_attempt(at(1_000)))
                .await
                .unwrap();
            // A create beside each change, in the same queue.
            store
                .create_if_absent(record(
                    "ns/app",
                    "dev",
                    "prod",
                    &format!("2.{i}.0"),
                    at(i as i64),
                ))
                .await
                .unwrap();
        });
    }
    tasks.join_all().await;
    drop(store);
    let store = RedbPromotionStore::open(&path).unwrap();
    for id in &ids {
        let stored = store.get(id).await.unwrap().unwrap();
        assert_eq!(stored.phase, Phase::Running, "{id}");
        assert_eq!(stored.attempts, 1, "{id}");
    }
    assert_eq!(
        store.list(&PromotionFilter::default()).await.unwrap().len(),
        200
    );
    assert_eq!(store.unfinished().await.unwrap().len(), 200);
}

#[tokio::test]
async fn changing_a_deleted_record_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let r = record("ns/app", "dev", "staging", "1.0.0", at(0));
    store.create_if_absent(r.clone()).await.unwrap();
    store.delete(&r.id).await.unwrap();
    let err = store
        .modify(&r.id, &|r| {
            r.attempts += 1;
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}
