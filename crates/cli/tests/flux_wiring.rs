//! Direct Flux wiring (`serve --flux-wiring direct`) with the real binary against a
//! management and a leaf cluster (each a real etcd + kube-apiserver with Flux's CRDs):
//! the public URL derived from the controller's Service (none, then its LoadBalancer,
//! then an Ingress), the Provider, Alert and key Secret applied to every target of every
//! environment that has a next one (exactly what `flux-config` writes), drift undone
//! (edited and deleted objects), objects removed when an environment and when the
//! pipeline go away, and the key never logged. Then the same objects with Flux's own
//! notification-controller v1.6.0: a helm-controller-style event for dev reaches the
//! webhook signed with the copied key and records a promotion, whose `--events-addr`
//! announcement notification-controller forwards to an Alert of the user's.
//!
//! ```sh
//! scripts/ensure-test-binaries.sh kube flux-crds flux
//! cargo test -p pipeline-controller --test flux_wiring -- --nocapture   # ~30 s
//! ```
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::Api;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use pipeline_core::flux_wiring::pipeline_wiring;
use pipeline_core::pipeline::{Pipeline, PipelineRef, parse_pipeline_spec};
use pipeline_testenv::TestCluster;
use serde_json::{Value, json};
use support::k8s::Controller;

const NS: &str = "flux-system";
const SYSTEM: &str = "pipeline-system";
/// The webhook key, stored with a trailing newline (as `--from-file` writes it).
const KEY: &str = "direct-wiring-key-0123456789";

fn pipeline_spec(with_staging: bool) -> Value {
    let mut environments = vec![
        json!({"name": "dev", "targets": [
            {"namespace": "podinfo-dev", "clusterRef": {"apiVersion": "gitops.weave.works/v1alpha1", "kind": "GitopsCluster", "name": "leaf", "namespace": NS}},
            {"namespace": "podinfo-dev"}
        ]}),
        json!({"name": "staging", "targets": [{"namespace": "podinfo-staging"}]}),
        json!({"name": "prod", "targets": [{"namespace": "podinfo-prod"}]}),
    ];
    if !with_staging {
        environments.remove(1);
    }
    json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": environments,
        "promotion": {"strategy": {"notification": {}, "secretRef": {"name": "podinfo-hmac"}}}
    })
}

async fn apply_pipeline(cluster: &TestCluster, with_staging: bool) {
    let object = json!({
        "apiVersion": "pipelines.weave.works/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": pipeline_spec(with_staging),
    });
    let api: Api<DynamicObject> = Api::namespaced_with(
        cluster.client(),
        NS,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("pipelines.weave.works", "v1alpha1", "Pipeline"),
            "pipelines",
        ),
    );
    api.patch(
        "podinfo",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap();
}

fn resource(kind: &str) -> ApiResource {
    if kind == "Secret" {
        return ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("", "v1", "Secret"),
            "secrets",
        );
    }
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("notification.toolkit.fluxcd.io", "v1beta3", kind),
        &format!("{}s", kind.to_ascii_lowercase()),
    )
}

fn api(cluster: &TestCluster, kind: &str, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(cluster.client(), namespace, &resource(kind))
}

/// Every object of `kind` the direct wiring labelled, as "namespace/name".
async fn ours(cluster: &TestCluster, kind: &str) -> Vec<String> {
    let api: Api<DynamicObject> = Api::all_with(cluster.client(), &resource(kind));
    let mut names: Vec<String> = api
        .list(&ListParams::default().labels("pipelines.weave.works/flux-wiring=direct"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default()
            )
        })
        .collect();
    names.sort();
    names
}

