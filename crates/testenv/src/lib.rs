//! Real, throw-away Kubernetes control planes for integration tests: our envtest.
//!
//! [`TestCluster::start`] runs etcd and kube-apiserver (the binaries built by
//! `scripts/ensure-test-binaries.sh`) on free loopback ports, with a fresh CA, a serving
//! certificate, an admin client certificate (`O=system:masters`), a service-account key
//! pair and RBAC authorization, and waits until `/readyz` answers. Any number of clusters
//! can run at once (a management and a leaf cluster, say). Dropping a cluster kills both
//! processes and removes its files; when the dropping thread is panicking (a failed test)
//! the tails of both logs are printed first.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pipeline_testenv::Error> {
//! let cluster = pipeline_testenv::TestCluster::start().await?;
//! cluster.install_crds().await?;
//! let client = cluster.client(); // admin
//! let alice = cluster.user_client("alice", &["devs"]).await?; // RBAC applies
//! # let _ = (client, alice); Ok(()) }
//! ```
//!
//! Environment: `PIPELINE_ETCD_BIN`, `PIPELINE_KUBE_APISERVER_BIN` (else the tools cache,
//! see [`Binaries::locate`]); `PIPELINE_FLUX_CRDS_DIR` for
//! [`TestCluster::install_flux_crds`] (else the tools cache, see [`flux_crds_dir`]);
//! `PIPELINE_TESTENV_KEEP=1` keeps each cluster's directory (certificates, kubeconfigs,
//! logs) and prints its path; `PIPELINE_TESTENV_TIMEOUT_SECS` bounds each readiness wait
//! (default 90); `PIPELINE_TESTENV_PROFILING=1` serves the API server's `/debug/pprof`
//! (to see where a benchmark's API server CPU goes); `PIPELINE_TESTENV_CPUS=0` (a
//! `taskset` CPU list) runs etcd and kube-apiserver on those CPUs only (see
//! [`TestCluster::start_on_cpus`]).
//!
//! For tests of the deployment watch: [`TestCluster::install_flux_crds`] (Flux's real
//! HelmRelease and Kustomization CRDs), [`TestCluster::install_gitops_cluster_crd`],
//! [`TestCluster::kubeconfig_yaml`] / [`TestCluster::user_kubeconfig_yaml`] (inline
//! kubeconfigs to put in a leaf cluster's kubeconfig Secret) and
//! [`TestCluster::active_watches`] (the API server's count of open WATCH requests).
//!
//! For the real GitOps loop: [`FluxControllers::start`] runs Flux's four controllers
//! (`scripts/ensure-test-binaries.sh flux`; `PIPELINE_FLUX_*_BIN`) against a cluster.
#![forbid(unsafe_code)]

mod apply;
mod binaries;
mod flux;
mod pki;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub use apply::{apply_yaml, parse_yaml_documents};
pub use binaries::{Binaries, flux_crds_dir, helm_binary};
pub use flux::{FluxBinaries, FluxController, FluxControllers};

/// Field manager of everything this crate applies.
pub const FIELD_MANAGER: &str = "pipeline-testenv";

/// Why a test cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd or kube-apiserver is not built; the message says how to build them.
    #[error("{0}")]
    MissingBinaries(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("{context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// A process did not come up; the message holds the tail of its log.
    #[error("{0}")]
    Startup(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            context: context.into(),
            source,
        }
    }
}

/// Lines of each log printed when a cluster is dropped by a panicking thread.
const LOG_TAIL_LINES: usize = 60;

/// One etcd + kube-apiserver pair on loopback. See the crate documentation.
pub struct TestCluster {
    name: String,
    /// `None` once kept (`PIPELINE_TESTENV_KEEP=1`): then `dir_path` stays on disk.
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    binaries: Binaries,
    pki: pki::Pki,
    /// The CPUs etcd and kube-apiserver may run on (a `taskset` list), or all.
    cpus: Option<String>,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_client_port: u16,
    apiserver_port: u16,
    server_url: String,
    kubeconfig_path: PathBuf,
    client: Client,
    started_in: Duration,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("name", &self.name)
            .field("server_url", &self.server_url)
            .field("dir", &self.dir_path)
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// Starts a cluster named `test`.
    pub async fn start() -> Result<Self, Error> {
        Self::start_named("test").await
    }

