//! `datapath-user`: runs the pod IPv4 egress datapath and inspects it.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let args = cli::Cli::parse();
    match cli::execute(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datapath-user: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
