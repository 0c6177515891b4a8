//! The `dropscan` binary: parse the command line, then hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use dropscan::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dropscan: cannot start the async runtime: {e}");
            return ExitCode::from(dropscan::error::EXIT_UNAVAILABLE);
        }
    };
    runtime.block_on(dropscan::commands::dispatch(cli.command))
}