    /// Starts a cluster; `name` shows in its kubeconfig, directory and log output (use
    /// e.g. `management` and `leaf` when a test runs several).
    pub async fn start_named(name: &str) -> Result<Self, Error> {
        let cpus = std::env::var("PIPELINE_TESTENV_CPUS")
            .ok()
            .filter(|v| !v.is_empty());
        Self::start_on_cpus(name, cpus).await
    }

    /// Starts a cluster whose etcd and kube-apiserver run only on `cpus` (a `taskset` CPU
    /// list such as `0` or `0-1`; `None`: anywhere). A benchmark uses it to keep the API
    /// server's CPUs apart from its clients', as a control plane's nodes are in a real
    /// cluster.
    pub async fn start_on_cpus(name: &str, cpus: Option<String>) -> Result<Self, Error> {
        let binaries = Binaries::locate()?;
        let began = Instant::now();
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("pipeline-testenv-{name}-"))
            .tempdir()
            .map_err(|e| Error::io("creating the cluster directory", e))?;
        let dir_path = dir.path().to_path_buf();
        if std::env::var_os("PIPELINE_TESTENV_KEEP").is_some_and(|v| v == "1") {
            dir.disable_cleanup(true);
        }
        let pki = pki::Pki::generate()?;
        write_file(&dir_path.join("ca.crt"), &pki.ca_pem)?;
        write_file(&dir_path.join("serving.crt"), &pki.serving_cert_pem)?;
        write_file(&dir_path.join("serving.key"), &pki.serving_key_pem)?;
        write_file(&dir_path.join("sa.pub"), &pki.sa_public_pem)?;
        write_file(&dir_path.join("sa.key"), &pki.sa_private_pem)?;

        // Ports are probed free, then released and handed to the process, so another
        // process may take one meanwhile: a start that fails on a taken port is retried.
        let mut attempt = 0;
        let (etcd, etcd_client_port) = loop {
            attempt += 1;
            let client_port = free_port()?;
            let peer_port = free_port()?;
            match start_etcd(
                &binaries,
                cpus.as_deref(),
                &dir_path,
                client_port,
                peer_port,
            )
            .await
            {
                Ok(child) => break (child, client_port),
                Err(StartFailure::PortTaken(msg)) if attempt < 4 => {
                    eprintln!("pipeline-testenv[{name}]: {msg}; retrying on other ports");
                }
                Err(StartFailure::PortTaken(msg) | StartFailure::Failed(msg)) => {
                    return Err(Error::Startup(format!("[{name}] {msg}")));
                }
            }
        };

