//! The whole GitOps loop with Flux's own controllers, nothing simulated.
//!
//! A real kube-apiserver runs Flux's source-, kustomize-, helm- and notification-
//! controller (built from their Go modules: `scripts/ensure-test-binaries.sh flux`). A
//! real Gitea holds the fleet repository (a HelmRelease per environment, whose chart
//! version carries a promotion marker) and serves the chart as a Helm repository (its
//! package registry). The Provider and Alert that send Flux's events to us are written
//! by `pipeline-controller flux-config`, committed to the repository and applied by Flux
//! itself. pipeline-controller runs in Kubernetes mode with the pull-request strategy to
//! the same repository; the test only publishes the chart, bumps dev, merges the pull
//! requests through Gitea's API and approves prod, as people would.
//!
//! Run it alone (about 2 minutes once everything is built):
//!
//! ```sh
//! scripts/ensure-test-binaries.sh kube gitea helm flux
//! cargo test -p pipeline-controller --test flux_e2e -- --nocapture
//! ```
#![allow(clippy::unwrap_used)]

mod support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use pipeline_crds::Promotion;
use pipeline_git::testing::{ADMIN_PASSWORD, ADMIN_USER, Gitea};
use pipeline_testenv::{FluxController, FluxControllers, TestCluster};
use serde_json::{Value, json};
use support::k8s::{Controller, phase, run_cli};

const REPO: &str = "fleet";
const ENVIRONMENTS: [&str; 3] = ["dev", "staging", "prod"];
/// The webhook's key. Written to the leaf Secrets with a trailing newline, as
/// `kubectl create secret --from-file` does: notification-controller trims it.
const HMAC_KEY: &str = "flux-e2e-hmac-key-0123456789abcdef";
/// Bound of every wait for Flux or the controller to do one step.
const STEP: Duration = Duration::from_secs(120);

/// Elapsed time per hop, printed as the loop goes.
struct Hops {
    began: Instant,
    last: Instant,
    hops: Vec<(String, Duration, Duration)>,
}

impl Hops {
    fn new() -> Hops {
        let now = Instant::now();
        Hops {
            began: now,
            last: now,
            hops: Vec::new(),
        }
    }

    fn hop(&mut self, what: &str) {
        let now = Instant::now();
        let (total, step) = (now - self.began, now - self.last);
        self.last = now;
        eprintln!(
            "[flux-e2e] {:>7.1}s (+{:>5.1}s) {what}",
            total.as_secs_f64(),
            step.as_secs_f64()
        );
        self.hops.push((what.to_string(), total, step));
    }

    fn table(&self) -> String {
        self.hops
            .iter()
            .map(|(what, total, step)| {
                format!(
                    "{:>7.1}s  +{:>5.1}s  {what}\n",
                    total.as_secs_f64(),
                    step.as_secs_f64()
                )
            })
            .collect()
    }
}

/// Polls `check` every 250 ms until it gives a value; panics after `limit` with `what`.
async fn wait<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The HelmRelease of `env` at chart `version`; `message` is the YAML of the chart's
/// `message` value (the chart's schema wants a string).
fn helm_release(env: &str, version: &str, message: &str) -> String {
    format!(
        r#"apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata:
  name: podinfo
  namespace: podinfo-{env}
spec:
  interval: 10m
  chart:
    spec:
      chart: podinfo
      version: "{version}" # {{"$promotion": "flux-system:podinfo:{env}"}}
      sourceRef:
        kind: HelmRepository
        name: charts
        namespace: flux-system
      interval: 10m
  values:
    message: {message}
"#
    )
}

fn pipeline_yaml(gitea_repo_url: &str) -> String {
    format!(
        r#"apiVersion: pipelines.weave.works/v1alpha1
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
    - name: staging
      targets:
        - namespace: podinfo-staging
    - name: prod
      targets:
        - namespace: podinfo-prod
      promotion:
        manual: true
        strategy:
          pull-request:
            type: gitea
            url: {gitea_repo_url}
            baseBranch: main
            secretRef:
              name: git-credentials
  promotion:
    strategy:
      secretRef:
        name: podinfo-promotion-hmac
      pull-request:
        type: gitea
        url: {gitea_repo_url}
        baseBranch: main
        secretRef:
          name: git-credentials
---
apiVersion: v1
kind: Secret
metadata:
  name: podinfo-promotion-hmac
  namespace: flux-system
stringData:
  hmac-key: {HMAC_KEY}
  approval-key: flux-e2e-approval-key-fedcba9876543210
"#
    )
}

/// The Flux sources and per-environment Kustomizations of the management cluster.
fn flux_sources(gitea: &Gitea) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: fleet-auth
  namespace: flux-system
stringData:
  username: {ADMIN_USER}
  password: {ADMIN_PASSWORD}
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata:
  name: fleet
  namespace: flux-system
spec:
  interval: 2s
  url: {repo}
  ref:
    branch: main
  secretRef:
    name: fleet-auth
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: HelmRepository
metadata:
  name: charts
  namespace: flux-system
spec:
  interval: 2s
  url: {base}/api/packages/{ADMIN_USER}/helm
"#,
        repo = gitea.repo_url(REPO),
        base = gitea.base_url,
    );
    for env in ENVIRONMENTS {
        yaml.push_str(&format!(
            r#"---
apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata:
  name: apps-{env}
  namespace: flux-system
spec:
  interval: 10m
  retryInterval: 5s
  path: ./apps/{env}
  prune: true
  sourceRef:
    kind: GitRepository
    name: fleet
"#
        ));
    }
    yaml
}

