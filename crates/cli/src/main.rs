//! `pipeline-controller`: see `pipeline-controller --help`.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod keyfile;
mod kubernetes;
mod serve;
mod validate;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
