//! Command-line interface.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use pipeline_core::signature::{HmacAlgorithm, sign};
use pipeline_core::{PipelineRef, Verdict};
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
    /// the signed HTTP endpoint. An approval of a revision older than one already
    /// waiting, running or promoted there is refused (the older one is superseded).
    Approve(DecisionArgs),
    /// Reject a promotion waiting in ENVIRONMENT, for good, with a reason.
    Reject {
        #[command(flatten)]
        target: DecisionArgs,
        /// Why, recorded in the promotion's history.
        #[arg(long)]
        reason: String,
    },
    /// Print the CustomResourceDefinitions (Pipeline, Promotion) as YAML.
    Crds,
    /// Inspect promotions.
    Promotions {
        #[command(subcommand)]
        command: PromotionsCommand,
    },
}

/// Which promotion a decision is about, and where it is sent.
#[derive(Debug, Args)]
pub struct DecisionArgs {
    /// NAMESPACE/NAME of the pipeline.
    pub pipeline: String,
    /// The environment the promotion goes to (the one waiting for approval).
    pub environment: String,
    /// The revision being promoted.
    pub revision: String,
    #[command(flatten)]
    pub via: DecisionChannel,
}

/// Where a decision goes: a service over HTTP, signed with the approval key, or else the
/// Kubernetes API with your own credentials.
#[derive(Debug, Args)]
pub struct DecisionChannel {
    /// Send the decision to this pipeline-controller over HTTP, signed with --key-file
    /// (embedded mode, or Kubernetes mode started with --enable-hmac-approvals). Without
    /// it the decision goes through the Kubernetes API (KUBECONFIG) and RBAC decides.
    #[arg(long, env = "PIPELINE_CONTROLLER_SERVER", requires = "key_file")]
    pub server: Option<String>,
    /// File holding the environment's approval key (Secret key `approval-key`, which
    /// must differ from the webhook's `hmac-key` that leaf clusters hold).
    #[arg(long, requires = "server")]
    pub key_file: Option<PathBuf>,
    /// Your name, recorded with a decision sent over HTTP (through the Kubernetes API
    /// your username is recorded instead).
    #[arg(long, requires = "server")]
    pub by: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PromotionsCommand {
    /// Re-queue a Failed promotion for a fresh set of attempts (recorded in its history).
    Retry {
        /// The promotion's id (its Promotion's name in Kubernetes mode).
        id: String,
        /// Kubernetes mode: the Promotion's namespace [default: search all namespaces].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        via: DecisionChannel,
    },
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
        Command::Approve(target) => {
            decide(target, Verdict::Approve).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reject { target, reason } => {
            decide(target, Verdict::Reject { reason }).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Promotions {
            command: PromotionsCommand::Retry { id, namespace, via },
        } => {
            let record = match &via.server {
                Some(server) => client::get(server, &id).await?,
                None => kubernetes::find(namespace.as_deref(), &id).await?,
            };
            decide(
                DecisionArgs {
                    pipeline: record.pipeline.to_string(),
                    environment: record.target_environment,
                    revision: record.revision,
                    via,
                },
                Verdict::Retry,
            )
            .await?;
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

/// Sends a decision over the channel `target` names and says what came of it.
async fn decide(target: DecisionArgs, verdict: Verdict) -> anyhow::Result<()> {
    let pipeline = PipelineRef::parse(&target.pipeline).with_context(|| {
        format!(
            "pipeline {:?} is not of the form NAMESPACE/NAME",
            target.pipeline
        )
    })?;
    let record = match (&target.via.server, &target.via.key_file) {
        (Some(server), Some(key_file)) => {
            let key = keyfile::read(key_file)?;
            client::decide(
                server,
                &pipeline,
                &target.environment,
                &target.revision,
                &verdict,
                target.via.by.as_deref(),
                &key,
            )
            .await?
        }
        _ => kubernetes::decide(&pipeline, &target.environment, &target.revision, &verdict).await?,
    };
    let done = match verdict {
        Verdict::Approve => "approved",
        Verdict::Reject { .. } => "rejected",
        Verdict::Retry => "re-queued",
    };
    println!(
        "{done} {} of {} to {}: {} ({})",
        record.revision, record.pipeline, record.target_environment, record.phase, record.id
    );
    Ok(())
}
