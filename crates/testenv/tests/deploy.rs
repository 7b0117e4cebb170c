//! The deploy artefacts against a real kube-apiserver: every manifest under deploy/ is
//! accepted (server-side dry run, then a real apply in kustomization order), the
//! controller's ServiceAccount can do what the controller does and nothing broader, and
//! Pipelines written for the Go original apply and round-trip.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use pipeline_crds::{Pipeline, Promotion};
use pipeline_testenv::{TestCluster, parse_yaml_documents};

const CONTROLLER_NS: &str = "pipeline-system";
const CONTROLLER_SA: &str = "pipeline-controller";
/// The CLI's default --lease-name; rbac.yaml names it in resourceNames.
const LEASE_NAME: &str = "pipeline-controller-leader";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `resources:` of deploy/kustomization.yaml, in order.
fn kustomization_resources() -> Vec<String> {
    let docs = parse_yaml_documents(&read(&deploy_dir().join("kustomization.yaml"))).unwrap();
    docs[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

/// Every *.yaml under `dir`, relative, sorted.
fn yaml_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        if entry.file_type().unwrap().is_dir() {
            yaml_files(&entry.path(), &format!("{rel}/"), out);
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(rel);
        }
    }
}

#[test]
fn kustomization_lists_every_deploy_manifest() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), "", &mut files);
    let mut expected: Vec<String> = files
        .into_iter()
        .filter(|f| f != "kustomization.yaml" && !f.starts_with("examples/"))
        .collect();
    expected.sort();
    let mut listed = kustomization_resources();
    listed.sort();
    assert_eq!(
        listed, expected,
        "deploy/kustomization.yaml resources vs files in deploy/"
    );
}

#[test]
fn deployment_service_and_rbac_agree() {
    let dir = deploy_dir();
    let deployment = &parse_yaml_documents(&read(&dir.join("deployment.yaml"))).unwrap()[0];
    let service = &parse_yaml_documents(&read(&dir.join("service.yaml"))).unwrap()[0];
    let pdb = &parse_yaml_documents(&read(&dir.join("pdb.yaml"))).unwrap()[0];
    let rbac = parse_yaml_documents(&read(&dir.join("rbac.yaml"))).unwrap();

    let template = &deployment["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&labels[k], v, "deployment selector {k}");
    }
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "service selector {k}");
    }
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *selector);
    assert_eq!(deployment["spec"]["replicas"], 2);

    let pod = &template["spec"];
    assert_eq!(pod["serviceAccountName"], CONTROLLER_SA);
    assert!(rbac.iter().any(|d| d["kind"] == "ServiceAccount"
        && d["metadata"]["name"] == CONTROLLER_SA
        && d["metadata"]["namespace"] == CONTROLLER_NS));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    // Probes go to the internal listener; the Service exposes only the public one, and
    // the second Service only the internal one.
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "internal");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "internal");
    assert_eq!(container["ports"][0]["name"], "http");
    assert_eq!(container["ports"][1]["name"], "internal");
    assert_eq!(service["spec"]["ports"].as_array().unwrap().len(), 1);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let internal = &parse_yaml_documents(&read(&dir.join("service.yaml"))).unwrap()[1];
    assert_eq!(internal["metadata"]["name"], "pipeline-controller-internal");
    assert_eq!(internal["spec"]["ports"].as_array().unwrap().len(), 1);
    assert_eq!(internal["spec"]["ports"][0]["targetPort"], "internal");
    assert_eq!(internal["spec"]["selector"], service["spec"]["selector"]);
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "serve");
    assert!(
        !args.iter().any(|a| a.starts_with("--manifests")),
        "Kubernetes mode"
    );
    assert!(args.contains(&"--listen=0.0.0.0:8080"));
    assert!(args.contains(&"--internal-listen=0.0.0.0:8081"));
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"]["memory"].is_string());
}