/// Polls `check` every 200 ms until it holds; panics with `what` and the controller's
/// log after `limit`.
async fn wait_until<F, Fut>(controller: &Controller, what: &str, limit: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} (waited {limit:?}); controller log:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Provider and Alert `flux-config` writes for this pipeline at `url`, by
/// (namespace, kind).
fn expected(url: &str, with_staging: bool) -> Vec<Value> {
    let pipeline = Pipeline {
        reference: PipelineRef::new(NS, "podinfo"),
        spec: parse_pipeline_spec(pipeline_spec(with_staging)).unwrap(),
    };
    pipeline_wiring(&pipeline, url)
        .into_iter()
        .flat_map(|t| t.objects)
        .collect()
}

async fn spec_of(cluster: &TestCluster, kind: &str, namespace: &str, name: &str) -> Option<Value> {
    api(cluster, kind, namespace)
        .get_opt(name)
        .await
        .unwrap()
        .map(|o| o.data["spec"].clone())
}

#[tokio::test]
async fn direct_wiring_applies_repairs_and_removes_providers_alerts_and_keys() {
    let (management, leaf) = tokio::join!(
        TestCluster::start_named("management"),
        TestCluster::start_named("leaf")
    );
    let (management, leaf) = (management.unwrap(), leaf.unwrap());
    let (crds, flux, gitops, flux_leaf) = tokio::join!(
        management.install_crds(),
        management.install_flux_crds(),
        management.install_gitops_cluster_crd(),
        leaf.install_flux_crds(),
    );
    for result in [crds, flux, gitops, flux_leaf] {
        result.unwrap();
    }
    for namespace in [NS, SYSTEM, "podinfo-dev", "podinfo-staging", "podinfo-prod"] {
        management.ensure_namespace(namespace).await.unwrap();
    }
    leaf.ensure_namespace("podinfo-dev").await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(management.client(), NS);
    for (name, key, value) in [
        ("podinfo-hmac", "hmac-key", format!("{KEY}\n")),
        ("leaf-kubeconfig", "value", leaf.kubeconfig_yaml().unwrap()),
    ] {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": NS},
            "stringData": {key: value},
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    management
        .apply_yaml("apiVersion: gitops.weave.works/v1alpha1\nkind: GitopsCluster\nmetadata:\n  name: leaf\n  namespace: flux-system\nspec:\n  secretRef:\n    name: leaf-kubeconfig\n")
        .await
        .unwrap();
    apply_pipeline(&management, true).await;
    // The controller's Service, as the chart makes it: ClusterIP, so no public URL yet.
    let services: Api<Service> = Api::namespaced(management.client(), SYSTEM);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "pipeline-controller", "namespace": SYSTEM},
        "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                 "selector": {"app.kubernetes.io/name": "pipeline-controller"}},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();

    let controller = Controller::start(
        &management,
        "wiring",
        &[
            "--no-deployment-watch",
            "--flux-wiring",
            "direct",
            "--flux-wiring-interval",
            "2s",
            "--service-namespace",
            SYSTEM,
        ],
    );
    let began = Instant::now();
    wait_until(
        &controller,
        "no public URL said",
        Duration::from_secs(30),
        || async {
            controller
                .logs()
                .contains("direct Flux wiring cannot write Providers: no public URL")
        },
    )
    .await;
    let logs = controller.logs();
    assert!(
        logs.contains("of type ClusterIP, not LoadBalancer"),
        "{logs}"
    );
    // The leader's /readyz says it too (still 200: the webhook works).
    let readyz: Value = reqwest::get(controller.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        readyz["detail"][0]
            .as_str()
            .is_some_and(|d| d.contains("writes no Providers: no public URL")),
        "{readyz}"
    );
    assert!(ours(&management, "Provider").await.is_empty());

    // A LoadBalancer with an address: its URL.
    services
        .patch(
            "pipeline-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "LoadBalancer"}})),
        )
        .await
        .unwrap();
    services
        .patch_status(
            "pipeline-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}})),
        )
        .await
        .unwrap();
    let lb_url = "http://192.0.2.10";
    wait_until(
        &controller,
        "the LoadBalancer's URL used",
        Duration::from_secs(30),
        || async {
            let wanted = expected(lb_url, true);
            let provider = &wanted[0];
            spec_of(
                &leaf,
                "Provider",
                "podinfo-dev",
                provider["metadata"]["name"].as_str().unwrap(),
            )
            .await
            .is_some_and(|spec| spec == provider["spec"])
        },
    )
    .await;
    eprintln!("LoadBalancer URL wired in {:?}", began.elapsed());
    let readyz: Value = reqwest::get(controller.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(readyz, json!({"status": "ready"}));
    let logs = controller.logs();
    assert!(
        logs.lines().any(
            |l| l.contains("public URL of the webhook for Flux Providers")
                && l.contains(lb_url)
                && l.contains("LoadBalancer Service pipeline-system/pipeline-controller")
        ),
        "{logs}"
    );

    // An Ingress routing the webhook to the Service wins, with TLS: https.
    management
        .apply_yaml("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: pipeline-controller\n  namespace: pipeline-system\nspec:\n  tls:\n    - hosts: [promote.example.com]\n      secretName: promote-tls\n  rules:\n    - host: promote.example.com\n      http:\n        paths:\n          - path: /pipelines/\n            pathType: Prefix\n            backend:\n              service:\n                name: pipeline-controller\n                port:\n                  name: http\n")
        .await
        .unwrap();
    let url = "https://promote.example.com";
    let wanted = expected(url, true);
    wait_until(
        &controller,
        "the Ingress's URL used everywhere",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for (cluster, object) in [
                (&leaf, &wanted[0]),
                (&management, &wanted[2]),
                (&management, &wanted[4]),
            ] {
                let namespace = object["metadata"]["namespace"].as_str().unwrap();
                let name = object["metadata"]["name"].as_str().unwrap();
                all &= spec_of(cluster, "Provider", namespace, name)
                    .await
                    .is_some_and(|s| s == object["spec"]);
            }
            all
        },
    )
    .await;
    assert!(
        controller.logs().lines().any(|l| l
            .contains("public URL of the webhook for Flux Providers")
            && l.contains(url)
            && l.contains("Ingress pipeline-system/pipeline-controller")),
        "{}",
        controller.logs()
    );

    // The controller's own updates (new address) are not taken for repairs.
    assert!(
        !controller.logs().contains("put back"),
        "{}",
        controller.logs()
    );
    // In the steady state a pass writes nothing: the 9 objects (3 in the leaf, 6 here)
    // are as last applied, by their resourceVersion.
    wait_until(
        &controller,
        "a pass that applies nothing",
        Duration::from_secs(20),
        || async {
            controller
                .logs()
                .lines()
                .any(|l| l.contains("pass done") && l.contains("applied=0 unchanged=9"))
        },
    )
    .await;

    // Exactly flux-config's objects: dev (both targets) and staging; prod is last.
    assert_eq!(wanted.len(), 6);
    let dev_name = wanted[0]["metadata"]["name"].as_str().unwrap().to_string();
    let staging_name = wanted[4]["metadata"]["name"].as_str().unwrap().to_string();
    for (cluster, object) in [
        (&leaf, &wanted[0]),
        (&leaf, &wanted[1]),
        (&management, &wanted[2]),
        (&management, &wanted[3]),
        (&management, &wanted[4]),
        (&management, &wanted[5]),
    ] {
        let kind = object["kind"].as_str().unwrap();
        let namespace = object["metadata"]["namespace"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let live = api(cluster, kind, namespace).get(name).await.unwrap();
        assert_eq!(
            live.data["spec"], object["spec"],
            "{kind} {namespace}/{name}"
        );
        let labels = live.metadata.labels.clone().unwrap();
        for (k, v) in object["metadata"]["labels"].as_object().unwrap() {
            assert_eq!(
                labels.get(k).map(String::as_str),
                v.as_str(),
                "{kind} label {k}"
            );
        }
        assert_eq!(labels["pipelines.weave.works/flux-wiring"], "direct");
        let managers: Vec<String> = live
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|m| m.manager.clone())
            .collect();
        assert!(
            managers.contains(&"pipeline-controller-flux-wiring".to_string()),
            "{managers:?}"
        );
    }
    assert_eq!(
        ours(&management, "Provider").await,
        vec![
            format!("podinfo-dev/{dev_name}"),
            format!("podinfo-staging/{staging_name}")
        ]
    );
    assert_eq!(
        ours(&leaf, "Alert").await,
        vec![format!("podinfo-dev/{dev_name}")]
    );
    // The key, trimmed as Flux trims a Provider's token, under `token`.
    let leaf_secret: Secret = Api::namespaced(leaf.client(), "podinfo-dev")
        .get(&format!("{dev_name}-hmac"))
        .await
        .unwrap();
    let data = leaf_secret.data.unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), vec!["token"]);
    assert_eq!(data["token"].0, KEY.as_bytes());

    // Drift: the leaf's Provider readdressed, its Alert suspended with a field of
    // someone else's, a key added to its Secret; staging's Secret and Alert deleted.
    let edit = PatchParams::apply("kubectl-edit").force();
    api(&leaf, "Provider", "podinfo-dev")
        .patch(
            &dev_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"address": "https://attacker.example/hook"}})),
        )
        .await
        .unwrap();
    api(&leaf, "Alert", "podinfo-dev")
        .patch(
            &dev_name,
            &edit,
            &Patch::Apply(json!({"apiVersion": "notification.toolkit.fluxcd.io/v1beta3", "kind": "Alert", "metadata": {"name": dev_name, "namespace": "podinfo-dev"}, "spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    api(&leaf, "Secret", "podinfo-dev")
        .patch(
            &format!("{dev_name}-hmac"),
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"extra": "x"}, "data": {"token": "d3Jvbmc="}})),
        )
        .await
        .unwrap();
    api(&management, "Secret", "podinfo-staging")
        .delete(&format!("{staging_name}-hmac"), &DeleteParams::default())
        .await
        .unwrap();
    api(&management, "Alert", "podinfo-staging")
        .delete(&staging_name, &DeleteParams::default())
        .await
        .unwrap();
    let drifted = Instant::now();
    wait_until(
        &controller,
        "drift undone",
        Duration::from_secs(20),
        || async {
            let provider = spec_of(&leaf, "Provider", "podinfo-dev", &dev_name).await;
            let alert = spec_of(&leaf, "Alert", "podinfo-dev", &dev_name).await;
            let secret: Option<Secret> = Api::namespaced(leaf.client(), "podinfo-dev")
                .get_opt(&format!("{dev_name}-hmac"))
                .await
                .unwrap();
            let staging_alert =
                spec_of(&management, "Alert", "podinfo-staging", &staging_name).await;
            let staging_secret = api(&management, "Secret", "podinfo-staging")
                .get_opt(&format!("{staging_name}-hmac"))
                .await
                .unwrap();
            provider.is_some_and(|s| s == wanted[0]["spec"])
                && alert.is_some_and(|s| s == wanted[1]["spec"])
                && secret.and_then(|s| s.data).is_some_and(|d| {
                    d.len() == 1 && d.get("token").is_some_and(|t| t.0 == KEY.as_bytes())
                })
                && staging_alert.is_some_and(|s| s == wanted[5]["spec"])
                && staging_secret.is_some()
        },
    )
    .await;
    eprintln!("drift undone in {:?}", drifted.elapsed());
    assert!(
        controller.logs().contains("put back a Flux wiring object"),
        "{}",
        controller.logs()
    );

    // staging removed: its objects go; dev's stay (prod is now its next environment).
    apply_pipeline(&management, false).await;
    let removed = Instant::now();
    wait_until(
        &controller,
        "staging's objects removed",
        Duration::from_secs(20),
        || async {
            ours(&management, "Provider").await == vec![format!("podinfo-dev/{dev_name}")]
                && ours(&management, "Alert").await == vec![format!("podinfo-dev/{dev_name}")]
                && ours(&management, "Secret").await == vec![format!("podinfo-dev/{dev_name}-hmac")]
        },
    )
    .await;
    eprintln!("environment's objects removed in {:?}", removed.elapsed());
    assert_eq!(
        ours(&leaf, "Provider").await,
        vec![format!("podinfo-dev/{dev_name}")]
    );

    // The pipeline deleted: everything goes, in both clusters.
    let pipelines: Api<DynamicObject> = Api::namespaced_with(
        management.client(),
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
    wait_until(
        &controller,
        "every object removed",
        Duration::from_secs(20),
        || async {
            let mut empty = true;
            for cluster in [&management, &leaf] {
                for kind in ["Provider", "Alert", "Secret"] {
                    empty &= ours(cluster, kind).await.is_empty();
                }
            }
            empty
        },
    )
    .await;
    eprintln!("pipeline's objects removed in {:?}", deleted.elapsed());

    // The key never appears in the log, plain or base64.
    let logs = controller.logs();
    let encoded = base64::engine::general_purpose::STANDARD.encode(KEY);
    assert!(
        !logs.contains(KEY) && !logs.contains(&encoded),
        "the key was logged:\n{logs}"
    );
    assert!(
        logs.contains("deleted a Flux wiring object no pipeline wants any more"),
        "{logs}"
    );
}

