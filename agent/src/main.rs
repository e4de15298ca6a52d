// SPDX-License-Identifier: Apache-2.0
//! The `metadata-guard` command: clap, then one library call per command.

use std::process::ExitCode;

use clap::Parser;
use metadata_guard::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.init_logging();
    match cli.dispatch() {
        Ok(code) => code,
        Err(e) => {
            metadata_guard::fatal(&e);
            ExitCode::FAILURE
        }
    }
}
