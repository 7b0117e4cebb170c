//! The Helm chart, rendered by the real `helm` (built from tools/helm): it lints, its
//! default rendering is deploy/ (up to the chart's documented additions), every value in
//! values.yaml does something and is declared in values.schema.json, the schema rejects
//! bad values, several value sets render what they say, two releases in one cluster do
//! not collide, and the renderings pass a server-side dry run against a real
//! kube-apiserver (and apply).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use pipeline_testenv::{TestCluster, helm_binary, parse_yaml_documents};
use serde_json::{Value, json};

/// The test API server's version (tools/envtest pins Kubernetes v1.37.2).
const KUBE: &str = "v1.37.2";
const RELEASE: &str = "pipeline-controller";
const NS: &str = "pipeline-system";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart_dir() -> PathBuf {
    root().join("charts/pipeline-controller")
}

/// Runs helm with its config, cache and data kept out of the user's home.
fn helm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(helm_binary().unwrap())
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .unwrap()
}

/// `helm template <release> <chart> [--kube-version <kube>] <args>`: the documents, or
/// helm's error.
fn try_render(release: &str, kube: Option<&str>, args: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart_dir();
    let mut all = vec!["template", release, chart.to_str().unwrap()];
    if let Some(kube) = kube {
        all.extend(["--kube-version", kube]);
    }
    all.extend(args);
    let out = helm(&all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(parse_yaml_documents(&String::from_utf8(out.stdout).unwrap()).unwrap())
}

/// The release "pipeline-controller" in namespace pipeline-system, for Kubernetes `KUBE`.
fn render(args: &[&str]) -> Vec<Value> {
    render_release(RELEASE, KUBE, args)
}

fn render_release(release: &str, kube: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--namespace", NS];
    all.extend(args);
    try_render(release, Some(kube), &all)
        .unwrap_or_else(|e| panic!("helm template {release} {args:?}: {e}"))
}

fn key(doc: &Value) -> String {
    format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap_or_default(),
        doc["metadata"]["namespace"].as_str().unwrap_or_default(),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn keys(docs: &[Value]) -> Vec<String> {
    docs.iter().map(key).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "one {kind} in {:?}", keys(docs));
    found[0]
}

/// The Service of the public listener (the one the Ingress routes to).
fn public_service(docs: &[Value]) -> &Value {
    let found: Vec<&Value> = of_kind(docs, "Service")
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
        .collect();
    assert_eq!(found.len(), 1, "one public Service in {:?}", keys(docs));
    found[0]
}

fn container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(docs: &[Value]) -> Vec<String> {
    container(docs)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn env_of(docs: &[Value], name: &str) -> Option<String> {
    container(docs)["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["value"].as_str().unwrap_or_default().to_owned())
}

/// Whether every label of `selector` is in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn to_yaml_stream(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
        .collect()
}

/// The value sets the chart is checked with (lint, render, dry run).
fn value_sets() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("defaults", vec![]),
        (
            "ingress with TLS",
            vec![
                "--set-json",
                r#"ingress={"enabled":true,"className":"nginx","hosts":["promote.example.com","promote.example.org"],"annotations":{"cert-manager.io/cluster-issuer":"letsencrypt"},"tls":[{"secretName":"promote-tls"}]}"#,
            ],
        ),
        (
            "ServiceMonitor and NetworkPolicy",
            vec![
                "--set",
                "serviceMonitor.enabled=true,serviceMonitor.labels.release=prometheus,serviceMonitor.interval=30s,serviceMonitor.scrapeTimeout=10s,networkPolicy.enabled=true",
                "--set-json",
                r#"networkPolicy.from=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"flux-system"}}},{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
                "--set-json",
                r#"networkPolicy.egress=[{"ports":[{"port":53,"protocol":"UDP"},{"port":443,"protocol":"TCP"}]}]"#,
            ],
        ),
        ("one replica", vec!["--set", "replicas=1"]),
        ("three replicas", vec!["--set", "replicas=3"]),
        (
            "pod settings",
            vec![
                "--set",
                "logLevel=info\\,pipeline_kube=debug,logFormat=text,priorityClassName=system-cluster-critical,image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "--set-json",
                r#"podLabels={"team":"platform","app.kubernetes.io/instance":"not-this"}"#,
                "--set-json",
                r#"podAnnotations={"example.com/scrape":"false"}"#,
                "--set-json",
                r#"topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway"}]"#,
                "--set-json",
                r#"nodeSelector={"kubernetes.io/os":"linux"}"#,
                "--set-json",
                r#"tolerations=[{"key":"dedicated","operator":"Equal","value":"platform","effect":"NoSchedule"}]"#,
                "--set-json",
                r#"affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/arch","operator":"In","values":["amd64","arm64"]}]}]}}}"#,
                "--set-json",
                r#"resources={"requests":{"cpu":"100m","memory":"128Mi"},"limits":{"memory":"512Mi"}}"#,
                "--set-json",
                r#"serviceAccount={"create":true,"name":"promoter","annotations":{"iam.example.com/role":"promoter"}}"#,
            ],
        ),
        (
            "direct Flux wiring",
            vec![
                "--set",
                "fluxWiring.mode=direct,fluxWiring.interval=30s,publicUrl=https://promote.example.com",
            ],
        ),
        (
            "Grafana dashboard and PrometheusRule",
            vec![
                "--set",
                "grafanaDashboard.enabled=true,grafanaDashboard.annotations.grafana_folder=Delivery,prometheusRule.enabled=true,prometheusRule.labels.release=prometheus,prometheusRule.approvalWaiting.thresholdSeconds=3600",
            ],
        ),
    ]
}

