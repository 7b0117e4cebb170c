//! The controller's ServiceAccount permissions (deploy/rbac.yaml) are SUFFICIENT: the
//! real binary runs in Kubernetes mode with a token of ServiceAccount
//! `pipeline-system/pipeline-controller` (nothing else: no admin credentials) against a
//! real kube-apiserver whose RBAC comes from deploy/, and does all of its work — webhook,
//! Promotion records, notification strategy (Events + --events-addr), manual approval by a
//! user holding `pipeline-approver`, Pipeline status, leader election — without a single
//! forbidden answer. `crates/testenv/tests/deploy.rs` checks that it is not granted more.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use pipeline_crds::Pipeline;
use pipeline_testenv::{TestCluster, parse_yaml_documents};
use serde_json::Value;
use support::k8s::{
    Controller, apply_quickstart, assert_approved_then_succeeded, phase, post, post_ready,
    recorded_id, run_cli, wait_promotion,
};
use support::{Receiver, client, event};

const CONTROLLER_NS: &str = "pipeline-system";
const CONTROLLER_SA: &str = "pipeline-controller";
/// The CLI's default --lease-name, the only Lease the leader-election Role allows.
const LEASE_NAME: &str = "pipeline-controller-leader";
/// As deploy/deployment.yaml sets it from the Pod's name.
const POD_NAME: &str = "pipeline-controller-5d4f8-abcde";

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Who the API server says the holder of `kubeconfig` is.
async fn whoami(kubeconfig: &Path) -> String {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let api: Api<SelfSubjectReview> = Api::all(Client::try_from(config).unwrap());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    review.status.unwrap().user_info.unwrap().username.unwrap()
}

/// The log lines that report a refusal by the API server.
fn forbidden_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
        .collect()
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn waiting_revision(pipelines: &Api<Pipeline>, environment: &str) -> Option<String> {
    pipelines
        .get("podinfo")
        .await
        .unwrap()
        .status
        .and_then(|s| s.environments.get(environment).cloned())
        .map(|e| e.waiting_approval.revision)
}

/// A cluster set up as deploy/README.md says, with `rbac` instead of deploy/rbac.yaml,
/// the quickstart Pipeline and its Secret in flux-system, and group `release-managers`
/// bound to `pipeline-approver` there. Returns the ServiceAccount's kubeconfig.
async fn cluster(rbac: &str) -> (TestCluster, PathBuf) {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    // Flux is installed first (deploy/README.md): rbac.yaml binds Secrets in flux-system.
    cluster.ensure_namespace("flux-system").await.unwrap();
    // deploy/ without the Deployment, Service and PDB (no kubelets here).
    for (file, yaml) in [
        ("namespace.yaml", deploy("namespace.yaml")),
        ("rbac.yaml", rbac.to_string()),
        ("user-roles.yaml", deploy("user-roles.yaml")),
        ("admission-policy.yaml", deploy("admission-policy.yaml")),
    ] {
        cluster
            .apply_yaml(&yaml)
            .await
            .unwrap_or_else(|e| panic!("applying deploy/{file}: {e}"));
    }
    apply_quickstart(&cluster).await;
    // Release managers approve in flux-system, as user-roles.yaml suggests.
    cluster
        .apply_yaml(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: prod-approvers\n  namespace: flux-system\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: pipeline-approver\nsubjects:\n  - kind: Group\n    name: release-managers\n    apiGroup: rbac.authorization.k8s.io\n",
        )
        .await
        .unwrap();
    let kubeconfig = cluster
        .service_account_kubeconfig(CONTROLLER_NS, CONTROLLER_SA)
        .await
        .unwrap();
    assert_eq!(
        whoami(&kubeconfig).await,
        format!("system:serviceaccount:{CONTROLLER_NS}:{CONTROLLER_SA}")
    );
    (cluster, kubeconfig)
}

/// Runs `serve` as deploy/deployment.yaml does (default Lease name, POD_NAMESPACE,
/// POD_NAME), with the ServiceAccount's credentials.
fn controller(kubeconfig: &Path, events_addr: &str) -> Controller {
    Controller::spawn(
        kubeconfig,
        &["--events-addr", events_addr],
        &[("POD_NAMESPACE", CONTROLLER_NS), ("POD_NAME", POD_NAME)],
    )
}

