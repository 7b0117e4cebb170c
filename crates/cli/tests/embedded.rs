//! End-to-end tests of embedded mode: the real binary, real HTTP over loopback, the
//! real state file, the bundled quickstart manifests.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use pipeline_core::signature::{HmacAlgorithm, verify};
use serde_json::Value;
use support::*;

/// The quickstart Secret's `approval-key`.
const APPROVAL_KEY: &str = "quickstart-approval-key-9876543210";

#[tokio::test]
async fn event_to_notification_to_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url()],
    );

    let (status, record) = post_event(&service, "dev", event("podinfo-dev", "6.5.1")).await;
    assert_eq!(status, 202, "{record}");
    let id = record["id"].as_str().unwrap();
    let done = wait_for(&service, id, "Succeeded", |r| r["phase"] == "Succeeded").await;
    assert_eq!(done["attempts"], 1);
    let phases: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["Pending", "Running", "Succeeded"]);

    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let (headers, body) = &received[0];
    let signature = headers.get("x-signature").unwrap().to_str().unwrap();
    assert!(signature.starts_with("sha256="));
    verify(Some(signature), KEY.as_bytes(), body).unwrap();
    let event: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(event["reason"], "Promote");
    assert_eq!(event["involvedObject"]["kind"], "Pipeline");
    assert_eq!(event["metadata"]["environment"], "staging");
    assert_eq!(event["metadata"]["version"], "6.5.1");
    assert_eq!(event["metadata"]["sourceEnvironment"], "dev");

    // Logs never carry the key or a signature.
    let logs = service.logs();
    assert!(logs.contains("promotion recorded"), "{logs}");
    assert!(!logs.contains(KEY), "key in logs");
    assert!(!logs.contains(&signature[7..]), "signature in logs");
}

#[tokio::test]
async fn kill_9_loses_nothing_and_success_is_never_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let state = dir.path().join("state.redb");
    // A receiver so slow that the attempt is mid-flight when the process dies.
    let slow = Receiver::start(vec![], Duration::from_secs(30)).await;
    let mut service = Service::start(&manifests, &state, &["--notify-url", &slow.url()]);
    let (status, record) = post_event(&service, "dev", event("podinfo-dev", "7.0.0")).await;
    assert_eq!(status, 202);
    let id = record["id"].as_str().unwrap().to_string();
    wait_for(&service, &id, "Running", |r| r["phase"] == "Running").await;
    service.kill9();

    // Restarted against a healthy receiver, it finishes the interrupted promotion.
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let mut service = Service::start(&manifests, &state, &["--notify-url", &receiver.url()]);
    let done = wait_for(&service, &id, "Succeeded", |r| r["phase"] == "Succeeded").await;
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["history"][2]["reason"], "Resumed");
    // The same deployment reported again is a duplicate, not a new promotion.
    let (status, again) = post_event(&service, "dev", event("podinfo-dev", "7.0.0")).await;
    assert_eq!(status, 200);
    assert_eq!(again["phase"], "Succeeded");
    service.kill9();

    // Another restart does not execute the succeeded promotion again.
    let service = Service::start(&manifests, &state, &["--notify-url", &receiver.url()]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.count(), 1);
    let listed = get_json(&service, "/api/v1/promotions").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn failed_deliveries_are_retried_with_backoff_then_give_up() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![503, 502], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &[
            "--notify-url",
            &receiver.url(),
            "--retry-base",
            "100ms",
            "--max-attempts",
            "5",
        ],
    );
    let (_, record) = post_event(&service, "dev", event("podinfo-dev", "8.0.0")).await;
    let id = record["id"].as_str().unwrap();
    let done = wait_for(&service, id, "Succeeded", |r| r["phase"] == "Succeeded").await;
    assert_eq!(done["attempts"], 3);
    let reasons: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "Recorded",
            "Started",
            "RetryScheduled",
            "Started",
            "RetryScheduled",
            "Started",
            "Succeeded"
        ]
    );

    // A receiver that keeps failing: the record ends Failed after the attempts allowed.
    let broken = Receiver::start(vec![500; 10], Duration::ZERO).await;
    let dir2 = tempfile::tempdir().unwrap();
    let manifests2 = copy_quickstart(dir2.path());
    let service2 = Service::start(
        &manifests2,
        &dir2.path().join("state.redb"),
        &[
            "--notify-url",
            &broken.url(),
            "--retry-base",
            "50ms",
            "--max-attempts",
            "3",
        ],
    );
    let (_, record) = post_event(&service2, "dev", event("podinfo-dev", "8.0.1")).await;
    let failed = wait_for(&service2, record["id"].as_str().unwrap(), "Failed", |r| {
        r["phase"] == "Failed"
    })
    .await;
    assert_eq!(failed["attempts"], 3);
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 3 attempts"),
        "{failed}"
    );
    drop(service);
}

