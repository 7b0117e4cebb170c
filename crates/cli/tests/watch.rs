//! "No promotion lost": the controller (the real binary, Kubernetes mode, deployment watch
//! on) watches the pipeline's HelmReleases itself, in the management cluster and in two
//! leaf clusters, each a real etcd + kube-apiserver (pipeline-testenv), and promotes from
//! what it sees, with or without the Flux webhook event.
//!
//! Run this suite alone (etcd, kube-apiserver and the Flux CRDs come from the tools cache,
//! built/fetched once by the script):
//!
//! ```sh
//! scripts/ensure-test-binaries.sh kube flux-crds
//! cargo test -p pipeline-controller --test watch                              # all, ~4 min
//! cargo test -p pipeline-controller --test watch -- leaf_outage --nocapture   # one test
//! ```
//!
//! The fleet of every test: a management cluster (Pipeline, Promotions, the staging and
//! prod HelmReleases, a GitopsCluster and the leaves' kubeconfig Secrets) and leaves A and
//! B, each with the dev HelmRelease `podinfo-dev/podinfo`. Leaf A is reached through
//! GitopsCluster `flux-system/leaf-a` (`spec.secretRef`, kubeconfig under `value.yaml`),
//! leaf B as a Cluster API `Cluster` (Secret `leaf-b-kubeconfig`, key `value`). There is
//! no helm-controller: the tests write HelmRelease status through the status subresource
//! the way helm-controller v1.4 does. Each test starts its own fleet; they take turns (one
//! fleet, three API servers, at a time), so a failure in one does not touch the others.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use pipeline_core::PipelineRef;
use pipeline_crds::Promotion;
use pipeline_testenv::TestCluster;
use serde_json::{Value, json};
use support::k8s::{Controller, QUICKSTART_SECRET, phase, post, recorded_id, wait_promotion};
use support::{Receiver, event};

/// One fleet at a time: each is three etcd + kube-apiserver pairs and a controller.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NS: &str = "flux-system";

const PIPELINE: &str = r#"apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata:
  name: podinfo
  namespace: flux-system
spec:
  appRef:
    apiVersion: helm.toolkit.fluxcd.io/v2
    kind: HelmRelease
    name: podinfo
  environments:
    - name: dev
      targets:
        - namespace: podinfo-dev
          clusterRef:
            apiVersion: gitops.weave.works/v1alpha1
            kind: GitopsCluster
            name: leaf-a
            namespace: flux-system
        - namespace: podinfo-dev
          clusterRef:
            apiVersion: cluster.x-k8s.io/v1beta1
            kind: Cluster
            name: leaf-b
    - name: staging
      targets:
        - namespace: podinfo-staging
    - name: prod
      targets:
        - namespace: podinfo-prod
      promotion:
        manual: true
        strategy:
          notification: {}
  promotion:
    strategy:
      secretRef:
        name: podinfo-promotion-hmac
      notification: {}
"#;

/// The `trigger.cluster` names of the dev targets' clusters.
const LEAF_A: &str = "GitopsCluster/flux-system/leaf-a";
const LEAF_B: &str = "Cluster/flux-system/leaf-b";

struct Fleet {
    // Dropped first: the controller goes before the clusters it talks to.
    controller: Controller,
    receiver: Receiver,
    management: TestCluster,
    leaf_a: TestCluster,
    leaf_b: TestCluster,
}

