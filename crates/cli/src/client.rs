//! Client commands talking to a running service over HTTP.

use anyhow::Context;
use chrono::Utc;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_core::{ApprovalBody, PipelineRef, PromotionRecord, SecretBytes, Verdict};

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

fn base(server: &str) -> &str {
    server.trim_end_matches('/')
}

/// Reads an error body `{"error", "reason"}` into one line.
async fn failure(response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            let error = v.get("error")?.as_str()?.to_string();
            let reason = v.get("reason").and_then(|r| r.as_str()).unwrap_or("");
            Some(format!("{error} ({reason})"))
        })
        .unwrap_or(text);
    anyhow::anyhow!("server answered {status}: {detail}")
}

/// Sends an approver's decision about the promotion of `revision` into `environment`,
/// signed with the environment's approval key. Returns the record as it stands after.
pub async fn decide(
    server: &str,
    pipeline: &PipelineRef,
    environment: &str,
    revision: &str,
    verdict: &Verdict,
    by: Option<&str>,
    key: &SecretBytes,
) -> anyhow::Result<PromotionRecord> {
    let body = serde_json::to_vec(&ApprovalBody {
        pipeline: pipeline.to_string(),
        environment: environment.to_string(),
        revision: revision.to_string(),
        timestamp: Utc::now(),
        action: Some(verdict.action().to_string()),
        by: by.map(str::to_string),
        reason: match verdict {
            Verdict::Reject { reason } => Some(reason.clone()),
            _ => None,
        },
    })?;
    let route = match verdict {
        Verdict::Approve => "approvals",
        Verdict::Reject { .. } => "rejections",
        Verdict::Retry => "retries",
    };
    let encode = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    let url = format!(
        "{}/pipelines/{route}/{}/{}/{}/{}",
        base(server),
        encode(&pipeline.namespace),
        encode(&pipeline.name),
        encode(environment),
        encode(revision)
    );
    let response = http()?
        .post(&url)
        .header("content-type", "application/json")
        .header(
            "x-signature",
            sign(HmacAlgorithm::Sha256, key.expose(), &body),
        )
        .body(body)
        .send()
        .await
        .map_err(|e| unreachable(e, server))?;
    if !response.status().is_success() {
        return Err(failure(response).await);
    }
    response.json().await.context("decoding the answer")
}

/// One promotion by id, from the service at `server`.
pub async fn get(server: &str, id: &str) -> anyhow::Result<PromotionRecord> {
    let encode = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    let response = http()?
        .get(format!("{}/api/v1/promotions/{}", base(server), encode(id)))
        .send()
        .await
        .map_err(|e| unreachable(e, server))?;
    if !response.status().is_success() {
        return Err(api_failure(response, server).await);
    }
    response.json().await.context("decoding the answer")
}

/// Like [`failure`], saying where the API is when `server` does not serve it (the
/// public listener answers only the webhook and decisions).
async fn api_failure(response: reqwest::Response, server: &str) -> anyhow::Error {
    let no_such_path = response.status() == reqwest::StatusCode::NOT_FOUND;
    let error = failure(response).await;
    if no_such_path && error.to_string().contains("(not_found)") {
        anyhow::anyhow!(
            "{error}; {} does not serve the promotions API: pass the URL of the internal listener (serve --internal-listen) as --server",
            base(server)
        )
    } else {
        error
    }
}

/// Promotions from the service at `server`, newest first.
pub async fn list(
    server: &str,
    pipeline: Option<&PipelineRef>,
    environment: Option<&str>,
) -> anyhow::Result<Vec<PromotionRecord>> {
    let pipeline = pipeline.map(ToString::to_string);
    let mut query = Vec::new();
    if let Some(p) = &pipeline {
        query.push(("pipeline", p.as_str()));
    }
    if let Some(e) = environment {
        query.push(("environment", e));
    }
    let response = http()?
        .get(format!("{}/api/v1/promotions", base(server)))
        .query(&query)
        .send()
        .await
        .map_err(|e| unreachable(e, server))?;
    if !response.status().is_success() {
        return Err(api_failure(response, server).await);
    }
    response.json().await.context("decoding the answer")
}

/// A request that got no answer, as one line saying what to check.
fn unreachable(err: reqwest::Error, server: &str) -> anyhow::Error {
    if err.is_connect() {
        anyhow::anyhow!(
            "cannot connect to {} ({}); is pipeline-controller serving there? Check --server",
            base(server),
            pipeline_core::report::error_chain(&err)
                .rsplit(": ")
                .next()
                .unwrap_or("connection failed")
        )
    } else if err.is_timeout() {
        anyhow::anyhow!("{} did not answer within 30s", base(server))
    } else {
        anyhow::anyhow!(
            "asking {}: {}",
            base(server),
            pipeline_core::report::error_chain(&err)
        )
    }
}
