//! `pipeline-controller`: see `pipeline-controller --help`.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod embedded;
mod errors;
mod flux_config;
mod keyfile;
mod kubeconfig;
mod kubernetes;
mod logging;
mod output;
mod serve;
mod validate;
mod values;
mod wiring;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return errors::clap_failure(&err),
    };
    match cli::run(cli).await {
        Ok(code) => code,
        Err(err) => errors::report(&err),
    }
}