/// The whole direct path with Flux's own notification-controller (v1.6.0): the Provider,
/// Alert and key Secret the controller applied carry a helm-controller-style event for
/// dev to the webhook, signed by notification-controller with the copied (trimmed) key,
/// and a promotion to staging is recorded. That promotion's notification strategy posts
/// its announcement to the same notification-controller through --events-addr, which
/// forwards it to the people's own Alert (and not, thanks to the generated Alerts'
/// exclusionList, back to the webhook as a deployment).
#[tokio::test]
async fn a_real_notification_controller_delivers_through_the_direct_wiring() {
    use pipeline_crds::Promotion;
    use pipeline_testenv::{FluxController, FluxControllers};

    let management = TestCluster::start_named("management").await.unwrap();
    let (crds, flux_crds) = tokio::join!(management.install_crds(), management.install_flux_crds());
    crds.unwrap();
    flux_crds.unwrap();
    for namespace in [NS, SYSTEM, "podinfo-dev", "podinfo-staging", "podinfo-prod"] {
        management.ensure_namespace(namespace).await.unwrap();
    }
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "podinfo-hmac", "namespace": NS},
        "stringData": {"hmac-key": format!("{KEY}\n")},
    }))
    .unwrap();
    Api::<Secret>::namespaced(management.client(), NS)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let spec = json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": [
            // A dev target in the pipeline's own namespace too: its Alert selects the
            // object the promotion announcements are about, and must exclude them.
            {"name": "dev", "targets": [{"namespace": "podinfo-dev"}, {"namespace": NS}]},
            {"name": "staging", "targets": [{"namespace": "podinfo-staging"}]},
            {"name": "prod", "targets": [{"namespace": "podinfo-prod"}]}
        ],
        "promotion": {"strategy": {"notification": {}, "secretRef": {"name": "podinfo-hmac"}}}
    });
    management
        .apply_yaml(
            &serde_json::to_string(&json!({
                "apiVersion": "pipelines.weave.works/v1alpha1", "kind": "Pipeline",
                "metadata": {"name": "podinfo", "namespace": NS}, "spec": spec,
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let flux = FluxControllers::start(&management).await.unwrap();
    eprintln!("Flux controllers started in {:?}", flux.started_in());

    let controller = Controller::start(
        &management,
        "real-flux",
        &[
            "--no-deployment-watch",
            "--flux-wiring",
            "direct",
            "--flux-wiring-interval",
            "2s",
            "--service-namespace",
            SYSTEM,
            "--events-addr",
            &flux.events_url(),
        ],
    );
    // The controller's Service as a LoadBalancer on loopback, at the controller's port.
    let port = controller.address.port();
    load_balancer(&management, port, "127.0.0.1").await;
    let pipeline = Pipeline {
        reference: PipelineRef::new(NS, "podinfo"),
        spec: parse_pipeline_spec(spec).unwrap(),
    };
    let wiring = pipeline_wiring(&pipeline, &format!("http://127.0.0.1:{port}"));
    assert_eq!(wiring.len(), 3, "dev (2 targets) and staging");
    wait_until(
        &controller,
        "every Provider and Alert applied",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for object in wiring.iter().flat_map(|t| &t.objects) {
                let kind = object["kind"].as_str().unwrap();
                let namespace = object["metadata"]["namespace"].as_str().unwrap();
                let name = object["metadata"]["name"].as_str().unwrap();
                all &= spec_of(&management, kind, namespace, name)
                    .await
                    .is_some_and(|s| s == object["spec"]);
            }
            all
        },
    )
    .await;
    // People are told through an Alert of their own in the pipeline's namespace,
    // selecting the app object and only promotion announcements, sent to a receiver
    // (a generic Provider, as one for Slack or Teams would be).
    let people = support::Receiver::start(vec![], Duration::ZERO).await;
    management
        .apply_yaml(&format!(
            "apiVersion: notification.toolkit.fluxcd.io/v1beta3\nkind: Provider\nmetadata:\n  name: people\n  namespace: {NS}\nspec:\n  type: generic\n  address: {}\n---\napiVersion: notification.toolkit.fluxcd.io/v1beta3\nkind: Alert\nmetadata:\n  name: promotions\n  namespace: {NS}\nspec:\n  providerRef:\n    name: people\n  eventSeverity: info\n  eventSources:\n    - kind: HelmRelease\n      name: podinfo\n  inclusionList:\n    - \"^Promote pipeline \"\n",
            people.url()
        ))
        .await
        .unwrap();

    // What helm-controller posts after upgrading dev; a new message per attempt, since
    // notification-controller rate-limits identical events (and may not see the Alert
    // in its cache at once).
    let revision = "6.0.1";
    let id = pipeline_core::promotion_id(&pipeline.reference, "staging", revision);
    let promotions: Api<Promotion> = Api::namespaced(management.client(), NS);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    let began = Instant::now();
    while promotions.get_opt(&id).await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no promotion through notification-controller; its log:\n{}\ncontroller log:\n{}",
            flux.log(FluxController::Notification),
            controller.logs()
        );
        attempt += 1;
        let event = json!({
            "involvedObject": {"kind": "HelmRelease", "namespace": "podinfo-dev", "name": "podinfo",
                               "apiVersion": "helm.toolkit.fluxcd.io/v2", "uid": "u1"},
            "severity": "info",
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "message": format!("Helm upgrade succeeded for release podinfo-dev/podinfo.v{attempt} with chart podinfo@{revision}"),
            "reason": "UpgradeSucceeded",
            "metadata": {"helm.toolkit.fluxcd.io/revision": revision},
            "reportingController": "helm-controller",
        });
        let answer = http
            .post(flux.events_url())
            .json(&event)
            .send()
            .await
            .unwrap();
        assert!(
            answer.status().is_success(),
            "notification-controller answered {}",
            answer.status()
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    eprintln!(
        "event → notification-controller → promotion recorded in {:?} ({attempt} post(s))",
        began.elapsed()
    );
    let done =
        support::k8s::wait_promotion(&management.client(), &id, "the staging promotion", |p| {
            support::k8s::phase(p) == "Succeeded"
        })
        .await;
    let message = &done.status.as_ref().unwrap().message;
    assert!(
        message.contains("; posted to --events-addr http://127.0.0.1:")
            && message.contains(
                "as an event of HelmRelease flux-system/podinfo (accepted, which is not delivery"
            ),
        "{message}"
    );
    // notification-controller forwarded the announcement to the people's receiver, with
    // the details as plain metadata keys.
    let deadline = Instant::now() + Duration::from_secs(20);
    let announced = loop {
        let found = people
            .received
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
            .find(|e| e["reason"] == "Promote");
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "nothing forwarded; notification-controller log:\n{}",
            flux.log(FluxController::Notification)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "announcement forwarded by notification-controller in {:?}",
        began.elapsed()
    );
    assert_eq!(
        announced["message"],
        format!("Promote pipeline flux-system/podinfo to staging with version {revision}")
    );
    assert_eq!(announced["involvedObject"]["kind"], "HelmRelease");
    assert_eq!(
        announced["metadata"]["environment"], "staging",
        "{announced}"
    );
    assert_eq!(announced["metadata"]["version"], revision, "{announced}");
    assert_eq!(
        announced["metadata"]["sourceEnvironment"], "dev",
        "{announced}"
    );
    assert_eq!(
        announced["metadata"]["promotion"],
        id.as_str(),
        "{announced}"
    );
    // Only promotion announcements reach it (the dev deployment events do not), and the
    // generated Alert in flux-system, which selects the same object, did not send the
    // announcement back to the webhook as a deployment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let forwarded: Vec<Value> = people
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
        .collect();
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    let logs = controller.logs();
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("event ignored") && l.contains("\"Promote\"")),
        "{logs}"
    );
    let logs = controller.logs();
    assert!(!logs.contains(KEY), "the key was logged");
}