#[test]
fn chart_crds_match_the_types() {
    let generated = pipeline_crds::crds_yaml().unwrap();
    let path = chart_dir().join("files/crds.yaml");
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "charts/pipeline-controller/files/crds.yaml is out of date: run `UPDATE_CRDS=1 cargo test -p pipeline-testenv --test chart`"
    );
}

#[test]
fn helm_lint_passes_for_every_value_set() {
    let chart = chart_dir();
    for (name, args) in value_sets() {
        let mut all = vec![
            "lint",
            "--strict",
            chart.to_str().unwrap(),
            "--namespace",
            NS,
            "--kube-version",
            KUBE,
        ];
        all.extend(&args);
        let out = helm(&all);
        assert!(
            out.status.success(),
            "helm lint ({name}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `kubeVersion` in Chart.yaml: `helm template` works with helm's default capabilities
/// (no cluster, no --kube-version; v1.20.0 for a helm built without the Makefile's
/// version stamp, like tools/helm's) and with the test API server's version, and refuses
/// a Kubernetes older than the rendered objects' APIs.
#[test]
fn kube_version_constraint_accepts_defaults_and_current_kubernetes() {
    try_render(RELEASE, None, &[]).unwrap();
    try_render(RELEASE, Some(KUBE), &[]).unwrap();
    try_render(RELEASE, Some("v1.37.0-gke.100"), &[]).unwrap();
    let err = try_render(RELEASE, Some("v1.19.16"), &[]).unwrap_err();
    assert!(
        err.contains("kubeVersion") || err.contains("Kubernetes"),
        "{err}"
    );
}

/// Removes what the chart adds to deploy/'s objects (the labels Helm and the chart put on
/// every object, the release's instance label in the selectors, the explicit
/// --lease-name and log level, the CRDs' keep annotation), so that the rest compares
/// equal. Applied to both sides: the comparison keeps holding if deploy/ adopts them.
fn without_chart_additions(doc: &Value) -> Value {
    fn strip_instance(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.get("app.kubernetes.io/instance") == Some(&json!(RELEASE)) {
                    map.remove("app.kubernetes.io/instance");
                }
                map.values_mut().for_each(strip_instance);
            }
            Value::Array(items) => items.iter_mut().for_each(strip_instance),
            _ => {}
        }
    }
    let mut doc = doc.clone();
    if let Some(meta) = doc.pointer_mut("/metadata").and_then(Value::as_object_mut) {
        meta.remove("labels");
        if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove("helm.sh/resource-policy");
            if annotations.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    strip_instance(&mut doc);
    if let Some(containers) = doc
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
    {
        for c in containers {
            if let Some(args) = c["args"].as_array_mut() {
                args.retain(|a| a != "--lease-name=pipeline-controller-leader");
            }
            if let Some(env) = c["env"].as_array_mut() {
                env.retain(|e| {
                    !(e["name"] == "PIPELINE_CONTROLLER_LOG_LEVEL" && e["value"] == "info")
                });
            }
        }
    }
    doc
}

#[test]
fn default_rendering_equals_the_deploy_manifests() {
    let docs = render(&[]);
    // The additions are there.
    for crd in of_kind(&docs, "CustomResourceDefinition") {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
    }
    let deployment = one(&docs, "Deployment");
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        RELEASE
    );
    assert!(args_of(&docs).contains(&"--lease-name=pipeline-controller-leader".to_owned()));
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_LOG_LEVEL").as_deref(),
        Some("info")
    );

    let rendered: BTreeMap<String, Value> = docs.iter().map(|d| (key(d), d.clone())).collect();
    let deploy = root().join("deploy");
    let kustomization =
        parse_yaml_documents(&std::fs::read_to_string(deploy.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut expected = BTreeMap::new();
    for file in kustomization[0]["resources"].as_array().unwrap() {
        let text = std::fs::read_to_string(deploy.join(file.as_str().unwrap())).unwrap();
        for doc in parse_yaml_documents(&text).unwrap() {
            // The chart installs into an existing namespace (helm --create-namespace).
            if doc["kind"] != "Namespace" {
                expected.insert(key(&doc), doc);
            }
        }
    }
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "objects of the chart vs deploy/"
    );
    for (k, want) in &expected {
        assert_eq!(
            without_chart_additions(&rendered[k]),
            without_chart_additions(want),
            "{k} differs between the chart and deploy/"
        );
    }
}

/// Paths of values.yaml: every key, nested maps included (`a`, `a.b`, ...).
fn value_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.push(path.clone());
            value_paths(v, &path, out);
        }
    }
}

