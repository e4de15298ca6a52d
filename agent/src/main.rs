//! The `metadata-guard` command: clap, then one library call per command.

use std::process::ExitCode;

use clap::Parser;
use metadata_guard::{cli, logging};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init(cli.log_format);
    match cli::dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            logging::fatal(&e);
            ExitCode::FAILURE
        }
    }
}
