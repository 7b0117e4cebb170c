//! `pipeline-controller`: see `pipeline-controller --help`.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod embedded;
mod errors;
mod flux_config;
mod heap;
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

/// jemalloc rather than the system allocator: with glibc's per-thread arenas the
/// controller's resident memory kept growing with the number of promotions handled
/// (about 3 KiB each, with a live heap that stayed near 10 MiB), because freed memory was
/// not given back; jemalloc returns it after a short decay (a second, by a background
/// thread: `.cargo/config.toml` sets jemalloc's options at build time).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
