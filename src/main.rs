//! The `dropscan` binary: parse the command line, then hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use dropscan::cli::Cli;

fn main() -> ExitCode {
    // clap exits 2 on a usage error, which our commands use for "refused": 64 (EX_USAGE) instead.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            e.print().ok();
            let code = if e.use_stderr() {
                dropscan::error::EXIT_USAGE
            } else {
                0
            };
            return ExitCode::from(code);
        }
    };
    let runtime = match dropscan::runtime::build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dropscan: cannot start the async runtime: {e}");
            return ExitCode::from(dropscan::error::EXIT_UNAVAILABLE);
        }
    };
    let code = runtime.block_on(dropscan::commands::dispatch(cli.command));
    // Dropping the runtime would wait for every blocking call still running, for ever when one
    // waits on a share whose server hangs: the stages have stopped and the journal is written,
    // so what is left is ended with the process (as a kill would, which the journal survives).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