/// `flux-config` without `--public-url` derives it from the cluster as `serve` does, says
/// which it chose, and refuses when nothing gives one (or with `--manifests`).
#[tokio::test]
async fn flux_config_derives_the_public_url_like_serve() {
    use support::k8s::run_cli;

    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    cluster.ensure_namespace(SYSTEM).await.unwrap();
    support::k8s::apply_quickstart(&cluster).await;
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let kubeconfig = cluster.kubeconfig_path();

    // No Service at all: refused, saying what was looked at.
    let (code, _, stderr) = run_cli(kubeconfig, &["flux-config", "--output-dir", dir]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no public URL: none found")
            && stderr.contains("Service pipeline-system/pipeline-controller does not exist"),
        "{stderr}"
    );

    // A LoadBalancer with an address.
    load_balancer(&cluster, 80, "192.0.2.20").await;
    let (code, _, stderr) = run_cli(kubeconfig, &["flux-config", "--output-dir", dir]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "public URL: http://192.0.2.20 (from LoadBalancer Service pipeline-system/pipeline-controller)"
        ),
        "{stderr}"
    );
    let mut providers = Vec::new();
    for entry in walk(out.path()) {
        let text = std::fs::read_to_string(&entry).unwrap();
        if text.contains("kind: Provider") {
            providers.push(text);
        }
    }
    assert!(!providers.is_empty());
    for provider in &providers {
        assert!(
            provider
                .contains("address: http://192.0.2.20/pipelines/promotions/flux-system/podinfo/"),
            "{provider}"
        );
    }

    // --manifests has no cluster to derive from.
    let (code, _, stderr) = run_cli(
        kubeconfig,
        &["flux-config", "--output-dir", dir, "--manifests", dir],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("pass --public-url URL"), "{stderr}");
}

/// Every file under `dir`.
/// The controller's Service (`pipeline-system/pipeline-controller`) as a LoadBalancer
/// on `port` whose status has the address `ip`, as a cloud would write it.
async fn load_balancer(cluster: &TestCluster, port: u16, ip: &str) {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "pipeline-controller", "namespace": SYSTEM},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": port, "targetPort": "http"}]},
    }))
    .unwrap();
    let services: Api<Service> = Api::namespaced(cluster.client(), SYSTEM);
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    services
        .patch_status(
            "pipeline-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})),
        )
        .await
        .unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
