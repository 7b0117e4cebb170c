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

use crate::errors::usage;
use crate::values::{parse_http_url, parse_listen, parse_server};
use crate::{client, keyfile, kubernetes, output, serve, validate};

/// `--version`: the crate version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PIPELINE_CONTROLLER_GIT_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "pipeline-controller",
    version = VERSION,
    about = "Promotes Flux deployments through the environments of a Pipeline"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the promotion service.
    Serve(Box<ServeArgs>),
    /// Check every manifest under DIR; exits non-zero on errors.
    Validate {
        /// Folder of Pipeline and Secret manifests (read recursively, as `serve` does).
        dir: PathBuf,
    },
    /// Print the X-Signature header value for the body read from stdin.
    Sign {
        /// File holding the HMAC key (one trailing newline is ignored).
        #[arg(long)]
        key_file: PathBuf,
        /// Hash of the HMAC: sha224, sha256, sha384 or sha512.
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
    /// Write the Flux Provider and Alert every leaf cluster needs (a folder per cluster
    /// and namespace) and a Flux Kustomization per cluster that applies them from the
    /// management cluster, for a GitOps repository.
    FluxConfig(FluxConfigArgs),
    /// Inspect promotions.
    Promotions {
        /// What to do with promotions.
        #[command(subcommand)]
        command: PromotionsCommand,
    },
    /// Print a shell completion script, e.g.
    /// `pipeline-controller completion bash > /etc/bash_completion.d/pipeline-controller`.
    Completion {
        /// The shell to complete in.
        shell: clap_complete::Shell,
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
    #[arg(long, env = "PIPELINE_CONTROLLER_SERVER", requires = "key_file", value_name = "URL", value_parser = parse_server)]
    pub server: Option<String>,
    /// File holding the environment's approval key (Secret key `approval-key`, which
    /// must differ from the webhook's `hmac-key` that leaf clusters hold).
    #[arg(long, requires = "server")]
    pub key_file: Option<PathBuf>,
    /// Your name, recorded with a decision sent over HTTP (through the Kubernetes API
    /// your username is recorded instead).
    #[arg(long, requires = "server")]
    pub by: Option<String>,
    /// Print the changed record as table, json or yaml [default: one line saying what
    /// was done].
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
}

/// Where records are read from: a service over HTTP, or else the cluster.
#[derive(Debug, Args)]
pub struct RecordSource {
    /// Read from the pipeline-controller at this URL (http://HOST:PORT) instead of the
    /// cluster (KUBECONFIG).
    #[arg(long, env = "PIPELINE_CONTROLLER_SERVER", value_name = "URL", value_parser = parse_server)]
    pub server: Option<String>,
    /// Only promotions of pipelines in this namespace. From the cluster, only this
    /// namespace is read, so RBAC on that namespace alone is enough.
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Every namespace (the default without -n or --pipeline; needs cluster-wide read
    /// access to Promotions when reading from the cluster).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

/// Where `flux-config` reads pipelines and writes its folder.
#[derive(Debug, Args)]
pub struct FluxConfigArgs {
    /// Base URL leaf clusters reach the webhook at; each Provider's address is
    /// `<URL>/pipelines/promotions/<namespace>/<name>/<environment>`. Without it (and
    /// without --manifests) it is derived from the cluster as `serve` derives it: an
    /// Ingress routing /pipelines/promotions/ to --service-name, else that Service's
    /// LoadBalancer address; the choice is printed.
    #[arg(long, value_name = "URL", value_parser = crate::values::parse_http_url)]
    pub public_url: Option<reqwest::Url>,
    /// Without --public-url: the controller's Service, whose Ingress or load balancer
    /// gives the URL.
    #[arg(long, default_value = "pipeline-controller")]
    pub service_name: String,
    /// Without --public-url: namespace of that Service.
    #[arg(long, default_value = "pipeline-system")]
    pub service_namespace: String,
    /// Folder to write (its clusters/ and management/ subfolders are replaced).
    #[arg(long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Read pipelines (and GitopsClusters) from this manifests folder instead of the
    /// cluster (KUBECONFIG).
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Only this pipeline (NAMESPACE/NAME) [default: every pipeline].
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pipeline: Option<String>,
    /// The output folder's path inside the Git repository the management cluster's Flux
    /// reads (the Kustomizations' spec.path).
    #[arg(long, default_value = "./pipelines-wiring")]
    pub repo_path: String,
    /// The management cluster's GitRepository holding that repository (NAMESPACE/NAME).
    #[arg(long, default_value = "flux-system/flux-system")]
    pub source: String,
    /// Namespace of the generated Flux Kustomizations in the management cluster.
    #[arg(long, default_value = "flux-system")]
    pub kustomization_namespace: String,
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
        /// With --server: read the promotion from the service's internal listener at
        /// this URL (`serve --internal-listen`, where the promotions API is); the retry
        /// itself goes to --server, the public listener [default: --server].
        #[arg(long, env = "PIPELINE_CONTROLLER_INTERNAL_SERVER", requires = "server", value_name = "URL", value_parser = parse_server)]
        internal_server: Option<String>,
        #[command(flatten)]
        via: DecisionChannel,
    },
    /// List promotions, newest first: from the service at --server, else from the
    /// cluster (KUBECONFIG).
    List {
        #[command(flatten)]
        source: RecordSource,
        /// Only this pipeline (NAMESPACE/NAME).
        #[arg(long)]
        pipeline: Option<String>,
        /// Only promotions from or to this environment.
        #[arg(long)]
        environment: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Show one promotion by id: from the service at --server, else from the cluster
    /// (the Promotion named ID; its namespace is the pipeline's).
    Get {
        /// The promotion's id (as listed, and in the Location header of the webhook's
        /// 202 answer).
        id: String,
        /// Read from the pipeline-controller at this URL (http://HOST:PORT) instead of
        /// the cluster (KUBECONFIG).
        #[arg(long, env = "PIPELINE_CONTROLLER_SERVER", value_name = "URL", value_parser = parse_server)]
        server: Option<String>,
        /// From the cluster: look in this namespace only [default: search all namespaces,
        /// then the current context's namespace when that is not allowed].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: OutputFormat,
    },
}

/// How records are printed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns, one line per record.
    Table,
    /// Pretty-printed JSON, as the HTTP API answers.
    Json,
    /// YAML.
    Yaml,
}

/// How `serve` writes its logs (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, keys never repeated.
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
    /// Address (IP:PORT) of the public listener: the webhook and signed approvals, what
    /// leaf clusters and approvers call; 0.0.0.0:8080 for every interface.
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "IP:PORT",
        value_parser = parse_listen
    )]
    pub listen: SocketAddr,
    /// Address (IP:PORT) of the internal listener: the promotions API
    /// (`promotions list --server`), the dashboard, /metrics, /healthz and /readyz.
    /// Keep it inside the cluster: it is not authenticated.
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_INTERNAL_LISTEN",
        default_value = "127.0.0.1:8081",
        value_name = "IP:PORT",
        value_parser = parse_listen
    )]
    pub internal_listen: SocketAddr,
    /// How often the delivery insights (deployments, lead time, approval wait, failure
    /// ratio, time to recover) are recomputed from the records for /metrics.
    #[arg(
        long,
        env = "PIPELINE_CONTROLLER_INSIGHTS_INTERVAL",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub insights_interval: Duration,
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
    /// Receiver of notification-strategy events, an http:// or https:// URL (repeatable).
    #[arg(long = "notify-url", value_name = "URL", value_parser = parse_http_url)]
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
    /// Do not watch the targets' HelmReleases and Kustomizations: promotions then come
    /// from signed events only, and run without checking the source environment.
    #[arg(long)]
    pub no_deployment_watch: bool,
    /// Finished promotions older than this are deleted (0s keeps them whatever their age).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub retention_max_age: Duration,
    /// Finished promotions kept per pipeline and target environment, newest first; older
    /// ones are deleted (0 keeps them all). Unfinished ones are never deleted.
    #[arg(long, default_value_t = 100)]
    pub retention_per_environment: usize,
    /// How long a promotion waits for every target of its source environment to be
    /// Ready at its revision (where the controller watches them) before it fails.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub health_gate_timeout: Duration,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "PIPELINE_CONTROLLER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log level: error, warn, info, debug or trace, or filter directives such as
    /// info,pipeline_git=debug. RUST_LOG, when set, wins.
    #[arg(
        long,
        default_value = "info",
        env = "PIPELINE_CONTROLLER_LOG_LEVEL",
        value_name = "LEVEL",
        value_parser = crate::logging::parse_log_level
    )]
    pub log_level: String,
    /// Kubernetes mode settings.
    #[command(flatten)]
    pub kubernetes: crate::kubernetes::KubernetesArgs,
    /// Pull-request strategy settings.
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
    /// Largest size on disk of the pull-request clone cache (in --pr-work-dir/clones),
    /// e.g. 2Gi, 500Mi; 0 turns it off (a fresh clone per promotion).
    #[arg(long, env = "PIPELINE_CONTROLLER_PR_CLONE_CACHE_MAX_BYTES", default_value = "2Gi", value_parser = pipeline_git::clones::parse_size)]
    pub pr_clone_cache_max_bytes: u64,
    /// Most clones the pull-request clone cache keeps (least recently used go first);
    /// 0 turns it off.
    #[arg(long, env = "PIPELINE_CONTROLLER_PR_CLONE_CACHE_MAX_CLONES", default_value_t = pipeline_git::DEFAULT_CLONE_CACHE_MAX_CLONES)]
    pub pr_clone_cache_max_clones: usize,
}

