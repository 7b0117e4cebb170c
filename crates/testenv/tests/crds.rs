//! The CRDs against a real kube-apiserver: the committed YAML applies without a single
//! warning, the schema explains every field (`kubectl explain`), refuses what the Go
//! original's schema refused, and names and columns are what `kubectl` shows.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::api::{Api, Patch, PatchParams};
use pipeline_crds::Pipeline;
use pipeline_testenv::{FIELD_MANAGER, TestCluster, parse_yaml_documents};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Server-side applies one object with a raw request and returns the API server's
/// `Warning` headers (what `kubectl apply` prints as `Warning: ...`).
async fn apply_collecting_warnings(
    cluster: &TestCluster,
    path: &str,
    object: &serde_json::Value,
) -> Vec<String> {
    let request = http::Request::patch(format!("{path}?fieldManager={FIELD_MANAGER}&force=true"))
        .header("Content-Type", "application/apply-patch+yaml")
        .body(kube::client::Body::from(
            serde_json::to_vec(object).unwrap(),
        ))
        .unwrap();
    let response = cluster.client().send(request).await.unwrap();
    let status = response.status();
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let body = response.into_body().collect_bytes().await.unwrap();
    assert!(
        status.is_success(),
        "{path}: {status}: {}",
        String::from_utf8_lossy(&body)
    );
    warnings
}

#[tokio::test]
async fn committed_crds_apply_without_warnings() {
    let cluster = TestCluster::start().await.unwrap();
    let yaml = read(&repo_root().join("deploy/crds/crds.yaml"));
    let docs = parse_yaml_documents(&yaml).unwrap();
    assert_eq!(docs.len(), 2);
    for doc in docs {
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        // Twice: creation and an update can warn differently.
        for round in ["create", "update"] {
            let warnings = apply_collecting_warnings(
                &cluster,
                &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
                &doc,
            )
            .await;
            assert!(
                warnings.is_empty(),
                "{name} ({round}): the API server warned: {warnings:#?}"
            );
        }
    }
}

/// The schema of `path` (dot-separated property names; `[]` steps into array items, as
/// `kubectl explain pipeline.spec.environments.targets` does implicitly).
fn schema_at<'a>(root: &'a JSONSchemaProps, path: &str) -> &'a JSONSchemaProps {
    let mut at = root;
    for step in path.split('.') {
        if let Some(JSONSchemaPropsOrArray::Schema(items)) = at.items.as_ref() {
            at = items;
        }
        at = at
            .properties
            .as_ref()
            .and_then(|p| p.get(step))
            .unwrap_or_else(|| panic!("{path}: no property {step:?}"));
    }
    at
}

async fn served_schema(
    cluster: &TestCluster,
    name: &str,
) -> (CustomResourceDefinition, JSONSchemaProps) {
    let crd = Api::<CustomResourceDefinition>::all(cluster.client())
        .get(name)
        .await
        .unwrap();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.clone())
        .unwrap();
    (crd, schema)
}