impl Fleet {
    /// Starts the three clusters, applies everything, starts the controller and waits
    /// until it leads and watches HelmReleases in all three clusters.
    async fn start() -> Fleet {
        let began = Instant::now();
        let (management, leaf_a, leaf_b) = tokio::join!(
            TestCluster::start_named("management"),
            TestCluster::start_named("leaf-a"),
            TestCluster::start_named("leaf-b"),
        );
        let (management, leaf_a, leaf_b) = (management.unwrap(), leaf_a.unwrap(), leaf_b.unwrap());
        let (crds, flux, gitops, flux_a, flux_b) = tokio::join!(
            management.install_crds(),
            management.install_flux_crds(),
            management.install_gitops_cluster_crd(),
            leaf_a.install_flux_crds(),
            leaf_b.install_flux_crds(),
        );
        for result in [crds, flux, gitops, flux_a, flux_b] {
            result.unwrap();
        }
        for namespace in [NS, "podinfo-staging", "podinfo-prod"] {
            management.ensure_namespace(namespace).await.unwrap();
        }
        leaf_a.ensure_namespace("podinfo-dev").await.unwrap();
        leaf_b.ensure_namespace("podinfo-dev").await.unwrap();
        management.apply_yaml(QUICKSTART_SECRET).await.unwrap();
        // Leaf A: a GitopsCluster whose own Secret holds the kubeconfig under value.yaml.
        put_secret(
            &management,
            "leaf-a-kubeconfig",
            "value.yaml",
            &leaf_a.kubeconfig_yaml().unwrap(),
        )
        .await;
        management
            .apply_yaml(
                "apiVersion: gitops.weave.works/v1alpha1\nkind: GitopsCluster\nmetadata:\n  name: leaf-a\n  namespace: flux-system\nspec:\n  secretRef:\n    name: leaf-a-kubeconfig\n",
            )
            .await
            .unwrap();
        // Leaf B: a Cluster API cluster, i.e. Secret <name>-kubeconfig, key value.
        put_secret(
            &management,
            "leaf-b-kubeconfig",
            "value",
            &leaf_b.kubeconfig_yaml().unwrap(),
        )
        .await;
        create_release(&leaf_a, "podinfo-dev").await;
        create_release(&leaf_b, "podinfo-dev").await;
        create_release(&management, "podinfo-staging").await;
        create_release(&management, "podinfo-prod").await;
        management.apply_yaml(PIPELINE).await.unwrap();

        let receiver = Receiver::start(vec![], Duration::ZERO).await;
        let controller =
            Controller::start(&management, "watcher", &["--events-addr", &receiver.url()]);
        let fleet = Fleet {
            controller,
            receiver,
            management,
            leaf_a,
            leaf_b,
        };
        fleet
            .wait_logged("acquired leadership", 1, "the controller never led")
            .await;
        for cluster in fleet.clusters() {
            wait_watches(cluster, "the controller watching HelmReleases", |n| n >= 1).await;
        }
        eprintln!("fleet ready in {:?}", began.elapsed());
        fleet
    }

    fn clusters(&self) -> [&TestCluster; 3] {
        [&self.management, &self.leaf_a, &self.leaf_b]
    }

    fn kube(&self) -> kube::Client {
        self.management.client()
    }

    /// Lines of the controller's log holding every one of `parts`.
    fn logged(&self, parts: &[&str]) -> usize {
        self.controller
            .logs()
            .lines()
            .filter(|line| parts.iter().all(|p| line.contains(p)))
            .count()
    }

    /// Waits (30 s at most) until `count` log lines contain `text`.
    async fn wait_logged(&self, text: &str, count: usize, what: &str) {
        self.wait_logged_all(&[text], count, what).await;
    }

    async fn wait_logged_all(&self, parts: &[&str], count: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.logged(parts) < count {
            assert!(
                Instant::now() < deadline,
                "{what}: no {count} log lines with {parts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Both dev targets deployed at `version`.
    async fn deploy_dev(&self, version: &str) {
        release(&self.leaf_a, "podinfo-dev", version, Outcome::Deployed).await;
        release(&self.leaf_b, "podinfo-dev", version, Outcome::Deployed).await;
    }

    /// Notifications the receiver got for a promotion of `revision` into `environment`.
    fn notified(&self, environment: &str, revision: &str) -> usize {
        self.receiver
            .received
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
            .filter(|e| {
                e["metadata"]["pipelines.weave.works/version"] == revision
                    && e["metadata"]["pipelines.weave.works/environment"] == environment
            })
            .count()
    }
}

async fn put_secret(cluster: &TestCluster, name: &str, key: &str, value: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "stringData": {key: value},
    }))
    .unwrap();
    let api: Api<Secret> = Api::namespaced(cluster.client(), NS);
    match api.get_opt(name).await.unwrap() {
        None => {
            api.create(&PostParams::default(), &secret).await.unwrap();
        }
        Some(_) => {
            api.replace(name, &PostParams::default(), &secret)
                .await
                .unwrap();
        }
    }
}

/// Polls `cluster`'s `apiserver_longrunning_requests` until its HelmRelease watches
/// satisfy `done` (30 s at most).
async fn wait_watches(cluster: &TestCluster, what: &str, done: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = cluster
            .active_watches("helm.toolkit.fluxcd.io", "helmreleases")
            .await
            .unwrap();
        if done(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} in {}: {n} HelmRelease watches",
            cluster.name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn helm_releases(cluster: &TestCluster, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("helm.toolkit.fluxcd.io", "v2", "HelmRelease");
    Api::namespaced_with(
        cluster.client(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "helmreleases"),
    )
}

/// HelmRelease `podinfo` in `namespace`, before helm-controller got to it (no status).
async fn create_release(cluster: &TestCluster, namespace: &str) {
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "helm.toolkit.fluxcd.io/v2",
        "kind": "HelmRelease",
        "metadata": {"name": "podinfo", "namespace": namespace},
        "spec": {
            "interval": "10m",
            "releaseName": "podinfo",
            "chart": {"spec": {
                "chart": "podinfo",
                "version": "1.0.0",
                "sourceRef": {"kind": "HelmRepository", "name": "podinfo", "namespace": NS},
            }},
        },
    }))
    .unwrap();
    helm_releases(cluster, namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// How a helm-controller release attempt left the HelmRelease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Released: Ready=True and Released=True for the current generation.
    Deployed,
    /// The release failed: Ready=False (for the current generation).
    Failed,
    /// Ready=True at the version, but the spec changed again since: status and
    /// conditions speak of the previous generation.
    StaleStatus,
    /// `status.observedGeneration` is current, the Ready condition's is not.
    StaleCondition,
}