#[tokio::test]
async fn manual_approval_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url()],
    );
    let (status, record) = post_event(&service, "staging", event("podinfo-staging", "6.5.1")).await;
    assert_eq!(status, 202, "{record}");
    assert_eq!(record["phase"], "WaitingApproval");
    let id = record["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count(), 0, "nothing runs before approval");

    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{APPROVAL_KEY}\n")).unwrap();
    let server = service.url("");
    // The webhook key every leaf cluster holds must not approve anything.
    let leaf_key = dir.path().join("leaf");
    std::fs::write(&leaf_key, KEY).unwrap();
    let approve = |key: std::path::PathBuf| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            run_cli(&[
                "approve",
                "flux-system/podinfo",
                "prod",
                "6.5.1",
                "--server",
                &server,
                "--key-file",
                key.to_str().unwrap(),
                "--by",
                "alice",
            ])
        })
    };
    let (code, _, stderr) = approve(leaf_key).await.unwrap();
    assert_ne!(code, 0);
    assert!(
        stderr.contains("401") && stderr.contains("unauthenticated"),
        "{stderr}"
    );
    let still = get_json(&service, &format!("/api/v1/promotions/{id}")).await;
    assert_eq!(still["phase"], "WaitingApproval");

    let (code, stdout, stderr) = approve(key_file).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("approved 6.5.1 of flux-system/podinfo to prod"),
        "{stdout}"
    );
    let done = wait_for(&service, id, "Succeeded", |r| r["phase"] == "Succeeded").await;
    assert_eq!(done["decidedBy"], "alice (approval key)");
    assert_eq!(receiver.count(), 1);

    let server = service.url("");
    let (code, stdout, _) = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "promotions",
            "list",
            "--server",
            &server,
            "--pipeline",
            "flux-system/podinfo",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert!(stdout.starts_with("PIPELINE"), "{stdout}");
    assert!(
        stdout.contains("flux-system/podinfo") && stdout.contains("Succeeded"),
        "{stdout}"
    );
}

#[tokio::test]
async fn pull_request_promotions_fail_clearly_without_their_secret() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let text = std::fs::read_to_string(manifests.join("pipeline.yaml")).unwrap();
    let text = text.replacen(
        "      secretRef:\n        name: podinfo-promotion-hmac\n      notification: {}",
        "      secretRef:\n        name: podinfo-promotion-hmac\n      pull-request:\n        type: github\n        url: https://github.com/example/fleet\n        baseBranch: main\n        secretRef:\n          name: git-credentials",
        1,
    );
    assert!(text.contains("pull-request"));
    std::fs::write(manifests.join("pipeline.yaml"), text).unwrap();
    let service = Service::start(&manifests, &dir.path().join("state.redb"), &[]);
    let (status, record) = post_event(&service, "dev", event("podinfo-dev", "6.5.1")).await;
    assert_eq!(status, 202, "{record}");
    let failed = wait_for(&service, record["id"].as_str().unwrap(), "Failed", |r| {
        r["phase"] == "Failed"
    })
    .await;
    assert_eq!(failed["attempts"], 1);
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("secret flux-system/git-credentials for the pull request not found"),
        "{failed}"
    );
}