/// Every property below `at` (named `path`) and `at` itself have a description, except
/// `metadata`, `apiVersion` and `kind` of the root.
fn missing_descriptions(at: &JSONSchemaProps, path: &str, out: &mut Vec<String>) {
    if at
        .description
        .as_deref()
        .is_none_or(|d| d.trim().is_empty())
    {
        out.push(path.to_owned());
    }
    if let Some(properties) = &at.properties {
        for (name, property) in properties {
            missing_descriptions(property, &format!("{path}.{name}"), out);
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &at.items {
        for (name, property) in items.properties.iter().flatten() {
            missing_descriptions(property, &format!("{path}.{name}"), out);
        }
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &at.additional_properties {
        for (name, property) in values.properties.iter().flatten() {
            missing_descriptions(property, &format!("{path}.<key>.{name}"), out);
        }
    }
}

#[tokio::test]
async fn served_crds_explain_every_field_and_carry_names_and_columns() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();

    for (crd_name, kind) in [
        ("pipelines.pipelines.weave.works", "pipeline"),
        ("promotions.pipelines.weave.works", "promotion"),
    ] {
        let (_, schema) = served_schema(&cluster, crd_name).await;
        let mut missing = Vec::new();
        assert!(schema.description.is_some(), "{kind}: no description");
        for part in ["spec", "status"] {
            missing_descriptions(
                schema_at(&schema, part),
                &format!("{kind}.{part}"),
                &mut missing,
            );
        }
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:#?}"
        );
    }

    // What `kubectl explain pipeline.spec.environments.targets` prints.
    let (crd, schema) = served_schema(&cluster, "pipelines.pipelines.weave.works").await;
    for (path, says) in [
        ("spec.environments", "promotion order"),
        ("spec.environments.targets", "at least one"),
        (
            "spec.environments.targets.namespace",
            "Namespace of the app object",
        ),
        ("spec.environments.targets.clusterRef.kind", "GitopsCluster"),
        ("spec.appRef.kind", "HelmRelease"),
        ("spec.promotion.strategy.secretRef", "hmac-key"),
        ("spec.promotion.strategy.pull-request.secretRef", "token"),
        ("spec.promotion.strategy.pull-request.type", "forgejo"),
        ("status.conditions", "Stalled"),
        ("status.environments", "waitingApproval"),
    ] {
        let description = schema_at(&schema, path)
            .description
            .clone()
            .unwrap_or_default();
        assert!(
            description.contains(says),
            "{path}: {description:?} does not mention {says:?}"
        );
    }
    // Required fields and enums, as strict as the Go original's schema (a superset of
    // its enums).
    let required = |path: &str| {
        let at = schema_at(&schema, path);
        let at = match &at.items {
            Some(JSONSchemaPropsOrArray::Schema(items)) => items,
            _ => at,
        };
        at.required.clone().unwrap_or_default()
    };
    assert_eq!(required("spec"), ["appRef", "environments"]);
    assert_eq!(required("spec.appRef"), ["apiVersion", "kind", "name"]);
    assert_eq!(required("spec.environments"), ["name", "targets"]);
    assert_eq!(required("spec.environments.targets"), ["namespace"]);
    assert_eq!(
        required("spec.environments.targets.clusterRef"),
        ["kind", "name"]
    );
    assert_eq!(required("spec.promotion"), ["strategy"]);
    assert_eq!(
        required("spec.promotion.strategy.pull-request"),
        ["baseBranch", "secretRef", "type", "url"]
    );
    assert_eq!(required("spec.promotion.strategy.secretRef"), ["name"]);
    let enum_of = |path: &str| -> Vec<String> {
        schema_at(&schema, path)
            .enum_
            .iter()
            .flatten()
            .map(|v| v.0.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        enum_of("spec.appRef.kind"),
        pipeline_core::pipeline::APP_KINDS
    );
    assert_eq!(
        enum_of("spec.environments.targets.clusterRef.kind"),
        pipeline_core::pipeline::CLUSTER_KINDS
    );
    assert_eq!(
        enum_of("spec.environments.promotion.strategy.pull-request.type"),
        pipeline_core::pipeline::PROVIDER_TYPES
    );
    // No defaults that would fill in a required field before the check.
    assert!(
        !serde_json::to_string(schema_at(&schema, "spec"))
            .unwrap()
            .contains("\"default\"")
    );

    // Printer columns.
    let columns: Vec<(String, String)> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect();
    assert_eq!(
        columns,
        [
            ("App", ".spec.appRef.name"),
            ("Environments", ".status.environmentNames"),
            ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
            ("Status", ".status.conditions[?(@.type==\"Ready\")].message"),
            ("Age", ".metadata.creationTimestamp"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );

    // Short names and the category, as discovery serves them to kubectl.
    let resources = cluster
        .client()
        .list_api_group_resources("pipelines.weave.works/v1alpha1")
        .await
        .unwrap();
    for (plural, short) in [("pipelines", "pl"), ("promotions", "promo")] {
        let resource = resources
            .resources
            .iter()
            .find(|r| r.name == plural)
            .unwrap();
        assert_eq!(
            resource.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert_eq!(
            resource.categories.as_deref(),
            Some(&[pipeline_crds::CATEGORY.to_owned()][..])
        );
    }

    // The columns as `kubectl get pipelines` prints them (a server-side Table).
    cluster.ensure_namespace("flux-system").await.unwrap();
    cluster
        .apply_yaml(&read(
            &repo_root().join("examples/quickstart/pipeline.yaml"),
        ))
        .await
        .unwrap();
    // The status as the reconciler writes it (crates/kube/tests/pipeline_status.rs).
    Api::<Pipeline>::namespaced(cluster.client(), "flux-system")
        .patch_status(
            "podinfo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "environmentNames": "dev,staging,prod",
                "conditions": [{"type": "Ready", "status": "False", "reason": "SecretNotFound",
                    "message": "Secret flux-system/podinfo-promotion-hmac not found (spec.promotion.strategy.secretRef)",
                    "lastTransitionTime": "2024-01-01T00:00:00Z"}],
            }})),
        )
        .await
        .unwrap();
    let table: serde_json::Value = cluster
        .client()
        .request(
            http::Request::get(
                "/apis/pipelines.weave.works/v1alpha1/namespaces/flux-system/pipelines",
            )
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .unwrap(),
        )
        .await
        .unwrap();
    let names: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let cells = table["rows"][0]["cells"].as_array().unwrap();
    let cell = |name: &str| &cells[names.iter().position(|n| *n == name).unwrap()];
    assert_eq!(cell("Environments"), "dev,staging,prod", "{table:#}");
    assert_eq!(cell("Ready"), "False", "{table:#}");
    assert!(
        cell("Status")
            .as_str()
            .unwrap()
            .starts_with("Secret flux-system/podinfo-promotion-hmac not found"),
        "{table:#}"
    );

    // With kubectl at hand, `kubectl explain` itself: it reads the OpenAPI document the
    // API server publishes for the CRD a moment after it is established.
    let kubectl = |args: &[&str]| {
        std::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .output()
    };
    if kubectl(&["version", "--client"]).is_ok() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let text = loop {
            let output = kubectl(&["explain", "pipeline.spec.environments.targets"]).unwrap();
            if output.status.success() {
                break String::from_utf8_lossy(&output.stdout).into_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kubectl explain: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        };
        assert!(text.contains("at least one"), "{text}");
        assert!(text.contains("clusterRef"), "{text}");
        assert!(text.contains("GitopsCluster"), "{text}");
        // Short names and the category resolve (the category lists both kinds).
        let output = kubectl(&["get", "pipeline-controller", "-A"]).unwrap();
        assert!(
            String::from_utf8_lossy(&output.stdout)
                .contains("pipeline.pipelines.weave.works/podinfo"),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let output = kubectl(&["get", "pl,promo", "-A"]).unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("dev,staging,prod"),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

fn valid_pipeline() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "pipelines.weave.works/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "p", "namespace": "flux-system"},
        "spec": {
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
            "environments": [
                {"name": "dev", "targets": [{"namespace": "podinfo-dev", "clusterRef": {"kind": "GitopsCluster", "name": "dev"}}]},
                {"name": "prod", "targets": [{"namespace": "podinfo-prod", "clusterRef": {"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Cluster", "name": "prod"}}],
                 "promotion": {"manual": true, "strategy": {"pull-request": {
                     "type": "forgejo", "url": "https://git.example/o/r", "baseBranch": "main", "secretRef": {"name": "pr"}}}}}
            ],
            "promotion": {"strategy": {"secretRef": {"name": "hmac"}, "notification": {}}}
        }
    })
}

#[tokio::test]
async fn schema_refuses_what_the_controller_refuses() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    cluster.ensure_namespace("flux-system").await.unwrap();

    // Valid, with a Cluster API Cluster and a forge the Go original did not know.
    let valid = valid_pipeline();
    pipeline_core::pipeline::parse_pipeline_spec(valid["spec"].clone()).unwrap();
    cluster
        .apply_yaml(&serde_json::to_string(&valid).unwrap())
        .await
        .unwrap();

    type Change = fn(&mut serde_json::Value);
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "wrong appRef kind",
            |s| s["appRef"]["kind"] = "Deployment".into(),
            "spec.appRef.kind",
        ),
        (
            "no appRef name",
            |s| drop(s["appRef"].as_object_mut().unwrap().remove("name")),
            "spec.appRef.name",
        ),
        (
            "no environments",
            |s| drop(s.as_object_mut().unwrap().remove("environments")),
            "spec.environments",
        ),
        (
            "empty environments",
            |s| s["environments"] = serde_json::json!([]),
            "spec.environments",
        ),
        (
            "no targets",
            |s| {
                drop(
                    s["environments"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("targets"),
                )
            },
            "spec.environments[0].targets",
        ),
        (
            "empty targets",
            |s| s["environments"][0]["targets"] = serde_json::json!([]),
            "spec.environments[0].targets",
        ),
        (
            "no target namespace",
            |s| {
                s["environments"][0]["targets"][0] =
                    serde_json::json!({"clusterRef": {"kind": "GitopsCluster", "name": "dev"}})
            },
            "spec.environments[0].targets[0].namespace",
        ),
        (
            "no environment name",
            |s| drop(s["environments"][1].as_object_mut().unwrap().remove("name")),
            "spec.environments[1].name",
        ),
        (
            "wrong clusterRef kind",
            |s| s["environments"][0]["targets"][0]["clusterRef"]["kind"] = "KindCluster".into(),
            "spec.environments[0].targets[0].clusterRef.kind",
        ),
        (
            "no clusterRef kind",
            |s| {
                drop(
                    s["environments"][0]["targets"][0]["clusterRef"]
                        .as_object_mut()
                        .unwrap()
                        .remove("kind"),
                )
            },
            "spec.environments[0].targets[0].clusterRef.kind",
        ),
        (
            "wrong pull-request type",
            |s| {
                s["environments"][1]["promotion"]["strategy"]["pull-request"]["type"] = "svn".into()
            },
            "spec.environments[1].promotion.strategy.pull-request.type",
        ),
        (
            "no pull-request baseBranch",
            |s| {
                drop(
                    s["environments"][1]["promotion"]["strategy"]["pull-request"]
                        .as_object_mut()
                        .unwrap()
                        .remove("baseBranch"),
                )
            },
            "spec.environments[1].promotion.strategy.pull-request.baseBranch",
        ),
        (
            "no pull-request secretRef",
            |s| {
                drop(
                    s["environments"][1]["promotion"]["strategy"]["pull-request"]
                        .as_object_mut()
                        .unwrap()
                        .remove("secretRef"),
                )
            },
            "spec.environments[1].promotion.strategy.pull-request.secretRef",
        ),
        (
            "no strategy",
            |s| drop(s["promotion"].as_object_mut().unwrap().remove("strategy")),
            "spec.promotion.strategy",
        ),
        (
            "two strategies",
            |s| s["promotion"]["strategy"]["pull-request"] = serde_json::json!({"type": "github", "url": "https://github.com/o/r", "baseBranch": "main", "secretRef": {"name": "pr"}}),
            "spec.promotion.strategy",
        ),
        (
            "no strategy but a secretRef",
            |s| {
                drop(
                    s["promotion"]["strategy"]
                        .as_object_mut()
                        .unwrap()
                        .remove("notification"),
                )
            },
            "spec.promotion.strategy",
        ),
        (
            "secretRef without name",
            |s| s["promotion"]["strategy"]["secretRef"] = serde_json::json!({}),
            "spec.promotion.strategy.secretRef.name",
        ),
    ];
    for (what, change, field) in cases {
        let mut pipeline = valid_pipeline();
        change(&mut pipeline["spec"]);
        // The controller's own validation (embedded mode too) refuses it...
        let errors =
            pipeline_core::pipeline::parse_pipeline_spec(pipeline["spec"].clone()).expect_err(what);
        assert!(
            errors.iter().any(|e| e.field.starts_with(field)),
            "{what}: the controller names {errors:?}, not {field}"
        );
        // ... and so does the API server, naming the field.
        pipeline["metadata"]["name"] = "refused".into();
        let err = cluster
            .apply_yaml(&serde_json::to_string(&pipeline).unwrap())
            .await
            .expect_err(what)
            .to_string();
        assert!(
            err.contains("Invalid") || err.contains("invalid") || err.contains("Required"),
            "{what}: {err}"
        );
        assert!(err.contains(field), "{what}: {err} does not name {field}");
    }
}