fn digest(what: &str, version: &str, n: i64) -> String {
    let hex: String = format!("{what}{version}{n}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{:0<64}", &hex[..hex.len().min(64)])
}

/// What helm-controller does for one release of chart `version` of HelmRelease
/// `namespace/podinfo` in `cluster`: the spec asks for the version (a new generation),
/// then the status subresource gets the outcome: observedGeneration, Ready and Released
/// conditions, and a new `status.history` entry (newest first; earlier deployed ones
/// become superseded), as helm-controller v1.4 writes them.
async fn release(cluster: &TestCluster, namespace: &str, version: &str, outcome: Outcome) {
    let api = helm_releases(cluster, namespace);
    let params = PatchParams::default();
    let spec = json!({"spec": {"chart": {"spec": {"version": version}}}});
    let mut object = api
        .patch("podinfo", &params, &Patch::Merge(&spec))
        .await
        .unwrap();
    if outcome == Outcome::StaleStatus {
        // The spec moves on again (new values) before helm-controller looks.
        let bump = json!({"spec": {"values": {"bump": object.metadata.generation}}});
        object = api
            .patch("podinfo", &params, &Patch::Merge(&bump))
            .await
            .unwrap();
    }
    let generation = object.metadata.generation.unwrap();
    let observed = if outcome == Outcome::StaleStatus {
        generation - 1
    } else {
        generation
    };
    let condition_generation = match outcome {
        Outcome::StaleStatus | Outcome::StaleCondition => generation - 1,
        Outcome::Deployed | Outcome::Failed => generation,
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut history: Vec<Value> = object.data["status"]["history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let number = history
        .iter()
        .filter_map(|h| h["version"].as_i64())
        .max()
        .unwrap_or(0)
        + 1;
    let first_deployed = history
        .last()
        .and_then(|h| h["firstDeployed"].as_str())
        .unwrap_or(&now)
        .to_string();
    let succeeded = outcome != Outcome::Failed;
    if succeeded {
        for entry in &mut history {
            if entry["status"] == "deployed" {
                entry["status"] = json!("superseded");
            }
        }
    }
    let action = if number == 1 { "install" } else { "upgrade" };
    let (reason, message) = match (succeeded, number == 1) {
        (true, true) => ("InstallSucceeded", "succeeded"),
        (true, false) => ("UpgradeSucceeded", "succeeded"),
        (false, true) => ("InstallFailed", "failed"),
        (false, false) => ("UpgradeFailed", "failed"),
    };
    let message = if succeeded {
        format!(
            "Helm {action} {message} for release {namespace}/podinfo.v{number} with chart podinfo@{version}"
        )
    } else {
        format!(
            "Helm {action} {message} for release {namespace}/podinfo with chart podinfo@{version}: context deadline exceeded"
        )
    };
    let config_digest = digest("config", version, number);
    history.insert(
        0,
        json!({
            "name": "podinfo",
            "namespace": namespace,
            "version": number,
            "status": if succeeded { "deployed" } else { "failed" },
            "chartName": "podinfo",
            "chartVersion": version,
            "appVersion": version,
            "configDigest": config_digest,
            "digest": digest("release", version, number),
            "firstDeployed": first_deployed,
            "lastDeployed": now,
        }),
    );
    history.truncate(5);
    let ready = if succeeded { "True" } else { "False" };
    let condition = |kind: &str| {
        json!({
            "type": kind,
            "status": ready,
            "observedGeneration": condition_generation,
            "lastTransitionTime": now,
            "reason": reason,
            "message": message,
        })
    };
    let status = json!({"status": {
        "observedGeneration": observed,
        "lastAttemptedGeneration": observed,
        "lastAttemptedRevision": version,
        "lastAttemptedConfigDigest": config_digest,
        "lastAttemptedReleaseAction": action,
        "helmChart": format!("{NS}/{namespace}-podinfo"),
        "storageNamespace": namespace,
        "failures": if succeeded { 0 } else { 1 },
        "conditions": [condition("Ready"), condition("Released")],
        "history": history,
    }});
    api.patch_status("podinfo", &params, &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Promotions of `revision` into `environment`.
async fn promotions(kube: &kube::Client, environment: &str, revision: &str) -> Vec<Promotion> {
    Api::<Promotion>::namespaced(kube.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.spec.target_environment == environment && p.spec.revision == revision)
        .collect()
}

/// Waits (`limit` at most) for the Promotion of `revision` into `environment`.
async fn wait_recorded(
    kube: &kube::Client,
    environment: &str,
    revision: &str,
    limit: Duration,
) -> Promotion {
    let deadline = Instant::now() + limit;
    loop {
        let found = promotions(kube, environment, revision).await;
        if let Some(first) = found.first() {
            assert_eq!(found.len(), 1, "{found:#?}");
            return first.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no promotion of {revision} to {environment} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// No Promotion of `revision` into `environment` appears during `period`.
async fn assert_none_recorded(
    kube: &kube::Client,
    environment: &str,
    revision: &str,
    period: Duration,
    why: &str,
) {
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        let found = promotions(kube, environment, revision).await;
        assert!(
            found.is_empty(),
            "{why}: yet a promotion of {revision} to {environment} was recorded: {found:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_succeeded(kube: &kube::Client, promotion: &Promotion) -> Promotion {
    let name = promotion.metadata.name.clone().unwrap();
    wait_promotion(kube, &name, "Succeeded", |p| phase(p) == "Succeeded").await
}

fn expected_id(environment: &str, revision: &str) -> String {
    pipeline_core::promotion_id(&PipelineRef::new(NS, "podinfo"), environment, revision)
}

fn message(p: &Promotion) -> String {
    p.status
        .as_ref()
        .map(|s| s.message.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn observed_deployments_promote_without_any_webhook() {
    let _turn = TURN.lock().await;
    let fleet = Fleet::start().await;
    let kube = fleet.kube();
    let quiet = Duration::from_secs(3);

    // One of two dev targets at 1.2.0: nothing yet.
    release(&fleet.leaf_a, "podinfo-dev", "1.2.0", Outcome::Deployed).await;
    assert_none_recorded(&kube, "staging", "1.2.0", quiet, "only leaf A is at 1.2.0").await;
    // Leaf B's release of 1.2.0 failed: Ready=False.
    release(&fleet.leaf_b, "podinfo-dev", "1.2.0", Outcome::Failed).await;
    assert_none_recorded(&kube, "staging", "1.2.0", quiet, "leaf B is Ready=False").await;
    // Ready=True at 1.2.0, but for an older generation than the object's.
    release(&fleet.leaf_b, "podinfo-dev", "1.2.0", Outcome::StaleStatus).await;
    assert_none_recorded(
        &kube,
        "staging",
        "1.2.0",
        quiet,
        "leaf B's status.observedGeneration is behind metadata.generation",
    )
    .await;
    release(
        &fleet.leaf_b,
        "podinfo-dev",
        "1.2.0",
        Outcome::StaleCondition,
    )
    .await;
    assert_none_recorded(
        &kube,
        "staging",
        "1.2.0",
        quiet,
        "leaf B's Ready condition is for an older generation",
    )
    .await;

    // Leaf B released 1.2.0 for its current generation: both are deployed, no webhook.
    release(&fleet.leaf_b, "podinfo-dev", "1.2.0", Outcome::Deployed).await;
    let ready = Instant::now();
    let recorded = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(20)).await;
    let took = ready.elapsed();
    eprintln!("observed promotion recorded {took:?} after the last target became ready");
    assert!(took < Duration::from_secs(10), "recorded after {took:?}");
    assert_eq!(
        recorded.metadata.name.as_deref(),
        Some(expected_id("staging", "1.2.0").as_str())
    );
    assert_eq!(recorded.spec.source_environment, "dev");
    let trigger = &recorded.spec.trigger;
    assert_eq!(trigger.source, "observed", "{trigger:?}");
    assert!(
        trigger.cluster.contains(LEAF_A) && trigger.cluster.contains(LEAF_B),
        "{trigger:?}"
    );
    let done = wait_succeeded(&kube, &recorded).await;
    assert_eq!(done.status.unwrap().attempts, 1);
    assert_eq!(fleet.notified("staging", "1.2.0"), 1);
    assert_eq!(promotions(&kube, "staging", "1.2.0").await.len(), 1);
}

#[tokio::test]
async fn a_webhook_event_and_the_watcher_make_one_promotion() {
    let _turn = TURN.lock().await;
    let fleet = Fleet::start().await;
    let kube = fleet.kube();

    // The watcher first, then Flux's event for the same deployment: the same record.
    fleet.deploy_dev("1.2.0").await;
    let observed = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(10)).await;
    assert_eq!(observed.spec.trigger.source, "observed");
    let response = post(&fleet.controller, "dev", event("podinfo-dev", "1.2.0")).await;
    assert_eq!(response.status(), 200, "a duplicate is answered 200");
    let answered: Value = response.json().await.unwrap();
    assert_eq!(answered["id"], json!(observed.metadata.name));
    wait_succeeded(&kube, &observed).await;

    // The event first (leaf A's Flux sent it before leaf B got there), then the watcher
    // sees both deployed: still one record, the webhook's.
    release(&fleet.leaf_a, "podinfo-dev", "1.3.0", Outcome::Deployed).await;
    let response = post(&fleet.controller, "dev", event("podinfo-dev", "1.3.0")).await;
    let id = recorded_id(response).await;
    assert_eq!(id, expected_id("staging", "1.3.0"));
    release(&fleet.leaf_b, "podinfo-dev", "1.3.0", Outcome::Deployed).await;
    let done = wait_promotion(&kube, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(done.spec.trigger.source, "webhook");
    // Give the proposer time to (wrongly) add another.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for revision in ["1.2.0", "1.3.0"] {
        let found = promotions(&kube, "staging", revision).await;
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(fleet.notified("staging", revision), 1, "{revision}");
    }
}

#[tokio::test]
async fn the_health_gate_holds_a_webhook_promotion_until_every_target_is_deployed() {
    let _turn = TURN.lock().await;
    let fleet = Fleet::start().await;
    let kube = fleet.kube();
    fleet.deploy_dev("1.2.0").await;
    let first = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(10)).await;
    wait_succeeded(&kube, &first).await;

    // Leaf A upgraded to 1.3.0 and its Flux says so; leaf B still runs 1.2.0.
    release(&fleet.leaf_a, "podinfo-dev", "1.3.0", Outcome::Deployed).await;
    let response = post(&fleet.controller, "dev", event("podinfo-dev", "1.3.0")).await;
    let id = recorded_id(response).await;
    let held = wait_promotion(&kube, &id, "held by the health gate", |p| {
        message(p).starts_with("waiting for 1 of 2 targets")
    })
    .await;
    eprintln!("held: {}", message(&held));
    assert_eq!(phase(&held), "Pending");
    assert!(message(&held).contains(LEAF_B), "{}", message(&held));
    assert!(message(&held).contains("at 1.2.0"), "{}", message(&held));
    // It stays held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = wait_promotion(&kube, &id, "still held", |_| true).await;
    assert_eq!(phase(&still), "Pending");
    assert!(message(&still).starts_with("waiting for 1 of 2 targets"));
    assert_eq!(still.status.as_ref().unwrap().attempts, 0);
    assert_eq!(fleet.notified("staging", "1.3.0"), 0);

    // Leaf B gets there: the promotion runs.
    release(&fleet.leaf_b, "podinfo-dev", "1.3.0", Outcome::Deployed).await;
    let released = Instant::now();
    let done = wait_promotion(&kube, &id, "Succeeded", |p| phase(p) == "Succeeded").await;
    eprintln!(
        "ran {:?} after the second target was ready",
        released.elapsed()
    );
    assert_eq!(done.status.unwrap().attempts, 1);
    assert_eq!(fleet.notified("staging", "1.3.0"), 1);
    assert_eq!(promotions(&kube, "staging", "1.3.0").await.len(), 1);
}

#[tokio::test]
async fn leaf_outage_the_missed_promotion_happens_after_the_restart() {
    let _turn = TURN.lock().await;
    let mut fleet = Fleet::start().await;
    let kube = fleet.kube();
    fleet.deploy_dev("1.2.0").await;
    let first = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(10)).await;
    wait_succeeded(&kube, &first).await;

    // Leaf B's API server goes away; leaf A deploys 1.4.0 meanwhile.
    fleet.leaf_b.stop_apiserver().await;
    let stopped = Instant::now();
    release(&fleet.leaf_a, "podinfo-dev", "1.4.0", Outcome::Deployed).await;
    assert_none_recorded(
        &kube,
        "staging",
        "1.4.0",
        Duration::from_secs(15),
        "leaf B is unreachable",
    )
    .await;
    // Back after ~20 s (the controller's reconnect backoff has grown by then); leaf B
    // deploys 1.4.0 at once, likely before the controller is connected again.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(stopped.elapsed())).await;
    fleet.leaf_b.restart_apiserver().await.unwrap();
    let restarted = Instant::now();
    eprintln!("leaf B was down for {:?}", stopped.elapsed());
    release(&fleet.leaf_b, "podinfo-dev", "1.4.0", Outcome::Deployed).await;
    // Waits longer than the bound, to tell "late" from "never" in a failure.
    let recorded = wait_recorded(&kube, "staging", "1.4.0", Duration::from_secs(90)).await;
    let took = restarted.elapsed();
    eprintln!("promotion of 1.4.0 recorded {took:?} after leaf B came back");
    assert!(
        took < Duration::from_secs(35),
        "the missed promotion was recorded only {took:?} after leaf B's API server was back (reconnect backoff is capped at 30 s)"
    );
    assert_eq!(recorded.spec.trigger.source, "observed");
    wait_succeeded(&kube, &recorded).await;
    assert_eq!(fleet.notified("staging", "1.4.0"), 1);
}

#[tokio::test]
async fn a_rotated_kubeconfig_secret_is_used_from_then_on() {
    let _turn = TURN.lock().await;
    let fleet = Fleet::start().await;
    let kube = fleet.kube();
    const CHANGED: &str = "kubeconfig changed; reconnecting";
    fleet.deploy_dev("1.2.0").await;
    let first = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(10)).await;
    wait_succeeded(&kube, &first).await;
    assert_eq!(fleet.logged(&[CHANGED]), 0);

    // Both Secrets rotated to another admin with a fresh client certificate.
    let rotated_a = fleet
        .leaf_a
        .user_kubeconfig_yaml("leaf-a-rotated", &["system:masters"])
        .unwrap();
    put_secret(
        &fleet.management,
        "leaf-a-kubeconfig",
        "value.yaml",
        &rotated_a,
    )
    .await;
    let rotated_b = fleet
        .leaf_b
        .user_kubeconfig_yaml("leaf-b-rotated", &["system:masters"])
        .unwrap();
    put_secret(&fleet.management, "leaf-b-kubeconfig", "value", &rotated_b).await;
    fleet
        .wait_logged_all(&[CHANGED, LEAF_A], 1, "leaf A's rotation unnoticed")
        .await;
    fleet
        .wait_logged_all(&[CHANGED, LEAF_B], 1, "leaf B's rotation unnoticed")
        .await;
    fleet.deploy_dev("1.5.0").await;
    let recorded = wait_recorded(&kube, "staging", "1.5.0", Duration::from_secs(15)).await;
    wait_succeeded(&kube, &recorded).await;

    // The new credentials are the ones used: a user without any rights sees nothing...
    let nobody = fleet.leaf_a.user_kubeconfig_yaml("nobody", &[]).unwrap();
    put_secret(
        &fleet.management,
        "leaf-a-kubeconfig",
        "value.yaml",
        &nobody,
    )
    .await;
    fleet
        .wait_logged_all(&[CHANGED, LEAF_A], 2, "leaf A's second rotation unnoticed")
        .await;
    fleet.deploy_dev("1.6.0").await;
    assert_none_recorded(
        &kube,
        "staging",
        "1.6.0",
        Duration::from_secs(5),
        "leaf A's kubeconfig may not read HelmReleases",
    )
    .await;
    // ... and an admin again does.
    let admin = fleet
        .leaf_a
        .user_kubeconfig_yaml("leaf-a-admin-again", &["system:masters"])
        .unwrap();
    put_secret(&fleet.management, "leaf-a-kubeconfig", "value.yaml", &admin).await;
    fleet
        .wait_logged_all(&[CHANGED, LEAF_A], 3, "leaf A's third rotation unnoticed")
        .await;
    let recorded = wait_recorded(&kube, "staging", "1.6.0", Duration::from_secs(45)).await;
    wait_succeeded(&kube, &recorded).await;
}

#[tokio::test]
async fn a_rollback_in_dev_is_not_promoted() {
    let _turn = TURN.lock().await;
    let fleet = Fleet::start().await;
    let kube = fleet.kube();
    fleet.deploy_dev("1.2.0").await;
    let first = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(10)).await;
    wait_succeeded(&kube, &first).await;
    // Flux in staging acts on the notification and deploys 1.2.0 (whose promotion to
    // prod then waits for an approval: the watcher has seen staging at 1.2.0).
    release(
        &fleet.management,
        "podinfo-staging",
        "1.2.0",
        Outcome::Deployed,
    )
    .await;
    let to_prod = wait_recorded(&kube, "prod", "1.2.0", Duration::from_secs(10)).await;
    assert_eq!(to_prod.spec.trigger.source, "observed");

    // Dev rolls back to 1.1.0 on both targets: staging already runs newer.
    fleet.deploy_dev("1.1.0").await;
    assert_none_recorded(
        &kube,
        "staging",
        "1.1.0",
        Duration::from_secs(5),
        "staging already runs 1.2.0",
    )
    .await;
    // The watcher was listening all along: dev's next release is promoted.
    fleet.deploy_dev("1.3.0").await;
    let next = wait_recorded(&kube, "staging", "1.3.0", Duration::from_secs(10)).await;
    wait_succeeded(&kube, &next).await;
    assert!(promotions(&kube, "staging", "1.1.0").await.is_empty());
    assert_eq!(fleet.notified("staging", "1.1.0"), 0);
}

#[tokio::test]
async fn deleting_the_pipeline_releases_its_watches() {
    let _turn = TURN.lock().await;
    let fleet = Fleet::start().await;
    const RELEASED: &str = "no longer watching a cluster's app objects";
    assert_eq!(fleet.logged(&[RELEASED]), 0);
    let pipelines: Api<DynamicObject> = Api::namespaced_with(
        fleet.kube(),
        NS,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("pipelines.weave.works", "v1alpha1", "Pipeline"),
            "pipelines",
        ),
    );
    pipelines
        .delete("podinfo", &DeleteParams::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    for cluster in [LEAF_A, LEAF_B, "cluster=local"] {
        fleet
            .wait_logged_all(&[RELEASED, cluster], 1, "watch not released")
            .await;
    }
    for cluster in fleet.clusters() {
        wait_watches(cluster, "HelmRelease watches released", |n| n == 0).await;
    }
    eprintln!(
        "watches released {:?} after the deletion",
        deleted.elapsed()
    );

    // A pipeline naming the clusters again brings the watches back.
    fleet.management.apply_yaml(PIPELINE).await.unwrap();
    for cluster in fleet.clusters() {
        wait_watches(cluster, "HelmRelease watches again", |n| n >= 1).await;
    }
    fleet.deploy_dev("1.2.0").await;
    let recorded = wait_recorded(&fleet.kube(), "staging", "1.2.0", Duration::from_secs(10)).await;
    wait_succeeded(&fleet.kube(), &recorded).await;
}

/// Embedded mode watches leaf clusters too: the manifests folder holds the Pipeline, a
/// GitopsCluster and its kubeconfig Secret; a dev target becoming Ready at a version is
/// promoted without any webhook, and a signed event for a version the leaf does not run
/// waits at the health gate.
#[tokio::test]
async fn embedded_mode_watches_a_leaf_cluster_named_in_the_folder() {
    let _turn = TURN.lock().await;
    let leaf = TestCluster::start_named("embedded-leaf").await.unwrap();
    leaf.install_flux_crds().await.unwrap();
    leaf.ensure_namespace("podinfo-dev").await.unwrap();
    create_release(&leaf, "podinfo-dev").await;

    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("secret.yaml"), QUICKSTART_SECRET).unwrap();
    let kubeconfig = leaf.kubeconfig_yaml().unwrap();
    let indented: String = kubeconfig.lines().map(|l| format!("    {l}\n")).collect();
    std::fs::write(
        manifests.join("leaf.yaml"),
        format!(
            "apiVersion: gitops.weave.works/v1alpha1\nkind: GitopsCluster\nmetadata:\n  name: leaf\n  namespace: flux-system\nspec:\n  secretRef:\n    name: leaf-kubeconfig\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: leaf-kubeconfig\n  namespace: flux-system\nstringData:\n  value.yaml: |\n{indented}"
        ),
    )
    .unwrap();
    std::fs::write(
        manifests.join("pipeline.yaml"),
        "apiVersion: pipelines.weave.works/v1alpha1\nkind: Pipeline\nmetadata:\n  name: podinfo\n  namespace: flux-system\nspec:\n  appRef:\n    apiVersion: helm.toolkit.fluxcd.io/v2\n    kind: HelmRelease\n    name: podinfo\n  environments:\n    - name: dev\n      targets:\n        - namespace: podinfo-dev\n          clusterRef:\n            kind: GitopsCluster\n            name: leaf\n    - name: staging\n      targets:\n        - namespace: podinfo-staging\n  promotion:\n    strategy:\n      secretRef:\n        name: podinfo-promotion-hmac\n      notification: {}\n",
    )
    .unwrap();
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = support::Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url()],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !service.logs().contains("watching a cluster's app objects") {
        assert!(
            Instant::now() < deadline,
            "never watched the leaf:\n{}",
            service.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The leaf deploys 1.5.0: observed and promoted, no webhook.
    release(&leaf, "podinfo-dev", "1.5.0", Outcome::Deployed).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let observed = loop {
        let records = support::get_json(&service, "/api/v1/promotions").await;
        if let Some(found) = records
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["revision"] == "1.5.0")
        {
            break found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "1.5.0 never proposed:\n{}",
            service.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(observed["trigger"]["source"], "observed");
    assert_eq!(
        observed["trigger"]["cluster"],
        "GitopsCluster/flux-system/leaf"
    );
    let id = observed["id"].as_str().unwrap();
    support::wait_for(&service, id, "Succeeded", |r| r["phase"] == "Succeeded").await;

    // A signed event for 2.0.0 while the leaf still runs 1.5.0: held at the gate.
    let (status, held) = support::post_event(&service, "dev", event("podinfo-dev", "2.0.0")).await;
    assert_eq!(status, 202, "{held}");
    let held_id = held["id"].as_str().unwrap().to_string();
    support::wait_for(&service, &held_id, "held", |r| {
        r["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("waiting for 1 of 1 targets"))
    })
    .await;
    assert_eq!(receiver.count(), 1);

    // Then it deploys 2.0.0: the held promotion runs (and is not proposed twice).
    release(&leaf, "podinfo-dev", "2.0.0", Outcome::Deployed).await;
    let done = support::wait_for(&service, &held_id, "Succeeded", |r| {
        r["phase"] == "Succeeded"
    })
    .await;
    assert_eq!(done["trigger"]["source"], "webhook");
    let records = support::get_json(&service, "/api/v1/promotions").await;
    assert_eq!(records.as_array().unwrap().len(), 2, "{records:#}");
    assert_eq!(receiver.count(), 2);
}

/// A deployment that happens while the controller is down is promoted once it is back,
/// and what was promoted before is not promoted again.
#[tokio::test]
async fn a_controller_restarted_mid_way_misses_nothing_and_doubles_nothing() {
    let _turn = TURN.lock().await;
    let mut fleet = Fleet::start().await;
    let kube = fleet.kube();
    fleet.deploy_dev("1.2.0").await;
    let first = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(10)).await;
    wait_succeeded(&kube, &first).await;

    // The controller goes away (SIGKILL); dev deploys 1.3.0 meanwhile.
    fleet.controller.kill9();
    fleet.deploy_dev("1.3.0").await;
    assert_none_recorded(
        &kube,
        "staging",
        "1.3.0",
        Duration::from_secs(2),
        "nobody is watching",
    )
    .await;

    // Back: 1.3.0 is promoted, 1.2.0 is not again.
    fleet.controller = Controller::start(
        &fleet.management,
        "watcher-restarted",
        &["--events-addr", &fleet.receiver.url()],
    );
    let missed = wait_recorded(&kube, "staging", "1.3.0", Duration::from_secs(30)).await;
    wait_succeeded(&kube, &missed).await;
    assert_eq!(promotions(&kube, "staging", "1.2.0").await.len(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fleet.notified("staging", "1.2.0"),
        1,
        "1.2.0 promoted twice"
    );
    assert_eq!(fleet.notified("staging", "1.3.0"), 1);
}

/// The overview fragment of the dashboard, and the part of it about `environment`'s lane.
async fn dashboard_lane(fleet: &Fleet, environment: &str) -> String {
    let html = support::client()
        .get(fleet.controller.internal_url("/ui/fragment/overview"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let start = html
        .find(&format!(r#"data-environment="{environment}""#))
        .unwrap_or_else(|| panic!("no {environment} lane in {html}"));
    let rest = &html[start..];
    let end = rest[1..]
        .find("data-environment=")
        .map_or(rest.len(), |i| i + 1);
    rest[..end].to_string()
}

/// Waits (bounded) until `environment`'s lane on the dashboard satisfies `done`.
async fn wait_lane(fleet: &Fleet, environment: &str, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lane = dashboard_lane(fleet, environment).await;
        if done(&lane) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; lane: {lane}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kubernetes mode's dashboard reads the deployment watch through the read port: a lane
/// shows a failing target's problem, then the revision every target runs, as the watch
/// sees it (not as the records say).
#[tokio::test]
async fn the_dashboard_shows_what_the_watch_sees() {
    let _turn = TURN.lock().await;
    let fleet = Fleet::start().await;
    let kube = fleet.kube();

    release(&fleet.leaf_a, "podinfo-dev", "1.2.0", Outcome::Deployed).await;
    release(&fleet.leaf_b, "podinfo-dev", "1.2.0", Outcome::Failed).await;
    wait_lane(&fleet, "dev", "dev degraded by leaf B", |lane| {
        lane.contains(r#"class="health bad""#)
            && lane.contains("not Ready")
            && lane.contains(LEAF_B)
    })
    .await;

    release(&fleet.leaf_b, "podinfo-dev", "1.2.0", Outcome::Deployed).await;
    let recorded = wait_recorded(&kube, "staging", "1.2.0", Duration::from_secs(20)).await;
    wait_succeeded(&kube, &recorded).await;
    wait_lane(
        &fleet,
        "dev",
        "dev healthy at 1.2.0 per the watch",
        |lane| {
            lane.contains(r#"title="seen by the deployment watch">1.2.0<"#)
                && lane.contains(r#"class="health ok""#)
        },
    )
    .await;
    // staging's HelmRelease has not released 1.2.0: the lane says the promotion
    // succeeded, not that staging runs it.
    wait_lane(&fleet, "staging", "staging promoted to 1.2.0", |lane| {
        lane.contains(r#"title="latest successful promotion">1.2.0<"#)
    })
    .await;
}
