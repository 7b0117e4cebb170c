//! Benchmark: one pull-request promotion on a repository of 10,000 files, against a real
//! Gitea on loopback. Prints the time from the promotion being handed to the strategy to
//! the pull request URL, and peak memory (VmHWM) of this process and of the largest git
//! child process.
//!
//! ```sh
//! scripts/ensure-test-binaries.sh gitea
//! cargo run --release -p pipeline-git --features testing --example pr-bench [-- FILES]
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pipeline_core::pipeline::parse_pipeline_spec;
use pipeline_core::{
    Pipeline, PipelineRef, PromotionContext, PromotionRecord, PromotionStrategy, SecretBytes,
    SecretLookupError, SecretSource, Trigger,
};
use pipeline_git::testing::{ADMIN_PASSWORD, ADMIN_USER, Gitea};
use pipeline_git::{PullRequestSettings, PullRequestStrategy};
use serde_json::json;

struct Secrets(String);

#[async_trait::async_trait]
impl SecretSource for Secrets {
    async fn secret_value(
        &self,
        _: &str,
        _: &str,
        key: &str,
    ) -> Result<Option<SecretBytes>, SecretLookupError> {
        Ok(match key {
            "username" => Some(ADMIN_USER.into()),
            "password" => Some(ADMIN_PASSWORD.into()),
            "token" => Some(self.0.clone()),
            _ => None,
        }
        .map(|v: String| SecretBytes::new(v.into_bytes())))
    }
}

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Descendants of `pid`, not descending into `skip` (Gitea and its own git processes).
fn children(pid: &str, out: &mut Vec<String>, skip: Option<&str>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            for child in text.split_whitespace() {
                if Some(child) == skip {
                    continue;
                }
                out.push(child.to_string());
                children(child, out, skip);
            }
        }
    }
}

fn comm(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split('\0')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() {
    let files: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    // RUST_LOG=pipeline_git=debug shows each git command and its duration.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let gitea = Gitea::start().await.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let gitea_pid = gitea_pid();

    // A fleet repository: `files` files, most YAML, 10 of them marked for the promotion.
    let mut content = Vec::with_capacity(files);
    for i in 0..files {
        let app = format!("app-{i:05}");
        if i % 10 == 9 {
            content.push((format!("docs/{app}.md"), format!("# {app}\n\nNotes.\n")));
            continue;
        }
        let marker = if i % 1000 == 0 {
            "flux-system:podinfo:prod"
        } else {
            "flux-system:other:prod"
        };
        content.push((
            format!("clusters/prod/{}/{app}/release.yaml", i / 500),
            format!(
                "apiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\nmetadata:\n  name: {app}\n  namespace: prod\nspec:\n  chart:\n    spec:\n      chart: {app}\n      version: \"1.0.0\" # {{\"$promotion\": \"{marker}\"}}\n  values:\n    replicas: 3\n"
            ),
        ));
    }
    let setup = Instant::now();
    let url = gitea.create_repo("fleet", &content).await.unwrap();
    drop(content);
    println!(
        "repository: {files} files pushed to Gitea in {:.2}s",
        setup.elapsed().as_secs_f64()
    );

    let spec = parse_pipeline_spec(json!({
        "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
        "environments": [
            {"name": "staging", "targets": [{"namespace": "staging"}]},
            {"name": "prod", "targets": [{"namespace": "prod"}]}
        ],
        "promotion": {"strategy": {"pull-request": {
            "type": "gitea", "url": url, "baseBranch": "main", "secretRef": {"name": "git"}}}}
    }))
    .unwrap();
    let pipeline = Pipeline {
        reference: PipelineRef::new("flux-system", "podinfo"),
        spec,
    };
    let work = tempfile::tempdir().unwrap();
    let strategy = PullRequestStrategy::new(
        PullRequestSettings {
            work_dir: work.path().to_path_buf(),
            ..PullRequestSettings::default()
        },
        pipeline_git::forge::http_client().unwrap(),
    );
    let secrets = Secrets(gitea.token.clone());

    let own_before = status_kib("self", "VmHWM:").unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let me = std::process::id().to_string();
        std::thread::spawn(move || {
            let mut peaks: HashMap<String, (u64, String)> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let mut pids = Vec::new();
                children(&me, &mut pids, gitea_pid.as_deref());
                for pid in pids {
                    if let Some(hwm) = status_kib(&pid, "VmHWM:") {
                        let entry = peaks.entry(pid.clone()).or_insert((0, comm(&pid)));
                        entry.0 = entry.0.max(hwm);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peaks.into_values().max_by_key(|(kib, _)| *kib)
        })
    };

    for (round, revision) in ["2.0.0", "2.0.1"].into_iter().enumerate() {
        let record = PromotionRecord::new(
            pipeline.reference.clone(),
            "staging",
            "prod",
            revision,
            false,
            Trigger::default(),
            chrono::Utc::now(),
        );
        let start = Instant::now();
        let outcome = strategy
            .promote(PromotionContext {
                record: &record,
                pipeline: &pipeline,
                promotion: pipeline.promotion_for("prod").unwrap(),
                secrets: &secrets,
            })
            .await;
        let elapsed = start.elapsed();
        match outcome {
            Ok(outcome) => println!(
                "promotion {} ({revision}): {:.3}s: {} -> {}",
                round + 1,
                elapsed.as_secs_f64(),
                outcome.message,
                outcome.result.unwrap_or_default()
            ),
            Err(err) => {
                println!(
                    "promotion failed after {:.3}s: {err}",
                    elapsed.as_secs_f64()
                );
                std::process::exit(1);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let child_peak = sampler.join().unwrap();
    let own_after = status_kib("self", "VmHWM:").unwrap_or(0);
    println!(
        "peak memory: this process VmHWM {:.1} MiB (before the promotions {:.1} MiB)",
        own_after as f64 / 1024.0,
        own_before as f64 / 1024.0
    );
    if let Some((kib, command)) = child_peak {
        println!(
            "peak memory: largest git child VmHWM {:.1} MiB ({command})",
            kib as f64 / 1024.0
        );
    }
    drop(gitea);
}

fn gitea_pid() -> Option<String> {
    let mut pids = Vec::new();
    children("self", &mut pids, None);
    pids.into_iter().find(|p| comm(p).contains("gitea"))
}