        let mut cluster = Self {
            name: name.to_owned(),
            dir: Some(dir),
            dir_path,
            binaries,
            pki,
            cpus,
            etcd: Some(etcd),
            apiserver: None,
            etcd_client_port,
            apiserver_port: 0,
            server_url: String::new(),
            kubeconfig_path: PathBuf::new(),
            // Replaced below, once the port is known; building a client does not connect.
            client: placeholder_client()?,
            started_in: Duration::ZERO,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.apiserver_port = free_port()?;
            cluster.server_url = format!("https://127.0.0.1:{}", cluster.apiserver_port);
            let admin = cluster
                .pki
                .client_cert("pipeline-testenv-admin", &["system:masters"])?;
            let kubeconfig = cluster.kubeconfig_json(
                "admin",
                UserAuth::Cert {
                    cert_pem: &admin.cert_pem,
                    key_pem: &admin.key_pem,
                },
            );
            cluster.kubeconfig_path = cluster.dir_path.join("kubeconfig");
            write_file(&cluster.kubeconfig_path, &kubeconfig.to_string())?;
            cluster.client = client_from_kubeconfig(kubeconfig).await?;
            match cluster.spawn_apiserver().await {
                Ok(()) => break,
                Err(StartFailure::PortTaken(msg)) if attempt < 4 => {
                    eprintln!("pipeline-testenv[{name}]: {msg}; retrying on another port");
                }
                Err(StartFailure::PortTaken(msg) | StartFailure::Failed(msg)) => {
                    return Err(Error::Startup(format!("[{name}] {msg}")));
                }
            }
        }
        cluster.wait_default_namespace().await?;
        cluster.started_in = began.elapsed();
        Ok(cluster)
    }

    /// The cluster's name as given to [`TestCluster::start_named`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A client authenticated as an admin (`O=system:masters`, bypasses RBAC).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An admin kubeconfig file (certificates inline), for child processes
    /// (`KUBECONFIG=...` or `--kubeconfig`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The admin kubeconfig as YAML: server `https://127.0.0.1:<port>`, the CA and the
    /// admin client certificate and key inline (`*-data`, no file paths), so it works
    /// from anywhere, e.g. as the kubeconfig Secret of a leaf cluster.
    pub fn kubeconfig_yaml(&self) -> Result<String, Error> {
        to_yaml(&read_json(&self.kubeconfig_path)?)
    }

    /// A kubeconfig (YAML, certificates inline) for `user` in `groups`, with a client
    /// certificate minted now: each call gives different bytes for the same cluster
    /// (`&["system:masters"]` makes the user an admin). At most two groups.
    pub fn user_kubeconfig_yaml(&self, user: &str, groups: &[&str]) -> Result<String, Error> {
        to_yaml(&self.user_kubeconfig_json(user, groups)?)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The CA that signed the serving certificate (and every client certificate), PEM.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// The directory holding certificates, kubeconfigs and the logs.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// How long [`TestCluster::start`] took, until the API server was ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// `etcd.log` and `kube-apiserver.log` paths.
    pub fn log_paths(&self) -> [PathBuf; 2] {
        [
            self.dir_path.join("etcd.log"),
            self.dir_path.join("kube-apiserver.log"),
        ]
    }

    /// The last `lines` lines of both logs.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for path in self.log_paths() {
            out.push_str(&format!(
                "----- {} (last {lines} lines) -----\n{}\n",
                path.display(),
                tail(&path, lines)
            ));
        }
        out
    }

    /// A client for `user` in `groups`, authenticated by a client certificate signed by
    /// the cluster CA: RBAC applies to it. At most two groups (see
    /// [`TestCluster::impersonating_client`] for more).
    pub async fn user_client(&self, user: &str, groups: &[&str]) -> Result<Client, Error> {
        client_from_kubeconfig(self.user_kubeconfig_json(user, groups)?).await
    }

    /// Writes a kubeconfig for `user` in `groups` (client certificate) and returns its path.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf, Error> {
        let json = self.user_kubeconfig_json(user, groups)?;
        let path = self
            .dir_path
            .join(format!("kubeconfig-user-{}", file_safe(user)));
        write_file(&path, &json.to_string())?;
        Ok(path)
    }

    /// An admin client that impersonates `user` in any number of `groups`.
    pub async fn impersonating_client(&self, user: &str, groups: &[&str]) -> Result<Client, Error> {
        let mut config = Config::from_custom_kubeconfig(
            kubeconfig_from_json(read_json(&self.kubeconfig_path)?)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups =
            Some(groups.iter().map(|g| (*g).to_owned()).collect());
        Client::try_from(config).map_err(|e| Error::kube("building a client", e))
    }

    /// A bound token for ServiceAccount `namespace/name` from the TokenRequest API (valid
    /// one hour). The ServiceAccount must exist (see [`TestCluster::ensure_service_account`]).
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<String, Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|e| Error::kube(format!("requesting a token for {namespace}/{name}"), e))?;
        answer
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Other(format!(
                    "TokenRequest for {namespace}/{name} returned no token"
                ))
            })
    }

    /// A client acting as ServiceAccount `namespace/name` (token auth): RBAC applies.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Client, Error> {
        let token = self.service_account_token(namespace, name).await?;
        client_from_kubeconfig(
            self.kubeconfig_json(&format!("{namespace}-{name}"), UserAuth::Token(&token)),
        )
        .await
    }

    /// Writes a kubeconfig acting as ServiceAccount `namespace/name` and returns its path.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PathBuf, Error> {
        let token = self.service_account_token(namespace, name).await?;
        let json = self.kubeconfig_json(&format!("{namespace}-{name}"), UserAuth::Token(&token));
        let path = self.dir_path.join(format!(
            "kubeconfig-sa-{}-{}",
            file_safe(namespace),
            file_safe(name)
        ));
        write_file(&path, &json.to_string())?;
        Ok(path)
    }

    /// Creates namespace `name` unless it exists.
    pub async fn ensure_namespace(&self, name: &str) -> Result<(), Error> {
        let api: Api<Namespace> = Api::all(self.client());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .map_err(|e| Error::Other(format!("namespace object: {e}")))?;
        api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns))
            .await
            .map_err(|e| Error::kube(format!("creating namespace {name}"), e))?;
        Ok(())
    }

    /// Creates namespace `namespace` and ServiceAccount `namespace/name` unless they exist.
    pub async fn ensure_service_account(&self, namespace: &str, name: &str) -> Result<(), Error> {
        self.ensure_namespace(namespace).await?;
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace}
        }))
        .map_err(|e| Error::Other(format!("service account object: {e}")))?;
        api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&sa))
            .await
            .map_err(|e| Error::kube(format!("creating service account {namespace}/{name}"), e))?;
        Ok(())
    }

    /// Applies `pipeline_crds::crds()` (server-side apply) and waits until each is
    /// `Established` and served.
    pub async fn install_crds(&self) -> Result<(), Error> {
        self.install_crd_list(&pipeline_crds::crds()).await
    }

    /// Applies the given CRDs and waits until each is `Established`.
    pub async fn install_crd_list(&self, crds: &[CustomResourceDefinition]) -> Result<(), Error> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client());
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(crd),
            )
            .await
            .map_err(|e| Error::kube(format!("applying CRD {name}"), e))?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            loop {
                let current = api
                    .get(&name)
                    .await
                    .map_err(|e| Error::kube(format!("reading CRD {name}"), e))?;
                let established = current
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Other(format!(
                        "CRD {name} not Established after 30s: {:?}",
                        current.status
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Established means served; discovery can trail it by a moment.
        for crd in crds {
            let group = &crd.spec.group;
            for version in &crd.spec.versions {
                let path = format!("/apis/{group}/{}", version.name);
                self.wait_for_path(&path, Duration::from_secs(30)).await?;
            }
        }
        Ok(())
    }

    /// Applies every CRD in the Flux CRD directory ([`flux_crds_dir`]: those of source-,
    /// kustomize-, helm- and notification-controller, as fetched by
    /// `scripts/ensure-test-binaries.sh flux-crds`) and waits
    /// until each is `Established` and its versions are served.
    pub async fn install_flux_crds(&self) -> Result<(), Error> {
        let dir = flux_crds_dir()?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
            })
            .collect();
        files.sort();
        let mut crds = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
            for doc in parse_yaml_documents(&text)? {
                if doc["kind"] != "CustomResourceDefinition" {
                    continue;
                }
                let crd: CustomResourceDefinition = serde_json::from_value(doc)
                    .map_err(|e| Error::Other(format!("{}: not a CRD: {e}", file.display())))?;
                crds.push(crd);
            }
        }
        if crds.is_empty() {
            return Err(Error::Other(format!(
                "no CustomResourceDefinition in {}",
                dir.display()
            )));
        }
        self.install_crd_list(&crds).await
    }

    /// Applies a minimal CRD for Weave GitOps' `GitopsCluster`
    /// (`gitopsclusters.gitops.weave.works`, `v1alpha1`, namespaced, with a status
    /// subresource; `spec` and `status` keep any fields) and waits until it is served.
    /// Enough to create GitopsClusters whose `spec.secretRef` / `spec.capiClusterRef`
    /// name a kubeconfig Secret.
    pub async fn install_gitops_cluster_crd(&self) -> Result<(), Error> {
        let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "gitopsclusters.gitops.weave.works"},
            "spec": {
                "group": "gitops.weave.works",
                "names": {
                    "kind": "GitopsCluster",
                    "listKind": "GitopsClusterList",
                    "plural": "gitopsclusters",
                    "singular": "gitopscluster",
                    "shortNames": ["gc"],
                },
                "scope": "Namespaced",
                "versions": [{
                    "name": "v1alpha1",
                    "served": true,
                    "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        },
                    }},
                }],
            },
        }))
        .map_err(|e| Error::Other(format!("GitopsCluster CRD: {e}")))?;
        self.install_crd_list(&[crd]).await
    }

    /// Server-side applies every document of a (multi-document) YAML stream as admin,
    /// in order; see [`apply_yaml`].
    pub async fn apply_yaml(&self, yaml: &str) -> Result<Vec<kube::api::DynamicObject>, Error> {
        apply_yaml(&self.client(), yaml, false).await
    }

    /// Like [`TestCluster::apply_yaml`] with `dryRun=All`: validated and admitted by the
    /// API server, nothing stored.
    pub async fn dry_run_yaml(&self, yaml: &str) -> Result<Vec<kube::api::DynamicObject>, Error> {
        apply_yaml(&self.client(), yaml, true).await
    }

    /// kube-apiserver's Prometheus metrics (`GET /metrics` as admin), as text.
    pub async fn metrics_text(&self) -> Result<String, Error> {
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .map_err(|e| Error::Other(format!("building GET /metrics: {e}")))?;
        self.client
            .request_text(request)
            .await
            .map_err(|e| Error::kube("GET /metrics", e))
    }

    /// How many WATCH requests on `resource` (plural) of API group `group` (`""` for the
    /// core group) the API server is serving now, from any client: the sum of
    /// `apiserver_longrunning_requests{verb="WATCH",group=...,resource=...}`.
    pub async fn active_watches(&self, group: &str, resource: &str) -> Result<u64, Error> {
        Ok(sum_watches(&self.metrics_text().await?, group, resource))
    }

    /// Stops kube-apiserver gracefully (SIGTERM, SIGKILL after 10 s); etcd keeps running
    /// and [`TestCluster::restart_apiserver`] brings it back on the same address.
    pub async fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            terminate(&mut child, Duration::from_secs(10)).await;
        }
    }

    /// Kills kube-apiserver at once (SIGKILL), as a crash would.
    pub fn kill_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts kube-apiserver again (same port, certificates and data) after
    /// [`TestCluster::stop_apiserver`] or [`TestCluster::kill_apiserver`], and waits until
    /// it is ready. Clients made before keep working.
    pub async fn restart_apiserver(&mut self) -> Result<(), Error> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        self.spawn_apiserver().await.map_err(
            |(StartFailure::PortTaken(msg) | StartFailure::Failed(msg))| {
                Error::Startup(format!("[{}] {msg}", self.name))
            },
        )
    }

    /// Whether kube-apiserver is running (not stopped, not exited).
    pub fn apiserver_running(&mut self) -> bool {
        self.apiserver
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops both processes and removes the cluster's files.
    pub async fn stop(mut self) {
        self.stop_apiserver().await;
        self.kill_all();
    }

    fn kill_all(&mut self) {
        // kube-apiserver first: without etcd its shutdown hangs.
        self.kill_apiserver();
        if let Some(mut child) = self.etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn user_kubeconfig_json(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<serde_json::Value, Error> {
        let cert = self.pki.client_cert(user, groups)?;
        Ok(self.kubeconfig_json(
            user,
            UserAuth::Cert {
                cert_pem: &cert.cert_pem,
                key_pem: &cert.key_pem,
            },
        ))
    }

    /// A kubeconfig (JSON, which is YAML too) with the certificates inline.
    fn kubeconfig_json(&self, user: &str, auth: UserAuth<'_>) -> serde_json::Value {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let user_entry = match auth {
            UserAuth::Cert { cert_pem, key_pem } => serde_json::json!({
                "client-certificate-data": b64(cert_pem),
                "client-key-data": b64(key_pem),
            }),
            UserAuth::Token(token) => serde_json::json!({ "token": token }),
        };
        let context = format!("{user}@{}", self.name);
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": self.name,
                "cluster": {
                    "server": self.server_url,
                    "certificate-authority-data": b64(&self.pki.ca_pem),
                },
            }],
            "users": [{ "name": user, "user": user_entry }],
            "contexts": [{
                "name": context,
                "context": { "cluster": self.name, "user": user, "namespace": "default" },
            }],
            "current-context": context,
        })
    }

    async fn spawn_apiserver(&mut self) -> Result<(), StartFailure> {
        let dir = &self.dir_path;
        let path = |name: &str| dir.join(name).display().to_string();
        let log = open_log(&dir.join("kube-apiserver.log")).map_err(StartFailure::Failed)?;
        let args = [
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_client_port),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={}", self.apiserver_port),
            format!("--tls-cert-file={}", path("serving.crt")),
            format!("--tls-private-key-file={}", path("serving.key")),
            format!("--client-ca-file={}", path("ca.crt")),
            format!("--cert-dir={}", path("apiserver-certs")),
            "--authorization-mode=RBAC".to_owned(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            // No kubelets, controllers or nodes: nothing to reconcile endpoints for, and
            // the ServiceAccount admission plugin would wait for token controllers.
            "--endpoint-reconciler-type=none".to_owned(),
            "--disable-admission-plugins=ServiceAccount".to_owned(),
            "--allow-privileged=true".to_owned(),
            format!(
                "--profiling={}",
                std::env::var("PIPELINE_TESTENV_PROFILING").is_ok_and(|v| v == "1")
            ),
            "--enable-priority-and-fairness=false".to_owned(),
        ];
        let mut cmd = command_on_cpus(&self.binaries.kube_apiserver, self.cpus.as_deref());
        cmd.args(&args);
        let child = spawn_logged(cmd, log, "kube-apiserver").map_err(StartFailure::Failed)?;
        self.apiserver = Some(child);

        let log_path = dir.join("kube-apiserver.log");
        let deadline = Instant::now() + readiness_timeout();
        let readyz = http::Request::get("/readyz").body(Vec::new());
        loop {
            if let Some(child) = self.apiserver.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.apiserver = None;
                return Err(exited("kube-apiserver", status, &log_path));
            }
            if let Ok(request) = readyz.as_ref().map(Clone::clone)
                && let Ok(body) = self.client.request_text(request).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_apiserver();
                return Err(StartFailure::Failed(format!(
                    "kube-apiserver not ready after {:?}; last lines of {}:\n{}",
                    readiness_timeout(),
                    log_path.display(),
                    tail(&log_path, 40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The system namespaces controller creates `default` right after readiness.
    async fn wait_default_namespace(&self) -> Result<(), Error> {
        self.wait_for_path("/api/v1/namespaces/default", readiness_timeout())
            .await
    }

    async fn wait_for_path(&self, path: &str, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let request = http::Request::get(path)
                .body(Vec::new())
                .map_err(|e| Error::Other(format!("building GET {path}: {e}")))?;
            match self.client.request_text(request).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::kube(format!("GET {path} after {timeout:?}"), e));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!(
                "pipeline-testenv[{}]: test failed; control-plane logs:\n{}",
                self.name,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        if let Some(dir) = self.dir.take()
            && std::env::var_os("PIPELINE_TESTENV_KEEP").is_some_and(|v| v == "1")
        {
            eprintln!(
                "pipeline-testenv[{}]: kept {}",
                self.name,
                dir.path().display()
            );
        }
    }
}

enum UserAuth<'a> {
    Cert { cert_pem: &'a str, key_pem: &'a str },
    Token(&'a str),
}

enum StartFailure {
    /// The process could not bind its port: worth another try on another one.
    PortTaken(String),
    Failed(String),
}

/// `binary`, or `taskset --cpu-list <cpus> <binary>` (which execs it: the child's pid
/// is the binary's).
fn command_on_cpus(binary: &Path, cpus: Option<&str>) -> Command {
    match cpus {
        None => Command::new(binary),
        Some(cpus) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("--cpu-list").arg(cpus).arg(binary);
            cmd
        }
    }
}

fn readiness_timeout() -> Duration {
    let secs = std::env::var("PIPELINE_TESTENV_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(90);
    Duration::from_secs(secs)
}

async fn start_etcd(
    binaries: &Binaries,
    cpus: Option<&str>,
    dir: &Path,
    client_port: u16,
    peer_port: u16,
) -> Result<Child, StartFailure> {
    let data = dir.join("etcd-data");
    let log_path = dir.join("etcd.log");
    let log = open_log(&log_path).map_err(StartFailure::Failed)?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = command_on_cpus(&binaries.etcd, cpus);
    cmd.args([
        "--name=pipeline-testenv".to_owned(),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=pipeline-testenv={peer_url}"),
        "--unsafe-no-fsync".to_owned(),
        "--log-level=warn".to_owned(),
    ]);
    let mut child = spawn_logged(cmd, log, "etcd").map_err(StartFailure::Failed)?;
    let deadline = Instant::now() + readiness_timeout();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, client_port));
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(exited("etcd", status, &log_path));
        }
        if etcd_healthy(addr).await {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartFailure::Failed(format!(
                "etcd not healthy after {:?}; last lines of {}:\n{}",
                readiness_timeout(),
                log_path.display(),
                tail(&log_path, 40)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /health` answered `200` with `"health":"true"`.
async fn etcd_healthy(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let answer = String::from_utf8_lossy(&answer);
        Some(answer.starts_with("HTTP/1.1 200") && answer.contains("\"health\":\"true\""))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn exited(what: &str, status: std::process::ExitStatus, log_path: &Path) -> StartFailure {
    let log = tail(log_path, 40);
    let msg = format!(
        "{what} exited during startup ({status}); last lines of {}:\n{log}",
        log_path.display()
    );
    if log.contains("address already in use") {
        StartFailure::PortTaken(msg)
    } else {
        StartFailure::Failed(msg)
    }
}

fn spawn_logged(mut cmd: Command, log: File, what: &str) -> Result<Child, String> {
    let stderr = log
        .try_clone()
        .map_err(|e| format!("duplicating the {what} log handle: {e}"))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .spawn()
        .map_err(|e| {
            format!(
                "starting {what} ({}): {e}",
                cmd.get_program().to_string_lossy()
            )
        })
}

fn open_log(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// SIGTERM, then SIGKILL once `grace` has passed.
async fn terminate(child: &mut Child, grace: Duration) {
    let pid = rustix::process::Pid::from_child(child);
    if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok() {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Ports handed out by this process, never handed out twice.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn free_port() -> Result<u16, Error> {
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| Error::io("probing for a free loopback port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("probing for a free loopback port", e))?
            .port();
        let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    Err(Error::Other("no free loopback port found".to_owned()))
}

fn placeholder_client() -> Result<Client, Error> {
    let uri = http::Uri::from_static("https://127.0.0.1:1");
    Client::try_from(Config::new(uri)).map_err(|e| Error::kube("building a client", e))
}

fn kubeconfig_from_json(json: serde_json::Value) -> Result<Kubeconfig, Error> {
    serde_json::from_value(json).map_err(|e| Error::Other(format!("kubeconfig: {e}")))
}

async fn client_from_kubeconfig(json: serde_json::Value) -> Result<Client, Error> {
    let config =
        Config::from_custom_kubeconfig(kubeconfig_from_json(json)?, &KubeConfigOptions::default())
            .await?;
    Client::try_from(config).map_err(|e| Error::kube("building a client", e))
}

/// Sums the `apiserver_longrunning_requests` samples for WATCHes of `group`/`resource`.
fn sum_watches(metrics: &str, group: &str, resource: &str) -> u64 {
    let want = [
        "verb=\"WATCH\"".to_owned(),
        format!("group=\"{group}\""),
        format!("resource=\"{resource}\""),
    ];
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("apiserver_longrunning_requests{"))
        .filter_map(|rest| rest.split_once('}'))
        .filter(|(labels, _)| {
            let labels: Vec<&str> = labels.split(',').collect();
            want.iter().all(|w| labels.contains(&w.as_str()))
        })
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .map(|value| value.max(0.0) as u64)
        .sum()
}

fn to_yaml(value: &serde_json::Value) -> Result<String, Error> {
    serde_saphyr::to_string(value).map_err(|e| Error::Other(format!("writing YAML: {e}")))
}

fn read_json(path: &Path) -> Result<serde_json::Value, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}

fn write_file(path: &Path, contents: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("(cannot read: {e})"),
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn watches_are_summed_from_longrunning_requests() {
        let metrics = r#"# HELP apiserver_longrunning_requests [STABLE] Gauge
# TYPE apiserver_longrunning_requests gauge
apiserver_longrunning_requests{component="apiserver",group="helm.toolkit.fluxcd.io",resource="helmreleases",scope="cluster",subresource="",verb="WATCH",version="v2"} 2
apiserver_longrunning_requests{component="apiserver",group="helm.toolkit.fluxcd.io",resource="helmreleases",scope="namespace",subresource="",verb="WATCH",version="v2"} 1
apiserver_longrunning_requests{component="apiserver",group="",resource="secrets",scope="cluster",subresource="",verb="WATCH",version="v1"} 5
apiserver_longrunning_requests{component="apiserver",group="helm.toolkit.fluxcd.io",resource="helmreleases",scope="cluster",subresource="",verb="LIST",version="v2"} 7
"#;
        assert_eq!(
            super::sum_watches(metrics, "helm.toolkit.fluxcd.io", "helmreleases"),
            3
        );
        assert_eq!(super::sum_watches(metrics, "", "secrets"), 5);
        assert_eq!(super::sum_watches(metrics, "apps", "deployments"), 0);
    }
}
