//! The controller's Kubernetes API client: kube-rs's client over HTTP/2 when the API
//! server offers it (as client-go does), so every request and watch of a cluster shares
//! one TLS connection instead of a pool that grows with the largest burst of concurrent
//! requests (52 connections after a burst of creates, retention deletes and status
//! writes; each with its own buffers here and on the API server).
//!
//! Everything else is kube-rs's own stack: its TLS configuration (client certificates,
//! CA, `tls-server-name`), connect/read/write timeouts, retries of 429/503/504 answers,
//! authentication layer (tokens, exec plugins, refresh), base URI and extra headers. A
//! configuration kube-rs would send through a proxy keeps kube-rs's own client, which
//! knows how.

use std::time::Duration;

use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use kube::{Client, Config};
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// How often an otherwise quiet connection is pinged, and how long a ping may go
/// unanswered before the connection (and every request on it) is given up: a connection
/// to an API server that went away is noticed within a minute. The pings also keep
/// kube-rs's read timeout (meant for one request per connection) from ending a quiet
/// connection that carries a watch.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// A client for `config`: HTTP/2 to an `https` API server that negotiates it (HTTP/1.1
/// otherwise), kube-rs's default client when a proxy is configured.
pub fn api_client(config: Config) -> Result<Client, kube::Error> {
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let tls = config.rustls_client_config()?;
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                kube::Error::Service(format!("invalid tls-server-name {name:?}: {e}").into())
            })?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let mut connector = TimeoutConnector::new(builder.enable_all_versions().wrap_connector(http));
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(client);
    Ok(Client::new(service, config.default_namespace))
}
