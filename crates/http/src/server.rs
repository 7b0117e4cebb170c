//! Serving the router on a TCP listener with limits that hostile clients cannot outlast:
//! a deadline for request headers, an idle deadline for kept-alive connections, and a
//! cap on open connections that evicts idle ones first, so a slowloris cannot starve
//! health checks or the webhook, nor exhaust the process's file descriptors.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use pipeline_core::Throttle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Default deadline for a client to send complete request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a kept-alive connection may stay idle between requests.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on open connections (lowered to fit the open-file limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// File descriptors kept free for everything but client connections: the state file,
/// outgoing HTTP, git subprocesses, the API server.
const RESERVED_FDS: u64 = 64;

/// How long shutdown waits for requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How long accepting pauses after an error such as "too many open files".
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The connection cap that fits the process: `wanted`, lowered so that the cap plus a
/// reserve stays under the open-file limit (raised to its hard limit first).
pub fn fit_connection_cap(wanted: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(hard)) = (limit.current, limit.maximum)
        && current < hard
    {
        limit.current = Some(hard);
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    let Some(files) = limit.current else {
        return wanted.max(1);
    };
    let room = usize::try_from(files.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX);
    if room < wanted {
        tracing::info!(
            wanted,
            open_file_limit = files,
            cap = room,
            "connection cap lowered to fit the open-file limit"
        );
    }
    wanted.min(room).max(1)
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets requests in
/// progress finish (bounded by the deadlines above) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ServerSettings,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let registry = Arc::new(Registry::default());
    let accept_errors = Throttle::new(ACCEPT_ERROR_LOG_INTERVAL);
    loop {
        // At the cap, close the oldest idle connection and wait until a connection has
        // really closed, so open sockets never exceed the cap (nor the file limit).
        while registry.open() >= settings.max_connections {
            let closed = registry.closed.notified();
            registry.evict_idle();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = closed => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    if let Some(held_back) = accept_errors.admit() {
                        tracing::warn!(error = %err, errors_not_logged = held_back, "cannot accept a connection; pausing briefly");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (id, activity, evicted) = registry.add();
        tokio::spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            settings,
            ConnectionHandles {
                registry: Arc::clone(&registry),
                id,
                activity,
                evicted,
                shutdown: shutdown.clone(),
            },
        ));
    }
    drop(listener);
    let longest = settings.header_read_timeout.max(SHUTDOWN_GRACE);
    if tokio::time::timeout(longest, registry.drained())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at shutdown were closed");
    }
    Ok(())
}

/// What one connection task shares with the accept loop.
struct ConnectionHandles {
    registry: Arc<Registry>,
    id: u64,
    activity: Arc<Activity>,
    evicted: CancellationToken,
    shutdown: CancellationToken,
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    settings: ServerSettings,
    handles: ConnectionHandles,
) {
    let ConnectionHandles {
        registry,
        id,
        activity,
        evicted,
        shutdown,
    } = handles;
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let guard = activity.request_started();
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(Body::new)).await;
                drop(guard);
                response
            }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        // Deadlines hold while closing too, so a stalled client cannot hold up shutdown.
        let deadline = activity.deadline(&settings);
        let expired = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::trace!(%peer, error = %err, "connection ended with an error");
                }
                break;
            }
            () = evicted.cancelled() => {
                tracing::debug!(%peer, "idle connection closed to admit a new one");
                break;
            }
            () = shutdown.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = activity.changed.notified() => {}
            () = expired => {
                if activity.expired(&settings) {
                    tracing::debug!(%peer, "connection closed: no complete request in time");
                    break;
                }
            }
        }
    }
    registry.remove(id);
}

/// What the connection is doing, as far as deadlines care.
struct Activity {
    opened: Instant,
    /// Requests being answered; a connection with none may be timed out or evicted.
    in_flight: AtomicUsize,
    /// Whether any request was dispatched yet (the first one gets no idle grace).
    served: AtomicBool,
    /// Milliseconds since `opened` of the last change between busy and idle.
    idle_since_ms: AtomicU64,
    /// Milliseconds since `opened` when bytes of the next request first arrived, plus
    /// one; zero while none have.
    head_started_ms: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    fn bytes_arrived(&self) {
        if self.is_idle() && self.head_started_ms.load(Ordering::Relaxed) == 0 {
            let now = self.now_ms().saturating_add(1);
            if self
                .head_started_ms
                .compare_exchange(0, now, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                self.changed.notify_one();
            }
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        self.head_started_ms.store(0, Ordering::SeqCst);
        self.changed.notify_one();
        RequestGuard(Arc::clone(self))
    }

    /// When the connection must have made progress by, if it is idle: complete headers
    /// within the header deadline of their first byte (or of opening, for the first
    /// request), else the next request within the idle deadline.
    fn deadline(&self, settings: &ServerSettings) -> Option<Instant> {
        if !self.is_idle() {
            return None;
        }
        let head_started = self.head_started_ms.load(Ordering::SeqCst);
        if head_started > 0 {
            return Some(self.at(head_started - 1) + settings.header_read_timeout);
        }
        if !self.served.load(Ordering::SeqCst) {
            return Some(self.opened + settings.header_read_timeout);
        }
        Some(self.at(self.idle_since_ms.load(Ordering::SeqCst)) + settings.idle_timeout)
    }

    fn expired(&self, settings: &ServerSettings) -> bool {
        self.deadline(settings)
            .is_some_and(|at| Instant::now() >= at)
    }
}

/// Marks the end of a request when dropped (also when its future is dropped).
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
        activity.changed.notify_one();
    }
}

/// The socket, noting when bytes of a request arrive.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Open connections, oldest first. A connection stays counted until its task has closed
/// the socket, also after it was chosen for eviction.
#[derive(Default)]
struct Registry {
    connections: Mutex<BTreeMap<u64, Entry>>,
    next_id: AtomicU64,
    closed: Notify,
}

struct Entry {
    activity: Arc<Activity>,
    evicted: CancellationToken,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> usize {
        self.lock().len()
    }

    fn add(&self) -> (u64, Arc<Activity>, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        let evicted = CancellationToken::new();
        self.lock().insert(
            id,
            Entry {
                activity: Arc::clone(&activity),
                evicted: evicted.clone(),
            },
        );
        (id, activity, evicted)
    }

    /// Asks the oldest connection without a request in progress to close, unless one is
    /// already closing.
    fn evict_idle(&self) {
        let connections = self.lock();
        if connections.values().any(|e| e.evicted.is_cancelled()) {
            return;
        }
        if let Some(entry) = connections.values().find(|e| e.activity.is_idle()) {
            entry.evicted.cancel();
        }
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.closed.notify_waiters();
    }

    async fn drained(&self) {
        loop {
            let closed = self.closed.notified();
            if self.lock().is_empty() {
                return;
            }
            closed.await;
        }
    }
}
