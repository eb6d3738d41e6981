//! The `metalearn` binary: parses the command line, runs the command, and turns any error into a
//! message on stderr and a non-zero exit status.

use std::process::ExitCode;

use clap::Parser;
use metalearn::cli::{error_chain, run, Cli};

fn main() -> ExitCode {
    // Before any thread or tensor exists: second-order gradients on, thread count pinned.
    metalearn::runtime::init();
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let place = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error in metalearn{place}: {payload}; please report it with the \
             command line that caused it"
        );
    }));
    // Usage errors exit with status 2 and --help / --version with 0, as clap decides.
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
