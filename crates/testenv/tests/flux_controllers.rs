//! Flux's own controllers against a test cluster: they start, reconcile, serve artifacts on
//! loopback, and one of them can be stopped and started again.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use pipeline_testenv::{FluxController, FluxControllers, TestCluster};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const INDEX: &str = "apiVersion: v1\nentries: {}\ngenerated: \"2025-01-01T00:00:00Z\"\n";

/// Serves `INDEX` at any path over HTTP/1.1 on loopback; returns its address.
async fn index_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = [0_u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/yaml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{INDEX}",
                    INDEX.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    address
}

/// `GET url` (plain HTTP on loopback): the status line and the body, or `None` when
/// nothing answers.
async fn http_get(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// The local addresses of the TCP sockets process `pid` listens on (IPv4 as
/// `a.b.c.d:port`, IPv6 as `[hex]:port`): its socket inodes (`/proc/<pid>/fd`) matched
/// against the LISTEN entries of `/proc/<pid>/net/tcp{,6}`.
fn listening_addresses(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address st ... inode: fields 1, 3 and 9; 0A is LISTEN.
            if fields.len() < 10 || fields[3] != "0A" || !inodes.iter().any(|i| i == fields[9]) {
                continue;
            }
            let (address, port) = fields[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            if table == "tcp" {
                let ip = u32::from_str_radix(address, 16).unwrap();
                // The kernel prints the address's bytes as a native-endian number.
                let ip = std::net::Ipv4Addr::from(ip.to_ne_bytes());
                found.push(format!("{ip}:{port}"));
            } else {
                found.push(format!("[{address}]:{port}"));
            }
        }
    }
    found
}

async fn ready_artifact(api: &Api<DynamicObject>, name: &str) -> Option<String> {
    let object = api.get_opt(name).await.ok()??;
    let ready = object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    ready
        .then(|| {
            object.data["status"]["artifact"]["url"]
                .as_str()
                .map(str::to_string)
        })
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_controllers_reconcile_and_serve_artifacts_on_loopback() {
    let cluster = TestCluster::start_named("flux-controllers").await.unwrap();
    cluster.install_flux_crds().await.unwrap();
    let mut flux = FluxControllers::start(&cluster).await.unwrap();
    eprintln!("Flux controllers ready in {:?}", flux.started_in());
    for controller in FluxController::ALL {
        assert!(flux.is_running(controller), "{}", controller.name());
    }

    // Every listening socket of every controller is on loopback.
    for controller in FluxController::ALL {
        let pid = flux.pid(controller).unwrap();
        let listening = listening_addresses(pid);
        // metrics and health; source-controller's artifacts; notification-controller's
        // events and receiver.
        let expected = match controller {
            FluxController::Source => 3,
            FluxController::Kustomize | FluxController::Helm => 2,
            FluxController::Notification => 4,
        };
        assert_eq!(
            listening.len(),
            expected,
            "{}: {listening:?}",
            controller.name()
        );
        for address in &listening {
            assert!(
                address.starts_with("127.0.0.1:"),
                "{} listens on {address}",
                controller.name()
            );
        }
        eprintln!("{} listens on {listening:?}", controller.name());
    }

    let index = index_server().await;
    cluster
        .apply_yaml(&format!(
            "apiVersion: source.toolkit.fluxcd.io/v1\nkind: HelmRepository\nmetadata:\n  name: charts\n  namespace: flux-system\nspec:\n  interval: 1m\n  url: http://{index}/\n"
        ))
        .await
        .unwrap();
    let gvk = GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "HelmRepository");
    let api: Api<DynamicObject> = Api::namespaced_with(
        cluster.client(),
        "flux-system",
        &ApiResource::from_gvk_with_plural(&gvk, "helmrepositories"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        if let Some(url) = ready_artifact(&api, "charts").await {
            break url;
        }
        assert!(
            Instant::now() < deadline,
            "HelmRepository not Ready: {:#?}\n{}",
            api.get_opt("charts").await.unwrap().map(|o| o.data),
            flux.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The artifact is served by source-controller's own server, on loopback.
    assert!(url.starts_with(&flux.storage_url()), "{url}");
    let (status, index) = http_get(&url).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        index.contains("apiVersion") && index.contains("entries"),
        "{index}"
    );

    flux.stop(FluxController::Notification).await;
    assert!(!flux.is_running(FluxController::Notification));
    assert!(
        http_get(&format!("{}/", flux.events_url())).await.is_none(),
        "the event server is down with its controller"
    );
    flux.restart(FluxController::Notification).await.unwrap();
    assert!(flux.is_running(FluxController::Notification));
    assert!(flux.log(FluxController::Source).contains("HelmRepository"));
}
