//! `bare-hmac-server`: the baseline `pipeline-bench` measures pipeline-controller against.
//!
//! An axum server on loopback that does the least a webhook must do: read the body
//! (256 KiB limit), verify `X-Signature: sha256=<hex>` in constant time with a fixed key
//! (`pipeline_core::signature::verify`), parse the JSON and answer 202 (or 401 / 400 /
//! 413). No store, no validation, no logging.
//!
//! Usage: `bare-hmac-server [PORT] [--key-file F]`; prints the bound address on stdout.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use clap::Parser;

/// The quickstart key (`examples/quickstart/hmac-key.txt`), used without `--key-file`.
const DEFAULT_KEY: &[u8] = b"quickstart-hmac-key-0123456789";
const MAX_BODY_BYTES: usize = 256 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "bare-hmac-server",
    about = "Baseline webhook: HMAC check + JSON parse, nothing else"
)]
struct Args {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(default_value_t = 0)]
    port: u16,
    /// File holding the raw HMAC key (one trailing newline ignored).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

async fn webhook(State(key): State<Arc<Vec<u8>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers
        .get("x-signature")
        .and_then(|value| value.to_str().ok());
    if pipeline_core::signature::verify(signature, &key, &body).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(_) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let key = match &args.key_file {
        Some(path) => {
            let mut key = std::fs::read(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            if key.last() == Some(&b'\n') {
                key.pop();
            }
            key
        }
        None => DEFAULT_KEY.to_vec(),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .fallback(webhook)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(key));
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)))
            .await
            .context("binding the listener")?;
    let address = listener.local_addr().context("reading the bound address")?;
    println!("{address}");
    axum::serve(listener, app).await.context("serving HTTP")?;
    Ok(())
}