/// Whether the templates read `.Values.<path>` or, wholesale, one of its parents
/// (`toYaml .Values.resources`).
fn used_in(templates: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').collect();
    (1..=parts.len()).any(|n| {
        let needle = format!(".Values.{}", parts[..n].join("."));
        templates.match_indices(&needle).any(|(at, _)| {
            let next = templates[at + needle.len()..].chars().next();
            // `.Values.image` inside `.Values.imagePullSecrets` is not a use of `image`;
            // `.Values.image.tag` uses `image.tag`, not `image` wholesale.
            let whole = !matches!(next, Some(c) if c.is_alphanumeric() || c == '_' || c == '.');
            whole || n == parts.len() && next == Some('.')
        })
    })
}

#[test]
fn every_value_is_used_and_declared_in_the_schema() {
    let values =
        parse_yaml_documents(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap()
            .remove(0);
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    let mut templates = String::new();
    for entry in std::fs::read_dir(chart_dir().join("templates")).unwrap() {
        templates.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    let mut paths = Vec::new();
    value_paths(&values, "", &mut paths);
    assert!(paths.len() > 40, "{paths:?}");

    let unused: Vec<&String> = paths.iter().filter(|p| !used_in(&templates, p)).collect();
    assert!(
        unused.is_empty(),
        "values.yaml keys no template reads: {unused:?}"
    );

    // Declared: follow `properties` as long as the schema has them (below that, a map is
    // free-form, e.g. resources.requests or podLabels).
    let mut undeclared = Vec::new();
    for path in &paths {
        let mut node = &schema;
        for part in path.split('.') {
            match node.get("properties") {
                Some(props) => match props.get(part) {
                    Some(next) => node = next,
                    None => {
                        undeclared.push(path.clone());
                        break;
                    }
                },
                None => break,
            }
        }
    }
    assert!(
        undeclared.is_empty(),
        "not in values.schema.json: {undeclared:?}"
    );

    // And the other way round: the schema declares nothing values.yaml lacks (but
    // `global`, which Helm sets for dependencies).
    fn schema_paths(schema: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(path.clone());
                schema_paths(v, &path, out);
            }
        }
    }
    let mut declared = Vec::new();
    schema_paths(&schema, "", &mut declared);
    let paths: BTreeSet<&String> = paths.iter().collect();
    let stale: Vec<&String> = declared
        .iter()
        .filter(|p| *p != "global" && !paths.contains(p))
        .collect();
    assert!(
        stale.is_empty(),
        "in the schema, not in values.yaml: {stale:?}"
    );
    assert_eq!(schema["additionalProperties"], false);
}