fn parse_algorithm(text: &str) -> Result<HmacAlgorithm, String> {
    HmacAlgorithm::parse(text)
        .ok_or_else(|| format!("unsupported algorithm {text:?} (sha224, sha256, sha384, sha512)"))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Validate { dir } => Ok(validate::run(&dir)),
        Command::FluxConfig(args) => {
            crate::flux_config::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
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
            command:
                PromotionsCommand::Retry {
                    id,
                    namespace,
                    internal_server,
                    via,
                },
        } => {
            let record = match &via.server {
                Some(server) => {
                    client::get(internal_server.as_ref().unwrap_or(server), &id).await?
                }
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
                    source,
                    pipeline,
                    environment,
                    output,
                },
        } => {
            let pipeline = match pipeline.as_deref() {
                None => None,
                Some(text) => Some(PipelineRef::parse(text).ok_or_else(|| {
                    usage(format!(
                        "--pipeline {text:?} is not of the form NAMESPACE/NAME, e.g. flux-system/podinfo"
                    ))
                })?),
            };
            if let (Some(pipeline), Some(namespace)) = (&pipeline, &source.namespace)
                && pipeline.namespace != *namespace
            {
                return Err(usage(format!(
                    "--pipeline {pipeline} is in namespace {}, not -n {namespace}; drop -n or change it",
                    pipeline.namespace
                )));
            }
            let mut records = match &source.server {
                Some(server) => {
                    client::list(server, pipeline.as_ref(), environment.as_deref()).await?
                }
                None => {
                    let namespace = pipeline
                        .as_ref()
                        .map(|p| p.namespace.clone())
                        .or(source.namespace.clone());
                    kubernetes::list(namespace.as_deref(), pipeline, environment).await?
                }
            };
            if let Some(namespace) = &source.namespace {
                records.retain(|r| r.pipeline.namespace == *namespace);
            }
            output::print_records(&records, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Promotions {
            command:
                PromotionsCommand::Get {
                    id,
                    server,
                    namespace,
                    output,
                },
        } => {
            let record = match &server {
                Some(server) => client::get(server, &id).await?,
                None => kubernetes::get(namespace.as_deref(), &id).await?,
            };
            output::print_record(&record, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "pipeline-controller",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends a decision over the channel `target` names and says what came of it.
async fn decide(target: DecisionArgs, verdict: Verdict) -> anyhow::Result<()> {
    let pipeline = PipelineRef::parse(&target.pipeline).ok_or_else(|| {
        usage(format!(
            "pipeline {:?} is not of the form NAMESPACE/NAME, e.g. flux-system/podinfo",
            target.pipeline
        ))
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
    if let Some(format) = target.via.output {
        return output::print_record(&record, format);
    }
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag and argument of every subcommand says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if arg.is_hide_set() || matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let command = Cli::command();
        command.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&command, "pipeline-controller", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    #[test]
    fn version_names_the_commit() {
        let version = Cli::command().render_version();
        assert!(version.contains("(commit "), "{version}");
    }
}