#[tokio::test]
async fn every_deploy_manifest_passes_server_side_dry_run_and_applies() {
    let cluster = TestCluster::start().await.unwrap();
    // Flux is a prerequisite: its namespace exists where the controller is installed.
    cluster.ensure_namespace("flux-system").await.unwrap();
    let dir = deploy_dir();
    let resources = kustomization_resources();

    // Dry run first, on a cluster that has only the namespaces: nothing is stored. The
    // namespaced objects need their namespace, so namespace.yaml is applied for real
    // after its own dry run.
    for file in &resources {
        let yaml = read(&dir.join(file));
        let objects = cluster
            .dry_run_yaml(&yaml)
            .await
            .unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
        assert!(!objects.is_empty(), "deploy/{file} holds no object");
        if file == "namespace.yaml" {
            cluster.apply_yaml(&yaml).await.unwrap();
        }
    }
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(cluster.client());
    assert!(
        crds.get_opt("pipelines.pipelines.weave.works")
            .await
            .unwrap()
            .is_none(),
        "a dry run stored a CRD"
    );

    // Then for real, in kustomization order, as `kubectl apply --server-side -k` would.
    for file in &resources {
        cluster
            .apply_yaml(&read(&dir.join(file)))
            .await
            .unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
    }
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(cluster.client(), CONTROLLER_NS);
    let deployment = deployments.get("pipeline-controller").await.unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(2));
}

