//! End-to-end tests of Kubernetes mode: the real binary against a real kube-apiserver
//! (pipeline-testenv), real HTTP over loopback.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_crds::{Pipeline, Promotion};
use serde_json::{Value, json};
use support::k8s::{
    Controller, assert_approved_then_succeeded, cluster, phase, post, post_ready, recorded_id,
    run_cli, wait_promotion,
};
use support::{KEY, Receiver, client, event, get_text};

#[tokio::test]
async fn event_to_promotion_to_succeeded_dedupe_events_list_and_503() {
    let mut cluster = cluster().await;
    let kube = cluster.client();
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let controller = Controller::start(&cluster, "solo", &["--events-addr", &receiver.url()]);

    let response = post_ready(&controller, "dev", "6.5.1", "podinfo-dev").await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let object = response.headers()["x-promotion-object"]
        .to_str()
        .unwrap()
        .to_string();
    let record: Value = response.json().await.unwrap();
    let id = record["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/api/v1/promotions/{id}"));
    assert_eq!(
        object,
        format!("/apis/pipelines.weave.works/v1alpha1/namespaces/flux-system/promotions/{id}")
    );

    let done = wait_promotion(&kube, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    let status = done.status.unwrap();
    assert_eq!(status.attempts, 1);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    let phases: Vec<&str> = status.history.iter().map(|h| h.phase.as_str()).collect();
    assert_eq!(phases, ["Pending", "Running", "Succeeded"]);

    // The API's view of the record is the object's.
    let api_record: Value = client()
        .get(controller.url(&location))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api_record["phase"], "Succeeded");

    // The Promote Event on the Pipeline, with prefixed annotations.
    let events: Api<Event> = Api::namespaced(kube.clone(), "flux-system");
    let deadline = Instant::now() + Duration::from_secs(20);
    let promote = loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        if let Some(e) = list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("Promote")
                && e.involved_object.kind.as_deref() == Some("Pipeline")
        }) {
            break e;
        }
        assert!(Instant::now() < deadline, "no Promote event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let annotations = promote.metadata.annotations.unwrap();
    assert_eq!(annotations["pipelines.weave.works/environment"], "staging");
    assert_eq!(annotations["pipelines.weave.works/version"], "6.5.1");
    assert_eq!(
        annotations["pipelines.weave.works/sourceEnvironment"],
        "dev"
    );
    assert!(promote.involved_object.uid.is_some());

    // The same event, Flux-format, at --events-addr (unsigned, prefixed metadata).
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let (headers, body) = &received[0];
    assert!(headers.get("x-signature").is_none());
    let flux: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(flux["reason"], "Promote");
    // About the app object in the pipeline's namespace, which an Alert can select;
    // the details also under Flux's event prefix, which notification-controller keeps.
    assert_eq!(
        flux["involvedObject"],
        json!({"kind": "HelmRelease", "namespace": "flux-system", "name": "podinfo",
               "apiVersion": "helm.toolkit.fluxcd.io/v2"})
    );
    assert_eq!(flux["metadata"]["pipelines.weave.works/version"], "6.5.1");
    assert_eq!(flux["metadata"]["event.toolkit.fluxcd.io/version"], "6.5.1");
    assert_eq!(
        flux["metadata"]["event.toolkit.fluxcd.io/environment"],
        "staging"
    );
    assert_eq!(flux["reportingController"], "pipeline-controller");

    // Promotion lifecycle Events on the Promotion.
    let list = events.list(&ListParams::default()).await.unwrap();
    assert!(
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("PromotionSucceeded")
                && e.involved_object.kind.as_deref() == Some("Promotion")),
        "no PromotionSucceeded event"
    );

    // 50 concurrent identical events: one Promotion, one 202.
    let body = event("podinfo-dev", "6.6.0");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let body = body.clone();
        let url = controller.url("/pipelines/promotions/flux-system/podinfo/dev");
        tasks.push(tokio::spawn(async move {
            let signature = sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &body);
            client()
                .post(url)
                .header("content-type", "application/json")
                .header("x-signature", signature)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
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
    let promotions: Api<Promotion> = Api::namespaced(kube.clone(), "flux-system");
    let all = promotions.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        all.items
            .iter()
            .filter(|p| p.spec.revision == "6.6.0")
            .count(),
        1
    );

    // `promotions list` reads the cluster.
    let (code, out, err) = run_cli(
        cluster.kubeconfig_path(),
        &[
            "promotions",
            "list",
            "--pipeline",
            "flux-system/podinfo",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["revision"], "6.6.0");

    // Invalid pipelines: Ready=False with the messages, and 404 to the webhook.
    cluster
        .apply_yaml(
            "apiVersion: pipelines.weave.works/v1alpha1\nkind: Pipeline\nmetadata:\n  name: broken\n  namespace: flux-system\nspec:\n  appRef:\n    apiVersion: helm.toolkit.fluxcd.io/v2\n    kind: HelmRelease\n    name: podinfo\n  environments:\n    - name: dev\n      targets: [{namespace: a}]\n    - name: dev\n      targets: [{namespace: b}]\n",
        )
        .await
        .unwrap();
    let pipelines: Api<Pipeline> = Api::namespaced(kube.clone(), "flux-system");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pipelines.get("broken").await.unwrap();
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
        if let Some(ready) = ready {
            assert_eq!(ready.status, "False");
            assert_eq!(ready.reason, "InvalidSpec");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Ready condition on the broken pipeline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // API server down: 503 with Retry-After, so Flux retries.
    cluster.stop_apiserver().await;
    let response = post(&controller, "dev", event("podinfo-dev", "6.7.0")).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "unavailable");
    cluster.restart_apiserver().await.unwrap();
    let response = post_ready(&controller, "dev", "6.7.0", "podinfo-dev").await;
    assert_eq!(response.status(), 202);
}

/// An events receiver that holds requests while `hang` is set (the request is counted
/// on arrival), so a promotion can be caught mid-attempt.
struct Gate {
    address: SocketAddr,
    hang: Arc<std::sync::atomic::AtomicBool>,
    count: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn start() -> Gate {
        use std::sync::atomic::Ordering;
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, c) = (hang.clone(), count.clone());
        let app = axum::Router::new().fallback(move || {
            let (h, c) = (h.clone(), c.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if h.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                }
                axum::http::StatusCode::OK
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Gate {
            address,
            hang,
            count,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    fn set_hang(&self, hang: bool) {
        self.hang.store(hang, std::sync::atomic::Ordering::SeqCst);
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_leader(controller: &Controller, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !controller.is_leader() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (20 s at most) until `/metrics` of `controller` holds `series`.
async fn wait_metric(controller: &Controller, series: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !get_text(controller, "/metrics").await.contains(series) {
        assert!(Instant::now() < deadline, "{what}: no {series}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_controllers_execute_once_fail_over_and_resume_after_restart() {
    let cluster = cluster().await;
    let kube = cluster.client();
    let gate = Gate::start().await;
    let url = gate.url();
    let args = [
        "--events-addr",
        url.as_str(),
        "--insights-interval",
        "200ms",
    ];
    let mut a = Controller::start(&cluster, "replica-a", &args);
    wait_leader(&a, "A never led").await;
    let mut b = Controller::start(&cluster, "replica-b", &args);

    // Events to both replicas: one record, executed once, by the leader only.
    let first = post_ready(&b, "dev", "1.0.0", "podinfo-dev").await;
    let id = recorded_id(first).await;
    let again = post_ready(&a, "dev", "1.0.0", "podinfo-dev").await;
    assert_eq!(again.status(), 200);
    let done = wait_promotion(&kube, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(done.status.unwrap().attempts, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gate.count(), 1);
    assert!(!b.is_leader());
    assert!(
        !b.logs().contains("promotion attempt started"),
        "a follower executed"
    );
    // Only the leader exports the delivery insights (a sum over replicas stays right).
    let insight = "pipeline_controller_promotion_failure_ratio{";
    wait_metric(&a, insight, "the leader's insights").await;
    assert!(
        !get_text(&b, "/metrics").await.contains(insight),
        "a follower exported insights"
    );

    // The leader is SIGKILLed mid-promotion: B takes over and finishes it.
    gate.set_hang(true);
    let response = post(&b, "dev", event("podinfo-dev", "2.0.0")).await;
    let id = recorded_id(response).await;
    wait_promotion(&kube, &id, "Running", |p| phase(p) == "Running").await;
    let killed = Instant::now();
    a.kill9();
    gate.set_hang(false);
    let done = wait_promotion(&kube, &id, "Succeeded after failover", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let took = killed.elapsed();
    assert!(b.is_leader());
    wait_metric(&b, insight, "the new leader's insights").await;
    let status = done.status.unwrap();
    assert_eq!(status.attempts, 2);
    assert!(
        status
            .history
            .iter()
            .any(|h| h.reason == pipeline_core::ChangeReason::Resumed)
    );
    // Bounded by the Lease (3 s) plus a renew period or two.
    assert!(took < Duration::from_secs(15), "failover took {took:?}");

    // The only controller is killed mid-promotion and restarted: it finishes it.
    gate.set_hang(true);
    let response = post(&b, "dev", event("podinfo-dev", "3.0.0")).await;
    let id = recorded_id(response).await;
    wait_promotion(&kube, &id, "Running", |p| phase(p) == "Running").await;
    b.kill9();
    gate.set_hang(false);
    let c = Controller::start(&cluster, "replica-b-restarted", &args);
    let done = wait_promotion(&kube, &id, "Succeeded after restart", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    assert!(c.is_leader());
    assert_eq!(done.status.unwrap().attempts, 2);
}

#[tokio::test]
async fn manual_approval_through_the_kubernetes_api() {
    let cluster = cluster().await;
    let kube = cluster.client();
    cluster
        .apply_yaml(include_str!("../../../deploy/user-roles.yaml"))
        .await
        .unwrap();
    cluster
        .apply_yaml(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: approvers\n  namespace: flux-system\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: pipeline-approver\nsubjects:\n  - kind: User\n    name: alice\n    apiGroup: rbac.authorization.k8s.io\n  - kind: User\n    name: mallory\n    apiGroup: rbac.authorization.k8s.io\n",
        )
        .await
        .unwrap();
    cluster
        .apply_yaml(include_str!("../../../deploy/admission-policy.yaml"))
        .await
        .unwrap();
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let controller = Controller::start(&cluster, "solo", &["--events-addr", &receiver.url()]);

    // staging deployed 3.0.0: the promotion to prod waits for approval.
    let response = post_ready(&controller, "staging", "3.0.0", "podinfo-staging").await;
    let id = recorded_id(response).await;
    wait_promotion(&kube, &id, "WaitingApproval", |p| {
        phase(p) == "WaitingApproval"
    })
    .await;
    let pipelines: Api<Pipeline> = Api::namespaced(kube.clone(), "flux-system");
    let waiting = |p: &Pipeline| {
        p.status
            .as_ref()
            .and_then(|s| s.environments.get("prod"))
            .map(|e| e.waiting_approval.revision.clone())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting(&pipelines.get("podinfo").await.unwrap()).as_deref() != Some("3.0.0") {
        assert!(
            Instant::now() < deadline,
            "waitingApproval.revision never set"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bob may not approve.
    let bob = cluster.user_kubeconfig("bob", &[]).unwrap();
    let (code, _, err) = run_cli(&bob, &["approve", "flux-system/podinfo", "prod", "3.0.0"]);
    assert_ne!(code, 0);
    assert!(err.contains("forbidden"), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let promotions: Api<Promotion> = Api::namespaced(kube.clone(), "flux-system");
    assert_eq!(
        phase(&promotions.get(&id).await.unwrap()),
        "WaitingApproval"
    );

    // Mallory may patch Promotions, but not approve in someone else's name (the shipped
    // admission policy), nor change what is promoted (the CRD's immutable spec).
    let mallory = cluster.user_client("mallory", &[]).await.unwrap();
    let as_mallory: Api<Promotion> = Api::namespaced(mallory, "flux-system");
    let forged = serde_json::json!({"spec": {"approval": {"approved": true, "by": "alice"}}});
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match as_mallory
            .patch(&id, &PatchParams::default(), &Patch::Merge(&forged))
            .await
        {
            Err(err) => break err.to_string(),
            // The policy takes effect a moment after it is created.
            Ok(_) => {
                assert!(Instant::now() < deadline, "forged approval accepted");
                let undo = serde_json::json!({"spec": {"approval": null}});
                kube::Api::<Promotion>::namespaced(kube.clone(), "flux-system")
                    .patch(&id, &PatchParams::default(), &Patch::Merge(&undo))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(err.contains("must be your own username"), "{err}");
    let moved = serde_json::json!({"spec": {"revision": "0.0.1"}});
    let err = as_mallory
        .patch(&id, &PatchParams::default(), &Patch::Merge(&moved))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("immutable"), "{err}");

    // Alice may.
    let alice = cluster.user_kubeconfig("alice", &[]).unwrap();
    let (code, out, err) = run_cli(&alice, &["approve", "flux-system/podinfo", "prod", "3.0.0"]);
    assert_eq!(code, 0, "{out}{err}");
    let done = wait_promotion(&kube, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_approved_then_succeeded(&done, "alice");
    // The decision is counted like one taken over HTTP: WaitingApproval -> Pending.
    let metrics = get_text(&controller, "/metrics").await;
    assert!(
        metrics.contains(r#"pipeline_controller_promotions_total{phase="Pending"} 1"#),
        "{metrics}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting(&pipelines.get("podinfo").await.unwrap()).as_deref() != Some("") {
        assert!(
            Instant::now() < deadline,
            "waitingApproval.revision never reset"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Approving again is refused with a clear message.
    let (code, _, err) = run_cli(&alice, &["approve", "flux-system/podinfo", "prod", "3.0.0"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot approve it"), "{err}");

    // Signed HTTP approvals are off in Kubernetes mode unless enabled, and then take the
    // approval key only (never the webhook key every leaf cluster holds).
    let response = post(&controller, "staging", event("podinfo-staging", "3.1.0")).await;
    let id = recorded_id(response).await;
    wait_promotion(&kube, &id, "WaitingApproval", |p| {
        phase(p) == "WaitingApproval"
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let leaf_key = dir.path().join("hmac-key");
    std::fs::write(&leaf_key, KEY).unwrap();
    let approval_key = dir.path().join("approval-key");
    std::fs::write(&approval_key, "quickstart-approval-key-9876543210").unwrap();
    let http_approve = |server: &str, key: &std::path::Path| {
        run_cli(
            &bob,
            &[
                "approve",
                "flux-system/podinfo",
                "prod",
                "3.1.0",
                "--server",
                server,
                "--key-file",
                key.to_str().unwrap(),
                "--by",
                "bob",
            ],
        )
    };
    let (code, _, err) = http_approve(&controller.url(""), &approval_key);
    assert_ne!(code, 0);
    assert!(
        err.contains("403") && err.contains("hmac_approvals_disabled"),
        "{err}"
    );
    let with_hmac = Controller::start(&cluster, "hmac-approvals", &["--enable-hmac-approvals"]);
    let (code, _, err) = http_approve(&with_hmac.url(""), &leaf_key);
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");
    let (code, out, err) = http_approve(&with_hmac.url(""), &approval_key);
    assert_eq!(code, 0, "{out}{err}");
    let done = wait_promotion(&kube, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(
        done.status.unwrap().decided_by.as_deref(),
        Some("bob (approval key)")
    );
    drop(with_hmac);
    drop(controller);
}

#[tokio::test]
async fn a_failed_promotion_is_retried_through_the_kubernetes_api() {
    let cluster = cluster().await;
    let kube = cluster.client();
    cluster
        .apply_yaml(include_str!("../../../deploy/user-roles.yaml"))
        .await
        .unwrap();
    cluster
        .apply_yaml(include_str!("../../../deploy/admission-policy.yaml"))
        .await
        .unwrap();
    cluster
        .apply_yaml(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: approvers\n  namespace: flux-system\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: pipeline-approver\nsubjects:\n  - kind: User\n    name: carol\n    apiGroup: rbac.authorization.k8s.io\n",
        )
        .await
        .unwrap();
    // The receiver refuses the first delivery; one attempt allowed: Failed.
    let receiver = Receiver::start(vec![500], Duration::ZERO).await;
    let controller = Controller::start(
        &cluster,
        "solo",
        &["--events-addr", &receiver.url(), "--max-attempts", "1"],
    );
    let response = post_ready(&controller, "dev", "8.0.0", "podinfo-dev").await;
    let id = recorded_id(response).await;
    wait_promotion(&kube, &id, "Failed", |p| phase(p) == "Failed").await;

    let carol = cluster.user_kubeconfig("carol", &[]).unwrap();
    // The policy may need a moment after it is created: retry the command, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = run_cli(&carol, &["promotions", "retry", &id, "-n", "flux-system"]);
        if code == 0 {
            assert!(out.contains("re-queued 8.0.0"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "retry refused: {out}{err}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done = wait_promotion(&kube, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    let status = done.status.unwrap();
    assert_eq!(status.decided_by.as_deref(), Some("carol"));
    let reasons: Vec<&str> = status.history.iter().map(|h| h.reason.as_str()).collect();
    assert!(
        reasons.ends_with(&["Failed", "Retried", "Started", "Succeeded"]),
        "{reasons:?}"
    );
    // Taken once: the same request is not applied again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = Api::<Promotion>::namespaced(kube.clone(), "flux-system")
        .get(&id)
        .await
        .unwrap();
    assert_eq!(phase(&again), "Succeeded");
    // A retried-by naming someone else is refused by the admission policy.
    let forged = serde_json::json!({"metadata": {"annotations": {
        "pipelines.weave.works/retry": "again",
        "pipelines.weave.works/retried-by": "alice",
    }}});
    let err = Api::<Promotion>::namespaced(
        cluster.user_client("carol", &[]).await.unwrap(),
        "flux-system",
    )
    .patch(&id, &PatchParams::default(), &Patch::Merge(&forged))
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("must be your own username"), "{err}");
    drop(controller);
}