#[tokio::test]
async fn controller_does_all_its_work_with_the_deploy_service_account_only() {
    let (cluster, kubeconfig) = cluster(&deploy("rbac.yaml")).await;
    let admin = cluster.client();
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let controller = controller(&kubeconfig, &receiver.url());

    // Leader election in pipeline-system.
    wait_until("leadership", || async { controller.is_leader() }).await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), CONTROLLER_NS);
    let lease = leases.get(LEASE_NAME).await.unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    assert!(holder.starts_with(POD_NAME), "Lease held by {holder}");

    // Pipeline status (reconciler): Ready=True.
    let pipelines: Api<Pipeline> = Api::namespaced(admin.clone(), "flux-system");
    wait_until("Ready=True on the Pipeline", || async {
        pipelines
            .get("podinfo")
            .await
            .unwrap()
            .status
            .is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
    })
    .await;

    // A signed event from dev: Promotion created, executed by notification, Succeeded.
    let response = post_ready(&controller, "dev", "6.5.1", "podinfo-dev").await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = wait_promotion(&admin, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    let status = done.status.unwrap();
    assert_eq!(status.attempts, 1);
    let phases: Vec<&str> = status.history.iter().map(|h| h.phase.as_str()).collect();
    assert_eq!(phases, ["Pending", "Running", "Succeeded"]);

    // The same event again: the existing record (200), no second Promotion.
    let again = post(&controller, "dev", event("podinfo-dev", "6.5.1")).await;
    assert_eq!(again.status(), 200);
    // The promotions API reads the cluster with the controller's credentials.
    let record: Value = client()
        .get(controller.url(&location))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["phase"], "Succeeded");
    let listed = client()
        .get(controller.url("/api/v1/promotions"))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    assert_eq!(
        listed
            .json::<Value>()
            .await
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Notification strategy: the Promote Event on the Pipeline, and at --events-addr.
    let events: Api<Event> = Api::namespaced(admin.clone(), "flux-system");
    let has_event = |reason: &'static str, kind: &'static str| {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.involved_object.kind.as_deref() == Some(kind)
                })
        }
    };
    wait_until("the Promote Event on the Pipeline", || {
        has_event("Promote", "Pipeline")
    })
    .await;
    wait_until("the PromotionSucceeded Event on the Promotion", || {
        has_event("PromotionSucceeded", "Promotion")
    })
    .await;
    // A plain success is not repeated on the Pipeline (only what needs people is).
    assert!(!has_event("PromotionSucceeded", "Pipeline").await);
    assert_eq!(receiver.count(), 1);
    let flux: Value = serde_json::from_slice(&receiver.received.lock().unwrap()[0].1).unwrap();
    assert_eq!(flux["reason"], "Promote");
    assert_eq!(flux["metadata"]["pipelines.weave.works/version"], "6.5.1");

    // staging deployed 3.0.0: the promotion to prod waits for approval, and the Pipeline
    // says so.
    let response = post(&controller, "staging", event("podinfo-staging", "3.0.0")).await;
    let id = recorded_id(response).await;
    wait_promotion(&admin, &id, "WaitingApproval", |p| {
        phase(p) == "WaitingApproval"
    })
    .await;
    wait_until("waitingApproval.revision = 3.0.0", || async {
        waiting_revision(&pipelines, "prod").await.as_deref() == Some("3.0.0")
    })
    .await;

    // A release manager approves with their own credentials (pipeline-approver).
    let carol = cluster
        .user_kubeconfig("carol", &["release-managers"])
        .unwrap();
    let (code, out, err) = run_cli(&carol, &["approve", "flux-system/podinfo", "prod", "3.0.0"]);
    assert_eq!(code, 0, "{out}{err}");
    let done = wait_promotion(&admin, &id, "Succeeded after approval", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    assert_approved_then_succeeded(&done, "carol");
    wait_until("waitingApproval.revision reset", || async {
        waiting_revision(&pipelines, "prod").await.as_deref() == Some("")
    })
    .await;
    wait_until("the second notification", || async {
        receiver.count() == 2
    })
    .await;

    // Still the leader after several renewals (Lease `update`), same holder.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lease = leases.get(LEASE_NAME).await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some(holder.as_str()));
    assert!(!controller.logs().contains("lost leadership"));

    // Not one request of the controller was refused.
    let logs = controller.logs();
    let forbidden = forbidden_lines(&logs);
    assert!(
        forbidden.is_empty(),
        "the controller was refused:\n{}",
        forbidden.join("\n")
    );
}

/// The check above would see a missing permission: without the RoleBinding that lets the
/// controller read Secrets in flux-system, the refusal is in its log.
#[tokio::test]
async fn a_missing_permission_shows_in_the_controller_log() {
    let rbac: String = parse_yaml_documents(&deploy("rbac.yaml"))
        .unwrap()
        .into_iter()
        .filter(|d| {
            !(d["kind"] == "RoleBinding" && d["metadata"]["name"] == "pipeline-controller-secrets")
        })
        .map(|d| format!("---\n{d}\n"))
        .collect();
    let (_cluster, kubeconfig) = cluster(&rbac).await;
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let controller = controller(&kubeconfig, &receiver.url());
    // The Secrets of flux-system are watched once a Pipeline there is seen; an event
    // needs its HMAC key.
    wait_until("a forbidden line in the log", || async {
        let found = !forbidden_lines(&controller.logs()).is_empty();
        if !found {
            let _ = post(&controller, "dev", event("podinfo-dev", "1.0.0")).await;
        }
        found
    })
    .await;
    assert_eq!(receiver.count(), 0);
}