#[test]
fn schema_rejects_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    // (values.yaml text, a word helm's error must name)
    let cases = [
        ("replicas: \"three\"", "replicas"),
        ("replicas: -1", "replicas"),
        ("replicas: 1.5", "replicas"),
        ("replica: 3", "replica"),
        ("logFormat: xml", "logFormat"),
        ("logLevel: \"\"", "logLevel"),
        ("logLevel: verbose", "logLevel"),
        ("logLevel: info,chatty", "logLevel"),
        ("image: {pullPolicy: Sometimes}", "pullPolicy"),
        ("image: {digest: latest}", "digest"),
        ("service: {port: 0}", "port"),
        ("service: {type: Internal}", "type"),
        ("ingress: {enabled: yes-please}", "enabled"),
        ("ingress: {hosts: [Promote.Example.com]}", "hosts"),
        ("ingress: {tls: [{hosts: [a.example.com]}]}", "secretName"),
        ("ingress: {path: /}", "path"),
        ("serviceAccount: {create: false}", "name"),
        ("podDisruptionBudget: {minAvailable: half}", "minAvailable"),
        ("notifyUrls: [ftp://receiver]", "notifyUrls"),
        ("extraArgs: [serve]", "extraArgs"),
        ("rbac: {secrets: {namespaces: [Flux_System]}}", "namespaces"),
        ("serviceMonitor: {interval: 30 seconds}", "interval"),
        ("networkPolicy: {from: {namespace: x}}", "from"),
        ("podLabels: {team: [a]}", "podLabels"),
        ("topologySpreadConstraints: [{maxSkew: 1}]", "topologyKey"),
        ("resources: {requests: {cpu: lots}}", "cpu"),
        ("crds: {install: \"true\"}", "install"),
    ];
    let mut wrong = Vec::new();
    for (i, (yaml, word)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        match try_render(RELEASE, Some(KUBE), &["-f", file.to_str().unwrap()]) {
            Ok(_) => wrong.push(format!("accepted: {yaml}")),
            Err(e) if !e.contains(word) => wrong.push(format!(
                "rejected {yaml}, but the error does not name {word:?}: {e}"
            )),
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Checks the schema cannot express: the PDB must leave a pod evictable.
    let err = try_render(
        RELEASE,
        Some(KUBE),
        &["--set", "replicas=3,podDisruptionBudget.minAvailable=3"],
    )
    .unwrap_err();
    assert!(
        err.contains("minAvailable (3) must be below replicas (3)"),
        "{err}"
    );
    // --set gives strings where values.yaml gives numbers: still checked.
    let err = try_render(RELEASE, Some(KUBE), &["--set-string", "replicas=3"]).unwrap_err();
    assert!(err.contains("replicas"), "{err}");
}

#[test]
fn ingress_routes_only_the_webhook_paths_with_tls() {
    assert!(
        of_kind(&render(&[]), "Ingress").is_empty(),
        "off by default"
    );
    let sets = value_sets();
    let docs = render(&sets[1].1);
    let ingress = one(&docs, "Ingress");
    let service = public_service(&docs);
    assert_eq!(ingress["metadata"]["name"], RELEASE);
    assert_eq!(ingress["metadata"]["namespace"], NS);
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
    assert_eq!(
        ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"],
        "letsencrypt"
    );
    let hosts = json!(["promote.example.com", "promote.example.org"]);
    assert_eq!(
        ingress["spec"]["tls"],
        json!([{"secretName": "promote-tls", "hosts": hosts}])
    );
    let rules = ingress["spec"]["rules"].as_array().unwrap();
    assert_eq!(
        rules.iter().map(|r| r["host"].clone()).collect::<Vec<_>>(),
        hosts.as_array().unwrap().clone()
    );
    for rule in rules {
        let paths = rule["http"]["paths"].as_array().unwrap();
        let prefixes: Vec<&str> = paths.iter().map(|p| p["path"].as_str().unwrap()).collect();
        // Never /api/v1/..., /metrics or the health endpoints: they are not authenticated.
        assert_eq!(prefixes, ["/pipelines/", "/promotion/", "/approval/"]);
        for path in paths {
            assert_eq!(path["pathType"], "Prefix");
            assert_eq!(
                path["backend"]["service"]["name"],
                service["metadata"]["name"]
            );
            assert_eq!(
                path["backend"]["service"]["port"]["name"],
                service["spec"]["ports"][0]["name"]
            );
        }
    }

    // Without the Go aliases and without hosts: one rule for any host, /pipelines/ only.
    let docs = render(&[
        "--set",
        "ingress.enabled=true,ingress.goCompatiblePaths=false",
        "--set-json",
        r#"ingress.tls=[{"secretName":"t","hosts":["x.example.com"]}]"#,
    ]);
    let ingress = one(&docs, "Ingress");
    assert!(ingress["spec"].get("ingressClassName").is_none());
    assert_eq!(
        ingress["spec"]["tls"],
        json!([{"secretName": "t", "hosts": ["x.example.com"]}])
    );
    let rules = ingress["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert!(rules[0].get("host").is_none(), "{rules:?}");
    assert_eq!(rules[0]["http"]["paths"].as_array().unwrap().len(), 1);
    assert_eq!(rules[0]["http"]["paths"][0]["path"], "/pipelines/");
}

#[test]
fn service_monitor_and_network_policy_select_the_release() {
    let defaults = render(&[]);
    assert!(
        of_kind(&defaults, "ServiceMonitor").is_empty(),
        "off by default"
    );
    assert!(
        of_kind(&defaults, "NetworkPolicy").is_empty(),
        "off by default"
    );

    let sets = value_sets();
    let docs = render(&sets[2].1);
    let services = of_kind(&docs, "Service");
    assert_eq!(services.len(), 2, "a public and an internal Service");
    let service = services
        .iter()
        .find(|s| s["metadata"]["name"] == "pipeline-controller")
        .unwrap();
    let internal = services
        .iter()
        .find(|s| s["metadata"]["name"] == "pipeline-controller-internal")
        .unwrap();
    let pod_labels = &one(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"];

    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    // It scrapes the internal Service, never the public one.
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &internal["metadata"]["labels"]
    ));
    assert!(!selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!([NS])
    );
    assert_eq!(
        monitor["spec"]["endpoints"],
        json!([{"port": "internal", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}])
    );
    assert_eq!(service["spec"]["ports"].as_array().unwrap().len(), 1);
    assert_eq!(service["spec"]["ports"][0]["name"], "http");
    assert_eq!(internal["spec"]["ports"][0]["name"], "internal");
    assert_eq!(internal["spec"]["type"], "ClusterIP");

    let policy = one(&docs, "NetworkPolicy");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        pod_labels
    ));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2);
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": "http", "protocol": "TCP"}])
    );
    assert_eq!(ingress[0]["from"].as_array().unwrap().len(), 2);
    assert_eq!(
        ingress[1]["ports"],
        json!([{"port": "internal", "protocol": "TCP"}])
    );
    assert_eq!(ingress[1]["from"], json!([{"podSelector": {}}]));
    assert_eq!(policy["spec"]["egress"][0]["ports"][1]["port"], 443);

    // Defaults when enabled: from flux-system only, egress not restricted.
    let docs = render(&["--set", "networkPolicy.enabled=true"]);
    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["spec"]["ingress"][0]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "flux-system"}}}])
    );
    // An empty internalFrom admits nobody to the internal port (an empty `from` in a
    // rule would admit everybody, so no rule is rendered).
    let docs = render(&[
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.internalFrom=null",
    ]);
    let ingress = one(&docs, "NetworkPolicy")["spec"]["ingress"].clone();
    assert_eq!(ingress.as_array().unwrap().len(), 1, "{ingress}");
    assert_eq!(ingress[0]["ports"][0]["port"], "http");
}