/// Whether the client may `verb` `group/resource[/subresource]` (`name`) in `namespace`
/// (`""`: all namespaces, or a cluster-scoped resource).
async fn can(client: &Client, verb: &str, resource: &str, namespace: &str, name: &str) -> bool {
    let (group, resource) = match resource.split_once(':') {
        Some((group, resource)) => (group, resource),
        None => ("", resource),
    };
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                subresource,
                verb: Some(verb.to_owned()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                name: (!name.is_empty()).then(|| name.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.unwrap().allowed
}

const P: &str = "pipelines.weave.works:";

#[tokio::test]
async fn controller_service_account_may_do_its_work_and_nothing_broader() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    for ns in ["flux-system", "apps", "kube-system"] {
        cluster.ensure_namespace(ns).await.unwrap();
    }
    let dir = deploy_dir();
    cluster
        .apply_yaml(&read(&dir.join("namespace.yaml")))
        .await
        .unwrap();
    cluster
        .apply_yaml(&read(&dir.join("rbac.yaml")))
        .await
        .unwrap();
    let sa = cluster
        .service_account_client(CONTROLLER_NS, CONTROLLER_SA)
        .await
        .unwrap();

    // (verb, [group:]resource[/subresource], namespace, name)
    let allowed: &[(&str, String, &str, &str)] = &[
        ("get", format!("{P}pipelines"), "flux-system", "p"),
        ("list", format!("{P}pipelines"), "", ""),
        ("watch", format!("{P}pipelines"), "", ""),
        ("get", format!("{P}pipelines/status"), "apps", "p"),
        ("update", format!("{P}pipelines/status"), "apps", "p"),
        ("patch", format!("{P}pipelines/status"), "flux-system", "p"),
        ("get", format!("{P}promotions"), "apps", "x"),
        ("list", format!("{P}promotions"), "", ""),
        ("watch", format!("{P}promotions"), "", ""),
        ("create", format!("{P}promotions"), "apps", ""),
        ("delete", format!("{P}promotions"), "apps", "x"),
        ("update", format!("{P}promotions/status"), "apps", "x"),
        ("patch", format!("{P}promotions/status"), "flux-system", "x"),
        ("create", "events".to_owned(), "apps", ""),
        ("patch", "events".to_owned(), "flux-system", "e"),
        ("create", "events.k8s.io:events".to_owned(), "apps", ""),
        (
            "list",
            "helm.toolkit.fluxcd.io:helmreleases".to_owned(),
            "",
            "",
        ),
        (
            "watch",
            "helm.toolkit.fluxcd.io:helmreleases".to_owned(),
            "",
            "",
        ),
        (
            "list",
            "kustomize.toolkit.fluxcd.io:kustomizations".to_owned(),
            "",
            "",
        ),
        (
            "watch",
            "kustomize.toolkit.fluxcd.io:kustomizations".to_owned(),
            "",
            "",
        ),
        (
            "get",
            "gitops.weave.works:gitopsclusters".to_owned(),
            "fleet",
            "leaf",
        ),
        (
            "list",
            "gitops.weave.works:gitopsclusters".to_owned(),
            "",
            "",
        ),
        (
            "watch",
            "gitops.weave.works:gitopsclusters".to_owned(),
            "",
            "",
        ),
        ("get", "secrets".to_owned(), "flux-system", "hmac"),
        ("list", "secrets".to_owned(), "flux-system", ""),
        ("watch", "secrets".to_owned(), "flux-system", ""),
        (
            "create",
            "coordination.k8s.io:leases".to_owned(),
            CONTROLLER_NS,
            "",
        ),
        (
            "get",
            "coordination.k8s.io:leases".to_owned(),
            CONTROLLER_NS,
            LEASE_NAME,
        ),
        (
            "update",
            "coordination.k8s.io:leases".to_owned(),
            CONTROLLER_NS,
            LEASE_NAME,
        ),
    ];
    let denied: &[(&str, String, &str, &str)] = &[
        // Secrets: only read, only where Pipelines live (a RoleBinding per namespace).
        ("get", "secrets".to_owned(), "apps", "hmac"),
        ("get", "secrets".to_owned(), "kube-system", "x"),
        ("list", "secrets".to_owned(), "", ""),
        ("watch", "secrets".to_owned(), "", ""),
        ("create", "secrets".to_owned(), "flux-system", ""),
        ("update", "secrets".to_owned(), "flux-system", "hmac"),
        ("delete", "secrets".to_owned(), "flux-system", "hmac"),
        // Deployments and clusters are only watched, never changed.
        (
            "update",
            "helm.toolkit.fluxcd.io:helmreleases".to_owned(),
            "apps",
            "x",
        ),
        (
            "patch",
            "kustomize.toolkit.fluxcd.io:kustomizations".to_owned(),
            "apps",
            "x",
        ),
        (
            "update",
            "gitops.weave.works:gitopsclusters".to_owned(),
            "fleet",
            "leaf",
        ),
        // Pipelines are the users'.
        ("create", format!("{P}pipelines"), "apps", ""),
        ("update", format!("{P}pipelines"), "apps", "p"),
        ("patch", format!("{P}pipelines"), "apps", "p"),
        ("delete", format!("{P}pipelines"), "apps", "p"),
        ("deletecollection", format!("{P}pipelines"), "apps", ""),
        // Promotions: created and their status written, never rewritten or deleted;
        // approvals (spec.approval) are the approvers'.
        ("update", format!("{P}promotions"), "apps", "x"),
        ("patch", format!("{P}promotions"), "apps", "x"),
        ("deletecollection", format!("{P}promotions"), "apps", ""),
        // Leases: its own only.
        (
            "get",
            "coordination.k8s.io:leases".to_owned(),
            "kube-system",
            "kube-controller-manager",
        ),
        (
            "update",
            "coordination.k8s.io:leases".to_owned(),
            "kube-system",
            "kube-scheduler",
        ),
        (
            "create",
            "coordination.k8s.io:leases".to_owned(),
            "apps",
            "",
        ),
        (
            "update",
            "coordination.k8s.io:leases".to_owned(),
            CONTROLLER_NS,
            "someone-else",
        ),
        (
            "delete",
            "coordination.k8s.io:leases".to_owned(),
            CONTROLLER_NS,
            LEASE_NAME,
        ),
        (
            "list",
            "coordination.k8s.io:leases".to_owned(),
            CONTROLLER_NS,
            "",
        ),
        // Events: written, not read or removed.
        ("list", "events".to_owned(), "apps", ""),
        ("delete", "events".to_owned(), "apps", "e"),
        // Nothing else.
        ("list", "pods".to_owned(), "flux-system", ""),
        ("get", "configmaps".to_owned(), "flux-system", "x"),
        ("list", "namespaces".to_owned(), "", ""),
        (
            "create",
            "serviceaccounts/token".to_owned(),
            CONTROLLER_NS,
            CONTROLLER_SA,
        ),
        ("impersonate", "users".to_owned(), "", "admin"),
        (
            "create",
            "rbac.authorization.k8s.io:clusterroles".to_owned(),
            "",
            "",
        ),
        (
            "create",
            "rbac.authorization.k8s.io:rolebindings".to_owned(),
            "apps",
            "",
        ),
        (
            "bind",
            "rbac.authorization.k8s.io:clusterroles".to_owned(),
            "",
            "cluster-admin",
        ),
        (
            "create",
            "apiextensions.k8s.io:customresourcedefinitions".to_owned(),
            "",
            "",
        ),
        (
            "update",
            "apps:deployments".to_owned(),
            CONTROLLER_NS,
            "pipeline-controller",
        ),
        (
            "get",
            "helm.toolkit.fluxcd.io:helmreleases".to_owned(),
            "flux-system",
            "podinfo",
        ),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, ns, name) in allowed {
        if !can(&sa, verb, resource, ns, name).await {
            wrong.push(format!(
                "DENIED but needed: {verb} {resource} ns={ns:?} name={name:?}"
            ));
        }
    }
    for (verb, resource, ns, name) in denied {
        if can(&sa, verb, resource, ns, name).await {
            wrong.push(format!(
                "ALLOWED but must not be: {verb} {resource} ns={ns:?} name={name:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // And for real, as the controller's calls are made.
    let pipeline_yaml = read(&dir.join("examples/notification-manual.yaml"));
    cluster.apply_yaml(&pipeline_yaml).await.unwrap();
    let all_pipelines: Api<Pipeline> = Api::all(sa.clone());
    assert_eq!(
        all_pipelines
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let pipelines: Api<Pipeline> = Api::namespaced(sa.clone(), "flux-system");
    let status = serde_json::json!({"status": {"environments": {"prod": {"waitingApproval": {"revision": "6.0.1"}}}}});
    pipelines
        .patch_status(
            "podinfo-02",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    let err = pipelines
        .patch(
            "podinfo-02",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"promotion": null}})),
        )
        .await
        .unwrap_err();
    assert!(is_forbidden(&err), "{err:?}");

    let promotions: Api<Promotion> = Api::namespaced(sa.clone(), "flux-system");
    let promotion = promotion_object("flux-system", "p-1");
    promotions
        .create(&PostParams::default(), &promotion)
        .await
        .unwrap();
    let mut current = promotions.get("p-1").await.unwrap();
    current.status = Some(
        serde_json::from_value(
            serde_json::json!({"phase": "Pending", "attempts": 1, "message": "queued"}),
        )
        .unwrap(),
    );
    promotions
        .replace_status("p-1", &PostParams::default(), &current)
        .await
        .unwrap();
    // The retention policy deletes finished Promotions.
    promotions.delete("p-1", &Default::default()).await.unwrap();

    let events: Api<Event> = Api::namespaced(sa.clone(), "flux-system");
    let event: Event = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "podinfo-02.1", "namespace": "flux-system"},
        "involvedObject": {"apiVersion": "pipelines.weave.works/v1alpha1", "kind": "Pipeline", "name": "podinfo-02", "namespace": "flux-system"},
        "reason": "Promote", "message": "test", "type": "Normal"
    }))
    .unwrap();
    events.create(&PostParams::default(), &event).await.unwrap();

    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "podinfo-02-hmac"}, "stringData": {"hmac-key": "k"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(cluster.client(), "flux-system")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    Api::<Secret>::namespaced(cluster.client(), "apps")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let flux_secrets: Api<Secret> = Api::namespaced(sa.clone(), "flux-system");
    flux_secrets.get("podinfo-02-hmac").await.unwrap();
    assert_eq!(
        flux_secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let err = Api::<Secret>::namespaced(sa.clone(), "apps")
        .get("podinfo-02-hmac")
        .await
        .unwrap_err();
    assert!(is_forbidden(&err), "{err:?}");

    let leases: Api<Lease> = Api::namespaced(sa.clone(), CONTROLLER_NS);
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": LEASE_NAME}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut held = leases.get(LEASE_NAME).await.unwrap();
    held.spec.as_mut().unwrap().holder_identity = Some("b".to_owned());
    leases
        .replace(LEASE_NAME, &PostParams::default(), &held)
        .await
        .unwrap();
    let err = Api::<Lease>::namespaced(sa, "kube-system")
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(is_forbidden(&err), "{err:?}");
}

#[tokio::test]
async fn approver_role_may_approve_where_bound_only() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    for ns in ["flux-system", "apps"] {
        cluster.ensure_namespace(ns).await.unwrap();
    }
    cluster
        .apply_yaml(&read(&deploy_dir().join("user-roles.yaml")))
        .await
        .unwrap();
    cluster
        .apply_yaml(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: release-managers-approve, namespace: flux-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: pipeline-approver}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: release-managers}]
