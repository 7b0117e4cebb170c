//! Client commands talking to a running service over HTTP.

use anyhow::Context;
use chrono::Utc;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_core::{ApprovalBody, PipelineRef, PromotionRecord, SecretBytes, Verdict};

use crate::cli::OutputFormat;

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
        .with_context(|| format!("sending the decision to {}", base(server)))?;
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
        .with_context(|| format!("reading promotion {id} from {}", base(server)))?;
    if !response.status().is_success() {
        return Err(failure(response).await);
    }
    response.json().await.context("decoding the answer")
}

pub async fn list(
    server: &str,
    pipeline: Option<&str>,
    environment: Option<&str>,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if let Some(p) = pipeline {
        query.push(("pipeline", p));
    }
    if let Some(e) = environment {
        query.push(("environment", e));
    }
    let response = http()?
        .get(format!("{}/api/v1/promotions", base(server)))
        .query(&query)
        .send()
        .await
        .with_context(|| format!("listing promotions from {}", base(server)))?;
    if !response.status().is_success() {
        return Err(failure(response).await);
    }
    let records: Vec<PromotionRecord> = response.json().await.context("decoding the answer")?;
    print_records(&records, output)
}

pub fn print_records(records: &[PromotionRecord], output: OutputFormat) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&records)?),
        OutputFormat::Table => print!("{}", table(records)),
    }
    Ok(())
}

fn table(records: &[PromotionRecord]) -> String {
    let header = [
        "PIPELINE", "FROM", "TO", "REVISION", "PHASE", "ATTEMPTS", "AGE", "MESSAGE",
    ];
    let now = Utc::now();
    let rows: Vec<[String; 8]> = records
        .iter()
        .map(|r| {
            let age = (now - r.created_at).to_std().unwrap_or_default();
            let age = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
            [
                r.pipeline.to_string(),
                r.source_environment.clone(),
                r.target_environment.clone(),
                r.revision.clone(),
                r.phase.to_string(),
                r.attempts.to_string(),
                age.to_string(),
                r.result.clone().unwrap_or_else(|| r.message.clone()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if records.is_empty() {
        out.push_str("(no promotions)\n");
    }
    out
}
