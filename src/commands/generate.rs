//! `dropscan generate completions|man --out DIR` (hidden): the shell completions (clap_complete)
//! and man pages (clap_mangen) the `.deb` installs, generated from the command line definition
//! itself so they can never drift from it; `dropscan.toml(5)` is rendered from the example
//! configuration the package installs. `packaging/build-deb` runs it on the release binary
//! before `cargo deb`; cargo-deb compresses the man pages.

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{Cli, Generated};
use crate::error::EXIT_UNAVAILABLE;

/// The program name completions and man pages are written for.
const BIN: &str = "dropscan";

/// Writes `what` into `out`; prints each file written. Exit 0, or 69 with the failing path.
pub fn run(what: Generated, out: &Path) -> ExitCode {
    let written = match what {
        Generated::Completions => completions(out),
        Generated::Man => man_pages(out),
    };
    match written {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dropscan generate: {e:#}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// Bash, zsh and fish completions: `dropscan.bash`, `_dropscan`, `dropscan.fish`.
pub fn completions(out: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use anyhow::Context as _;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cmd = Cli::command();
    let mut files = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let file = clap_complete::generate_to(shell, &mut cmd, BIN, out).with_context(|| {
            format!(
                "cannot write the {shell} completions into {}",
                out.display()
            )
        })?;
        files.push(file);
    }
    Ok(files)
}

/// `dropscan.1` and one `dropscan-COMMAND.1` per visible subcommand (nested ones too, e.g.
/// `dropscan-quarantine-list.1`), each with the sections `--help` has no room for (exit
/// status, files, signals, environment, see also: `super::man`), and `dropscan.toml.5` from
/// the example configuration.
pub fn man_pages(out: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use anyhow::Context as _;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Building gives every subcommand its display name, `dropscan-run` and so on.
    cmd.build();
    let mut pending = vec![cmd];
    let mut files = Vec::new();
    while let Some(page) = pending.pop() {
        pending.extend(page.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let man = clap_mangen::Man::new(page)
            .manual("dropscan manual")
            .source(format!("dropscan {}", env!("CARGO_PKG_VERSION")));
        let name = man.get_filename();
        let file = out.join(&name);
        let mut text = Vec::new();
        man.render(&mut text)
            .with_context(|| format!("cannot render the man page {}", file.display()))?;
        let page = name.trim_end_matches(".1");
        let text = super::man::with_extra_sections(page, &String::from_utf8_lossy(&text));
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
        files.push(file);
    }
    let file = out.join("dropscan.toml.5");
    let text = super::man::config_page(env!("CARGO_PKG_VERSION"));
    std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    files.push(file);
    files.sort();
    Ok(files)
}