"#,
        )
        .await
        .unwrap();
    for ns in ["flux-system", "apps"] {
        Api::<Promotion>::namespaced(cluster.client(), ns)
            .create(&PostParams::default(), &promotion_object(ns, "p-1"))
            .await
            .unwrap();
    }
    let rita = cluster
        .user_client("rita", &["release-managers"])
        .await
        .unwrap();
    assert!(
        can(
            &rita,
            "patch",
            &format!("{P}promotions"),
            "flux-system",
            "p-1"
        )
        .await
    );
    assert!(!can(&rita, "patch", &format!("{P}promotions"), "apps", "p-1").await);
    assert!(
        !can(
            &rita,
            "patch",
            &format!("{P}promotions/status"),
            "flux-system",
            "p-1"
        )
        .await
    );
    assert!(
        !can(
            &rita,
            "create",
            &format!("{P}promotions"),
            "flux-system",
            ""
        )
        .await
    );
    assert!(!can(&rita, "get", "secrets", "flux-system", "x").await);
    let approve = serde_json::json!({"spec": {"approval": {"approved": true, "by": "rita", "at": "2024-01-01T00:00:00Z"}}});
    Api::<Promotion>::namespaced(rita.clone(), "flux-system")
        .patch("p-1", &PatchParams::default(), &Patch::Merge(&approve))
        .await
        .unwrap();
    let err = Api::<Promotion>::namespaced(rita, "apps")
        .patch("p-1", &PatchParams::default(), &Patch::Merge(&approve))
        .await
        .unwrap_err();
    assert!(is_forbidden(&err), "{err:?}");
}