#[test]
fn pod_disruption_budget_only_with_more_than_one_replica() {
    for (replicas, pdb) in [("0", false), ("1", false), ("2", true), ("3", true)] {
        let docs = render(&["--set", &format!("replicas={replicas}")]);
        assert_eq!(
            one(&docs, "Deployment")["spec"]["replicas"],
            replicas.parse::<u64>().unwrap()
        );
        let pdbs = of_kind(&docs, "PodDisruptionBudget");
        assert_eq!(pdbs.len(), usize::from(pdb), "replicas={replicas}");
        if let Some(pdb) = pdbs.first() {
            assert_eq!(pdb["spec"]["minAvailable"], 1);
            assert_eq!(
                pdb["spec"]["selector"],
                one(&docs, "Deployment")["spec"]["selector"]
            );
        }
    }
    let docs = render(&["--set", "replicas=4,podDisruptionBudget.minAvailable=50%"]);
    assert_eq!(
        one(&docs, "PodDisruptionBudget")["spec"]["minAvailable"],
        "50%"
    );
    let docs = render(&["--set", "replicas=3,podDisruptionBudget.enabled=false"]);
    assert!(of_kind(&docs, "PodDisruptionBudget").is_empty());
}

#[test]
fn pod_settings_reach_the_pod() {
    let sets = value_sets();
    let docs = render(&sets[5].1);
    let deployment = one(&docs, "Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];

    // podLabels are added; the selector labels cannot be overridden.
    assert_eq!(pod["metadata"]["labels"]["team"], "platform");
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/instance"],
        RELEASE
    );
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/scrape"],
        "false"
    );
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    let spread = &spec["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(
        spread["labelSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"],
        "a constraint without labelSelector gets the release's pods"
    );
    assert_eq!(spec["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(spec["tolerations"][0]["key"], "dedicated");
    assert!(spec["affinity"].get("podAntiAffinity").is_none());
    assert!(spec["affinity"]["nodeAffinity"].is_object());
    let c = container(&docs);
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    );
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_LOG_LEVEL").as_deref(),
        Some("info,pipeline_kube=debug")
    );
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_LOG_FORMAT").as_deref(),
        Some("text")
    );
    assert_eq!(
        c["image"],
        "ghcr.io/pipeline-controller/pipeline-controller@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );

    // The ServiceAccount's name and annotations, and everything bound to it.
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "promoter");
    assert_eq!(
        sa["metadata"]["annotations"]["iam.example.com/role"],
        "promoter"
    );
    assert_eq!(spec["serviceAccountName"], "promoter");
    for binding in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "promoter", "namespace": NS}]),
            "{}",
            key(binding)
        );
    }

    // An existing ServiceAccount: not created, still bound.
    let docs = render(&[
        "--set",
        "serviceAccount.create=false,serviceAccount.name=existing",
    ]);
    assert!(of_kind(&docs, "ServiceAccount").is_empty());
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        "existing"
    );
    assert_eq!(
        one(&docs, "ClusterRoleBinding")["subjects"][0]["name"],
        "existing"
    );

    // Defaults: spread over nodes, info logs as JSON, the appVersion's image.
    let docs = render(&[]);
    let spec = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert!(spec["affinity"]["podAntiAffinity"].is_object());
    assert!(spec.get("priorityClassName").is_none());
    assert!(spec.get("topologySpreadConstraints").is_none());
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_LOG_FORMAT").as_deref(),
        Some("json")
    );
    assert!(
        container(&docs)["image"]
            .as_str()
            .unwrap()
            .ends_with(":0.1.0")
    );
}

#[test]
fn crds_are_templates_kept_on_uninstall_and_optional() {
    let docs = render(&[]);
    let crds = of_kind(&docs, "CustomResourceDefinition");
    let names: Vec<&str> = crds
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "pipelines.pipelines.weave.works",
            "promotions.pipelines.weave.works"
        ]
    );
    // files/crds.yaml verbatim, plus labels and the keep annotation.
    let file = parse_yaml_documents(
        &std::fs::read_to_string(chart_dir().join("files/crds.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(crds.len(), file.len());
    for (crd, want) in crds.iter().zip(&file) {
        assert_eq!(crd["spec"], want["spec"]);
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/instance"],
            RELEASE
        );
    }
    let docs = render(&["--set", "crds.install=false"]);
    assert!(of_kind(&docs, "CustomResourceDefinition").is_empty());
}

const CLUSTER_SCOPED: &[&str] = &[
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
];

/// The Lease a rendering's Deployment uses and the one its leader-election Role allows.
fn lease_names(docs: &[Value]) -> (String, Vec<String>) {
    let flag = args_of(docs)
        .iter()
        .find_map(|a| a.strip_prefix("--lease-name=").map(str::to_owned))
        .expect("--lease-name is always passed");
    let role = of_kind(docs, "Role")
        .into_iter()
        .find(|r| r["rules"].to_string().contains("leases"))
        .unwrap();
    let allowed = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["resourceNames"].as_array())
        .flatten()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    (flag, allowed)
}

