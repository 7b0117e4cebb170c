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

    let server = service.internal_url("");
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
    assert!(stdout.starts_with("ID "), "{stdout}");
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
    // The broken file was valid before: its last good version (podinfo-two) keeps
    // serving, and /readyz (still 200) and the metrics say so.
    let body = event("podinfo-dev", "1.2.5");
    let signature = pipeline_core::signature::sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &body);
    let response = client()
        .post(service.url("/pipelines/promotions/flux-system/podinfo-two/dev"))
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let warnings = service
        .logs()
        .lines()
        .filter(|l| l.contains("manifest file invalid, serving its last good version"))
        .count();
    assert_eq!(warnings, 1, "{}", service.logs());
    let ready = client().get(service.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    let detail = ready["detail"].as_array().unwrap();
    assert_eq!(detail.len(), 1, "{ready}");
    let detail = detail[0].as_str().unwrap();
    assert!(
        detail.starts_with("manifests: more/two.yaml is invalid, serving its last good version")
            && detail.contains(expected),
        "{detail}"
    );
    let metrics = get_text(&service, "/metrics").await;
    assert!(
        metrics.contains("pipeline_controller_manifest_files_invalid 1\n")
            && metrics.contains("pipeline_controller_manifest_files_last_good 1\n"),
        "{metrics}"
    );
    // Deleting the file takes its pipeline away, and readiness detail with it.
    std::fs::remove_file(manifests.join("more/two.yaml")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = get_json(&service, "/readyz").await;
        if ready.get("detail").is_none() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post().await.unwrap().status().as_u16(), 404);
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
    // The record is read from the internal listener; the public one says where it is.
    let (code, _, stderr) = cli(decision(&["promotions", "retry", &id])).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("internal listener"), "{stderr}");
    let internal = service.internal_url("");
    let (code, stdout, stderr) = cli(decision(&[
        "promotions",
        "retry",
        &id,
        "--internal-server",
        &internal,
    ]))
    .await;
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

/// Any JSON value; deserializing fails on an object with a repeated key, at any depth.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = NoDuplicateKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
                Ok(NoDuplicateKeys)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    map.next_value::<NoDuplicateKeys>()?;
                }
                Ok(NoDuplicateKeys)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A `serve --log-format json` in embedded mode: its stderr lines, and its address.
struct JsonService {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    address: std::net::SocketAddr,
    internal: std::net::SocketAddr,
}

