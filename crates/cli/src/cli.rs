//! Command-line interface.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_http::RateLimit;

use crate::{client, keyfile, serve, validate};

#[derive(Debug, Parser)]
#[command(
    name = "pipeline-controller",
    version,
    about = "Promotes Flux deployments through the environments of a Pipeline"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the promotion service.
    Serve(ServeArgs),
    /// Check every manifest under DIR; exits non-zero on errors.
    Validate { dir: PathBuf },
    /// Print the X-Signature header value for the body read from stdin.
    Sign {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value = "sha256", value_parser = parse_algorithm)]
        algo: HmacAlgorithm,
    },
    /// Approve a promotion waiting in ENVIRONMENT.
    Approve {
        /// NAMESPACE/NAME of the pipeline.
        pipeline: String,
        environment: String,
        revision: String,
        #[arg(long, env = "PIPELINE_CONTROLLER_SERVER")]
        server: String,
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Inspect promotions.
    Promotions {
        #[command(subcommand)]
        command: PromotionsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PromotionsCommand {
    /// List promotions, newest first.
    List {
        #[arg(long, env = "PIPELINE_CONTROLLER_SERVER")]
        server: String,
        /// Only this pipeline (NAMESPACE/NAME).
        #[arg(long)]
        pipeline: Option<String>,
        /// Only promotions from or to this environment.
        #[arg(long)]
        environment: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Folder of Pipeline and Secret manifests (embedded mode).
    #[arg(long, env = "PIPELINE_CONTROLLER_MANIFESTS")]
    pub manifests: PathBuf,
    /// Embedded state file; created when missing.
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_STATE",
        default_value = "pipeline-controller.redb"
    )]
    pub state: PathBuf,
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Largest accepted request body.
    #[arg(long, default_value_t = pipeline_http::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Oldest event (and approval) timestamp accepted.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub max_event_age: Duration,
    /// Per peer address, e.g. 20/30s. Unlimited when unset.
    #[arg(long)]
    pub rate_limit: Option<RateLimit>,
    /// Receiver of notification-strategy events (repeatable).
    #[arg(long = "notify-url")]
    pub notify_urls: Vec<reqwest::Url>,
    /// How often the manifests folder is checked for changes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// First retry delay of a failed promotion; doubles each attempt.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_base: Duration,
    /// Longest retry delay.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub retry_max: Duration,
    /// Attempts before a promotion is marked Failed.
    #[arg(long, default_value_t = 8)]
    pub max_attempts: u32,
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "PIPELINE_CONTROLLER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

fn parse_algorithm(text: &str) -> Result<HmacAlgorithm, String> {
    HmacAlgorithm::parse(text)
        .ok_or_else(|| format!("unsupported algorithm {text:?} (sha224, sha256, sha384, sha512)"))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Validate { dir } => Ok(validate::run(&dir)),
        Command::Sign { key_file, algo } => {
            let key = keyfile::read(&key_file)?;
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading the body from stdin")?;
            println!("{}", sign(algo, key.expose(), &body));
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve {
            pipeline,
            environment,
            revision,
            server,
            key_file,
        } => {
            let key = keyfile::read(&key_file)?;
            client::approve(&server, &pipeline, &environment, &revision, &key).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Promotions {
            command:
                PromotionsCommand::List {
                    server,
                    pipeline,
                    environment,
                    output,
                },
        } => {
            client::list(&server, pipeline.as_deref(), environment.as_deref(), output).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