#[test]
fn two_releases_do_not_collide() {
    // Both in one namespace, the second without CRDs (CRDs are cluster-wide: one release
    // installs them; with crds.install=true in both, they would be the only overlap).
    let a = render_release(RELEASE, KUBE, &[]);
    let b = render_release("team-b", KUBE, &["--set", "crds.install=false"]);
    let b_with_crds = render_release("team-b", KUBE, &[]);

    let keys_a: BTreeSet<String> = keys(&a).into_iter().collect();
    let common: Vec<String> = keys(&b)
        .into_iter()
        .filter(|k| keys_a.contains(k))
        .collect();
    assert!(
        common.is_empty(),
        "objects both releases render: {common:?}"
    );
    let common_with_crds: Vec<String> = keys(&b_with_crds)
        .into_iter()
        .filter(|k| keys_a.contains(k))
        .collect();
    assert!(
        common_with_crds
            .iter()
            .all(|k| k.starts_with("CustomResourceDefinition ")),
        "{common_with_crds:?}"
    );

    // Cluster-scoped names are derived from the release.
    let cluster_b: BTreeSet<String> = b
        .iter()
        .filter(|d| CLUSTER_SCOPED.contains(&d["kind"].as_str().unwrap()))
        .map(key)
        .collect();
    let want: BTreeSet<String> = [
        "ClusterRole /team-b-pipeline-controller",
        "ClusterRole /team-b-pipeline-controller-secrets",
        "ClusterRole /team-b-pipeline-viewer",
        "ClusterRole /team-b-pipeline-approver",
        "ClusterRoleBinding /team-b-pipeline-controller",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(cluster_b, want, "cluster-scoped objects of release team-b");

    // Each Deployment uses its own Lease, the one its Role allows.
    let (lease_a, allowed_a) = lease_names(&a);
    let (lease_b, allowed_b) = lease_names(&b);
    assert_eq!(lease_a, "pipeline-controller-leader");
    assert_eq!(lease_b, "team-b-pipeline-controller-leader");
    assert_eq!(allowed_a, [lease_a]);
    assert_eq!(allowed_b, [lease_b]);

    // Selectors do not reach the other release's pods.
    for (x, y) in [(&a, &b), (&b, &a)] {
        let pods_y = &one(y, "Deployment")["spec"]["template"]["metadata"]["labels"];
        assert!(!selects(
            &one(x, "Deployment")["spec"]["selector"]["matchLabels"],
            pods_y
        ));
        for service in of_kind(x, "Service") {
            assert!(!selects(&service["spec"]["selector"], pods_y));
        }
        assert!(!selects(
            &one(x, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            pods_y
        ));
    }
    // Bindings name their own release's ServiceAccount and roles.
    for binding in of_kind(&b, "ClusterRoleBinding")
        .into_iter()
        .chain(of_kind(&b, "RoleBinding"))
    {
        assert_eq!(binding["subjects"][0]["name"], "team-b-pipeline-controller");
        assert!(
            binding["roleRef"]["name"]
                .as_str()
                .unwrap()
                .starts_with("team-b-"),
            "{binding}"
        );
    }

    // fullnameOverride names everything.
    let c = render_release(
        "x",
        KUBE,
        &["--set", "fullnameOverride=promoter,crds.install=false"],
    );
    for doc in &c {
        let name = doc["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("promoter"), "{}", key(doc));
    }
}

/// A minimal ServiceMonitor CRD (the prometheus-operator's kind, its schema left open),
/// so that the API server accepts ServiceMonitors in the dry run. It checks the kind and
/// the object's metadata, not the fields of the real CRD's schema.
const SERVICE_MONITOR_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

/// A minimal PrometheusRule CRD, as [`SERVICE_MONITOR_CRD`].
const PROMETHEUS_RULE_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: PrometheusRule, listKind: PrometheusRuleList, plural: prometheusrules, singular: prometheusrule}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

/// The `pipeline_controller_*` families named in `text`, without the sample suffixes.
fn metric_families(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pipeline_controller_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count", "_total"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        out.insert(name.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn grafana_dashboard_and_alerts_use_only_metrics_the_controller_exports() {
    let defaults = render(&[]);
    assert!(
        of_kind(&defaults, "PrometheusRule").is_empty(),
        "off by default"
    );
    assert!(
        !of_kind(&defaults, "ConfigMap")
            .iter()
            .any(|c| c["metadata"]["name"] == "pipeline-controller-dashboard"),
        "off by default"
    );
    let sets = value_sets();
    let (_, args) = sets
        .iter()
        .find(|(name, _)| *name == "Grafana dashboard and PrometheusRule")
        .unwrap();
    let docs = render(args);
    // What the controller's registry declares (every family, with or without samples).
    // Families without samples are not rendered: give every labelled one a sample.
    let metrics = pipeline_core::Metrics::new();
    metrics.observe_request("promotion", "recorded", 0.01);
    let labels = pipeline_core::metrics::EnvironmentLabels {
        pipeline: "a/b".into(),
        environment: "dev".into(),
    };
    let delivery = &metrics.delivery;
    delivery.deployments.get_or_create(&labels).inc();
    delivery.approval_wait.get_or_create(&labels).observe(1.0);
    delivery.time_to_recover.get_or_create(&labels).observe(1.0);
    delivery.failure_ratio.get_or_create(&labels).set(0.5);
    delivery.approval_waiting.get_or_create(&labels).set(1.0);
    delivery
        .lead_time
        .get_or_create(&pipeline_core::metrics::PipelineLabels {
            pipeline: "a/b".into(),
        })
        .observe(1.0);
    let exported: BTreeSet<String> = metrics
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        exported.contains("pipeline_controller_lead_time_seconds"),
        "{exported:?}"
    );

    let config_map = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "pipeline-controller-dashboard")
        .unwrap();
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        config_map["metadata"]["annotations"]["grafana_folder"],
        "Delivery"
    );
    let json_text = config_map["data"]["pipeline-controller.json"]
        .as_str()
        .unwrap();
    let dashboard: Value = serde_json::from_str(json_text).unwrap();
    assert_eq!(dashboard["uid"], "pipeline-controller");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 6);
    let used = metric_families(json_text);
    for family in [
        "pipeline_controller_deployments",
        "pipeline_controller_lead_time_seconds",
        "pipeline_controller_approval_wait_seconds",
        "pipeline_controller_promotion_failure_ratio",
        "pipeline_controller_time_to_recover_seconds",
    ] {
        assert!(
            used.contains(family),
            "the dashboard does not chart {family}"
        );
    }
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries unknown metrics {unknown:?}"
    );

    let rule = one(&docs, "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let alerts: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(
        alerts,
        [
            "PipelinePromotionFailing",
            "PipelineApprovalWaitingTooLong",
            "PipelineWebhookUnauthenticated"
        ]
    );
    let exprs: String = rules
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let unknown: Vec<String> = metric_families(&exprs)
        .difference(&exported)
        .cloned()
        .collect();
    assert!(
        unknown.is_empty(),
        "the alerts query unknown metrics {unknown:?}"
    );
    assert!(exprs.contains(r#"outcome="unauthenticated""#), "{exprs}");
    assert!(exprs.contains("> 3600"), "{exprs}");
    // The Prometheus template syntax reaches Prometheus unexpanded by Helm.
    assert!(
        rules[1]["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("{{ $labels.pipeline }}")
    );
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run_and_applies() {
    let cluster = TestCluster::start().await.unwrap();
    let version = cluster
        .client()
        .apiserver_version()
        .await
        .unwrap()
        .git_version;
    assert_eq!(version, KUBE, "tools/envtest's Kubernetes");
    for ns in [NS, "flux-system", "apps"] {
        cluster.ensure_namespace(ns).await.unwrap();
    }
    cluster.apply_yaml(SERVICE_MONITOR_CRD).await.unwrap();
    cluster.apply_yaml(PROMETHEUS_RULE_CRD).await.unwrap();

    // Every value set, dry run, into the existing namespace.
    for (name, args) in value_sets() {
        let docs = render_release(RELEASE, &version, &args);
        cluster
            .dry_run_yaml(&to_yaml_stream(&docs))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    // Every option switched: own namespace created, cluster-wide Secrets, a custom Lease,
    // notify URLs, extra args and env, no user roles, no PDB. Applied for real (the
    // Namespace comes first in Helm's order).
    let custom = render_release(
        RELEASE,
        &version,
        &[
            "--set",
            "namespace=promoter,createNamespace=true,rbac.secrets.clusterWide=true,rbac.userRoles=false,podDisruptionBudget.enabled=false,replicas=3,leaderElection.leaseName=promoter-leader,image.tag=dev,eventsAddr=",
            "--set-json",
            r#"notifyUrls=["http://receiver.apps.svc/hook"]"#,
            "--set-json",
            r#"extraArgs=["--max-attempts=3"]"#,
            "--set-json",
            r#"extraEnv=[{"name":"EXTRA","value":"1"}]"#,
        ],
    );
    let kinds = keys(&custom);
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("Namespace /promoter"),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"CustomResourceDefinition /pipelines.pipelines.weave.works".to_owned()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"ClusterRoleBinding /pipeline-controller-secrets".to_owned()),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| k.starts_with("RoleBinding flux-system/")),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| k.contains("pipeline-approver") || k.starts_with("PodDisruptionBudget")),
        "{kinds:?}"
    );
    let args = args_of(&custom);
    for want in [
        "--lease-name=promoter-leader",
        "--notify-url=http://receiver.apps.svc/hook",
        "--max-attempts=3",
    ] {
        assert!(args.contains(&want.to_owned()), "{args:?}");
    }
    assert!(env_of(&custom, "PIPELINE_CONTROLLER_EVENTS_ADDR").is_none());
    assert_eq!(env_of(&custom, "EXTRA").as_deref(), Some("1"));
    assert!(
        container(&custom)["image"]
            .as_str()
            .unwrap()
            .ends_with(":dev")
    );

    // Namespace first for real, then the rest dry-run, then the rest for real.
    let (namespaces, rest): (Vec<_>, Vec<_>) =
        custom.into_iter().partition(|d| d["kind"] == "Namespace");
    cluster
        .apply_yaml(&to_yaml_stream(&namespaces))
        .await
        .unwrap();
    cluster.dry_run_yaml(&to_yaml_stream(&rest)).await.unwrap();
    cluster.apply_yaml(&to_yaml_stream(&rest)).await.unwrap();

    // A second release in the same cluster, applied for real next to the first (which
    // installed the CRDs): it gets its own Lease and Secrets access, and the first keeps
    // its own.
    let b = render_release("team-b", &version, &["--set", "crds.install=false"]);
    cluster.dry_run_yaml(&to_yaml_stream(&b)).await.unwrap();
    cluster.apply_yaml(&to_yaml_stream(&b)).await.unwrap();

    // The cluster-wide Secrets option does what it says, and the Lease rule follows the name.
    let sa = cluster
        .service_account_client("promoter", "pipeline-controller")
        .await
        .unwrap();
    assert!(allowed(&sa, "list", "", "secrets", "", "").await);
    let lease = "coordination.k8s.io";
    assert!(
        allowed(
            &sa,
            "update",
            lease,
            "leases",
            "promoter",
            "promoter-leader"
        )
        .await
    );
    assert!(
        !allowed(
            &sa,
            "update",
            lease,
            "leases",
            "promoter",
            "pipeline-controller-leader"
        )
        .await
    );
    assert!(!allowed(&sa, "create", "", "secrets", "apps", "").await);

    let sa_b = cluster
        .service_account_client(NS, "team-b-pipeline-controller")
        .await
        .unwrap();
    let lease_b = "team-b-pipeline-controller-leader";
    assert!(allowed(&sa_b, "update", lease, "leases", NS, lease_b).await);
    assert!(
        !allowed(
            &sa_b,
            "update",
            lease,
            "leases",
            "promoter",
            "promoter-leader"
        )
        .await
    );
    assert!(
        !allowed(
            &sa_b,
            "update",
            lease,
            "leases",
            NS,
            "pipeline-controller-leader"
        )
        .await
    );
    assert!(allowed(&sa_b, "list", "", "secrets", "flux-system", "").await);
    assert!(!allowed(&sa_b, "list", "", "secrets", "apps", "").await);
    assert!(allowed(&sa_b, "list", "pipelines.weave.works", "pipelines", "", "").await);
}