#[tokio::test]
async fn manifest_changes_are_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let service = Service::start(&manifests, &dir.path().join("state.redb"), &[]);
    let other = std::fs::read_to_string(manifests.join("pipeline.yaml"))
        .unwrap()
        .replace(
            "name: podinfo\n  namespace: flux-system",
            "name: podinfo-two\n  namespace: flux-system",
        );
    let body = event("podinfo-dev", "1.2.3");
    let signature = pipeline_core::signature::sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &body);
    let post = || {
        client()
            .post(service.url("/pipelines/promotions/flux-system/podinfo-two/dev"))
            .header("x-signature", signature.clone())
            .body(body.clone())
            .send()
    };
    assert_eq!(post().await.unwrap().status().as_u16(), 404);
    std::fs::create_dir_all(manifests.join("more")).unwrap();
    std::fs::write(manifests.join("more/two.yaml"), other).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = post().await.unwrap().status().as_u16();
        if status == 202 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new pipeline never loaded ({status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken edit is reported and does not take the other pipelines down.
    std::fs::write(manifests.join("more/two.yaml"), "kind: Pipeline\napiVersion: pipelines.weave.works/v1alpha1\nmetadata: {name: broken}\nspec: {environments: []}\n").unwrap();
    let expected =
        "more/two.yaml (document 1) Pipeline default/broken: spec: missing field `appRef`";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !service.logs().contains(expected) {
        assert!(std::time::Instant::now() < deadline, "{}", service.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = post_event(&service, "dev", event("podinfo-dev", "1.2.4")).await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn concurrent_identical_events_over_http_give_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let service = std::sync::Arc::new(Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &[],
    ));
    let body = event("podinfo-dev", "9.9.9");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let service = service.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            post_event(&service, "dev", body).await.0
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        49,
        "{statuses:?}"
    );
    let listed = get_json(&service, "/api/v1/promotions").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[test]
fn validate_reports_file_object_and_field() {
    let quickstart = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/quickstart");
    let (code, stdout, stderr) = run_cli(&["validate", quickstart]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("1 pipeline(s)"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: pipelines.weave.works/v1alpha1\nkind: Pipeline\nmetadata:\n  name: broken\n  namespace: team\nspec:\n  appRef: {apiVersion: v1, kind: K, name: app}\n  environments:\n    - name: dev\n      targets: [{namespace: a}]\n    - name: dev\n      targets: [{namespace: b}]\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("team/broken"), "{stderr}");
    assert!(stderr.contains("spec.environments[1].name"), "{stderr}");
    let (code, _, _) = run_cli(&["validate", "/nonexistent/folder"]);
    assert_ne!(code, 0);
}

#[test]
fn sign_prints_the_header_for_stdin() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "Jefe\n").unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["sign", "--key-file", key.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"what do ya want for nothing?")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

/// Runs the CLI off the async runtime.
async fn cli(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&args)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn older_waiting_promotions_are_superseded_rejections_and_retries_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    // The receiver refuses the first delivery: one attempt allowed, so it fails.
    let receiver = Receiver::start(vec![500], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url(), "--max-attempts", "1"],
    );
    let key_file = dir.path().join("approval-key");
    std::fs::write(&key_file, APPROVAL_KEY).unwrap();
    let server = service.url("");
    let decision = |words: &[&str]| {
        let mut args: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        args.extend(["--server".into(), server.clone()]);
        args.extend(["--key-file".into(), key_file.to_str().unwrap().to_string()]);
        args
    };

    let (_, old) = post_event(&service, "staging", event("podinfo-staging", "1.0.0")).await;
    let (_, new) = post_event(&service, "staging", event("podinfo-staging", "1.1.0")).await;
    assert_eq!(new["phase"], "WaitingApproval");
    let old_id = old["id"].as_str().unwrap();
    let superseded = get_json(&service, &format!("/api/v1/promotions/{old_id}")).await;
    assert_eq!(superseded["phase"], "Superseded", "{superseded}");
    assert!(
        superseded["message"].as_str().unwrap().contains("1.1.0"),
        "{superseded}"
    );
    // Approving the older revision would roll prod back: refused, nothing runs.
    let (code, _, stderr) = cli(decision(&[
        "approve",
        "flux-system/podinfo",
        "prod",
        "1.0.0",
    ]))
    .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("409"), "{stderr}");

    // A late event for an even older revision is superseded on arrival.
    let (status, late) = post_event(&service, "staging", event("podinfo-staging", "0.9.0")).await;
    assert_eq!(status, 202);
    assert_eq!(late["phase"], "Superseded", "{late}");

    // Rejecting the newest: final, with the reason and who.
    let mut reject = decision(&["reject", "flux-system/podinfo", "prod", "1.1.0"]);
    reject.extend([
        "--reason".into(),
        "change freeze".into(),
        "--by".into(),
        "bob".into(),
    ]);
    let (code, stdout, stderr) = cli(reject).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("rejected 1.1.0"), "{stdout}");
    let new_id = new["id"].as_str().unwrap();
    let rejected = get_json(&service, &format!("/api/v1/promotions/{new_id}")).await;
    assert_eq!(rejected["phase"], "Rejected");
    assert_eq!(rejected["decidedBy"], "bob (approval key)");
    assert!(
        rejected["message"]
            .as_str()
            .unwrap()
            .contains("change freeze")
    );
    let (code, _, _) = cli(decision(&[
        "approve",
        "flux-system/podinfo",
        "prod",
        "1.1.0",
    ]))
    .await;
    assert_ne!(code, 0, "a rejected promotion cannot be approved");

    // A promotion that failed is re-queued by `promotions retry` and then succeeds.
    let (_, staging) = post_event(&service, "dev", event("podinfo-dev", "2.0.0")).await;
    let id = staging["id"].as_str().unwrap().to_string();
    wait_for(&service, &id, "Failed", |r| r["phase"] == "Failed").await;
    let (code, stdout, stderr) = cli(decision(&["promotions", "retry", &id])).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("re-queued 2.0.0"), "{stdout}");
    let done = wait_for(&service, &id, "Succeeded", |r| r["phase"] == "Succeeded").await;
    let reasons: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "Recorded",
            "Started",
            "Failed",
            "Retried",
            "Started",
            "Succeeded"
        ]
    );
    assert_eq!(receiver.count(), 2);
}
