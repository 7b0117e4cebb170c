//! Flux's own controllers (source-, kustomize-, helm- and notification-controller, built
//! by `scripts/ensure-test-binaries.sh flux`) running against a [`TestCluster`]: the real
//! GitOps loop, with nothing simulated.
//!
//! Each controller is a process of its own with the cluster's admin kubeconfig, leader
//! election off, every listener (metrics, health, source-controller's artifact server,
//! notification-controller's event and receiver servers) on a free loopback port, and
//! the other controllers' events sent to notification-controller's event server, as in a
//! Flux installation. Dropping [`FluxControllers`] kills them all; when the dropping
//! thread is panicking (a failed test) the tail of each log is printed first.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::binaries::flux_binaries;
use crate::{Error, TestCluster, free_port, open_log, readiness_timeout, spawn_logged, tail};

/// The four controllers, in the order they are started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FluxController {
    Source,
    Kustomize,
    Helm,
    Notification,
}

impl FluxController {
    pub const ALL: [FluxController; 4] = [
        FluxController::Source,
        FluxController::Kustomize,
        FluxController::Helm,
        FluxController::Notification,
    ];

    /// `source-controller`, ...: the binary's and the log's name.
    pub fn name(self) -> &'static str {
        match self {
            FluxController::Source => "source-controller",
            FluxController::Kustomize => "kustomize-controller",
            FluxController::Helm => "helm-controller",
            FluxController::Notification => "notification-controller",
        }
    }

    fn index(self) -> usize {
        match self {
            FluxController::Source => 0,
            FluxController::Kustomize => 1,
            FluxController::Helm => 2,
            FluxController::Notification => 3,
        }
    }
}

/// Paths of the four controller binaries.
#[derive(Clone, Debug)]
pub struct FluxBinaries {
    pub source: PathBuf,
    pub kustomize: PathBuf,
    pub helm: PathBuf,
    pub notification: PathBuf,
}

impl FluxBinaries {
    /// `PIPELINE_FLUX_{SOURCE,KUSTOMIZE,HELM,NOTIFICATION}_BIN`, else the tools cache's
    /// env.sh; fails, saying how to build them, when one is missing.
    pub fn locate() -> Result<Self, Error> {
        flux_binaries()
    }

    fn of(&self, controller: FluxController) -> &Path {
        match controller {
            FluxController::Source => &self.source,
            FluxController::Kustomize => &self.kustomize,
            FluxController::Helm => &self.helm,
            FluxController::Notification => &self.notification,
        }
    }
}

struct Running {
    child: Option<Child>,
    health_port: u16,
}

/// The four Flux controllers of one test cluster. See the module documentation.
pub struct FluxControllers {
    binaries: FluxBinaries,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    /// source-controller's artifact server (`--storage-addr`, also advertised).
    storage_port: u16,
    /// notification-controller's event server (`--events-addr`), where the others post.
    events_port: u16,
    receiver_port: u16,
    running: [Running; 4],
    started_in: Duration,
}

impl std::fmt::Debug for FluxControllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxControllers")
            .field("dir", &self.dir.path())
            .field("storage_port", &self.storage_port)
            .field("events_port", &self.events_port)
            .finish_non_exhaustive()
    }
}

impl FluxControllers {
    /// Starts all four against `cluster` (which must serve Flux's CRDs: see
    /// [`TestCluster::install_flux_crds`]) and waits until each reports ready (`/readyz`)
    /// and its servers (artifacts; events and receiver) accept connections.
    /// `RUNTIME_NAMESPACE` is `flux-system`, which is created.
    pub async fn start(cluster: &TestCluster) -> Result<Self, Error> {
        let binaries = FluxBinaries::locate()?;
        let began = Instant::now();
        cluster.ensure_namespace("flux-system").await?;
        let dir = tempfile::Builder::new()
            .prefix("pipeline-testenv-flux-")
            .tempdir()
            .map_err(|e| Error::io("creating the Flux directory", e))?;
        std::fs::create_dir_all(dir.path().join("artifacts"))
            .map_err(|e| Error::io("creating the artifact directory", e))?;
        let mut flux = Self {
            binaries,
            kubeconfig: cluster.kubeconfig_path().to_path_buf(),
            dir,
            storage_port: free_port()?,
            events_port: free_port()?,
            receiver_port: free_port()?,
            running: std::array::from_fn(|_| Running {
                child: None,
                health_port: 0,
            }),
            started_in: Duration::ZERO,
        };
        for controller in FluxController::ALL {
            flux.spawn(controller)?;
        }
        for controller in FluxController::ALL {
            flux.wait_ready(controller).await?;
        }
        flux.started_in = began.elapsed();
        Ok(flux)
    }