/// Packages the test chart at `version` with the real helm and publishes it to Gitea's
/// Helm registry.
async fn publish_chart(gitea: &Gitea, work: &Path, version: &str) {
    let chart = work.join(format!("chart-{version}/podinfo"));
    std::fs::create_dir_all(chart.join("templates")).unwrap();
    std::fs::write(
        chart.join("Chart.yaml"),
        format!("apiVersion: v2\nname: podinfo\nversion: {version}\nappVersion: \"{version}\"\n"),
    )
    .unwrap();
    std::fs::write(chart.join("values.yaml"), "message: hello\n").unwrap();
    // A value that is not a string fails the upgrade (the failed-upgrade variant).
    std::fs::write(
        chart.join("values.schema.json"),
        r#"{"type":"object","properties":{"message":{"type":"string"}},"required":["message"]}"#,
    )
    .unwrap();
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: podinfo\ndata:\n  chartVersion: {{ .Chart.Version | quote }}\n  message: {{ .Values.message | quote }}\n",
    )
    .unwrap();
    let helm = pipeline_testenv::helm_binary().unwrap();
    let out_dir = work.join("packages");
    let output = Command::new(helm)
        .args(["package", "--destination"])
        .arg(&out_dir)
        .arg(&chart)
        .env("HELM_CACHE_HOME", work.join("helm-cache"))
        .env("HELM_CONFIG_HOME", work.join("helm-config"))
        .env("HELM_DATA_HOME", work.join("helm-data"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "helm package: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tgz = std::fs::read(out_dir.join(format!("podinfo-{version}.tgz"))).unwrap();
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/packages/{ADMIN_USER}/helm/api/charts",
            gitea.base_url
        ))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .body(tgz)
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert!(
        status.is_success(),
        "publishing chart {version}: {status}: {}",
        response.text().await.unwrap_or_default()
    );
}

/// A working copy of the fleet repository.
struct Clone {
    dir: PathBuf,
}

impl Clone {
    fn new(gitea: &Gitea, work: &Path) -> Clone {
        let dir = work.join("fleet");
        std::fs::create_dir_all(&dir).unwrap();
        gitea
            .git(&dir, &["clone", "--quiet", &gitea.repo_url(REPO), "."])
            .unwrap();
        Clone { dir }
    }

    /// Pulls, lets `edit` change the tree, commits everything and pushes to main.
    fn commit(&self, gitea: &Gitea, message: &str, edit: impl FnOnce(&Path)) {
        gitea
            .git(
                &self.dir,
                &["pull", "--quiet", "--ff-only", "origin", "main"],
            )
            .unwrap();
        edit(&self.dir);
        gitea.git(&self.dir, &["add", "--all"]).unwrap();
        gitea
            .git(&self.dir, &["commit", "--quiet", "-m", message])
            .unwrap();
        gitea
            .git(&self.dir, &["push", "--quiet", "origin", "main"])
            .unwrap();
    }
}

/// Waits until source-controller's GitRepository `flux-system/fleet` has the clone's
/// HEAD as its artifact.
async fn wait_fetched(gitea: &Gitea, clone: &Clone, client: &kube::Client) {
    let head = gitea
        .git(&clone.dir, &["rev-parse", "HEAD"])
        .unwrap()
        .trim()
        .to_string();
    let repositories: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "flux-system",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository"),
            "gitrepositories",
        ),
    );
    wait(
        "source-controller fetching the wiring commit",
        STEP,
        || async {
            let repository = repositories.get_opt("fleet").await.ok()??;
            (repository.data["status"]["artifact"]["revision"] == format!("main@sha1:{head}"))
                .then_some(())
        },
    )
    .await;
}

/// `data.chartVersion` of the ConfigMap the chart installs in `podinfo-<env>`.
async fn deployed_version(client: &kube::Client, env: &str) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &format!("podinfo-{env}"));
    api.get_opt("podinfo")
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data)
        .and_then(|data| data.get("chartVersion").cloned())
}

fn helm_releases(client: &kube::Client, env: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("helm.toolkit.fluxcd.io", "v2", "HelmRelease");
    Api::namespaced_with(
        client.clone(),
        &format!("podinfo-{env}"),
        &ApiResource::from_gvk_with_plural(&gvk, "helmreleases"),
    )
}

/// The HelmRelease's Ready condition: (status, reason, message).
async fn release_ready(client: &kube::Client, env: &str) -> Option<(String, String, String)> {
    let release = helm_releases(client, env).get_opt("podinfo").await.ok()??;
    let conditions = release.data["status"]["conditions"].as_array()?.clone();
    let ready = conditions.iter().find(|c| c["type"] == "Ready")?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Some((
        text(&ready["status"]),
        text(&ready["reason"]),
        text(&ready["message"]),
    ))
}

/// Promotions into `env` of revision `revision`.
async fn promotions(client: &kube::Client, env: &str, revision: &str) -> Vec<Promotion> {
    let api: Api<Promotion> = Api::namespaced(client.clone(), "flux-system");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.spec.target_environment == env && p.spec.revision == revision)
        .collect()
}

/// The open pull request whose head branch promotes into `env`.
async fn open_pull(gitea: &Gitea, env: &str) -> Option<Value> {
    gitea
        .pulls(REPO, "open")
        .await
        .unwrap()
        .into_iter()
        .find(|p| {
            p["head"]["ref"]
                .as_str()
                .is_some_and(|r| r.ends_with(&format!("-{env}")))
        })
}

