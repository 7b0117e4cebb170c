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

use crate::{client, keyfile, kubernetes, serve, validate};

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
    Serve(Box<ServeArgs>),
    /// Check every manifest under DIR; exits non-zero on errors.
    Validate { dir: PathBuf },
    /// Print the X-Signature header value for the body read from stdin.
    Sign {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value = "sha256", value_parser = parse_algorithm)]
        algo: HmacAlgorithm,
    },
    /// Approve a promotion waiting in ENVIRONMENT: through the Kubernetes API
    /// (KUBECONFIG; Kubernetes RBAC decides), or with --server and --key-file through
    /// the signed HTTP approval endpoint.
    Approve {
        /// NAMESPACE/NAME of the pipeline.
        pipeline: String,
        environment: String,
        revision: String,
        #[arg(long, env = "PIPELINE_CONTROLLER_SERVER", requires = "key_file")]
        server: Option<String>,
        #[arg(long, requires = "server")]
        key_file: Option<PathBuf>,
    },
    /// Print the CustomResourceDefinitions (Pipeline, Promotion) as YAML.
    Crds,
    /// Inspect promotions.
    Promotions {
        #[command(subcommand)]
        command: PromotionsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PromotionsCommand {
    /// List promotions, newest first: from the service at --server, else from the
    /// cluster (KUBECONFIG).
    List {
        #[arg(long, env = "PIPELINE_CONTROLLER_SERVER")]
        server: Option<String>,
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
    /// Folder of Pipeline and Secret manifests (embedded mode). Without it the service
    /// runs in Kubernetes mode (in-cluster config or KUBECONFIG).
    #[arg(long, env = "PIPELINE_CONTROLLER_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Embedded state file; created when missing.
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_STATE",
        default_value = "pipeline-controller.redb"
    )]
    pub state: PathBuf,
    /// Start with an empty store when the state file exists but is empty (0 bytes).
    /// Without it such a file is refused: it usually means the data was lost.
    #[arg(long)]
    pub init_empty_state: bool,
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Close a connection that has not sent complete request headers within this time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Close a kept-alive connection idle for this long between requests.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Most connections open at once (lowered to fit the open-file limit). When full,
    /// the oldest connection without a request in progress is closed for a new one.
    #[arg(long, default_value_t = pipeline_http::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
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
    #[command(flatten)]
    pub kubernetes: crate::kubernetes::KubernetesArgs,
    #[command(flatten)]
    pub pull_request: PullRequestArgs,
}

/// Settings of the pull-request strategy.
#[derive(Debug, Args)]
pub struct PullRequestArgs {
    /// Author and committer name of promotion commits.
    #[arg(long, env = "PIPELINE_CONTROLLER_GIT_AUTHOR_NAME", default_value = pipeline_git::DEFAULT_AUTHOR_NAME)]
    pub git_author_name: String,
    /// Author and committer email of promotion commits.
    #[arg(long, env = "PIPELINE_CONTROLLER_GIT_AUTHOR_EMAIL", default_value = pipeline_git::DEFAULT_AUTHOR_EMAIL)]
    pub git_author_email: String,
    /// Commit subject and pull request title; {pipeline}, {namespace}, {name},
    /// {environment}, {version} and {source} are replaced.
    /// [default: "Promote {pipeline} to {environment}: {version}"]
    #[arg(long)]
    pub pr_title: Option<String>,
    /// Where repositories are cloned for pull-request promotions [default: the system temp dir].
    #[arg(long, env = "PIPELINE_CONTROLLER_PR_WORK_DIR")]
    pub pr_work_dir: Option<PathBuf>,
    /// Forge API base URL for repositories whose URL starts with PREFIX, where the
    /// derived one does not fit (repeatable), e.g.
    /// https://git.example/gitlab/=https://git.example/gitlab/api/v4
    #[arg(long = "forge-api", value_name = "PREFIX=URL")]
    pub forge_api: Vec<String>,
}

fn parse_algorithm(text: &str) -> Result<HmacAlgorithm, String> {
    HmacAlgorithm::parse(text)
        .ok_or_else(|| format!("unsupported algorithm {text:?} (sha224, sha256, sha384, sha512)"))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Validate { dir } => Ok(validate::run(&dir)),
        Command::Crds => {
            print!(
                "{}",
                pipeline_crds::crds_yaml().context("rendering the CRDs")?
            );
            Ok(ExitCode::SUCCESS)
        }
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
            match (server, key_file) {
                (Some(server), Some(key_file)) => {
                    let key = keyfile::read(&key_file)?;
                    client::approve(&server, &pipeline, &environment, &revision, &key).await?;
                }
                _ => kubernetes::approve(&pipeline, &environment, &revision).await?,
            }
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
            match server {
                Some(server) => {
                    client::list(&server, pipeline.as_deref(), environment.as_deref(), output)
                        .await?;
                }
                None => {
                    let records =
                        kubernetes::list(pipeline.as_deref(), environment.as_deref()).await?;
                    client::print_records(&records, output)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
