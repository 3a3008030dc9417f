//! The `reaper` binary: `reaper daemon`, `reaper unload`, and the client
//! commands. Everything else lives in the library (`lib.rs`).

use clap::Parser;
use tracing::level_filters::LevelFilter;

use reaper::cli::{self, Cli, CliCommand};
use reaper::config::{Config, LogFormat};
use reaper::{daemon, logging};

fn main() {
    let cli = Cli::parse();
    let quiet = || logging::init(LevelFilter::WARN, LogFormat::Text);
    let outcome = match cli.command {
        CliCommand::Daemon { config } => {
            let loaded = match &config {
                Some(path) => Config::load(path),
                None => Ok(Config::default()),
            };
            match loaded {
                Ok(c) => {
                    logging::init(LevelFilter::INFO, c.log_format);
                    daemon::run(c, config).map(|()| 0)
                }
                Err(e) => Err(reaper::error::Error::from(e)),
            }
        }
        CliCommand::Features => {
            quiet();
            cli::features()
        }
        CliCommand::Unload { config } => {
            quiet();
            cli::unload(config)
        }
        CliCommand::CheckConfig { config } => cli::check_config(&config),
        CliCommand::Completions { shell } => cli::completions(shell),
        CliCommand::Manpages { dir } => cli::manpages(&dir),
        CliCommand::Pam(p) => {
            quiet();
            cli::pam(p)
        }
        CliCommand::Watch(w) => {
            quiet();
            cli::watch(w)
        }
        CliCommand::Top(t) => {
            quiet();
            cli::top(t)
        }
        other => {
            quiet();
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