/// Merges pull request `number` through Gitea's API, as a person pressing the button
/// (retried while Gitea is still checking mergeability).
async fn merge(gitea: &Gitea, number: u64) {
    let client = reqwest::Client::new();
    wait(&format!("merging pull request #{number}"), STEP, || async {
        let response = client
            .post(format!(
                "{}/api/v1/repos/{ADMIN_USER}/{REPO}/pulls/{number}/merge",
                gitea.base_url
            ))
            .header("Authorization", format!("token {}", gitea.token))
            .json(&serde_json::json!({"Do": "merge", "delete_branch_after_merge": true}))
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())
    })
    .await;
}

/// Everything the loop runs on.
struct World {
    // Dropped in this order: the controller, Flux, then the cluster and Gitea.
    controller: Controller,
    flux: FluxControllers,
    cluster: TestCluster,
    gitea: Gitea,
    clone: Clone,
    work: tempfile::TempDir,
    hops: Hops,
}

impl World {
    fn client(&self) -> kube::Client {
        self.cluster.client()
    }

    /// Publishes chart 0.2.0 and bumps dev to it in Git (`message`: YAML of the value).
    async fn bump_dev(&mut self, message: &str) {
        publish_chart(&self.gitea, self.work.path(), "0.2.0").await;
        self.clone.commit(&self.gitea, "dev: podinfo 0.2.0", |dir| {
            std::fs::write(
                dir.join("apps/dev/podinfo.yaml"),
                helm_release("dev", "0.2.0", message),
            )
            .unwrap();
        });
        self.hops.hop("chart 0.2.0 published, dev bumped in Git");
    }

    /// Waits until the controller's log has a line containing all of `parts`.
    async fn controller_logged(&self, what: &str, parts: &[&str]) -> String {
        wait(what, STEP, || async {
            let logs = self.controller.logs();
            // The test never stops it gracefully: a signal from elsewhere did.
            assert!(
                !logs.contains("shutting down"),
                "pipeline-controller was stopped by a signal from outside the test"
            );
            logs.lines()
                .find(|line| parts.iter().all(|p| line.contains(p)))
                .map(str::to_string)
        })
        .await
    }

    async fn all_promotions(&self) -> Vec<Promotion> {
        let api: Api<Promotion> = Api::namespaced(self.client(), "flux-system");
        api.list(&ListParams::default()).await.unwrap().items
    }
}

/// How the Provider and Alert get into the target namespaces.
#[derive(Clone, Copy)]
enum Wiring {
    /// `flux-config`'s output, committed and applied by Flux; the leaf Secrets hold
    /// `token` (with a trailing newline).
    GitOps { token: &'static str },
    /// `serve --flux-wiring direct`: the controller applies them and copies the key.
    Direct,
}

fn providers(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("notification.toolkit.fluxcd.io", "v1beta3", "Provider");
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "providers"),
    )
}

/// Waits (bounded by [`STEP`]) until an Alert exists in `namespace`; `what` names who
/// should have applied it.
async fn wait_alert(client: &kube::Client, namespace: &str, what: &str) {
    wait(&format!("{what} in {namespace}"), STEP, || async {
        let list = alerts(client, namespace)
            .list(&ListParams::default())
            .await
            .ok()?;
        (!list.items.is_empty()).then_some(())
    })
    .await;
}

fn alerts(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("notification.toolkit.fluxcd.io", "v1beta3", "Alert");
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "alerts"),
    )
}

