//! Kubernetes-mode helpers shared by the tests that run the real binary against a real
//! kube-apiserver (pipeline-testenv).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kube::{Api, Client};
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_crds::Promotion;
use pipeline_testenv::TestCluster;

use super::{BIN, KEY, Service, client, event};

/// A `serve` process in Kubernetes mode; SIGKILLed when dropped.
pub struct Controller(Service);

impl std::ops::Deref for Controller {
    type Target = Service;

    fn deref(&self) -> &Service {
        &self.0
    }
}

impl std::ops::DerefMut for Controller {
    fn deref_mut(&mut self) -> &mut Service {
        &mut self.0
    }
}

impl Controller {
    /// Runs with the cluster's admin kubeconfig, the Lease in `default`.
    pub fn start(cluster: &TestCluster, identity: &str, extra: &[&str]) -> Controller {
        let mut args = vec!["--lease-namespace", "default", "--identity", identity];
        args.extend_from_slice(extra);
        Controller::spawn(cluster.kubeconfig_path(), &args, &[])
    }

    /// Runs `serve --listen 127.0.0.1:0 --internal-listen 127.0.0.1:0` (short Lease timings, fast retries) with
    /// `kubeconfig`, then `args`, with `envs` added to the environment; waits until it
    /// listens (60 s at most).
    pub fn spawn(kubeconfig: &Path, args: &[&str], envs: &[(&str, &str)]) -> Controller {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--internal-listen", "127.0.0.1:0"])
            .args(["--lease-duration", "3s", "--lease-renew", "1s"])
            .args(["--retry-base", "200ms"])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("PIPELINE_CONTROLLER_MANIFESTS")
            .env("RUST_LOG", "info,kube=warn,pipeline_kube=debug")
            .envs(envs.iter().copied());
        Controller(Service::spawn(command, Duration::from_secs(60)))
    }

    pub fn is_leader(&self) -> bool {
        self.logs().contains("acquired leadership")
    }
}

pub const QUICKSTART_PIPELINE: &str = include_str!("../../../../examples/quickstart/pipeline.yaml");
pub const QUICKSTART_SECRET: &str = include_str!("../../../../examples/quickstart/secret.yaml");

/// Applies the quickstart Pipeline `flux-system/podinfo` and its HMAC Secret (creating
/// the namespace).
pub async fn apply_quickstart(cluster: &TestCluster) {
    cluster.ensure_namespace("flux-system").await.unwrap();
    cluster.apply_yaml(QUICKSTART_SECRET).await.unwrap();
    cluster.apply_yaml(QUICKSTART_PIPELINE).await.unwrap();
}

/// A cluster with the CRDs and the quickstart pipeline.
pub async fn cluster() -> TestCluster {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    apply_quickstart(&cluster).await;
    cluster
}

/// POSTs a signed event from `environment` of `flux-system/podinfo`.
pub async fn post(controller: &Controller, environment: &str, body: Vec<u8>) -> reqwest::Response {
    let signature = sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &body);
    client()
        .post(controller.url(&format!(
            "/pipelines/promotions/flux-system/podinfo/{environment}"
        )))
        .header("content-type", "application/json")
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Posts until the controller's caches have synced (a fresh process answers 503 first).
pub async fn post_ready(
    controller: &Controller,
    environment: &str,
    revision: &str,
    namespace: &str,
) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = post(controller, environment, event(namespace, revision)).await;
        if response.status() != 503 || Instant::now() > deadline {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls Promotion `flux-system/{name}` until `done` holds (45 s at most).
pub async fn wait_promotion(
    client: &Client,
    name: &str,
    what: &str,
    done: impl Fn(&Promotion) -> bool,
) -> Promotion {
    let api: Api<Promotion> = Api::namespaced(client.clone(), "flux-system");
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let current = api.get_opt(name).await.unwrap();
        if let Some(p) = &current
            && done(p)
        {
            return p.clone();
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last: {current:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn phase(p: &Promotion) -> &'static str {
    p.status
        .as_ref()
        .and_then(|s| s.phase)
        .map_or("", |ph| ph.as_str())
}

/// Runs a client command of the binary with `kubeconfig` (Kubernetes mode).
pub fn run_cli(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("PIPELINE_CONTROLLER_SERVER")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `done` was approved by `user`, then ran to `Succeeded`.
pub fn assert_approved_then_succeeded(done: &Promotion, user: &str) {
    let by = done.spec.approval.as_ref().and_then(|a| a.by.as_deref());
    assert_eq!(by, Some(user));
    let phases: Vec<&str> = done
        .status
        .as_ref()
        .unwrap()
        .history
        .iter()
        .map(|h| h.phase.as_str())
        .collect();
    assert_eq!(
        phases,
        ["WaitingApproval", "Pending", "Running", "Succeeded"]
    );
}

/// The id of the promotion a webhook answer recorded; the answer must be 202.
pub async fn recorded_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202);
    let record: serde_json::Value = response.json().await.unwrap();
    record["id"].as_str().unwrap().to_string()
}