#[tokio::test]
async fn go_original_example_pipelines_apply_and_round_trip() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    for ns in ["flux-system", "apps"] {
        cluster.ensure_namespace(ns).await.unwrap();
    }
    let mut files =
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart/pipeline.yaml")];
    let mut names = Vec::new();
    yaml_files(&deploy_dir().join("examples"), "", &mut names);
    assert!(names.len() >= 3, "{names:?}");
    files.extend(names.iter().map(|n| deploy_dir().join("examples").join(n)));

    for file in files {
        let yaml = read(&file);
        for doc in parse_yaml_documents(&yaml).unwrap() {
            let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
            let namespace = doc["metadata"]["namespace"].as_str().unwrap().to_owned();
            let what = format!("{} {namespace}/{name}", file.display());
            // Valid for the controller itself, not just for the schema.
            pipeline_core::pipeline::parse_pipeline_spec(doc["spec"].clone())
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));

            cluster
                .apply_yaml(&serde_json::to_string(&doc).unwrap())
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            // The API server kept every field (structural schemas prune unknown ones).
            let raw = cluster
                .client()
                .request::<serde_json::Value>(
                    http::Request::get(format!(
                        "/apis/pipelines.weave.works/v1alpha1/namespaces/{namespace}/pipelines/{name}"
                    ))
                    .body(Vec::new())
                    .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(
                raw["spec"], doc["spec"],
                "{what}: spec changed on the server"
            );
            // And the typed object decodes and re-encodes to the same spec.
            let typed = Api::<Pipeline>::namespaced(cluster.client(), &namespace)
                .get(&name)
                .await
                .unwrap();
            assert_eq!(
                serde_json::to_value(&typed.spec).unwrap(),
                doc["spec"],
                "{what}: typed round trip"
            );
        }
    }

    // The Go original's status shape survives the status subresource.
    let api: Api<Pipeline> = Api::namespaced(cluster.client(), "flux-system");
    let status = serde_json::json!({"status": {"environments": {
        "prod": {"waitingApproval": {"revision": "6.3.5"}},
        "dev": {"waitingApproval": {"revision": ""}, "targets": [{"clusterAppRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2beta1", "kind": "HelmRelease", "name": "podinfo", "clusterRef": {"kind": "GitopsCluster", "name": "dev", "namespace": "flux-system"}}, "ready": true, "revision": "6.3.5"}]}
    }}});
    api.patch_status(
        "podinfo-02",
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await
    .unwrap();
    let back = api.get("podinfo-02").await.unwrap();
    let back = serde_json::to_value(back.status.unwrap()).unwrap();
    assert_eq!(
        back["environments"]["prod"]["waitingApproval"]["revision"],
        "6.3.5"
    );
    assert_eq!(back["environments"]["dev"]["targets"][0]["ready"], true);
    assert_eq!(
        back["environments"]["dev"]["targets"][0]["clusterAppRef"]["clusterRef"]["name"],
        "dev"
    );

    // A Promotion round-trips too.
    let promotions: Api<Promotion> = Api::namespaced(cluster.client(), "flux-system");
    let promotion = promotion_object("flux-system", "p-rt");
    let created = promotions
        .create(&PostParams::default(), &promotion)
        .await
        .unwrap();
    assert_eq!(created.spec, promotion.spec);
}

fn promotion_object(namespace: &str, name: &str) -> Promotion {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "pipelines.weave.works/v1alpha1",
        "kind": "Promotion",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "pipeline": {"name": "podinfo-02"},
            "sourceEnvironment": "staging",
            "targetEnvironment": "prod",
            "revision": "6.0.1",
            "manual": true,
            "recordedAt": "2024-05-01T10:00:00.123456Z"
        }
    }))
    .unwrap()
}

fn is_forbidden(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 403)
}