/// One test at a time: each runs a whole fleet (API server, Flux's four controllers,
/// Gitea, pipeline-controller) on the machine's few cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the cluster, Flux, Gitea and pipeline-controller (`serve` with `args`);
/// publishes chart 0.1.0, deploys it to every environment, then wires the Alerts as
/// `wiring` says.
async fn world(wiring: Wiring, args: &[&str]) -> World {
    let mut hops = Hops::new();
    let work = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start_named("flux-e2e").await.unwrap();
    cluster.install_crds().await.unwrap();
    cluster.install_flux_crds().await.unwrap();
    for env in ENVIRONMENTS {
        cluster
            .ensure_namespace(&format!("podinfo-{env}"))
            .await
            .unwrap();
    }
    hops.hop("cluster up, CRDs installed");
    let flux = FluxControllers::start(&cluster).await.unwrap();
    hops.hop(&format!(
        "Flux's four controllers ready (start took {:.1}s)",
        flux.started_in().as_secs_f64()
    ));
    let gitea = Gitea::start().await.unwrap();
    publish_chart(&gitea, work.path(), "0.1.0").await;
    let files: Vec<(String, String)> = ENVIRONMENTS
        .iter()
        .map(|env| {
            (
                format!("apps/{env}/podinfo.yaml"),
                helm_release(env, "0.1.0", &format!("\"hello from {env}\"")),
            )
        })
        .collect();
    let repo_url = gitea.create_repo(REPO, &files).await.unwrap();
    let clone = Clone::new(&gitea, work.path());
    hops.hop("Gitea up, chart 0.1.0 published, fleet repository created");

    cluster.apply_yaml(&flux_sources(&gitea)).await.unwrap();
    let client = cluster.client();
    for env in ENVIRONMENTS {
        wait(&format!("0.1.0 deployed in {env}"), STEP, || async {
            (deployed_version(&client, env).await.as_deref() == Some("0.1.0")).then_some(())
        })
        .await;
        // Ready is written after helm-controller has sent its install event, so no
        // event of 0.1.0 is still on its way when the Alerts appear.
        wait(&format!("{env}'s HelmRelease Ready"), STEP, || async {
            release_ready(&client, env)
                .await
                .filter(|(status, _, _)| status == "True")
        })
        .await;
    }
    hops.hop("Flux deployed chart 0.1.0 to dev, staging and prod");

    cluster.apply_yaml(&pipeline_yaml(&repo_url)).await.unwrap();
    cluster
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: git-credentials\n  namespace: flux-system\nstringData:\n  username: {ADMIN_USER}\n  password: {ADMIN_PASSWORD}\n  token: {}\n",
            gitea.token
        ))
        .await
        .unwrap();
    // Every hop carried by Flux's events alone: the controller's own watch is off.
    let mut serve_args = vec!["--lease-namespace", "default", "--identity", "flux-e2e"];
    serve_args.extend_from_slice(args);
    // pipeline_http at debug: refusals (a wrong signature) are logged at debug only.
    let controller = Controller::spawn(
        cluster.kubeconfig_path(),
        &serve_args,
        &[(
            "RUST_LOG",
            "info,kube=warn,pipeline_kube=debug,pipeline_http=debug",
        )],
    );
    let public_url = format!("http://{}", controller.address);
    hops.hop(&format!("pipeline-controller serving at {public_url}"));

    match wiring {
        Wiring::GitOps { token } => {
            // The wiring: flux-config's output, committed to the fleet repository and applied by
            // Flux from there; only the Secrets holding the key are made by hand, as documented.
            let wiring = flux_config(cluster.kubeconfig_path(), &public_url, &clone.dir);
            let mut secrets = Vec::new();
            for env in ["dev", "staging"] {
                let folder = wiring.join(format!("clusters/management/podinfo-{env}"));
                let provider = std::fs::read_dir(&folder)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| p.to_string_lossy().ends_with("-provider.yaml"))
                    .unwrap_or_else(|| panic!("no Provider in {}", folder.display()));
                let provider: Value =
                    serde_saphyr::from_str(&std::fs::read_to_string(&provider).unwrap()).unwrap();
                assert_eq!(
                    provider["spec"]["address"],
                    format!("{public_url}/pipelines/promotions/flux-system/podinfo/{env}")
                );
                secrets.push((
                    format!("podinfo-{env}"),
                    provider["spec"]["secretRef"]["name"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                ));
            }
            assert!(
                !wiring.join("clusters/management/podinfo-prod").exists(),
                "prod has no next environment: no Alert"
            );
            let secret_api = |ns: &str| Api::<Secret>::namespaced(client.clone(), ns);
            for (namespace, name) in &secrets {
                cluster
                    .apply_yaml(&format!(
                        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\nstringData:\n  token: |\n    {token}\n"
                    ))
                    .await
                    .unwrap();
                assert!(secret_api(namespace).get_opt(name).await.unwrap().is_some());
            }
            clone.commit(&gitea, "pipeline wiring from flux-config", |_| {});
            // The management Kustomization flux-config writes retries a failed apply only
            // after a minute: let source-controller fetch the commit holding its folder first.
            wait_fetched(&gitea, &clone, &client).await;
            let management =
                std::fs::read_to_string(wiring.join("management/management.yaml")).unwrap();
            cluster.apply_yaml(&management).await.unwrap();
            for (namespace, _) in &secrets {
                wait_alert(&client, namespace, "Flux applying the Alert").await;
            }
            hops.hop("flux-config output committed; Flux applied the Providers and Alerts");
        }
        Wiring::Direct => {
            // The public URL is derived from the controller's Service: a LoadBalancer
            // whose address a cloud would fill in, here loopback and the controller's port.
            let port = controller.address.port();
            cluster
                .apply_yaml(&format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: pipeline-controller\n  namespace: default\nspec:\n  type: LoadBalancer\n  ports:\n    - name: http\n      port: {port}\n"
                ))
                .await
                .unwrap();
            Api::<Service>::namespaced(client.clone(), "default")
                .patch_status(
                    "pipeline-controller",
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}}),
                    ),
                )
                .await
                .unwrap();
            for env in ["dev", "staging"] {
                let namespace = format!("podinfo-{env}");
                let provider = wait(
                    &format!("pipeline-controller applying the Provider in {namespace}"),
                    STEP,
                    || async {
                        providers(&client, &namespace)
                            .list(&ListParams::default())
                            .await
                            .ok()?
                            .items
                            .pop()
                    },
                )
                .await;
                assert_eq!(
                    provider.data["spec"]["address"],
                    format!("{public_url}/pipelines/promotions/flux-system/podinfo/{env}")
                );
                let secret_name = provider.data["spec"]["secretRef"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let secret = wait(
                    &format!("pipeline-controller copying the key into {namespace}"),
                    STEP,
                    || async {
                        Api::<Secret>::namespaced(client.clone(), &namespace)
                            .get_opt(&secret_name)
                            .await
                            .ok()?
                    },
                )
                .await;
                let token = secret.data.unwrap_or_default().remove("token").unwrap();
                assert_eq!(token.0, HMAC_KEY.as_bytes());
                wait_alert(
                    &client,
                    &namespace,
                    "pipeline-controller applying the Alert",
                )
                .await;
            }
            assert!(
                providers(&client, "podinfo-prod")
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .is_empty(),
                "prod has no next environment: no Provider"
            );
            hops.hop("--flux-wiring direct: pipeline-controller applied the Providers, Alerts and key Secrets");
        }
    }
    World {
        controller,
        flux,
        cluster,
        gitea,
        clone,
        work,
        hops,
    }
}

