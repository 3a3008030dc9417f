//! The `reaper` binary: `reaper daemon`, `reaper unload`, and the client
//! commands. Everything else lives in the library (`lib.rs`).

use clap::Parser;
use tracing::level_filters::LevelFilter;

use reaper::cli::{self, Cli, CliCommand};
use reaper::config::Config;
use reaper::daemon;

fn init_logging(default: LevelFilter) {
    let level = std::env::var("REAPER_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(default);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        CliCommand::Daemon { config } => {
            init_logging(LevelFilter::INFO);
            let loaded = match &config {
                Some(path) => Config::load(path),
                None => Ok(Config::default()),
            };
            loaded
                .map_err(reaper::error::Error::from)
                .and_then(|c| daemon::run(c, config))
                .map(|()| 0)
        }
        CliCommand::Features => {
            init_logging(LevelFilter::WARN);
            cli::features()
        }
        CliCommand::Unload { config } => {
            init_logging(LevelFilter::WARN);
            cli::unload(config)
        }
        other => {
            init_logging(LevelFilter::WARN);
            cli::run_client(other)
        }
    };
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("reaper: {}", reaper::error::chain(&e));
            std::process::exit(1);
        }
    }
}
