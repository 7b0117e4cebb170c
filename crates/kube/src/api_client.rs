//! The controller's Kubernetes API client: kube-rs's client over HTTP/2 when the API
//! server offers it (as client-go does), so the requests to a cluster share one TLS
//! connection instead of a pool that grows with the largest burst of concurrent
//! requests (52 connections after a burst of creates, retention deletes and status
//! writes; each with its own buffers here and on the API server).
//!
//! Watches keep a connection of their own each (HTTP/1.1, as kube-rs's default client
//! does): a watch holds its HTTP/2 stream for as long as it runs, and an API server
//! allows a bounded number of streams per connection (kube-apiserver's
//! `--http2-max-streams-per-connection`). With one Secret watch per namespace of
//! Pipelines, 1,000 namespaces took every stream of a shared connection, and the
//! requests queued behind them waited for good. (Go's HTTP/2 transport opens another
//! connection at the limit; hyper's waits for a free stream.)
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
use tower::steer::Steer;
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
    let server_name = match &config.tls_server_name {
        Some(name) => Some(
            rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                kube::Error::Service(format!("invalid tls-server-name {name:?}: {e}").into())
            })?,
        ),
        None => None,
    };
    let https = || {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http();
        match &server_name {
            Some(name) => builder.with_server_name_resolver(
                hyper_rustls::FixedServerNameResolver::new(name.clone()),
            ),
            None => builder,
        }
    };
    let timeouts = |mut connector: TimeoutConnector<_>| {
        connector.set_connect_timeout(config.connect_timeout);
        connector.set_read_timeout(config.read_timeout);
        connector.set_write_timeout(config.write_timeout);
        connector
    };
    let requests = timeouts(TimeoutConnector::new(
        https().enable_all_versions().wrap_connector(http.clone()),
    ));
    let watches = timeouts(TimeoutConnector::new(
        https().enable_http1().wrap_connector(http),
    ));
    let client = |connector| {
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_keep_alive_interval(PING_INTERVAL)
            .http2_keep_alive_timeout(PING_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(connector)
    };
    let client = Steer::new(
        [client(requests), client(watches)],
        |request: &http::Request<kube::client::Body>, _: &[_]| usize::from(is_watch(request)),
    );
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

/// A WATCH request (`watch=true` or `watch=1` in the query), which holds its connection
/// or stream until it ends.
fn is_watch<B>(request: &http::Request<B>) -> bool {
    request.uri().query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1"))
    })
}

#[cfg(test)]
mod tests {
    use super::is_watch;

    #[test]
    fn watches_are_told_from_other_requests_by_their_query() {
        let request = |uri: &str| http::Request::get(uri).body(()).unwrap();
        assert!(is_watch(&request(
            "/apis/pipelines.weave.works/v1alpha1/promotions?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=12"
        )));
        assert!(is_watch(&request("/api/v1/namespaces/a/secrets?watch=1")));
        assert!(!is_watch(&request(
            "/api/v1/namespaces/a/secrets?limit=500"
        )));
        assert!(!is_watch(&request("/api/v1/namespaces/watch=true/secrets")));
        assert!(!is_watch(&request(
            "/api/v1/secrets?fieldSelector=watch%3Dtrue"
        )));
    }
}