/// Runs `flux-config` with `kubeconfig` into `<clone>/pipelines-wiring` (the fleet
/// repository as the source of its Kustomizations); returns that folder.
fn flux_config(kubeconfig: &Path, public_url: &str, clone: &Path) -> PathBuf {
    let wiring = clone.join("pipelines-wiring");
    let (code, stdout, stderr) = run_cli(
        kubeconfig,
        &[
            "flux-config",
            "--public-url",
            public_url,
            "--output-dir",
            wiring.to_str().unwrap(),
            "--source",
            "flux-system/fleet",
        ],
    );
    assert_eq!(code, 0, "flux-config: {stdout}{stderr}");
    wiring
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_chart_version_goes_from_dev_to_prod_through_flux_and_pull_requests() {
    let _serial = SERIAL.lock().await;
    // Every hop carried by Flux's events alone: the controller's own watch is off.
    let mut w = world(
        Wiring::GitOps { token: HMAC_KEY },
        &["--no-deployment-watch"],
    )
    .await;
    let client = w.client();
    w.bump_dev("\"hello from dev\"").await;

    wait("helm-controller upgrading dev to 0.2.0", STEP, || async {
        (deployed_version(&client, "dev").await.as_deref() == Some("0.2.0")).then_some(())
    })
    .await;
    w.hops.hop("Flux upgraded dev to 0.2.0");

    let staging = wait("the promotion into staging", STEP, || async {
        promotions(&client, "staging", "0.2.0").await.pop()
    })
    .await;
    w.hops
        .hop("dev's event reached pipeline-controller: promotion into staging recorded");
    assert_eq!(staging.spec.trigger.source, "webhook");
    assert_eq!(staging.spec.trigger.reporting_controller, "helm-controller");
    assert_eq!(
        staging.spec.trigger.object,
        "HelmRelease/podinfo-dev/podinfo"
    );
    // What flux-config's Alert adds (eventMetadata) arrived signed and was kept.
    let metadata = &staging.spec.trigger.metadata;
    assert_eq!(
        metadata.get("pipeline").map(String::as_str),
        Some("flux-system/podinfo"),
        "{metadata:?}"
    );
    assert_eq!(
        metadata.get("environment").map(String::as_str),
        Some("dev"),
        "{metadata:?}"
    );
    assert!(
        metadata.get("summary").is_some_and(|s| s.contains("dev")),
        "{metadata:?}"
    );

    let pull = wait("the pull request to staging", STEP, || async {
        open_pull(&w.gitea, "staging").await
    })
    .await;
    let number = pull["number"].as_u64().unwrap();
    let diff = w.gitea.pull_diff(REPO, number).await.unwrap();
    assert!(diff.contains("apps/staging/podinfo.yaml"), "{diff}");
    assert!(diff.contains("+      version: \"0.2.0\""), "{diff}");
    w.hops
        .hop(&format!("pull request #{number} to staging opened"));
    merge(&w.gitea, number).await;
    w.hops.hop(&format!("pull request #{number} merged"));

    wait(
        "helm-controller upgrading staging to 0.2.0",
        STEP,
        || async {
            (deployed_version(&client, "staging").await.as_deref() == Some("0.2.0")).then_some(())
        },
    )
    .await;
    w.hops.hop("Flux upgraded staging to 0.2.0");

    let prod = wait(
        "the promotion into prod, waiting for approval",
        STEP,
        || async {
            promotions(&client, "prod", "0.2.0")
                .await
                .pop()
                .filter(|p| phase(p) == "WaitingApproval")
        },
    )
    .await;
    w.hops
        .hop("staging's event reached pipeline-controller: prod waits for approval");
    assert!(prod.spec.manual);
    assert!(
        open_pull(&w.gitea, "prod").await.is_none(),
        "no pull request to prod before the approval"
    );
    assert_eq!(
        deployed_version(&client, "prod").await.as_deref(),
        Some("0.1.0")
    );

    let (code, stdout, stderr) = run_cli(
        w.cluster.kubeconfig_path(),
        &["approve", "flux-system/podinfo", "prod", "0.2.0"],
    );
    assert_eq!(code, 0, "approve: {stdout}{stderr}");
    w.hops.hop("`pipeline-controller approve` prod 0.2.0");

    let pull = wait("the pull request to prod", STEP, || async {
        open_pull(&w.gitea, "prod").await
    })
    .await;
    let number = pull["number"].as_u64().unwrap();
    let diff = w.gitea.pull_diff(REPO, number).await.unwrap();
    assert!(diff.contains("apps/prod/podinfo.yaml"), "{diff}");
    w.hops
        .hop(&format!("pull request #{number} to prod opened"));
    merge(&w.gitea, number).await;
    w.hops.hop(&format!("pull request #{number} merged"));

    wait("helm-controller upgrading prod to 0.2.0", STEP, || async {
        (deployed_version(&client, "prod").await.as_deref() == Some("0.2.0")).then_some(())
    })
    .await;
    w.hops
        .hop("Flux upgraded prod to 0.2.0: the loop is closed");
    // helm-controller writes the HelmRelease's status after the release itself.
    wait("prod's HelmRelease Ready", STEP, || async {
        release_ready(&client, "prod")
            .await
            .filter(|(status, _, _)| status == "True")
    })
    .await;
    let api: Api<Promotion> = Api::namespaced(client.clone(), "flux-system");
    for p in [&staging, &prod] {
        let name = p.metadata.name.as_deref().unwrap();
        let done = wait(&format!("{name} Succeeded"), STEP, || async {
            api.get_opt(name)
                .await
                .ok()
                .flatten()
                .filter(|p| phase(p) == "Succeeded")
        })
        .await;
        assert_eq!(done.spec.revision, "0.2.0");
    }
    // Nothing else was promoted: no record of 0.1.0 (the initial installs happened before
    // the Alerts existed) and none into dev.
    let records = w.all_promotions().await;
    assert_eq!(records.len(), 2, "{records:#?}");
    eprintln!("[flux-e2e] hops:\n{}", w.hops.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_in_the_leaf_secret_is_refused_and_nothing_is_promoted() {
    let _serial = SERIAL.lock().await;
    let mut w = world(
        Wiring::GitOps {
            token: "not-the-pipeline-key",
        },
        &["--no-deployment-watch"],
    )
    .await;
    let client = w.client();
    w.bump_dev("\"hello from dev\"").await;
    wait("helm-controller upgrading dev to 0.2.0", STEP, || async {
        (deployed_version(&client, "dev").await.as_deref() == Some("0.2.0")).then_some(())
    })
    .await;
    w.hops.hop("Flux upgraded dev to 0.2.0");
    // dev's event arrived, signed with the wrong key: we answered 401 ...
    let refused = w
        .controller_logged(
            "the controller refusing dev's event",
            &["promotion event refused", "status=401"],
        )
        .await;
    w.hops.hop("dev's event refused with 401");
    assert!(
        refused.contains("dev") && !refused.contains("not-the-pipeline-key"),
        "{refused}"
    );
    // ... and notification-controller saw the 401.
    wait(
        "notification-controller reporting the 401",
        STEP,
        || async {
            w.flux
                .log(FluxController::Notification)
                .lines()
                .any(|l| l.contains("failed to send notification") && l.contains("401"))
                .then_some(())
        },
    )
    .await;
    let records = w.all_promotions().await;
    assert!(records.is_empty(), "{records:#?}");
    assert!(w.gitea.pulls(REPO, "all").await.unwrap().is_empty());
    assert_eq!(
        deployed_version(&client, "staging").await.as_deref(),
        Some("0.1.0")
    );
    eprintln!("[flux-e2e] hops:\n{}", w.hops.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_promotes_nothing() {
    let _serial = SERIAL.lock().await;
    let mut w = world(
        Wiring::GitOps { token: HMAC_KEY },
        &["--no-deployment-watch"],
    )
    .await;
    let client = w.client();
    // The chart's schema wants a string: helm refuses the upgrade.
    w.bump_dev("42").await;
    let (_, reason, message) = wait("dev's upgrade failing", STEP, || async {
        release_ready(&client, "dev")
            .await
            .filter(|(status, _, message)| status == "False" && message.contains("0.2.0"))
    })
    .await;
    w.hops
        .hop(&format!("helm-controller: dev not upgraded ({reason})"));
    // The failure's event reached us and was ignored: it is not a deployment.
    let ignored = w
        .controller_logged(
            "the controller ignoring dev's failure event",
            &["event ignored", "not_info_severity"],
        )
        .await;
    w.hops
        .hop("dev's failure event reached pipeline-controller and was ignored");
    assert!(
        ignored.contains("flux-system/podinfo") && ignored.contains("dev"),
        "{ignored}"
    );
    assert_eq!(
        deployed_version(&client, "dev").await.as_deref(),
        Some("0.1.0"),
        "{message}"
    );
    let records = w.all_promotions().await;
    assert!(records.is_empty(), "{records:#?}");
    assert!(w.gitea.pulls(REPO, "all").await.unwrap().is_empty());
    eprintln!("[flux-e2e] hops:\n{}", w.hops.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_notification_controller_down_the_deployment_watch_still_promotes() {
    let _serial = SERIAL.lock().await;
    // The controller's own watch on (the default).
    let mut w = world(Wiring::GitOps { token: HMAC_KEY }, &[]).await;
    let client = w.client();
    w.flux.stop(FluxController::Notification).await;
    w.hops.hop("notification-controller stopped");
    w.bump_dev("\"hello from dev\"").await;
    wait("helm-controller upgrading dev to 0.2.0", STEP, || async {
        (deployed_version(&client, "dev").await.as_deref() == Some("0.2.0")).then_some(())
    })
    .await;
    w.hops
        .hop("Flux upgraded dev to 0.2.0 (its event has nowhere to go)");
    let staging = wait("the promotion into staging", STEP, || async {
        promotions(&client, "staging", "0.2.0").await.pop()
    })
    .await;
    w.hops
        .hop("the deployment watch recorded the promotion into staging");
    assert_eq!(staging.spec.trigger.source, "observed");
    assert_eq!(
        staging.spec.trigger.object,
        "HelmRelease/podinfo-dev/podinfo"
    );
    let pull = wait("the pull request to staging", STEP, || async {
        open_pull(&w.gitea, "staging").await
    })
    .await;
    let number = pull["number"].as_u64().unwrap();
    let diff = w.gitea.pull_diff(REPO, number).await.unwrap();
    assert!(diff.contains("+      version: \"0.2.0\""), "{diff}");
    w.hops
        .hop(&format!("pull request #{number} to staging opened"));
    assert!(
        !w.controller.logs().contains("promotion event refused"),
        "{}",
        w.controller.logs()
    );
    eprintln!("[flux-e2e] hops:\n{}", w.hops.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_wiring_reaches_us_through_flux_and_puts_a_deleted_alert_back() {
    let _serial = SERIAL.lock().await;
    let mut w = world(
        Wiring::Direct,
        &[
            "--no-deployment-watch",
            "--flux-wiring",
            "direct",
            "--flux-wiring-interval",
            "1s",
            "--service-namespace",
            "default",
        ],
    )
    .await;
    let client = w.client();
    let dev_alerts = alerts(&client, "podinfo-dev");
    let before = dev_alerts.list(&ListParams::default()).await.unwrap().items;
    let name = before[0].metadata.name.clone().unwrap();
    let uid = before[0].metadata.uid.clone();
    dev_alerts.delete(&name, &Default::default()).await.unwrap();
    wait("the deleted Alert put back", STEP, || async {
        dev_alerts
            .get_opt(&name)
            .await
            .ok()?
            .filter(|a| a.metadata.uid != uid)
    })
    .await;
    w.hops
        .hop("dev's Alert deleted by hand and put back by pipeline-controller");

    w.bump_dev("\"hello from dev\"").await;
    wait("helm-controller upgrading dev to 0.2.0", STEP, || async {
        (deployed_version(&client, "dev").await.as_deref() == Some("0.2.0")).then_some(())
    })
    .await;
    w.hops.hop("Flux upgraded dev to 0.2.0");
    let staging = wait("the promotion into staging", STEP, || async {
        promotions(&client, "staging", "0.2.0").await.pop()
    })
    .await;
    w.hops
        .hop("dev's event reached pipeline-controller through the applied Provider");
    assert_eq!(staging.spec.trigger.source, "webhook");
    assert_eq!(staging.spec.trigger.reporting_controller, "helm-controller");
    let pull = wait("the pull request to staging", STEP, || async {
        open_pull(&w.gitea, "staging").await
    })
    .await;
    w.hops.hop(&format!(
        "pull request #{} to staging opened",
        pull["number"].as_u64().unwrap()
    ));
    eprintln!("[flux-e2e] hops:\n{}", w.hops.table());
}

/// The pipeline of the leaf-cluster test: every target in cluster `leaf` (a GitopsCluster
/// in the management cluster).
fn leaf_pipeline_yaml(gitea_repo_url: &str) -> String {
    pipeline_yaml(gitea_repo_url).replace(
        "        - namespace: podinfo-",
        "        - clusterRef:\n            kind: GitopsCluster\n            name: leaf\n            namespace: flux-system\n          namespace: podinfo-",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_cluster_gets_its_wiring_from_the_management_cluster_and_promotes() {
    let _serial = SERIAL.lock().await;
    let mut hops = Hops::new();
    let work = tempfile::tempdir().unwrap();
    let management = TestCluster::start_named("management").await.unwrap();
    management.install_crds().await.unwrap();
    management.install_flux_crds().await.unwrap();
    management.install_gitops_cluster_crd().await.unwrap();
    let leaf = TestCluster::start_named("leaf").await.unwrap();
    leaf.install_flux_crds().await.unwrap();
    for env in ENVIRONMENTS {
        leaf.ensure_namespace(&format!("podinfo-{env}"))
            .await
            .unwrap();
    }
    hops.hop("management and leaf clusters up");
    // The management cluster's Flux applies the fleet repository (remotely, to the leaf);
    // the leaf's own Flux installs the charts and sends the events.
    let management_flux = FluxControllers::start(&management).await.unwrap();
    let leaf_flux = FluxControllers::start(&leaf).await.unwrap();
    hops.hop("Flux running in both clusters");

    let gitea = Gitea::start().await.unwrap();
    publish_chart(&gitea, work.path(), "0.1.0").await;
    let files: Vec<(String, String)> = ENVIRONMENTS
        .iter()
        .map(|env| {
            (
                format!("apps/{env}/podinfo.yaml"),
                helm_release(env, "0.1.0", &format!("\"hello from {env}\"")),
            )
        })
        .collect();
    let repo_url = gitea.create_repo(REPO, &files).await.unwrap();
    let clone = Clone::new(&gitea, work.path());
    hops.hop("Gitea up, chart 0.1.0 published, fleet repository created");

    // The leaf's kubeconfig, as a GitopsCluster names it.
    management
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: leaf-kubeconfig\n  namespace: flux-system\nstringData:\n  value: |\n{}\n---\napiVersion: gitops.weave.works/v1alpha1\nkind: GitopsCluster\nmetadata:\n  name: leaf\n  namespace: flux-system\nspec:\n  secretRef:\n    name: leaf-kubeconfig\n",
            leaf.kubeconfig_yaml()
                .unwrap()
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        ))
        .await
        .unwrap();
    // The HelmRepository lives where the HelmReleases are reconciled: in the leaf.
    let sources = flux_sources(&gitea);
    let (repository_part, kustomizations) =
        sources.split_once("---\napiVersion: kustomize").unwrap();
    let (secret_and_git, helm_repository) = repository_part
        .rsplit_once("---\napiVersion: source.toolkit.fluxcd.io/v1\nkind: HelmRepository")
        .unwrap();
    leaf.apply_yaml(&format!(
        "apiVersion: source.toolkit.fluxcd.io/v1\nkind: HelmRepository{helm_repository}"
    ))
    .await
    .unwrap();
    management.apply_yaml(secret_and_git).await.unwrap();
    let remote = format!("---\napiVersion: kustomize{kustomizations}").replace(
        "  sourceRef:\n",
        "  kubeConfig:\n    secretRef:\n      name: leaf-kubeconfig\n  sourceRef:\n",
    );
    management.apply_yaml(&remote).await.unwrap();
    let leaf_client = leaf.client();
    for env in ENVIRONMENTS {
        wait(
            &format!("0.1.0 deployed in the leaf's {env}"),
            STEP,
            || async {
                (deployed_version(&leaf_client, env).await.as_deref() == Some("0.1.0"))
                    .then_some(())
            },
        )
        .await;
        wait(
            &format!("the leaf's {env} HelmRelease Ready"),
            STEP,
            || async {
                release_ready(&leaf_client, env)
                    .await
                    .filter(|(status, _, _)| status == "True")
            },
        )
        .await;
    }
    hops.hop(
        "the management cluster's Flux deployed 0.1.0 to the leaf, the leaf's Flux installed it",
    );

    management
        .apply_yaml(&leaf_pipeline_yaml(&repo_url))
        .await
        .unwrap();
    management
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: git-credentials\n  namespace: flux-system\nstringData:\n  username: {ADMIN_USER}\n  password: {ADMIN_PASSWORD}\n  token: {}\n",
            gitea.token
        ))
        .await
        .unwrap();
    let controller = Controller::spawn(
        management.kubeconfig_path(),
        &[
            "--lease-namespace",
            "default",
            "--identity",
            "flux-e2e-leaf",
            "--no-deployment-watch",
        ],
        &[],
    );
    let public_url = format!("http://{}", controller.address);
    hops.hop(&format!("pipeline-controller serving at {public_url}"));

    let wiring = flux_config(management.kubeconfig_path(), &public_url, &clone.dir);
    let kustomization =
        std::fs::read_to_string(wiring.join("management/flux-system-leaf.yaml")).unwrap();
    assert!(
        kustomization.contains("leaf-kubeconfig"),
        "the leaf's folder is applied through its kubeconfig Secret: {kustomization}"
    );
    for env in ["dev", "staging"] {
        let namespace = format!("podinfo-{env}");
        let folder = wiring.join(format!("clusters/flux-system-leaf/{namespace}"));
        let provider = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with("-provider.yaml"))
            .unwrap_or_else(|| panic!("no Provider in {}", folder.display()));
        let provider: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(&provider).unwrap()).unwrap();
        let secret = provider["spec"]["secretRef"]["name"].as_str().unwrap();
        leaf.apply_yaml(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {secret}\n  namespace: {namespace}\nstringData:\n  token: {HMAC_KEY}\n"
        ))
        .await
        .unwrap();
    }
    clone.commit(&gitea, "pipeline wiring from flux-config", |_| {});
    wait_fetched(&gitea, &clone, &management.client()).await;
    management.apply_yaml(&kustomization).await.unwrap();
    for env in ["dev", "staging"] {
        let namespace = format!("podinfo-{env}");
        wait_alert(
            &leaf_client,
            &namespace,
            "the management cluster's Flux applying the Alert in the leaf",
        )
        .await;
    }
    assert!(
        alerts(&management.client(), "podinfo-dev")
            .list(&ListParams::default())
            .await
            .map(|l| l.items.is_empty())
            .unwrap_or(true),
        "nothing of the leaf's wiring lands in the management cluster"
    );
    hops.hop("flux-config output committed; the management cluster's Flux applied the Providers and Alerts in the leaf");

    publish_chart(&gitea, work.path(), "0.2.0").await;
    clone.commit(&gitea, "dev: podinfo 0.2.0", |dir| {
        std::fs::write(
            dir.join("apps/dev/podinfo.yaml"),
            helm_release("dev", "0.2.0", "\"hello from dev\""),
        )
        .unwrap();
    });
    hops.hop("chart 0.2.0 published, dev bumped in Git");
    wait(
        "the leaf's helm-controller upgrading dev to 0.2.0",
        STEP,
        || async {
            (deployed_version(&leaf_client, "dev").await.as_deref() == Some("0.2.0")).then_some(())
        },
    )
    .await;
    hops.hop("Flux upgraded the leaf's dev to 0.2.0");
    let management_client = management.client();
    let staging = wait("the promotion into staging", STEP, || async {
        promotions(&management_client, "staging", "0.2.0")
            .await
            .pop()
    })
    .await;
    hops.hop("the leaf's event reached pipeline-controller: promotion into staging recorded");
    assert_eq!(staging.spec.trigger.source, "webhook");
    assert_eq!(staging.spec.trigger.reporting_controller, "helm-controller");
    let pull = wait("the pull request to staging", STEP, || async {
        open_pull(&gitea, "staging").await
    })
    .await;
    let number = pull["number"].as_u64().unwrap();
    merge(&gitea, number).await;
    hops.hop(&format!(
        "pull request #{number} to staging opened and merged"
    ));
    wait(
        "the leaf's helm-controller upgrading staging to 0.2.0",
        STEP,
        || async {
            (deployed_version(&leaf_client, "staging").await.as_deref() == Some("0.2.0"))
                .then_some(())
        },
    )
    .await;
    hops.hop("Flux upgraded the leaf's staging to 0.2.0");
    let prod = wait(
        "the promotion into prod, waiting for approval",
        STEP,
        || async {
            promotions(&management_client, "prod", "0.2.0")
                .await
                .pop()
                .filter(|p| phase(p) == "WaitingApproval")
        },
    )
    .await;
    assert!(prod.spec.manual);
    hops.hop("the leaf's staging event reached pipeline-controller: prod waits for approval");
    eprintln!("[flux-e2e] hops:\n{}", hops.table());
    drop((controller, management_flux, leaf_flux));
}
