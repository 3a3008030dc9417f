//! The commands an operator's tooling calls rather than a person:
//! `check-config` (systemd's ExecStartPre, a config rollout), `completions`
//! and the man pages (the Debian package), all from the clap definitions
//! and the config loader the daemon itself uses.

use std::path::Path;

use clap::CommandFactory;

use super::Cli;
use crate::config::{effective, Config};
use crate::error::{Error, Result};

/// `reaper check-config`: the file loaded as `reaper daemon --config` loads
/// it, then every key in force printed. An error (naming the key) goes to
/// stderr through the caller, with exit status 1.
pub fn check_config(path: &Path) -> Result<i32> {
    let config = Config::load(path)?;
    print!("{}", effective(&config));
    Ok(0)
}

/// `reaper completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> Result<i32> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "reaper", &mut std::io::stdout());
    Ok(0)
}

/// Writes reaper(8) and a page per subcommand (reaper-grant(8), ...) into
/// `dir`: section 8, as a daemon run by root belongs there.
pub fn manpages(dir: &Path) -> Result<i32> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let mut command = Cli::command().name("reaper");
    command.build();
    let mut pages = vec![("reaper".to_owned(), command.clone())];
    for sub in command
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("reaper-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.8"));
        let mut text = Vec::new();
        clap_mangen::Man::new(page)
            .section("8")
            .render(&mut text)
            .map_err(Error::io(format!("rendering {name}(8)")))?;
        std::fs::write(&path, text).map_err(Error::io(format!("writing {}", path.display())))?;
    }
    Ok(0)
}
