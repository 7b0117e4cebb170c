//! Drives the real `pipeline-controller` binary over loopback.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline_core::signature::{HmacAlgorithm, sign};
use serde_json::{Value, json};

pub mod k8s;
pub mod raw;

pub const BIN: &str = env!("CARGO_BIN_EXE_pipeline-controller");
pub const KEY: &str = "quickstart-hmac-key-0123456789";

/// A running service; killed (SIGKILL) when dropped.
pub struct Service {
    pub child: Child,
    /// The public listener: webhook and approvals.
    pub address: SocketAddr,
    /// The internal listener: API, dashboard, metrics, health.
    pub internal: SocketAddr,
    pub logs: Arc<Mutex<String>>,
}

impl Service {
    /// Embedded mode on `manifests`, state in `state`, listening on a free port.
    pub fn start(manifests: &Path, state: &Path, extra: &[&str]) -> Service {
        Service::spawn(
            serve_command(manifests, state, extra),
            Duration::from_secs(30),
        )
    }

    /// Spawns `command` (a `serve`), collects its stderr, and waits (at most `limit`)
    /// until it logs the address it listens on.
    pub fn spawn(mut command: Command, limit: Duration) -> Service {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let (mut public, mut internal, mut sent) = (None, None, false);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let field = |prefix: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(prefix))
                        .map(|a| a.parse::<SocketAddr>().unwrap())
                };
                if line.contains("listening") && public.is_none() {
                    public = field("address=");
                }
                if internal.is_none() {
                    internal = field("internal_address=");
                }
                if let (false, Some(p), Some(i)) = (sent, public, internal) {
                    let _ = tx.send((p, i));
                    sent = true;
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let (address, internal) = match rx.recv_timeout(limit) {
            Ok(addresses) => addresses,
            Err(_) => {
                let _ = child.kill();
                panic!("service did not start; logs:\n{}", logs.lock().unwrap());
            }
        };
        Service {
            child,
            address,
            internal,
            logs,
        }
    }

    /// `path` on the listener that serves it: the API, dashboard, metrics and health on
    /// the internal one, everything else (webhook, approvals) on the public one.
    pub fn url(&self, path: &str) -> String {
        if is_internal_path(path) {
            self.internal_url(path)
        } else {
            format!("http://{}{}", self.address, path)
        }
    }

    /// `path` on the internal listener.
    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{}", self.internal, path)
    }

    /// The listener that serves `path`.
    pub fn address_for(&self, path: &str) -> SocketAddr {
        if is_internal_path(path) {
            self.internal
        } else {
            self.address
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- service logs ---\n{}", self.logs());
        }
    }
}

/// Paths the internal listener serves (see `pipeline_http::internal_router` and the
/// dashboard under `/ui`; its overview at `/` is reached with `internal_url`, since `/`
/// on the public listener is an unknown path the hostile catalogue sends).
pub fn is_internal_path(path: &str) -> bool {
    ["/api/", "/metrics", "/healthz", "/readyz", "/ui"]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

/// The command [`Service::start`] runs (`RUST_LOG=debug`; set it again to change it).
pub fn serve_command(manifests: &Path, state: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(serve_args(manifests, state, extra));
    command.env("RUST_LOG", "debug");
    command
}

/// `serve` and its arguments for embedded mode on `manifests` and `state`, listening on a
/// free loopback port, then `extra`; for wrapping the binary in another command.
pub fn serve_args(manifests: &Path, state: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "serve".into(),
        "--manifests".into(),
        manifests.into(),
        "--state".into(),
        state.into(),
    ];
    args.extend(
        [
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
            "--reload-interval",
            "100ms",
        ]
        .iter()
        .chain(extra)
        .map(Into::into),
    );
    args
}

pub fn copy_quickstart(dir: &Path) -> PathBuf {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, manifests.join(path.file_name().unwrap())).unwrap();
        }
    }
    manifests
}

pub fn event(namespace: &str, revision: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "involvedObject": {"kind": "HelmRelease", "namespace": namespace, "name": "podinfo",
                           "apiVersion": "helm.toolkit.fluxcd.io/v2", "uid": "u1", "resourceVersion": "7"},
        "severity": "info",
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "message": format!("Helm upgrade succeeded for release {namespace}/podinfo.v2 with chart podinfo@{revision}"),
        "reason": "UpgradeSucceeded",
        "metadata": {"revision": revision},
        "reportingController": "helm-controller"
    }))
    .unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub async fn post_event(service: &Service, environment: &str, body: Vec<u8>) -> (u16, Value) {
    let signature = sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &body);
    let response = client()
        .post(service.url(&format!(
            "/pipelines/promotions/flux-system/podinfo/{environment}"
        )))
        .header("content-type", "application/json")
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Like [`post_event`] against the service at `base` (`http://addr`), but a failed
/// exchange (e.g. the process was killed) is an `Err` instead of a panic.
pub async fn try_post_event(
    client: &reqwest::Client,
    base: &str,
    environment: &str,
    body: Vec<u8>,
) -> Result<(u16, Value), reqwest::Error> {
    let signature = sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &body);
    let response = client
        .post(format!(
            "{base}/pipelines/promotions/flux-system/podinfo/{environment}"
        ))
        .header("content-type", "application/json")
        .header("x-signature", signature)
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

async fn get(service: &Service, path: &str) -> reqwest::Response {
    client().get(service.url(path)).send().await.unwrap()
}

pub async fn get_text(service: &Service, path: &str) -> String {
    get(service, path).await.text().await.unwrap()
}

pub async fn get_json(service: &Service, path: &str) -> Value {
    get(service, path).await.json().await.unwrap()
}

/// Polls the record until `done` holds (bounded).
pub async fn wait_for(
    service: &Service,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let record = get_json(service, &format!("/api/v1/promotions/{id}")).await;
        if done(&record) {
            return record;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last record: {record:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests a [`Receiver`] got: headers and raw body.
pub type Received = Arc<Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;

/// A notification receiver on loopback, recording what it gets; answers with the
/// statuses in `script` in turn, then 200.
pub struct Receiver {
    pub address: SocketAddr,
    pub received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(script: Vec<u16>, delay: Duration) -> Receiver {
        let received: Received = Arc::default();
        let script = Arc::new(Mutex::new(script.into_iter()));
        let sink = received.clone();
        let app = axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                let script = script.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    sink.lock().unwrap().push((headers, body.to_vec()));
                    let status = script.lock().unwrap().next().unwrap_or(200);
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            address,
            received,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.address)
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