impl JsonService {
    fn start(manifests: &std::path::Path, state: &std::path::Path, extra: &[&str]) -> JsonService {
        let mut child = std::process::Command::new(BIN)
            .args(serve_args(manifests, state, extra))
            .args(["--log-format", "json", "--log-level", "debug"])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut internal = None;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if let Some(address) = value["internal_address"].as_str() {
                        internal = Some(address.parse::<std::net::SocketAddr>().unwrap());
                    }
                    if value["message"] == "listening"
                        && let (Some(address), Some(internal)) =
                            (value["address"].as_str(), internal)
                    {
                        let _ =
                            tx.send((address.parse::<std::net::SocketAddr>().unwrap(), internal));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (address, internal) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addresses) => addresses,
            Err(_) => {
                let _ = child.kill();
                panic!("no listening line: {:#?}", lines.lock().unwrap());
            }
        };
        JsonService {
            child,
            lines,
            address,
            internal,
        }
    }

    fn url(&self, path: &str) -> String {
        let address = if support::is_internal_path(path) {
            self.internal
        } else {
            self.address
        };
        format!("http://{address}{path}")
    }

    /// SIGTERM, then waits (at most 10 s) for the process to end and its output to be read.
    fn stop(&mut self) -> Vec<String> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for JsonService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn json_logs_never_repeat_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![500], Duration::ZERO).await;
    let mut service = JsonService::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url(), "--retry-base", "50ms"],
    );
    let post = |environment: &str, body: Vec<u8>, key: &str| {
        let signature =
            pipeline_core::signature::sign(HmacAlgorithm::Sha256, key.as_bytes(), &body);
        client()
            .post(service.url(&format!(
                "/pipelines/promotions/flux-system/podinfo/{environment}"
            )))
            .header("x-signature", signature)
            .body(body)
            .send()
    };
    // Recorded, then executed: a refused delivery, a retry, success ("promotion attempt
    // finished" has a `message` field besides its own message).
    let response = post("dev", event("podinfo-dev", "1.0.0"), KEY)
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Ignored: "event ignored" carries the event's own `message`.
    let mut ignored: Value = serde_json::from_slice(&event("podinfo-dev", "1.0.1")).unwrap();
    ignored["reason"] = "Progressing".into();
    let response = post("dev", serde_json::to_vec(&ignored).unwrap(), KEY)
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Refused (debug), and a broken manifest (warnings).
    let response = post("dev", event("podinfo-dev", "1.0.2"), "wrong")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    std::fs::write(
        manifests.join("secret.yaml"),
        "apiVersion: v1\nkind: Secret\n: [\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let record: Value = client()
            .get(service.url(&format!("/api/v1/promotions/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let served_last_good = service
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("serving its last good version"));
        if record["phase"] == "Succeeded" && served_last_good {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{record}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = service.stop();
    assert!(lines.len() > 10, "{lines:#?}");
    let mut messages = std::collections::BTreeSet::new();
    for line in &lines {
        if let Err(err) = serde_json::from_str::<NoDuplicateKeys>(line) {
            panic!("log line is not JSON with unique keys ({err}): {line}");
        }
        let value: Value = serde_json::from_str(line).unwrap();
        for key in ["timestamp", "level", "target"] {
            assert!(value[key].is_string(), "no {key}: {line}");
        }
        if let Some(message) = value["message"].as_str() {
            messages.insert(message.to_string());
        }
    }
    for expected in [
        "listening",
        "promotion recorded",
        "event ignored",
        "promotion attempt finished",
        "stopped",
    ] {
        assert!(
            messages.contains(expected),
            "no {expected:?} in {messages:#?}"
        );
    }
    // The fields that share a name with the line's keys are kept, renamed.
    let ignored = lines
        .iter()
        .find(|l| l.contains("\"event ignored\""))
        .unwrap();
    let ignored: Value = serde_json::from_str(ignored).unwrap();
    assert!(
        ignored["fields.message"]
            .as_str()
            .unwrap()
            .contains("Progressing"),
        "{ignored}"
    );
}

#[tokio::test]
async fn promotions_get_and_output_formats() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let service = Service::start(&manifests, &dir.path().join("state.redb"), &[]);
    let (status, record) = post_event(&service, "staging", event("podinfo-staging", "6.5.1")).await;
    assert_eq!(status, 202, "{record}");
    let id = record["id"].as_str().unwrap().to_string();
    // Reading goes to the internal listener, decisions to the public one.
    let (internal, public) = (service.internal_url(""), service.url(""));
    let run = |args: &[&str]| {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let server = if args[0] == "promotions" {
            &internal
        } else {
            &public
        };
        args.extend(["--server".to_string(), server.clone()]);
        cli(args)
    };

    // get: YAML by default, JSON and a table on request.
    let (code, stdout, stderr) = run(&["promotions", "get", &id]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&format!("id: {id}")), "{stdout}");
    assert!(stdout.contains("phase: WaitingApproval"), "{stdout}");
    let (code, stdout, _) = run(&["promotions", "get", &id, "-o", "json"]).await;
    assert_eq!(code, 0);
    let got: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(got["id"], id.as_str());
    let (code, stdout, _) = run(&["promotions", "get", &id, "-o", "table"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("ID ")
            && lines[0].contains("TRIGGER")
            && lines[0].ends_with("MESSAGE"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&id) && lines[1].contains("webhook"),
        "{stdout}"
    );
    let (code, _, stderr) = run(&["promotions", "get", "no-such-promotion"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("404") && stderr.lines().count() == 1,
        "{stderr}"
    );

    // list: YAML, and -n filters by the pipeline's namespace.
    let (code, stdout, _) = run(&["promotions", "list", "-o", "yaml"]).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("- id: "), "{stdout}");
    let (code, stdout, _) = run(&["promotions", "list", "-n", "flux-system", "-o", "json"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (code, stdout, _) = run(&["promotions", "list", "-n", "elsewhere"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("(no promotions)"), "{stdout}");
    let (code, _, stderr) = run(&[
        "promotions",
        "list",
        "-n",
        "elsewhere",
        "--pipeline",
        "flux-system/podinfo",
    ])
    .await;
    assert_eq!(code, 2, "{stderr}");

    // approve -o json prints the record it changed.
    let key_file = dir.path().join("approval-key");
    std::fs::write(&key_file, APPROVAL_KEY).unwrap();
    let (code, stdout, stderr) = run(&[
        "approve",
        "flux-system/podinfo",
        "prod",
        "6.5.1",
        "--key-file",
        key_file.to_str().unwrap(),
        "-o",
        "json",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    let approved: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(approved["id"], id.as_str());
    assert_ne!(approved["phase"], "WaitingApproval");
}

#[tokio::test]
async fn mistaken_invocations_get_one_line_and_exit_code_2() {
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(BIN)
            .args(args)
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("PIPELINE_CONTROLLER_SERVER")
            .env_remove("PIPELINE_CONTROLLER_MANIFESTS")
            .env("HOME", home.path())
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let cases: [(&[&str], &str); 6] = [
        (
            &["serve"],
            "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster); pass --manifests DIR for embedded mode",
        ),
        (&["promotions", "list"], "pass --server URL"),
        (&["serve", "--listen", ":9000"], "use 0.0.0.0:9000"),
        (
            &["promotions", "list", "--server", "127.0.0.1:8080"],
            "needs a scheme: http://127.0.0.1:8080",
        ),
        (
            &[
                "serve",
                "--manifests",
                ".",
                "--notify-url",
                "127.0.0.1:9099",
            ],
            "needs a scheme: http://127.0.0.1:9099",
        ),
        (&["serv"], "a similar subcommand exists: 'serve'"),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
    }
    // A runtime failure is exit code 1, one line too.
    let (code, stderr) = run(&["promotions", "list", "--server", "http://127.0.0.1:9"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot connect to http://127.0.0.1:9"),
        "{stderr}"
    );

    let (code, stdout, _) = run_cli(&["--version"]);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("pipeline-controller ") && stdout.contains("(commit "),
        "{stdout}"
    );
    let (code, stdout, _) = run_cli(&["completion", "bash"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("complete -F _pipeline__controller"),
        "{}",
        &stdout[..stdout.len().min(300)]
    );
}

#[tokio::test]
async fn flux_config_writes_the_wiring_for_gitops_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    // The quickstart's dev clusterRef names GitopsCluster flux-system/dev: add it.
    std::fs::write(
        manifests.join("clusters.yaml"),
        "apiVersion: gitops.weave.works/v1alpha1\nkind: GitopsCluster\nmetadata:\n  name: dev\n  namespace: flux-system\nspec:\n  secretRef:\n    name: dev-kubeconfig\n",
    )
    .unwrap();
    let out = dir.path().join("wiring");
    let run = |out: &std::path::Path| {
        run_cli(&[
            "flux-config",
            "--public-url",
            "https://pipelines.example.com",
            "--output-dir",
            out.to_str().unwrap(),
            "--manifests",
            manifests.to_str().unwrap(),
        ])
    };
    let (code, stdout, stderr) = run(&out);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    // staging's GitopsCluster is missing: said, not guessed.
    assert!(
        stderr.contains("GitopsCluster flux-system/staging not found"),
        "{stderr}"
    );
    let read = |path: &str| std::fs::read_to_string(out.join(path)).unwrap();
    let remote = read("management/flux-system-dev.yaml");
    assert!(remote.contains("name: dev-kubeconfig"), "{remote}");
    assert!(
        remote.contains("path: ./pipelines-wiring/clusters/flux-system-dev"),
        "{remote}"
    );
    let folder = out.join("clusters/flux-system-dev/podinfo-dev");
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    let provider = std::fs::read_to_string(folder.join(&names[1])).unwrap();
    assert!(
        provider.contains(
            "address: https://pipelines.example.com/pipelines/promotions/flux-system/podinfo/dev"
        ),
        "{provider}"
    );
    assert!(provider.contains("type: generic-hmac"), "{provider}");
    // Never a key in the output.
    for entry in walk(&out) {
        let text = std::fs::read_to_string(entry).unwrap();
        assert!(!text.contains(KEY) && !text.contains(APPROVAL_KEY));
    }
    // Deterministic: a second run over the same folder changes nothing.
    let before: Vec<(std::path::PathBuf, String)> = walk(&out)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    let (code, _, _) = run(&out);
    assert_eq!(code, 0);
    let after: Vec<(std::path::PathBuf, String)> = walk(&out)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    assert_eq!(before, after);
}

/// Every file under `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `/metrics` on the internal listener until every line of `want` is in it (bounded).
async fn wait_metrics(service: &Service, what: &str, want: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = get_text(service, "/metrics").await;
        if want.iter().all(|line| text.lines().any(|l| l == *line)) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: missing {:?} in\n{text}",
            want.iter()
                .filter(|line| !text.lines().any(|l| l == **line))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real promotion chain (dev event, staging promoted, prod approved and promoted)
/// shows in the delivery metrics on the internal listener.
#[tokio::test]
async fn delivery_insights_reach_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &[
            "--notify-url",
            &receiver.url(),
            "--insights-interval",
            "100ms",
        ],
    );
    let (status, staging) = post_event(&service, "dev", event("podinfo-dev", "6.5.1")).await;
    assert_eq!(status, 202, "{staging}");
    wait_for(
        &service,
        staging["id"].as_str().unwrap(),
        "Succeeded",
        |r| r["phase"] == "Succeeded",
    )
    .await;
    let (status, prod) = post_event(&service, "staging", event("podinfo-staging", "6.5.1")).await;
    assert_eq!(status, 202, "{prod}");
    assert_eq!(prod["phase"], "WaitingApproval");
    // Someone waits: the gauge is above zero.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let waiting = r#"pipeline_controller_approval_waiting_seconds{pipeline="flux-system/podinfo",environment="prod"} "#;
    loop {
        let text = get_text(&service, "/metrics").await;
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(waiting))
            .and_then(|v| v.parse::<f64>().ok());
        if value.is_some_and(|v| v > 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no waiting approval in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let key_file = dir.path().join("approval-key");
    std::fs::write(&key_file, APPROVAL_KEY).unwrap();
    let (code, _, stderr) = cli(vec![
        "approve".into(),
        "flux-system/podinfo".into(),
        "prod".into(),
        "6.5.1".into(),
        "--server".into(),
        service.url(""),
        "--key-file".into(),
        key_file.to_str().unwrap().into(),
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    wait_for(&service, prod["id"].as_str().unwrap(), "Succeeded", |r| {
        r["phase"] == "Succeeded"
    })
    .await;
    wait_metrics(
        &service,
        "the whole chain in the delivery metrics",
        &[
            r#"pipeline_controller_deployments_total{pipeline="flux-system/podinfo",environment="dev"} 1"#,
            r#"pipeline_controller_deployments_total{pipeline="flux-system/podinfo",environment="staging"} 1"#,
            r#"pipeline_controller_deployments_total{pipeline="flux-system/podinfo",environment="prod"} 1"#,
            r#"pipeline_controller_lead_time_seconds_count{pipeline="flux-system/podinfo"} 1"#,
            r#"pipeline_controller_approval_wait_seconds_count{pipeline="flux-system/podinfo",environment="prod"} 1"#,
            r#"pipeline_controller_promotion_failure_ratio{pipeline="flux-system/podinfo",environment="staging"} 0.0"#,
            r#"pipeline_controller_promotion_failure_ratio{pipeline="flux-system/podinfo",environment="prod"} 0.0"#,
        ],
    )
    .await;
    // Nothing waits any more: the gauge has no series (one per environment of every
    // pipeline would dominate /metrics with thousands of pipelines).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = get_text(&service, "/metrics").await;
        if !text.contains(waiting) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "approval_waiting_seconds still has a series:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not on the public listener.
    let public = client()
        .get(format!("http://{}/metrics", service.address))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
}

/// The public and the internal listener cannot share an address.
#[test]
fn one_address_for_both_listeners_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let state = dir.path().join("state.redb");
    let output = std::process::Command::new(BIN)
        .args(["serve", "--manifests"])
        .arg(&manifests)
        .arg("--state")
        .arg(&state)
        .args([
            "--listen",
            "127.0.0.1:48123",
            "--internal-listen",
            "127.0.0.1:48123",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--listen and --internal-listen are both 127.0.0.1:48123"),
        "{stderr}"
    );
}