async fn allowed(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                verb: Some(verb.to_owned()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                name: (!name.is_empty()).then(|| name.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}

/// The public URL and direct Flux wiring reach the pod; direct mode, and only it, may
/// write Providers, Alerts and Secrets; the Service the URL is derived from is the
/// release's, and the controller may read it and the Ingresses next to it.
#[test]
fn public_url_and_direct_flux_wiring_reach_the_pod() {
    let docs = render(&[]);
    assert_eq!(env_of(&docs, "PIPELINE_CONTROLLER_PUBLIC_URL"), None);
    assert_eq!(env_of(&docs, "PIPELINE_CONTROLLER_FLUX_WIRING"), None);
    // The binary's default names the release "pipeline-controller"'s Service.
    assert_eq!(env_of(&docs, "PIPELINE_CONTROLLER_SERVICE_NAME"), None);
    let rules = |docs: &[Value]| -> Vec<Value> {
        of_kind(docs, "ClusterRole")
            .into_iter()
            .filter(|r| r["metadata"]["name"] == RELEASE)
            .flat_map(|r| r["rules"].as_array().unwrap().clone())
            .collect()
    };
    let writes = |rules: &[Value], resource: &str| {
        rules.iter().any(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == resource)
                && r["verbs"].as_array().unwrap().iter().any(|v| v == "patch")
        })
    };
    for resource in ["providers", "alerts", "secrets"] {
        assert!(
            !writes(&rules(&docs), resource),
            "{resource} writable by default"
        );
    }
    let public_url = one(
        &of_kind(&docs, "Role")
            .into_iter()
            .filter(|r| r["metadata"]["name"] == format!("{RELEASE}-public-url"))
            .cloned()
            .collect::<Vec<_>>(),
        "Role",
    )
    .clone();
    assert_eq!(public_url["metadata"]["namespace"], NS);
    assert_eq!(
        public_url["rules"],
        json!([
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["list"]}
        ])
    );

    let sets = value_sets();
    let (_, direct) = sets
        .iter()
        .find(|(name, _)| *name == "direct Flux wiring")
        .unwrap();
    let docs = render(direct);
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_PUBLIC_URL").as_deref(),
        Some("https://promote.example.com")
    );
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_FLUX_WIRING").as_deref(),
        Some("direct")
    );
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_FLUX_WIRING_INTERVAL").as_deref(),
        Some("30s")
    );
    for resource in ["providers", "alerts", "secrets"] {
        assert!(
            writes(&rules(&docs), resource),
            "{resource} not writable in direct mode"
        );
    }

    // Another release: its own Service is named.
    let docs = render_release("promoter", KUBE, &[]);
    assert_eq!(
        env_of(&docs, "PIPELINE_CONTROLLER_SERVICE_NAME").as_deref(),
        Some("promoter-pipeline-controller")
    );
    assert!(
        of_kind(&docs, "Service")
            .iter()
            .any(|s| s["metadata"]["name"] == "promoter-pipeline-controller")
    );
    for (values, message) in [
        ("fluxWiring.mode=sometimes", "fluxWiring"),
        ("publicUrl=promote.example.com", "publicUrl"),
    ] {
        let err = try_render(RELEASE, Some(KUBE), &["--set", values]).unwrap_err();
        assert!(err.contains(message), "{values}: {err}");
    }
}