    /// How long [`FluxControllers::start`] took, until all four were ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// `http://127.0.0.1:<port>`: notification-controller's event server.
    pub fn events_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.events_port)
    }

    /// `http://127.0.0.1:<port>`: source-controller's artifact server.
    pub fn storage_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.storage_port)
    }

    /// `http://127.0.0.1:<port>`: notification-controller's webhook receiver server.
    pub fn receiver_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.receiver_port)
    }

    /// The log file of `controller` (JSON lines, as Flux logs).
    pub fn log_path(&self, controller: FluxController) -> PathBuf {
        self.dir.path().join(format!("{}.log", controller.name()))
    }

    /// The whole log of `controller`.
    pub fn log(&self, controller: FluxController) -> String {
        std::fs::read(self.log_path(controller))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of every controller's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for controller in FluxController::ALL {
            let path = self.log_path(controller);
            out.push_str(&format!(
                "----- {} (last {lines} lines) -----\n{}\n",
                path.display(),
                tail(&path, lines)
            ));
        }
        out
    }

    /// Whether `controller`'s process is running.
    pub fn is_running(&mut self, controller: FluxController) -> bool {
        let running = &mut self.running[controller.index()];
        match running.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                running.child = None;
                false
            }
            None => false,
        }
    }

    /// The process id of `controller`, while it runs.
    pub fn pid(&mut self, controller: FluxController) -> Option<u32> {
        if !self.is_running(controller) {
            return None;
        }
        self.running[controller.index()]
            .child
            .as_ref()
            .map(Child::id)
    }

    /// Stops `controller` (SIGTERM, SIGKILL after 10 s); the others keep running, and
    /// what they send it meanwhile is lost, as with a real outage.
    pub async fn stop(&mut self, controller: FluxController) {
        if let Some(mut child) = self.running[controller.index()].child.take() {
            crate::terminate(&mut child, Duration::from_secs(10)).await;
        }
    }

    /// Starts `controller` again (after [`FluxControllers::stop`]) on the same ports and
    /// waits until it is ready.
    pub async fn restart(&mut self, controller: FluxController) -> Result<(), Error> {
        self.stop(controller).await;
        self.spawn(controller)?;
        self.wait_ready(controller).await
    }

    fn spawn(&mut self, controller: FluxController) -> Result<(), Error> {
        let health_port = match self.running[controller.index()].health_port {
            0 => free_port()?,
            port => port,
        };
        let metrics_port = free_port()?;
        let mut args = vec![
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            format!("--health-addr=127.0.0.1:{health_port}"),
            "--enable-leader-election=false".to_owned(),
            "--log-level=debug".to_owned(),
            "--log-encoding=json".to_owned(),
        ];
        match controller {
            FluxController::Source => {
                args.push(format!(
                    "--storage-path={}",
                    self.dir.path().join("artifacts").display()
                ));
                args.push(format!("--storage-addr=127.0.0.1:{}", self.storage_port));
                args.push(format!(
                    "--storage-adv-addr=127.0.0.1:{}",
                    self.storage_port
                ));
                args.push(format!("--events-addr={}", self.events_url()));
            }
            FluxController::Kustomize | FluxController::Helm => {
                args.push(format!("--events-addr={}", self.events_url()));
            }
            FluxController::Notification => {
                args.push(format!("--events-addr=127.0.0.1:{}", self.events_port));
                args.push(format!("--receiverAddr=127.0.0.1:{}", self.receiver_port));
            }
        }
        let log_path = self.log_path(controller);
        let log = open_log(&log_path).map_err(Error::Startup)?;
        let mut command = Command::new(self.binaries.of(controller));
        command
            .args(&args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUNTIME_NAMESPACE", "flux-system")
            // Flux reads credentials of cloud providers from the environment; none here.
            .env_remove("AWS_REGION")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .current_dir(self.dir.path());
        let child = spawn_logged(command, log, controller.name()).map_err(Error::Startup)?;
        self.running[controller.index()] = Running {
            child: Some(child),
            health_port,
        };
        Ok(())
    }

    async fn wait_ready(&mut self, controller: FluxController) -> Result<(), Error> {
        let port = self.running[controller.index()].health_port;
        let deadline = Instant::now() + readiness_timeout();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if !self.is_running(controller) {
                return Err(Error::Startup(format!(
                    "{} exited during startup; last lines of {}:\n{}",
                    controller.name(),
                    self.log_path(controller).display(),
                    tail(&self.log_path(controller), 40)
                )));
            }
            if http_ok(addr, "/readyz").await && self.servers_listen(controller).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop(controller).await;
                return Err(Error::Startup(format!(
                    "{} not ready after {:?}; last lines of {}:\n{}",
                    controller.name(),
                    readiness_timeout(),
                    self.log_path(controller).display(),
                    tail(&self.log_path(controller), 40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl FluxControllers {
    /// The servers besides metrics and health accept connections: `/readyz` can answer
    /// before source-controller's artifact server or notification-controller's event
    /// server listens.
    async fn servers_listen(&self, controller: FluxController) -> bool {
        let ports: &[u16] = match controller {
            FluxController::Source => &[self.storage_port],
            FluxController::Notification => &[self.events_port, self.receiver_port],
            FluxController::Kustomize | FluxController::Helm => &[],
        };
        for port in ports {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
            let connect = tokio::net::TcpStream::connect(addr);
            if !matches!(
                tokio::time::timeout(Duration::from_secs(2), connect).await,
                Ok(Ok(_))
            ) {
                return false;
            }
        }
        true
    }
}

impl Drop for FluxControllers {
    fn drop(&mut self) {
        for running in &mut self.running {
            if let Some(mut child) = running.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "pipeline-testenv[flux]: test failed; Flux controller logs:\n{}",
                self.log_tail(40)
            );
        }
    }
}

/// `GET path` answered `200`.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(answer.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
